"""Tests for t5jax.losses against direct numpy formulas and jax.grad of a naive one-hot version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5jax import losses


def _numpy_loss(logits, targets, ls, z):
  """Reference: explicit soft-target distribution, entropy subtracted, z-loss added."""
  logits = logits.astype(np.float64)
  v = logits.shape[-1]
  m = logits.max(-1, keepdims=True)
  log_z = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  logp = logits - log_z[..., None]
  soft = np.full(logits.shape, ls / (v - 1))
  np.put_along_axis(soft, targets[..., None], 1.0 - ls, -1)
  ent = -np.sum(np.where(soft > 0, soft * np.log(np.where(soft > 0, soft, 1.0)), 0.0), -1)
  return -np.sum(soft * logp, -1) - ent + z * log_z**2, z * log_z**2


def _naive_jax_loss(logits, targets, weights, ls, z):
  v = logits.shape[-1]
  soft = jax.nn.one_hot(targets, v) * (1 - ls - ls / (v - 1)) + ls / (v - 1)
  logp = jax.nn.log_softmax(logits)
  log_z = jax.nn.logsumexp(logits, -1)
  ce = -jnp.sum(soft * logp, -1) + z * log_z**2
  return jnp.sum(ce * weights) / jnp.sum(weights)


def _data(b=3, t=5, v=11, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.3).astype(np.float32)
  weights[0, 0] = 1.0
  return logits, targets, weights


@pytest.mark.parametrize("ls,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-4), (0.2, 1e-2)])
def test_per_token_matches_numpy(ls, z):
  logits, targets, _ = _data()
  loss, zl = losses.cross_entropy_with_logits(
    jnp.asarray(logits), jnp.asarray(targets), label_smoothing=ls, z_loss=z
  )
  ref_loss, ref_z = _numpy_loss(logits, targets, ls, z)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(zl, ref_z, rtol=1e-5, atol=1e-7)


def test_smoothed_minimum_is_zero():
  v, ls = 7, 0.1
  c, low, _ = losses.smoothing_constants(ls, v)
  soft = np.full((1, 1, v), low)
  soft[0, 0, 3] = c
  loss, _ = losses.cross_entropy_with_logits(
    jnp.log(jnp.asarray(soft, jnp.float32)), jnp.array([[3]]), label_smoothing=ls
  )
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


@pytest.mark.parametrize("ls,z", [(0.0, 0.0), (0.1, 1e-3)])
def test_gradient_matches_naive(ls, z):
  logits, targets, weights = _data(seed=1)
  logits, targets, weights = map(jnp.asarray, (logits, targets, weights))

  def ours(x):
    return losses.compute_loss(x, targets, weights, label_smoothing=ls, z_loss=z)[0]

  g = jax.grad(ours)(logits)
  g_ref = jax.grad(_naive_jax_loss)(logits, targets, weights, ls, z)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
  # The naive version keeps the soft target's entropy; ours subtracts it (a constant).
  entropy = losses.smoothing_constants(ls, logits.shape[-1])[2]
  naive = _naive_jax_loss(logits, targets, weights, ls, z)
  np.testing.assert_allclose(ours(logits), naive - entropy, rtol=1e-6)


def test_normalizers_and_metrics():
  logits, targets, weights = _data(seed=2)
  ref, ref_z = _numpy_loss(logits, targets, 0.0, 1e-4)
  total = np.sum(ref * weights)
  args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))

  loss, aux = losses.compute_loss(*args, z_loss=1e-4, normalizer="num_tokens")
  np.testing.assert_allclose(loss, total / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(aux["z_loss"], np.sum(ref_z * weights) / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(aux["cross_entropy"], loss - aux["z_loss"], rtol=1e-6)
  np.testing.assert_allclose(aux["loss_sum"], total, rtol=1e-5)
  assert aux["num_tokens"] == weights.sum()
  acc = np.sum((logits.argmax(-1) == targets) * weights) / weights.sum()
  np.testing.assert_allclose(aux["accuracy"], acc, rtol=1e-6)

  for norm in ("constant:100", 100.0, 100):
    loss, _ = losses.compute_loss(*args, z_loss=1e-4, normalizer=norm)
    np.testing.assert_allclose(loss, total / 100.0, rtol=1e-5)
  loss, _ = losses.compute_loss(*args, z_loss=1e-4, normalizer="total_tokens")
  np.testing.assert_allclose(loss, total / weights.size, rtol=1e-5)

  w = weights.copy()
  w[1] = 0.0  # an all-padding row is left out of the per-sequence mean
  loss, _ = losses.compute_loss(*args[:2], jnp.asarray(w), z_loss=1e-4, normalizer="batch")
  rows = [np.sum(ref[i] * w[i]) / w[i].sum() for i in range(len(w)) if w[i].sum() > 0]
  np.testing.assert_allclose(loss, np.mean(rows), rtol=1e-5)

  with pytest.raises(ValueError):
    losses.compute_loss(*args, normalizer="bogus")


def test_default_weights_skip_padding():
  logits, targets, _ = _data(seed=3)
  targets[:, -2:] = 0
  loss_a, aux = losses.compute_loss(jnp.asarray(logits), jnp.asarray(targets))
  loss_b, _ = losses.compute_loss(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(targets != 0)
  )
  np.testing.assert_allclose(loss_a, loss_b)
  assert aux["num_tokens"] == np.sum(targets != 0)


def test_large_vocab_bf16_logits_stable():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(2, 3, 32128)) * 10, jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 32128, size=(2, 3)))
  loss, _ = losses.cross_entropy_with_logits(logits, targets, label_smoothing=0.1, z_loss=1e-4)
  ref, _ = _numpy_loss(np.asarray(logits.astype(jnp.float32)), np.asarray(targets), 0.1, 1e-4)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref, rtol=1e-4)
