"""The blocked loss (`LossConfig.block_size`, `losses.blocked_loss_sums`) equals the loss over the
whole logits: sums and gradients with label smoothing, z-loss and zero weights, for block sizes
that do and do not divide the target length; the train step's loss and gradients (packed rows
included); and its backward pass never holds a `[B, T, V]` array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.runs import capture_grads, make_examples

from t5jax import data, losses, model, trainer
from t5jax.errors import ConfigError
from t5jax.train_config import LossConfig

# Float32 sums of the same per-token terms in blocks instead of at once. Measured on CPU
# (jax 0.10.2, 3 seeds x 4 block sizes): sums within 1.5e-7 relative, gradients within 4.8e-7
# absolute where entries reach ~7 (the output weight's gradient is summed over blocks). atol 5e-6
# and rtol 1e-5 leave 10x headroom.
TOL = dict(rtol=1e-5, atol=5e-6)
B, T, D, V = 3, 7, 16, 40


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)))
  weights = jnp.asarray(rng.integers(0, 3, (B, T)), jnp.float32)  # zeros and non-unit weights
  return h, w, targets, weights


def _project(w, h):
  return jnp.einsum("btd,dv->btv", h, w)


def _full_sums(h, w, targets, weights, **kw):
  _, aux = losses.compute_loss(_project(w, h), targets, weights, normalizer=1.0, **kw)
  return {k: aux[k] for k in ("loss_sum", "z_loss_sum", "num_correct", "num_tokens")}


def _blocked_sums(h, w, targets, weights, block_size, **kw):
  return losses.blocked_loss_sums(
    h, targets, weights, functools.partial(_project, w), block_size=block_size, **kw
  )


@pytest.mark.parametrize("block_size", [1, 3, T, 16])
def test_blocked_sums_and_gradients_equal_the_whole_logits(block_size):
  h, w, targets, weights = _inputs()
  kw = dict(label_smoothing=0.1, z_loss=1e-2)
  full = _full_sums(h, w, targets, weights, **kw)
  blocked = jax.jit(lambda h, w: _blocked_sums(h, w, targets, weights, block_size, **kw))(h, w)
  for k in full:
    np.testing.assert_allclose(blocked[k], full[k], **TOL, err_msg=k)
  assert float(full["z_loss_sum"]) > 0 and float(full["num_correct"]) > 0

  def grads(fn):
    return jax.grad(lambda h, w: fn(h, w)["loss_sum"], argnums=(0, 1))(h, w)

  g_full = grads(lambda h, w: _full_sums(h, w, targets, weights, **kw))
  g_blocked = jax.jit(
    lambda: grads(lambda h, w: _blocked_sums(h, w, targets, weights, block_size, **kw))
  )()
  for a, b in zip(g_blocked, g_full, strict=True):
    np.testing.assert_allclose(a, b, **TOL)
  # zero-weight positions have zero hidden-state gradient in both
  assert float(jnp.abs(g_blocked[0][weights == 0]).max()) == 0.0


def test_default_weights_are_nonpadding_targets():
  h, w, targets, _ = _inputs(1)
  full = _full_sums(h, w, targets, None)
  blocked = _blocked_sums(h, w, targets, None, 2)
  np.testing.assert_allclose(blocked["loss_sum"], full["loss_sum"], **TOL)
  assert float(blocked["num_tokens"]) == float(jnp.sum(targets != 0))


def test_block_size_is_validated():
  with pytest.raises(ConfigError, match="block_size"):
    LossConfig(block_size=-1)
  with pytest.raises(ValueError, match="block_size"):
    _blocked_sums(*_inputs(), 0)


# --- the train step --------------------------------------------------------------------------


@functools.cache
def _step(block_size: int):
  cfg = model.T5Config(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_heads=2,
    num_layers=1,
    num_decoder_layers=1,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=True,
    scale_decoder_outputs=True,
    dropout_rate=0.0,
  )  # fmt: skip  (tied and rescaled: the projection's scale is inside the blocks too)
  tx = capture_grads()
  loss_cfg = LossConfig(label_smoothing=0.1, z_loss=1e-4, block_size=block_size)
  step = jax.jit(trainer.make_train_step(cfg, tx, optax.constant_schedule(0.0), loss_cfg))
  state = trainer.create_train_state(model.init_params(cfg, jax.random.PRNGKey(0)), tx)
  return step, state


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_train_step_blocked_equals_whole_logits(packed):
  examples = make_examples([(7, 5), (6, 6), (9, 4), (5, 7), (3, 8), (8, 3)], seed=2)
  if packed:
    batch, _ = data.pack_examples(examples, num_rows=3, input_length=16, target_length=12)
  else:
    batch = data.pad_batch(examples, input_length=16, target_length=12)
  rng = jax.random.PRNGKey(0)
  s_full, m_full = _step(0)[0](_step(0)[1], batch, rng)
  s_blk, m_blk = _step(5)[0](_step(5)[1], batch, rng)  # 12 target positions: blocks 5, 5, 2
  for k in ("loss", "z_loss", "accuracy", "num_tokens"):
    np.testing.assert_allclose(m_blk[k], m_full[k], **TOL, err_msg=k)
  g_full, g_blk = jax.device_get((s_full.opt_state, s_blk.opt_state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), g_blk, g_full)
  assert min(float(np.abs(g).max()) for g in jax.tree.leaves(g_full)) > 1e-4


def _subjaxprs(p):
  if isinstance(p, list | tuple):
    for x in p:
      yield from _subjaxprs(x)
  elif hasattr(p, "eqns"):
    yield p
  elif hasattr(getattr(p, "jaxpr", None), "eqns"):
    yield p.jaxpr


def _shapes_in(jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value computed anywhere in a jaxpr (scan, remat, pjit bodies included)."""
  out = set()
  for eqn in jaxpr.eqns:
    out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
    for sub in _subjaxprs(list(eqn.params.values())):
      out |= _shapes_in(sub)
  return out


@pytest.mark.parametrize("block_size", [0, 4])
def test_no_whole_logits_in_the_gradient(block_size):
  cfg = model.T5Config(
    vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_layers=1, num_decoder_layers=1,
    dropout_rate=0.0,
  )  # fmt: skip
  params = model.init_params(cfg, jax.random.key(0))
  batch = {
    "encoder_input_tokens": jnp.ones((2, 6), jnp.int32),
    "decoder_input_tokens": jnp.ones((2, 8), jnp.int32),
    "decoder_target_tokens": jnp.ones((2, 8), jnp.int32),
  }
  loss_cfg = LossConfig(block_size=block_size)
  grad = jax.grad(lambda p: trainer._sums(p, cfg, batch, None, loss_cfg)[0])
  shapes = _shapes_in(jax.make_jaxpr(grad)(params).jaxpr)
  assert ((2, 8, 48) in shapes) == (block_size == 0)  # the whole logits exist only unblocked
  if block_size:
    assert (2, 4, 48) in shapes
