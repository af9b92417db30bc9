"""The README's commands work as typed: every flag exists, and the demo's decode command runs.

`make demo` itself (about 5-9 minutes) is too slow for the suite; its two halves are covered by
tests/test_train_cli.py (train.py on a demo-shaped config) and by the decode command below, run
word for word from the README against a tiny model placed at `workdir/demo`.
"""

import functools
import os
import re
import shlex
import subprocess
import sys

from hf_utils_decoding import make_hf_model, save_hf_model

from t5jax.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = (
  "train.py",
  "decode.py",
  *(f"benchmarks/{n}" for n in sorted(os.listdir(os.path.join(ROOT, "benchmarks")))),
)
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][A-Za-z0-9_.]*)")


def _read(name):
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


def _bash_blocks():
  return re.findall(r"^```bash\n(.*?)^```", _read("README.md"), flags=re.S | re.M)


def _commands():
  """(script, text after the script name) for every README shell line that runs one of ours."""
  out = []
  for block in _bash_blocks():
    for line in block.replace("\\\n", " ").split("\n"):
      for m in re.finditer(r"\bpython3? ((?:benchmarks/)?\w+\.py)\b((?:(?! \| )[^\"#])*)", line):
        if m.group(1) in SCRIPTS:
          out.append((m.group(1), m.group(2)))
  return out


@functools.cache
def _help_flags(script):
  args = ["--helpfull"] if script == "train.py" else ["--help"]
  proc = subprocess.run(
    [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  return set(FLAG.findall(proc.stdout + proc.stderr))


def _config_field_exists(path):
  sys.path.insert(0, ROOT)
  try:
    from configs.base import get_config
  finally:
    sys.path.remove(ROOT)
  node = get_config()
  for key in path.split("."):
    if key not in node:
      return False
    node = node[key]
  return True


def test_readme_commands_name_real_scripts_and_flags():
  commands = _commands()
  scripts = {s for s, _ in commands}
  assert {"train.py", "decode.py", "benchmarks/train.py", "benchmarks/decode.py"} <= scripts
  bad = []
  for script, rest in commands:
    for flag in FLAG.findall(rest):
      if flag.startswith("config."):
        path = flag.split("=")[0][len("config.") :]
        if path.isupper():  # the synopsis placeholder --config.FIELD=VALUE
          continue
        if not _config_field_exists(path):
          bad.append(f"{script} --{flag}")
      elif flag not in _help_flags(script):
        bad.append(f"{script} --{flag}")
  assert not bad, f"README commands use flags their scripts do not define: {bad}"


def test_decode_synopsis_lists_every_flag():
  """The README's decode.py synopsis is complete: each flag of `decode.py --help` is in it."""
  synopsis = next(b for b in _bash_blocks() if b.startswith("python decode.py --checkpoint DIR"))
  missing = sorted(_help_flags("decode.py") - set(FLAG.findall(synopsis)) - {"help"})
  assert not missing, f"decode.py flags missing from the README synopsis: {missing}"


def test_makefile_demo_decodes_the_readme_prompts():
  readme = re.search(r"printf '([^']*)'", _read("README.md")).group(1)
  makefile = re.search(r"printf '([^']*)'", _read("Makefile")).group(1)
  assert readme == makefile


def test_readme_demo_decode_command_runs_as_typed(tmp_path):
  """The README's `$ printf ... | python decode.py --checkpoint workdir/demo`, word for word."""
  block = next(b for b in _bash_blocks() if b.startswith("$ printf"))
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
  # What `source .venv/bin/activate` does for the command: `python` is this environment's.
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  proc = subprocess.run(
    ["bash", "-c", "set -o pipefail; " + command],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  # A random tiny model's words differ from the demo's; one output line per prompt does not.
  prompts = shlex.split(command.split("|")[0])[1].encode().decode("unicode_escape").splitlines()
  outputs = proc.stdout.split("\n")  # not splitlines(): random bytes may hold \r, \x1c ...
  assert outputs[-1] == "" and len(outputs) - 1 == len(prompts) == len(expected)
