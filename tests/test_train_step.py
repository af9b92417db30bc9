"""The train step with dropout and with packed rows: the dropout key across steps and a resume, and
a packed batch's loss and gradients against the same examples in separate padded rows.

Tiny models (one layer, d_model 32) so that each test costs a few small compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.runs import BASE, TINY, capture_grads, make_examples, read_metrics, tiny_run_config

from t5jax import checkpoint, data, model, trainer
from t5jax.config import get_config as get_model_config
from t5jax.train import train_and_evaluate
from t5jax.train_config import from_config_dict


@functools.cache
def _grad_step(dropout_rate: float):
  """(jitted train step that captures the gradients, initial state) of a tiny vocab-64 model."""
  cfg = get_model_config("t5-v1_1-small", vocab_size=64, **{**TINY, "dropout_rate": dropout_rate})
  tx = capture_grads()
  # every term of the loss: smoothing, z-loss, per-token weights
  loss_cfg = from_config_dict(BASE.get_config()).loss.replace(label_smoothing=0.1)
  assert loss_cfg.normalizer == "num_tokens" and loss_cfg.z_loss > 0
  schedule = optax.constant_schedule(0.0)
  step = jax.jit(trainer.make_train_step(cfg, tx, schedule, loss_cfg))
  state = trainer.create_train_state(model.init_params(cfg, jax.random.PRNGKey(0)), tx)
  return step, state


def test_dropout_key_changes_with_the_step_and_nothing_else():
  step, state = _grad_step(0.3)
  batch = data.pad_batch(make_examples([(6, 5), (4, 7), (9, 3), (5, 5)], seed=1), 10, 8)
  rng = jax.random.PRNGKey(7)

  def run(step_number, key=rng):
    _, m = step(state.replace(step=jnp.asarray(step_number, jnp.int32)), batch, key)
    return float(m["loss"])

  # Same step and key: the same masks (bit-identical), so a resumed run can redo a step exactly.
  assert run(3) == run(3)
  # Another step, or another key, draws other masks. A key that ignores the step (e.g. folded with
  # a constant) repeats one mask every step and fails here; the resume test in this file catches
  # a key that restarts with the process. Dropout 0.3 moves this loss by ~1e-2 between masks.
  assert len({run(0), run(1), run(2), run(3)}) == 4
  assert run(3) != run(3, jax.random.PRNGKey(8))


@pytest.mark.slow
def test_resume_with_dropout_equals_the_uninterrupted_run(tmp_path):
  # dropout_rate 0.3: the masks of steps 3-4 come from the resumed run's key. Bit-identical on
  # the same machine: same programs, same inputs, same keys.
  common = {"checkpoint_every": 2, "model.dropout_rate": 0.3, "async_checkpoints": False}
  whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
  train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=4, **common), whole)
  train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=2, **common), part)
  out = train_and_evaluate(tiny_run_config(tmp_path, num_train_steps=4, **common), part)
  assert out["step"] == 4
  keys = ("loss", "grad_norm", "accuracy", "num_tokens", "param_norm", "update_norm")
  rows_whole, rows_part = read_metrics(whole), read_metrics(part)
  assert [r["step"] for r in rows_whole] == [r["step"] for r in rows_part] == [1, 2, 3, 4]
  for a, b in zip(rows_whole, rows_part, strict=True):
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]
  _, p_whole = checkpoint.restore_params(whole, 4)
  _, p_part = checkpoint.restore_params(part, 4)
  jax.tree.map(np.testing.assert_array_equal, p_whole, p_part)
  # Dropout was on: a dropout-free run from the same start has other losses from step 1.
  off = str(tmp_path / "off")
  cfg_off = tiny_run_config(tmp_path, num_train_steps=1, **{**common, "model.dropout_rate": 0.0})
  train_and_evaluate(cfg_off, off)
  assert read_metrics(off)[0]["loss"] != rows_whole[0]["loss"]


# float32: the packed and the separate rows sum the same terms in other orders (softmax over other
# key lengths, per-row sums). Measured on CPU (jax 0.10, XLA -O0): loss, z-loss and accuracy equal
# to the bit; gradients differ by at most 6e-8 absolute, where the largest entries are ~0.2 and
# every parameter's largest is > 9e-3. atol 1e-6 leaves ~16x headroom and is still 10^4 below
# the gradients themselves.
PACK_TOL = dict(rtol=1e-6, atol=1e-6)


def test_packed_batch_has_the_loss_and_gradients_of_separate_rows():
  step, state = _grad_step(0.0)
  # Six examples of varied lengths: first-fit puts them in 3 rows of 16 / 12 tokens (2 per row),
  # or in 6 padded rows of their own. The normaliser is "num_tokens", the total number of target
  # tokens, which is the same for both layouts, so both the mean loss and its gradient must agree.
  examples = make_examples([(7, 5), (6, 6), (9, 4), (5, 7), (3, 8), (8, 3)], seed=2)
  packed, placement = data.pack_examples(examples, num_rows=3, input_length=16, target_length=12)
  assert sorted({p.row for p in placement}) == [0, 1, 2]
  assert max(p.segment_id for p in placement) == 2  # really packed: two segments in a row
  separate = data.pad_batch(examples, input_length=16, target_length=12)
  rng = jax.random.PRNGKey(0)
  s_packed, m_packed = step(state, packed, rng)
  s_sep, m_sep = step(state, separate, rng)
  assert float(m_packed["num_tokens"]) == float(m_sep["num_tokens"]) == 33.0
  np.testing.assert_allclose(m_packed["loss"], m_sep["loss"], **PACK_TOL)
  np.testing.assert_allclose(m_packed["z_loss"], m_sep["z_loss"], **PACK_TOL)
  np.testing.assert_allclose(m_packed["accuracy"], m_sep["accuracy"], **PACK_TOL)
  g_packed, g_sep = jax.device_get((s_packed.opt_state, s_sep.opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **PACK_TOL), g_packed, g_sep)
  # Non-trivial gradients in every parameter (a zero gradient would compare equal to anything).
  assert min(float(np.abs(g).max()) for g in jax.tree.leaves(g_sep)) > 1e-4
