"""Tiny training runs: the model, the data, the run config (in-process and as train.py flags),
and reading back what a run wrote (checkpoint steps, metrics rows, event files, stderr)."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_base_config():
  spec = importlib.util.spec_from_file_location(
    "t5jax_configs_base", os.path.join(REPO, "configs", "base.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


BASE = _load_base_config()  # configs/base.py

# The tiny model of the training tests (one layer each side, d_model 32) ...
TINY = dict(
  d_model=32, d_kv=8, d_ff=64, num_heads=2, num_layers=1, num_decoder_layers=1, dropout_rate=0.0
)

# ... the same model as train.py flags ...
TINY_MODEL_FLAGS = [f"--config.model.{k}={v}" for k, v in TINY.items() if k != "dropout_rate"]

# ... and with batch 4, every step logged, no progress bar.
TINY_FLAGS = [
  *TINY_MODEL_FLAGS,
  "--config.batch_size=4",
  "--config.progress_bar=False",
  "--config.log_every=1",
]


def write_tsv(path, n: int, seed: int = 0) -> str:
  """`n` lines `w1 w2 ...<TAB>reversed words` of varied lengths."""
  rng = np.random.default_rng(seed)
  words = ["ab", "cd", "ef", "gh", "ij"]
  with open(path, "w") as fh:
    for _ in range(n):
      ws = list(rng.choice(words, size=int(rng.integers(1, 4))))
      fh.write(" ".join(ws) + "\t" + " ".join(reversed(ws)) + "\n")
  return str(path)


def set_fields(config, overrides: dict):
  """Sets dotted `overrides` ({"optimizer.name": "adamw"}) in a ConfigDict; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tsv_run_config(tmp_path):
  """configs/base.py on byte-level TSV data in `tmp_path` (40 rows, lengths 12), AdamW at a
  constant rate, batch 4, 4 steps, every step logged, a checkpoint every 2, no eval set."""
  c = BASE.get_config()
  c.data.kind = "tsv"
  c.data.tokenizer = "byt5"
  c.data.train_file = write_tsv(tmp_path / "train.tsv", 40)
  c.data.max_input_length = 12
  c.data.max_target_length = 12
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.batch_size = 4
  c.num_train_steps = 4
  c.log_every = 1
  c.eval_every = 1000
  c.checkpoint_every = 2
  c.progress_bar = False
  return c


def tiny_run_config(tmp_path, **overrides):
  """A whole-run config of the tiny model on TSV data in `tmp_path` (no eval set by default)."""
  c = tsv_run_config(tmp_path)
  c.model = BASE.model_section("t5-v1_1-small", vocab_size=0, **TINY)
  c.optimizer.learning_rate = 3e-3
  c.eval_generate_examples = 0
  return set_fields(c, overrides)


def capture_grads() -> optax.GradientTransformation:
  """An "optimizer" whose state becomes the step's (normalised) gradients and whose updates are 0,
  so that the train step itself hands back exactly the gradients it would apply."""

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(jnp.zeros_like, grads), grads

  return optax.GradientTransformation(init, update)


def make_examples(lengths, seed=0, vocab=64):
  """{"inputs", "targets"} examples with the given (input, target) lengths, EOS (1) last."""
  rng = np.random.default_rng(seed)
  out = []
  for n_in, n_tg in lengths:
    inp, tgt = rng.integers(2, vocab, n_in), rng.integers(2, vocab, n_tg)
    inp[-1] = tgt[-1] = 1
    out.append({"inputs": inp.astype(np.int32), "targets": tgt.astype(np.int32)})
  return out


def read_metrics(workdir, split="train"):
  """The rows of `workdir`'s metrics.jsonl of one split."""
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    rows = [json.loads(line) for line in fh if line.strip()]
  return [r for r in rows if r["split"] == split]


def train_rows(workdir):
  return read_metrics(workdir, "train")


def read_events(path) -> dict[str, list[tuple[int, float]]]:
  """Scalars of a TensorBoard event file, read back with TensorBoard's own loader."""
  from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

  out, events = {}, list(LegacyEventFileLoader(path).Load())
  assert events[0].file_version == "brain.Event:2"
  for ev in events[1:]:
    for v in ev.summary.value:
      out.setdefault(v.tag, []).append((ev.step, np.float32(v.simple_value)))
  return out


def steps(workdir, sub="checkpoints"):
  """The checkpoint steps listed under `workdir/sub`, sorted ([] if there is none)."""
  d = os.path.join(workdir, sub)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def snapshot(workdir):
  """Every file under workdir with its size and modification time."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.relpath(os.path.join(root, f), workdir)] = (st.st_size, st.st_mtime_ns)
  return out


def assert_quiet(stderr: str) -> None:
  """No tracebacks and no INFO lines (orbax logs every save at INFO); warnings may appear, e.g.
  orbax's "waiting for previous save" on a loaded machine with a checkpoint every 2 steps."""
  assert "Traceback" not in stderr, stderr
  assert not [line for line in stderr.splitlines() if re.match(r"I\d{4} ", line)], stderr
