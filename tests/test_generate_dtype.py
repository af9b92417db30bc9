"""Decoding in the compute dtype: parameters are cast once before the `while_loop`, so its body
converts no parameter-shaped array, and the generated tokens and scores are those of the per-step
conversion (float32 and bfloat16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5jax
from t5jax import decoding, model
from t5jax.generate import compute_dtype_params

# d_model 24, heads 3 x 8, d_ff 40, vocab 56, 2 rows x 3 beams: no activation shares a parameter's
# shape, so a parameter-shaped conversion in the loop can only be a weight's.
CFG = t5jax.T5Config(
  vocab_size=56, d_model=24, d_kv=8, d_ff=40, num_heads=3, num_layers=1, num_decoder_layers=2,
  feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
  dropout_rate=0.0,
)  # fmt: skip
ENC = jnp.asarray([[5, 9, 13, 1, 0, 0], [7, 3, 22, 31, 8, 1]], jnp.int32)


def _params():
  return model.init_params(CFG, jax.random.key(0))


def _eqns(jaxpr):
  """Every equation of a jaxpr, nested bodies (pjit, while, cond, scan) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in p if isinstance(p, list | tuple) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _converts_in_loop(cfg, params, method):
  fn = lambda p, t: t5jax.generate(p, cfg, t, method=method, max_new_tokens=4).sequences  # noqa: E731
  jaxpr = jax.make_jaxpr(fn)(params, ENC).jaxpr
  loops = [e for e in _eqns(jaxpr) if e.primitive.name == "while"]
  assert loops
  shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
  return [
    (tuple(e.invars[0].aval.shape), e.invars[0].aval.dtype, e.params["new_dtype"])
    for loop in loops
    for e in _eqns(loop.params["body_jaxpr"].jaxpr)
    if e.primitive.name == "convert_element_type" and tuple(e.invars[0].aval.shape) in shapes
  ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_no_weight_conversion_in_the_loop(dtype, method):
  assert _converts_in_loop(CFG.replace(dtype=dtype), _params(), method) == []


def test_the_check_sees_a_per_step_conversion():
  # The loop of a model that casts its float32 weights at every step (what casting once removes)
  # is caught: the check can fail.
  cfg = CFG.replace(dtype="bfloat16")
  params, cross = _params(), None
  encoded = model.encode(params, cfg, ENC)
  cross = model.init_cross_cache(params, cfg, encoded, ENC)

  def loop(p):
    def tokens_to_logits(tokens, cache, step):
      return model.decode_step(p, cfg, tokens, cache, cross, step)

    cache = model.init_self_cache(cfg, 2, 4)
    return decoding.greedy_search(tokens_to_logits, cache, num_rows=2, max_len=4, start_id=0,
                                  eos_id=1, pad_id=0)  # fmt: skip

  jaxpr = jax.make_jaxpr(loop)(params).jaxpr
  shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
  body = [e for e in _eqns(jaxpr) if e.primitive.name == "while"][0].params["body_jaxpr"].jaxpr
  assert any(
    e.primitive.name == "convert_element_type" and tuple(e.invars[0].aval.shape) in shapes
    for e in _eqns(body)
  )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_results_equal_per_step_conversion(dtype):
  # Reference: the decoding loop over the float32 parameters, converted at every use (the model's
  # own casts), against generate's parameters cast once.
  cfg, params = CFG.replace(dtype=dtype), _params()
  out = t5jax.generate(params, cfg, ENC, method="greedy", max_new_tokens=5)

  @jax.jit
  def reference(p):
    encoded = model.encode(p, cfg, ENC)
    cross = model.init_cross_cache(p, cfg, encoded, ENC)

    def tokens_to_logits(tokens, cache, step):
      return model.decode_step(p, cfg, tokens, cache, cross, step)

    cache = model.init_self_cache(cfg, 2, 5)
    return decoding.greedy_search(tokens_to_logits, cache, num_rows=2, max_len=5, start_id=0,
                                  eos_id=1, pad_id=0)  # fmt: skip

  seqs, scores = reference(params)
  np.testing.assert_array_equal(out.sequences, seqs)
  np.testing.assert_array_equal(out.scores, scores)  # the same values in the same ops: exact
  cast = jax.tree_util.tree_flatten_with_path(compute_dtype_params(params, cfg))[0]
  for path, x in cast:
    # The model reads these in float32; the untied embedding table's rows are converted as taken.
    kept = path[-1].key in ("scale", "rel_embedding") or (
      path[-1].key == "shared" and not cfg.tie_word_embeddings
    )
    assert x.dtype == (jnp.float32 if kept else jnp.dtype(dtype)), path
