"""Tests of t5jax.trainer and t5jax.train: the step's maths, exact resumption, checkpoints, errors.

Everything runs in-process on a tiny model (one layer, d_model 32, ByT5 bytes) over TSV data made
in the test, so each `train_and_evaluate` call costs a couple of compilations and no tokenizer
training. The CLI's behaviour under signals and bad input is in test_train_cli.py.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest
from helpers.runs import BASE, TINY, read_events, read_metrics, tiny_run_config, write_tsv

from t5jax import checkpoint, data, hf, inference, model, sharding, trainer
from t5jax.config import get_config as get_model_config
from t5jax.sharding import MeshConfig
from t5jax.train import TrainingError, train_and_evaluate
from t5jax.train_config import AdamWConfig, OptimizerConfig, from_config_dict


def _batch(rng: np.random.Generator, lengths, s_len=10, t_len=8, vocab=64):
  """A text-to-text batch whose rows have the given target lengths (so rows weigh differently)."""
  b = len(lengths)
  enc = rng.integers(2, vocab, (b, s_len)).astype(np.int32)
  tgt = np.zeros((b, t_len), np.int32)
  for i, n in enumerate(lengths):
    tgt[i, :n] = rng.integers(2, vocab, n)
    tgt[i, n - 1] = 1
  dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
  return {
    "encoder_input_tokens": enc,
    "decoder_input_tokens": dec_in,
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": (tgt > 0).astype(np.float32),
  }


@functools.cache
def _step_setup(num_microbatches=1):
  """(jitted train step, fresh-state initialiser, mesh); cached so tests share compilations."""
  cfg = get_model_config("t5-v1_1-small", vocab_size=64, **TINY)
  # AdamW's first update is lr * g / (|g| + eps): with eps 1e-8, a gradient at rounding level moves
  # a weight by up to lr, so accumulated and whole-batch steps differed by 2.3e-6 in 1 of 512
  # weights on one install (bound 1e-6); eps 1e-4 keeps rounding out of the comparison.
  opt = OptimizerConfig(
    name="adamw",
    schedule="constant",
    learning_rate=1e-2,
    warmup_steps=0,
    adamw=AdamWConfig(eps=1e-4),
  )
  loss_cfg = from_config_dict(BASE.get_config()).loss
  mesh = sharding.create_mesh(MeshConfig())
  steps = trainer.build(cfg, opt, loss_cfg, mesh, num_microbatches=num_microbatches)
  return steps.train_step, lambda: steps.init_state(jax.random.PRNGKey(0)), mesh


@pytest.mark.slow
def test_loss_falls_on_a_repeated_batch():
  step, init, mesh = _step_setup()
  state = init()
  batch = sharding.shard_batch(_batch(np.random.default_rng(0), [8, 5, 3, 6]), mesh)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 25
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  assert set(metrics) >= {"loss", "accuracy", "grad_norm", "update_norm", "param_norm"}


@pytest.mark.slow
def test_accumulation_equals_the_large_batch():
  # Rows of very different lengths: averaging per microbatch (instead of normalising the summed
  # gradient once by all tokens) would weigh them differently and fail this test.
  batch_np = _batch(np.random.default_rng(1), [8, 7, 2, 1])
  out = {}
  for k in (1, 2):
    step, init, mesh = _step_setup(num_microbatches=k)
    state, metrics = step(init(), sharding.shard_batch(batch_np, mesh), jax.random.PRNGKey(0))
    out[k] = (jax.device_get(state.params), jax.device_get(metrics))
  (p1, m1), (p2, m2) = out[1], out[2]
  for key in ("loss", "grad_norm", "num_tokens", "accuracy"):
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)
  # ...and the step really changed the parameters.
  p0 = jax.device_get(_step_setup()[1]().params)
  assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0, p1))) > 1e-4


_EXACT = ("loss", "grad_norm", "accuracy", "num_tokens", "param_norm", "update_norm", "z_loss")


@pytest.mark.slow
def test_interrupted_run_reproduces_the_uninterrupted_one(tmp_path):
  eval_file = write_tsv(tmp_path / "eval.tsv", 6, seed=9)
  common = dict(checkpoint_every=2, eval_every=2, keep_checkpoints=3)
  common.update({"data.eval_file": eval_file, "best_metric": "loss", "best_mode": "max"})
  whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
  train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=8, **common), whole)
  train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=4, **common), part)
  assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["2", "4"]
  out = train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=8, **common), part)
  assert out["step"] == 8

  rows_whole, rows_part = read_metrics(whole), read_metrics(part)
  assert [r["step"] for r in rows_whole] == list(range(1, 9))
  assert [r["step"] for r in rows_part] == list(range(1, 9))
  for a, b in zip(rows_whole, rows_part, strict=True):
    assert {k: a[k] for k in _EXACT} == {k: b[k] for k in _EXACT}, a["step"]
  assert read_metrics(whole, "eval") == read_metrics(part, "eval")

  # The async save at step 4 of the uninterrupted run (taken while training went on, with the
  # state's buffers donated to the next step) holds exactly what the stopped run saved.
  s_whole, p_whole = checkpoint.restore_params(whole, 4)
  s_part, p_part = checkpoint.restore_params(part, 4)
  assert s_whole == s_part == 4
  jax.tree.map(np.testing.assert_array_equal, p_whole, p_part)

  # The saved data position continues with exactly the 5th batch of a fresh iterator.
  cfg = from_config_dict(tiny_run_config(tmp_path, **common))
  tok = data.build_tokenizer(cfg.data)
  fresh = data.make_datasets(cfg.data, tok, batch_size=cfg.batch_size, seed=cfg.seed).train
  batches = [next(fresh) for _ in range(5)]
  resumed = data.make_datasets(cfg.data, tok, batch_size=cfg.batch_size, seed=cfg.seed).train
  mgr = checkpoint.CheckpointManager(part, keep=3)
  resumed.set_state(mgr.restore_data_state(4)["0"])
  mgr.close()
  nxt = next(resumed)
  for k in batches[4]:
    np.testing.assert_array_equal(batches[4][k], nxt[k], err_msg=k)
  assert not np.array_equal(batches[3]["encoder_input_tokens"], nxt["encoder_input_tokens"])

  # Resuming with another optimizer is refused, and changes nothing.
  def mtimes(d):
    return {
      os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
      for r, _, fs in os.walk(d)
      for f in fs
    }

  before = mtimes(part)
  other = tiny_run_config(tmp_path, num_train_steps=10, **common, **{"optimizer.name": "adafactor"})
  with pytest.raises(TrainingError, match="cannot restore checkpoint 8 .* another optimizer"):
    train_and_evaluate(other, part)
  assert mtimes(part) == before

  # keep-last-K and best-by-metric (best_mode="max" on the eval loss: the worst, so that the
  # choice differs from "latest" whatever the loss curve does).
  mgr = checkpoint.CheckpointManager(whole, keep=3, best_metric="loss", best_mode="max")
  assert mgr.all_steps() == [4, 6, 8]
  evals = read_metrics(whole, "eval")
  assert [r["step"] for r in evals] == [2, 4, 6, 8]
  assert mgr.best_steps() == [max(evals, key=lambda r: r["loss"])["step"]]
  mgr.close()

  # TensorBoard has every logged scalar (float32), and the export equals the final checkpoint.
  (events,) = [n for n in os.listdir(whole) if n.startswith("events.out.tfevents")]
  scalars = read_events(os.path.join(whole, events))
  assert scalars["train/loss"] == [(r["step"], np.float32(r["loss"])) for r in rows_whole]
  assert [s for s, _ in scalars["eval/loss"]] == [2, 4, 6, 8]
  _, params = checkpoint.restore_params(whole)
  _, exported = hf.load_hf(os.path.join(whole, "export", "hf"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), params, exported)
  cfg_loaded, params_inf, tok_dir = inference.load_workdir(whole)
  assert cfg_loaded.d_model == 32 and os.path.isdir(tok_dir)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Constant schedule with a long warmup: step 1 runs at rate 0 (finite, checkpointed), step 2 at
  # 1e30/1000, which overflows the parameters (their norm is inf) -> stop before saving step 2.
  workdir = str(tmp_path / "wd")
  cfg = tiny_run_config(
    tmp_path,
    num_train_steps=6,
    checkpoint_every=1,
    async_checkpoints=False,
    **{"optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 1000},
  )
  kept = r"at step 2; stopping: the last good checkpoint \(step 1\)"
  with pytest.raises(TrainingError, match=kept):
    train_and_evaluate(cfg, workdir)
  mgr = checkpoint.CheckpointManager(workdir)
  assert mgr.all_steps() == [1]
  mgr.close()
  _, params = checkpoint.restore_params(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert not os.path.exists(os.path.join(workdir, "export"))


def test_bad_starts_leave_the_workdir_untouched(tmp_path):
  def listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)

  # Tokenizer larger than the model's vocabulary: nothing at all is written.
  workdir = tmp_path / "wd"
  cfg = tiny_run_config(tmp_path, **{"model.vocab_size": 128})
  with pytest.raises(TrainingError, match="tokenizer has 384 ids but config.model.vocab_size"):
    train_and_evaluate(cfg, str(workdir))
  assert listing(workdir) == []

  # A malformed eval file is found before the workdir is written to.
  bad = tmp_path / "bad.tsv"
  bad.write_text("a\tb\nno tab here\n")
  cfg = tiny_run_config(tmp_path, **{"data.eval_file": str(bad)})
  with pytest.raises(data.DataError, match=rf"{bad}:2: expected 2 tab-separated fields"):
    train_and_evaluate(cfg, str(workdir))
  assert listing(workdir) == []


def test_metric_rows_past_the_resumed_checkpoint_are_dropped(tmp_path):
  from t5jax.metrics import _drop_rows_after

  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "split": "train"} for s in (1, 2, 3, 4)] + [{"step": 2, "split": "eval"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  _drop_rows_after(str(path), 2)
  kept = [json.loads(line) for line in path.read_text().splitlines()]
  assert kept == [rows[0], rows[1], rows[4]]


def test_check_finite_names_the_step_and_what_is_kept():
  from t5jax.train import _check_finite

  ok = {"loss": 1.0, "grad_norm": 1.0, "update_norm": 1.0, "param_norm": 1.0}
  _check_finite(3, ok, None, "/w")
  with pytest.raises(TrainingError, match="loss is nan at step 7; .*no checkpoint"):
    _check_finite(7, {**ok, "loss": float("nan")}, None, "/w")
  with pytest.raises(TrainingError, match=r"param_norm is inf at step 9; .*\(step 8\)"):
    _check_finite(9, {**ok, "param_norm": float("inf")}, 8, "/w")


@pytest.mark.slow
def test_resume_accepts_a_new_attention_impl_and_refuses_a_new_architecture(tmp_path):
  """attention_impl changes how a step computes, not the parameters; d_ff changes the params."""
  workdir = str(tmp_path / "wd")
  train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=2), workdir)
  fused = tiny_run_config(tmp_path, num_train_steps=3, **{"model.attention_impl": "dot_product"})
  assert train_and_evaluate(fused, workdir)["step"] == 3
  wider = tiny_run_config(tmp_path, num_train_steps=4, **{"model.d_ff": 2 * TINY["d_ff"]})
  with pytest.raises(TrainingError, match="incompatible model config.*d_ff"):
    train_and_evaluate(wider, workdir)


def test_init_from_takes_the_folders_tokenizer_or_refuses(tmp_path):
  """A pretrained model's ids are its own tokenizer's: with no data.tokenizer, a run takes the
  init_from folder's, and a folder without one is an error naming the flag (a new SentencePiece
  model trained on the data would silently give the weights meaningless ids)."""
  from t5jax import train as train_lib
  from t5jax.tokenizer import train_sentencepiece

  folder = tmp_path / "hf"
  cfg = get_model_config("t5-v1_1-small", vocab_size=512, **TINY)
  hf.save_hf(cfg, model.init_params(cfg, jax.random.PRNGKey(0)), str(folder))
  base = {
    "init_from": str(folder),
    "model": {},
    "data": {"kind": "tsv", "train_file": write_tsv(tmp_path / "t.tsv", 20)},
  }
  with pytest.raises(TrainingError, match=r"holds no tokenizer .*--config.data.tokenizer"):
    train_lib._tokenizer_and_model(from_config_dict(base), str(tmp_path / "wd"))
  own = train_sentencepiece([f"word{i} more text {i}" for i in range(300)], 300, str(folder))
  tok, _, _ = train_lib._tokenizer_and_model(from_config_dict(base), str(tmp_path / "wd"))
  assert tok.fingerprint() == own.fingerprint()
