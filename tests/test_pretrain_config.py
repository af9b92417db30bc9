"""configs/pretrain_t5_v1_1_base.py: T5 1.1 base pretraining, built and (shrunk) run as documented.

The full config must build into a TrainConfig with the T5 1.1 settings; the same config with the
model, lengths and steps made tiny by the command-line overrides a user would type trains 3 steps
from a prepared text corpus, and refuses to start on raw text without a tokenizer.
"""

import gzip
import json
import os

import numpy as np
import pytest
from helpers.runs import TINY_MODEL_FLAGS, assert_quiet

from configs import pretrain_t5_v1_1_base
from t5jax import data, prepare
from t5jax.config import get_config
from t5jax.tokenizer import load_tokenizer
from t5jax.train_config import from_config_dict

SHRINK = [
  "--config.model.vocab_size=0",  # the tokenizer's size (byt5: 384)
  *TINY_MODEL_FLAGS,
  "--config.data.max_input_length=64",
  "--config.data.max_target_length=20",
  "--config.batch_size=4",
  "--config.num_train_steps=3",
  "--config.eval_every=3",
  "--config.checkpoint_every=3",
  "--config.log_every=1",
  "--config.progress_bar=False",
]


def test_the_config_builds_with_the_t5_1_1_settings():
  cfg = from_config_dict(pretrain_t5_v1_1_base.get_config())
  base = get_config("t5-v1_1-base").to_dict()
  model = {k: v for k, v in cfg.model.items() if k != "preset"}
  assert model == {**base, "dropout_rate": 0.0, "dtype": "bfloat16"}
  assert model["vocab_size"] == 32128 and model["d_model"] == 768 and model["num_layers"] == 12
  d = cfg.data
  assert (d.kind, d.noise_density, d.mean_noise_span_length, d.pack) == (
    "span_corruption",
    0.15,
    3.0,
    True,
  )
  assert (d.max_input_length, d.max_target_length) == (512, 114)
  # T5's 568-token raw chunks are what 512 / 114 hold after corruption.
  assert data.span_corruption_raw_length(512, 114, 0.15, 3.0) == 568
  o = cfg.optimizer
  assert (o.name, o.schedule, o.learning_rate, o.warmup_steps) == ("adafactor", "rsqrt", 1.0, 10000)
  assert (o.adafactor.decay_rate, o.adafactor.momentum, o.adafactor.clipping_threshold) == (
    0.8,
    0.0,
    1.0,
  )
  assert (cfg.loss.z_loss, cfg.loss.label_smoothing, cfg.batch_size) == (1e-4, 0.0, 128)
  assert d.spm_vocab_size == 0 and d.tokenizer == "" and d.train_file == ""


def _train(server, workdir, *flags):
  """train.py with the config and SHRINK, as a process of the fork server (tests/helpers)."""
  config = "--config=configs/pretrain_t5_v1_1_base.py"
  return server.run(config, f"--workdir={workdir}", *SHRINK, *flags)


@pytest.mark.slow
def test_the_shrunk_config_trains_3_steps_from_a_prepared_corpus(server, tmp_path):
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]
  docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for _ in range(120)]
  corpus = tmp_path / "corpus.txt.gz"
  with gzip.open(corpus, "wt") as f:
    f.write("\n".join(docs) + "\n")
  prepared = tmp_path / "prepared"
  argv = [f"--input={corpus}", f"--output={prepared}", "--kind=text", "--tokenizer=byt5"]
  assert prepare.main([*argv, "--quiet"]) == 0

  # Raw text and no tokenizer: refused before anything is written.
  refused = _train(server, tmp_path / "raw", f"--config.data.train_file={corpus}")
  lines = refused.stderr.strip().splitlines()
  assert refused.rc == 1 and len(lines) == 1, refused.stderr
  assert "no tokenizer: set --config.data.tokenizer" in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "raw" / "checkpoints")

  workdir = tmp_path / "wd"
  run = _train(
    server, workdir, f"--config.data.train_file={prepared}", f"--config.data.eval_file={prepared}"
  )
  assert run.rc == 0, run.stderr
  assert_quiet(run.stderr)
  rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in train)
  assert any(r["split"] == "eval" and np.isfinite(r["loss"]) for r in rows)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
  # The run used the prepared folder's tokenizer and the config's settings.
  assert (
    load_tokenizer(str(workdir / "tokenizer")).fingerprint() == load_tokenizer("byt5").fingerprint()
  )
