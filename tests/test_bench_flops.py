"""Tests for benchmarks.flops: a hand count, and the matmuls jax actually lowers for the model."""

import math
import re

import jax
import jax.numpy as jnp
import pytest

import t5jax
from benchmarks import flops

_TINY = dict(d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2, num_decoder_layers=3)


def _tiny(preset="t5-v1_1-small", **kw):
  return t5jax.get_config(preset, vocab_size=320, dropout_rate=0.0, **{**_TINY, **kw})


def _dot_flops(stablehlo: str) -> int:
  """2 * output elements * contracted size, summed over every dot_general in the module text."""
  total = 0
  for line in stablehlo.splitlines():
    if "dot_general" not in line:
      continue
    contract = re.search(r"contracting_dims = \[([\d, ]*)\] x", line)
    sig = re.search(r": \(tensor<([^>]*)>, tensor<[^>]*>\) -> tensor<([^>]*)>", line)
    assert contract and sig, line
    lhs = [int(x) for x in sig.group(1).split("x")[:-1]]
    out = [int(x) for x in sig.group(2).split("x")[:-1]]
    dims = [int(x) for x in contract.group(1).split(",")]
    total += 2 * math.prod(out) * math.prod(lhs[i] for i in dims)
  return total


def _lowered_forward(config, b, s, t):
  params = jax.eval_shape(lambda: t5jax.init_params(config, jax.random.key(0)))
  enc = jax.ShapeDtypeStruct((b, s), jnp.int32)
  dec = jax.ShapeDtypeStruct((b, t), jnp.int32)
  return jax.jit(lambda p, e, d: t5jax.forward(p, config, e, d)).lower(params, enc, dec)


def test_hand_count():
  cfg = _tiny()
  b, s, t = 2, 24, 8
  d, a, f, v = 64, 64, 96, 320
  enc_layer = b * s * (2 * d * a * 4 + 2 * d * f * 3) + 2 * 2 * b * s * s * a
  dec_layer = (
    b * t * (2 * d * a * 4 + 2 * d * f * 3)  # self-attention projections, gated MLP
    + 2 * 2 * b * t * t * a  # self-attention scores and weighted values
    + b * t * 2 * d * a * 2  # cross-attention q, o
    + b * s * 2 * d * a * 2  # cross-attention k, v over the encoder output
    + 2 * 2 * b * t * s * a  # cross-attention scores and weighted values
  )
  expected = 2 * enc_layer + 3 * dec_layer + 2 * b * t * d * v
  assert flops.forward_flops(cfg, b, s, t) == expected
  assert flops.train_step_flops(cfg, b, s, t) == 3 * expected
  parts = flops.forward_flops_breakdown(cfg, b, s, t)
  assert parts["total"] == sum(x for k, x in parts.items() if k != "total")
  assert parts["output"] == 2 * b * t * d * v


@pytest.mark.parametrize(
  "preset,kw",
  [("t5-v1_1-small", {}), ("t5-small", {}), ("t5-v1_1-small", dict(num_decoder_layers=1))],
  ids=["gated-untied", "relu-tied", "shallow-decoder"],
)
def test_matches_lowered_matmuls(preset, kw):
  cfg = _tiny(preset, **kw)
  b, s, t = 3, 20, 12
  lowered = _lowered_forward(cfg, b, s, t)
  assert _dot_flops(lowered.as_text()) == flops.forward_flops(cfg, b, s, t)


def test_close_to_xla_cost_analysis():
  """XLA also counts elementwise work (norms, softmax, gelu); matmuls dominate at these sizes."""
  cfg = _tiny()
  b, s, t = 2, 32, 16
  cost = _lowered_forward(cfg, b, s, t).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  if not cost or "flops" not in cost:
    pytest.skip("this backend reports no cost analysis")
  ours = flops.forward_flops(cfg, b, s, t)
  assert ours <= cost["flops"] <= 1.1 * ours
