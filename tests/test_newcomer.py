"""Issue 24's newcomer path: what the documentation names works after a bare `import t5jax`, and
a `save_hf` folder reloads in transformers with no warning of ours.

The names are checked in a fresh interpreter: in the test process other tests have imported the
submodules already, which would hide a package that does not expose them.
"""

import glob
import json
import logging
import os
import re
import subprocess
import sys

import jax
import torch
import transformers
from helpers.hf_models import make_hf_model

import t5jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
DOTTED = re.compile(r"(?<![\w/.])t5jax(?:\.[A-Za-z_]\w*)+")
IMPORT = re.compile(
  r"^\s*((?:from t5jax[\w.]* import [\w, ()]+)|(?:import t5jax[\w.]*(?: as \w+)?))"
)


def _documented():
  """Every dotted `t5jax.x.y` name and every `import` / `from t5jax... import` line of a
  ```python block, with the file it is in."""
  names, imports = {}, {}
  for doc in DOCS:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
      text = f.read()
    for name in DOTTED.findall(text):
      names.setdefault(name, doc)
    for block in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
      for line in block.splitlines():
        m = IMPORT.match(line)
        if m:
          imports.setdefault(m.group(1).strip(), doc)
  return names, imports


_CHECK = """
import json, sys
names, imports = json.loads(sys.argv[1])
import t5jax
bad = []
for line, doc in imports.items():
  try:
    exec(line, {})
  except Exception as e:
    bad.append(f"{doc}: {line!r}: {type(e).__name__}: {e}")
for name, doc in names.items():
  obj = t5jax
  for part in name.split(".")[1:]:
    try:
      obj = getattr(obj, part)
    except AttributeError as e:
      bad.append(f"{doc}: {name}: {e}")
      break
print(json.dumps(bad))
"""


def test_every_documented_name_resolves_after_import_t5jax():
  names, imports = _documented()
  # The README's own newcomer path (issue 24), whatever the docs say today.
  for name in ("t5jax.inference.load", "t5jax.inference.generate_all", "t5jax.check_token_ids"):
    names.setdefault(name, "issue 24")
  names.setdefault("t5jax.tokenizer.load_tokenizer", "issue 24")
  proc = subprocess.run(
    [sys.executable, "-c", _CHECK, json.dumps([names, imports])],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_the_package_lists_its_modules_and_refuses_unknown_names():
  assert {"inference", "tokenizer", "train", "checkpoint"} <= set(dir(t5jax))
  try:
    t5jax.no_such_module  # noqa: B018
  except AttributeError as e:
    assert "no attribute 'no_such_module'" in str(e)
  else:
    raise AssertionError("t5jax.no_such_module resolved")


class _Records(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def _reload_messages(folder):
  """transformers' warnings (logging and `warnings`) while it loads `folder`, and the model."""
  import warnings

  handler, logger = _Records(), logging.getLogger("transformers")
  logger.addHandler(handler)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder)
  finally:
    logger.removeHandler(handler)
  return handler.messages + [str(w.message) for w in caught], model


def test_save_hf_reloads_in_transformers_without_a_warning_of_ours(tmp_path):
  """A tied T5 1.0 folder reloads silently. An untied one (T5 1.1, flan) draws exactly the notice
  transformers 5.x gives every untied T5 (its T5Config forces tie_word_embeddings=True, so no
  config.json can say otherwise; the notice says it keeps lm_head apart, which is right), the
  same notice as for transformers' own save_pretrained of that model."""
  base = dict(vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=1)
  base.update(num_decoder_layers=1, dropout_rate=0.0)
  tied = t5jax.T5Config(feed_forward_proj="relu", **base)
  untied = t5jax.T5Config(
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False, **base
  )
  for name, config in (("tied", tied), ("untied", untied)):
    t5jax.save_hf(config, t5jax.init_params(config, jax.random.PRNGKey(0)), str(tmp_path / name))
  messages, _ = _reload_messages(str(tmp_path / "tied"))
  assert messages == []
  ours, model = _reload_messages(str(tmp_path / "untied"))
  assert not torch.equal(model.lm_head.weight, model.shared.weight)  # kept apart, as saved
  hf_model = make_hf_model("t5_untied_gated")
  hf_model.save_pretrained(tmp_path / "hf_untied")
  theirs, _ = _reload_messages(str(tmp_path / "hf_untied"))
  assert len(ours) == 1 and ours == theirs, (ours, theirs)
  with open(tmp_path / "untied" / "config.json") as f:
    assert json.load(f)["tie_word_embeddings"] is False  # what 4.x reads as "untied"
