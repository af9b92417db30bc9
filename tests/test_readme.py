"""README.md and docs/*.md say what the code does: commands run as typed, names exist.

- Every shell line in a ```bash block that runs one of our scripts (train.py, decode.py,
  `python -m benchmarks.X`) uses flags the script defines, and every `--config.X` named anywhere
  (prose included) is a field of the run config. Benchmarks are run as modules, never as files.
  docs/training.md and docs/decoding.md name only their script's flags; decode.py's synopsis in
  docs/decoding.md lists every flag it has.
- Every field of the typed configs (run, model, decoding) is documented somewhere in docs/.
- Links, repository paths and `t5jax.x.y` names in the docs resolve; docs/architecture.md's
  import table is the code's (and no test file imports another, as it says); `--help` of both
  scripts ends by pointing to its page.
- The README's library quick-start runs as typed on a tiny model, and the demo's decode command
  runs word for word against a tiny model placed at `workdir/demo` (`make demo` itself, about
  5-8 minutes, is too slow for the suite; its training half is tests/test_train_cli.py's).
- No tracked file names an absolute path of a developer's machine.
"""

import ast
import contextlib
import dataclasses
import functools
import importlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from unittest import mock

import pytest
from helpers.hf_models import make_hf_model, save_hf_model

import t5jax
from t5jax import sharding, train_config
from t5jax.generate import GenerateConfig
from t5jax.tokenizer import ByteTokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
  "train.py",
  "decode.py",
  *(f"benchmarks/{n}" for n in sorted(os.listdir(os.path.join(ROOT, "benchmarks")))),
)
DOCS = (
  "README.md",
  *sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")),
)
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][A-Za-z0-9_.]*)")
CONFIG_FLAG = re.compile(r"(?<![\w-])--config\.([A-Za-z_][\w.]*)")


def _read(name):
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


def _blocks(name, lang="bash"):
  return re.findall(rf"^```{lang}\n(.*?)^```", _read(name), flags=re.S | re.M)


def _prose(name):
  """The text outside fenced code blocks."""
  return re.sub(r"^```.*?^```", "", _read(name), flags=re.S | re.M)


def _commands(name):
  """(script, text after the script name) for every shell line of `name` that runs one of ours:
  lines of ```bash blocks and `python ...` code spans in the prose (the README's table)."""
  out = []
  spans = re.findall(r"`(python3? [^`\n]+)`", _prose(name))
  for block in [*_blocks(name), *spans]:
    for line in block.replace("\\\n", " ").split("\n"):
      for m in re.finditer(r"\bpython3? (\w+\.py|-m benchmarks\.\w+)\b((?:(?! \| )[^\"#])*)", line):
        script = re.sub(r"^-m benchmarks\.(\w+)$", r"benchmarks/\1.py", m.group(1))
        if script in SCRIPTS:
          out.append((script, m.group(2)))
  return out


@functools.cache
def _help(script, flag="--help"):
  """What `python SCRIPT --help` prints (a benchmark runs as a module, `python -m benchmarks.X`),
  run in this process (a fresh interpreter per script cost ~2 s each); the environment is put
  back after it."""
  bench = re.fullmatch(r"benchmarks/(\w+)\.py", script)
  out, env = io.StringIO(), dict(os.environ)
  with mock.patch.object(sys, "argv", [script, flag]), contextlib.redirect_stdout(out):
    with contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
      try:
        if bench:
          # As `python -m` runs it: not the copy a test may have imported (runpy warns of that).
          name = f"benchmarks.{bench.group(1)}"
          imported = sys.modules.pop(name, None)
          try:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
          finally:
            if imported is not None:
              sys.modules[name] = imported
        else:
          runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
      finally:
        os.environ.clear()
        os.environ.update(env)
  return out.getvalue()


@functools.cache
def _help_flags(script):
  if script == "train.py":  # absl's own help flags are listed as --[no]help...
    return set(FLAG.findall(_help(script, "--helpfull"))) | {"help", "helpfull", "helpshort"}
  return set(FLAG.findall(_help(script)))


@functools.cache
def _base_config():
  sys.path.insert(0, ROOT)
  try:
    from configs.base import get_config
  finally:
    sys.path.remove(ROOT)
  return get_config()


def _config_field_exists(path):
  parts = path.split(".")
  if (
    parts[:2] == ["data", "tasks"] and len(parts) == 4
  ):  # a mixture task's field (configs/mixture.py)
    from t5jax.train_config import TaskConfig

    return parts[3] in {f.name for f in dataclasses.fields(TaskConfig)}
  node = _base_config()
  for key in path.split("."):
    if not hasattr(node, "keys") or key not in node:
      return False
    node = node[key]
  return True


def test_commands_name_real_scripts_and_flags():
  scripts = {s for s, _ in _commands("README.md")}
  assert {"train.py", "decode.py", "benchmarks/train.py", "benchmarks/decode.py"} <= scripts
  bad = []
  for name in DOCS:
    for script, rest in _commands(name):
      for flag in FLAG.findall(rest):
        if flag.startswith("config."):
          continue  # test_config_fields_named_in_docs_exist
        if flag not in _help_flags(script):
          bad.append(f"{name}: {script} --{flag}")
  assert not bad, f"commands use flags their scripts do not define: {bad}"


def test_benchmarks_are_run_as_modules():
  """`python benchmarks/X.py` fails at its first import (`from benchmarks import ...`)."""
  bad = [
    f"{name}: {m}"
    for name in (*DOCS, *SCRIPTS)
    for m in re.findall(r"\bpython3? benchmarks/\w+\.py", _read(name))
  ]
  assert not bad, f"write `python -m benchmarks.X` instead: {bad}"


def test_config_fields_named_in_docs_exist():
  """Every `--config.X[=...]`, in commands and prose alike."""
  bad = []
  for name in DOCS:
    for path in CONFIG_FLAG.findall(_read(name)):
      path = path.rstrip(".")
      if path.isupper() or path.split(".")[-1] == "X":  # placeholders: FIELD=VALUE, config.X
        continue
      if not _config_field_exists(path):
        bad.append(f"{name}: --config.{path}")
  assert not bad, f"the docs name config fields that do not exist: {bad}"


def test_script_pages_name_only_their_scripts_flags():
  """The flags in docs/training.md's prose are train.py's, in docs/decoding.md's decode.py's,
  unless the code span names the other script (`decode.py --checkpoint W`)."""
  bad = []
  for page, own in (("docs/training.md", "train.py"), ("docs/decoding.md", "decode.py")):
    for span in re.findall(r"`([^`\n]+)`", _prose(page)):
      script = next((s for s in ("train.py", "decode.py") if s in span), own)
      for flag in FLAG.findall(span):
        if not flag.startswith("config.") and flag not in _help_flags(script):
          bad.append(f"{page}: {script} --{flag}")
  assert not bad, f"flags the page's script does not define: {bad}"


def test_decode_synopsis_lists_every_flag():
  """docs/decoding.md's decode.py synopsis is complete: each flag of `decode.py --help` is in it."""
  synopsis = next(
    b for b in _blocks("docs/decoding.md") if b.startswith("python decode.py --checkpoint DIR")
  )
  missing = sorted(_help_flags("decode.py") - set(FLAG.findall(synopsis)) - {"help"})
  assert not missing, f"decode.py flags missing from the docs/decoding.md synopsis: {missing}"


def test_every_config_field_is_documented():
  """Each field of the run config's sections, T5Config and GenerateConfig is named in docs/."""
  text = "\n".join(_read(n) for n in DOCS if n.startswith("docs/"))
  spans = " ".join(re.findall(r"`([^`\n]+)`", text))
  classes = [
    train_config.TrainConfig,
    train_config.DataConfig,
    train_config.OptimizerConfig,
    train_config.AdafactorConfig,
    train_config.AdamWConfig,
    train_config.LossConfig,
    sharding.MeshConfig,
    train_config.LoraConfig,
    train_config.PromptConfig,
    t5jax.T5Config,
    GenerateConfig,
  ]
  missing = [
    f"{cls.__name__}.{f.name}"
    for cls in classes
    for f in dataclasses.fields(cls)
    if not re.search(rf"(?<![\w]){f.name}(?![\w])", spans)
  ]
  assert not missing, f"fields documented nowhere in docs/*.md (in backticks): {missing}"


def test_links_and_repository_paths_exist():
  bad = []
  for name in DOCS:
    text = _read(name)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
      if "://" not in target and not os.path.exists(
        os.path.join(ROOT, os.path.dirname(name), target)
      ):
        bad.append(f"{name}: link {target}")
    for path in re.findall(
      r"(?<![\w/.])((?:tests|benchmarks|configs|t5jax|docs)/[\w/-]+\.\w+)", text
    ):
      if not os.path.exists(os.path.join(ROOT, path)):
        bad.append(f"{name}: {path}")
  assert not bad, f"links or paths that do not exist: {bad}"


def _resolves(dotted):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      if not hasattr(obj, attr):
        return False
      obj = getattr(obj, attr)
    return True
  return False


def test_dotted_names_exist():
  """Every `t5jax.module.name` the docs write in backticks is importable."""
  bad = []
  for name in DOCS:
    for span in re.findall(r"`([^`\n]+)`", _read(name)):
      for dotted in re.findall(r"(?<![\w.])t5jax(?:\.\w+)+", span):
        if not _resolves(dotted):
          bad.append(f"{name}: {dotted}")
  assert not bad, f"names that do not exist: {bad}"


def _t5jax_imports(path):
  """The t5jax modules a file imports, anywhere in it (function-level imports included)."""
  modules = {os.path.splitext(n)[0] for n in os.listdir(os.path.join(ROOT, "t5jax"))}
  found = set()
  for node in ast.walk(ast.parse(_read(path))):
    if isinstance(node, ast.ImportFrom) and node.module == "t5jax":
      found |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("t5jax."):
      found.add(node.module.split(".")[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("t5jax.")}
  return found - {os.path.splitext(os.path.basename(path))[0]}


def test_architecture_import_table_is_the_codes():
  section = _read("docs/architecture.md").split("## Import direction", 1)[1].split("\n## ", 1)[0]
  documented = {}
  for row in re.findall(r"^\| (`.*?) \| (.*?) \|$", section, flags=re.M):
    deps = set(re.findall(r"`(\w+)`", row[1]))
    for module in re.findall(r"`(\w+)`", row[0]):
      documented[module] = deps
  actual = {
    os.path.splitext(n)[0]: _t5jax_imports(f"t5jax/{n}")
    for n in os.listdir(os.path.join(ROOT, "t5jax"))
    if n.endswith(".py")
  }
  missing = sorted(set(actual) - set(documented))
  assert not missing, (
    f"add rows for t5jax modules to docs/architecture.md's import table: {missing}"
  )
  wrong = {m: sorted(actual[m]) for m in actual if actual[m] != documented[m]}
  assert not wrong, f"docs/architecture.md's import table differs from the code: {wrong}"
  assert not set(documented) - set(actual), "the import table names modules that do not exist"


def test_no_test_module_imports_another():
  """docs/architecture.md: what the tests share is in tests/helpers/; no test file imports one."""
  tests = os.path.join(ROOT, "tests")
  names = {n[:-3] for n in os.listdir(tests) if n.startswith("test_") and n.endswith(".py")}
  found = []
  for folder, _, files in os.walk(tests):
    for n in sorted(f for f in files if f.endswith(".py")):
      path = os.path.relpath(os.path.join(folder, n), ROOT)
      for node in ast.walk(ast.parse(_read(path))):
        if isinstance(node, ast.Import):
          imported = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
          imported = [node.module or ""]
        else:
          continue
        found += [f"{path}:{node.lineno}" for m in imported if m.split(".")[0] in names]
  assert not found, f"test modules imported from other test files (move to tests/helpers/): {found}"


def test_help_ends_by_pointing_to_the_docs():
  for script, page in (("train.py", "docs/training.md"), ("decode.py", "docs/decoding.md")):
    for flag in ("--help", "--helpfull") if script == "train.py" else ("--help",):
      last = _help(script, flag).rstrip().splitlines()[-1]
      assert page in last, f"{script} {flag} ends with {last!r}, not a pointer to {page}"
    assert os.path.isfile(os.path.join(ROOT, page))


def test_python_blocks_compile():
  for name in DOCS:
    for i, block in enumerate(_blocks(name, "python")):
      compile(block, f"{name} python block {i + 1}", "exec")


@pytest.mark.slow
def test_readme_library_quick_start_runs_as_typed(tmp_path):
  """The README's first Python block, word for word, on a tiny model at its path."""
  block = _blocks("README.md", "python")[0]
  folder = re.search(r'load_hf\("([^"]+)"\)', block).group(1)
  config = t5jax.get_config(
    "t5-v1_1-small", vocab_size=2048, d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=1,
    num_decoder_layers=1,
  )  # fmt: skip
  import jax

  t5jax.save_hf(config, t5jax.init_params(config, jax.random.key(0)), str(tmp_path / folder))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  proc = subprocess.run(
    [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
    timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "out" / "config.json").is_file()  # what its save_hf line writes


def _env():
  """What `source .venv/bin/activate` does for a command: `python` is this environment's."""
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


@pytest.mark.slow
def test_readme_fine_tune_and_decode_commands_run_as_typed(tmp_path):
  """The README's "Training on your own data" block, word for word, on a tiny HuggingFace
  folder at its path and TSV files at theirs; only more overrides are appended to the train
  command (2 steps, a small eval) so that it fits the suite."""
  section = _read("README.md").split("## Training on your own data", 1)[1]
  block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
  train_cmd, decode_cmd = block.replace("\\\n", " ").strip().split("\n")
  words = shlex.split(train_cmd)
  folder = next(w.split("=", 1)[1] for w in words if w.startswith("--config.init_from="))
  train_file = next(w.split("=", 1)[1] for w in words if w.startswith("--config.data.train_file="))
  eval_file = next(w.split("=", 1)[1] for w in words if w.startswith("--config.data.eval_file="))
  rows = [(f"question {i}: {i} plus {i}", f"answer {2 * i}") for i in range(24)]
  for name in (train_file, eval_file):
    lines = ["inputs\ttargets", *(f"{a}\t{b}" for a, b in rows)]
    (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
  train_sentencepiece([a + " " + b for a, b in rows] * 4, 300, str(tmp_path / folder))
  config = t5jax.get_config(
    "t5-v1_1-small", vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=1,
    num_decoder_layers=1,
  )  # fmt: skip
  import jax

  t5jax.save_hf(config, t5jax.init_params(config, jax.random.key(0)), str(tmp_path / folder))
  for script in ("decode.py", "train.py", "configs"):
    os.symlink(os.path.join(ROOT, script), tmp_path / script)
  quick = (
    " --config.num_train_steps=2 --config.eval_every=2 --config.checkpoint_every=2"
    " --config.log_every=1 --config.eval_generate_examples=4 --config.eval_batch_size=4"
  )
  for command in (train_cmd + quick, decode_cmd + " --max_new_tokens 4 --no_progress"):
    proc = subprocess.run(
      ["bash", "-c", command], cwd=tmp_path, env=_env(), capture_output=True, text=True,
      timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
  assert len(proc.stdout.split("\n")) - 1 == len(rows)  # one output line per dev row
  assert (tmp_path / "workdir" / "ft" / "export" / "hf" / "config.json").is_file()


def test_makefile_demo_decodes_the_readme_prompts():
  readme = re.search(r"printf '([^']*)'", _read("README.md")).group(1)
  makefile = re.search(r"printf '([^']*)'", _read("Makefile")).group(1)
  assert readme == makefile


def test_readme_demo_decode_command_runs_as_typed(tmp_path):
  """The README's `$ printf ... | python decode.py --checkpoint workdir/demo`, word for word."""
  block = next(b for b in _blocks("README.md") if b.startswith("$ printf"))
  lines = block.splitlines()
  n = 1
  while lines[n - 1].endswith("\\"):  # the command's continuation lines
    n += 1
  command = " ".join(line.rstrip("\\") for line in lines[:n])[2:]
  expected = [line for line in lines[n:] if line]
  os.makedirs(tmp_path / "workdir")
  folder = str(tmp_path / "workdir" / "demo")
  save_hf_model(make_hf_model("v1_1", seed=3, vocab_size=512, eos_swap=None), folder)
  ByteTokenizer().save(folder)
  for script in ("decode.py", "train.py"):
    os.symlink(os.path.join(ROOT, script), tmp_path / script)
  proc = subprocess.run(
    ["bash", "-c", "set -o pipefail; " + command],
    cwd=tmp_path,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  # A random tiny model's words differ from the demo's; one output line per prompt does not.
  prompts = shlex.split(command.split("|")[0])[1].encode().decode("unicode_escape").splitlines()
  outputs = proc.stdout.split("\n")  # not splitlines(): random bytes may hold \r, \x1c ...
  assert outputs[-1] == "" and len(outputs) - 1 == len(prompts) == len(expected)


# --- absolute paths of a developer's machine ----------------------------------------------------

# Home folders, one machine's work trees and tool-made temporary folders. Written so that this
# file does not match itself. Paths that mean the same on every machine (/dev/null, /etc/...,
# /tmp/<name>) or that an example invents on a cluster (/shared/..., /mnt/...) are fine.
MACHINE_PATH = re.compile(
  r"(?<![\w.$~-])(?:/(?:work|root|Users)/"
  r"|/home/[A-Za-z0-9._-]+/"
  r"|/tmp/(?:bash_jobs|pytest-of-)"
  r"|/private/var/(?:folders)/)"
  r"|\b[A-Za-z]:\\Users\\"
)


def machine_paths(root):
  """`file:line: text` for each line of a git-tracked text file under `root` naming one."""
  files = (
    subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
    .stdout.decode()
    .split("\0")
  )
  hits = []
  for name in filter(None, files):
    try:
      with open(os.path.join(root, name), encoding="utf-8") as f:
        lines = f.read().splitlines()
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
      continue  # binary files, submodules, files deleted but not yet staged
    hits += [
      f"{name}:{i}: {line.strip()}" for i, line in enumerate(lines, 1) if MACHINE_PATH.search(line)
    ]
  return hits


def test_no_tracked_file_names_a_developers_machine_path():
  hits = machine_paths(ROOT)
  assert not hits, "absolute paths of a developer's machine in tracked files:\n" + "\n".join(hits)


def test_machine_path_check_catches_a_planted_path(tmp_path):
  join = os.path.join
  planted = [
    join("/", "work", "main", ".venv", "bin", "activate"),
    join("/", "home", "alice", "t5jax", "README.md"),
    join("/", "root", ".cache", "jax"),
    join("/", "Users", "bob", "src"),
    join("/", "tmp", "bash_jobs.1000", "3", "stdout"),
    "C:" + "\\" + join("Users", "bob").replace("/", "\\") + "\\t5jax",
  ]
  fine = ["/dev/null", "/etc/hosts", "/shared/runs/t5-xl", "/mnt/shared/run", "/tmp/xla_dump",
          "~/work/t5", "docs/work/x", "https://example.com/Users/x", "$HOME/work/x"]  # fmt: skip
  subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, timeout=60)
  (tmp_path / "fine.md").write_text("\n".join(fine) + "\n")
  (tmp_path / "planted.md").write_text("ok\n" + "\n".join(f"see {p} here" for p in planted))
  (tmp_path / "untracked.md").write_text(planted[0])
  subprocess.run(["git", "add", "fine.md", "planted.md"], cwd=tmp_path, check=True, timeout=60)
  hits = machine_paths(str(tmp_path))
  assert [h.split(": ", 1)[0] for h in hits] == [f"planted.md:{i}" for i in range(2, 8)], hits
