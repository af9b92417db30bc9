"""The fused attention path (`T5Config.attention_impl`, `jax.nn.dot_product_attention`) equals the
einsum path: the attention function alone (bias shapes and dtypes, padding, causal, packed and
grouped query rows), the model's logits and gradients (packed rows included), a train step, and
greedy and beam decoding.

On CPU "dot_product" runs XLA's implementation; cuDNN is checked by benchmarks/gpu.py on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t5jax
from t5jax import layers, model

# Both paths compute the same float32 scores and softmax in another op order. Measured on CPU
# (jax 0.10.2, -O0 and default level): the model's logits and gradients are bit-identical; the
# attention function alone differs by at most 3e-7 in values and 5e-7 in gradients (values and
# gradients are O(1)); decoding scores by 1e-6. 1e-5 leaves >10x headroom.
TOL = dict(rtol=1e-5, atol=1e-5)
# bf16 queries/keys/values: both paths take float32 scores from bf16 products and round the
# probabilities to bf16 before the value product; measured max difference 0 on CPU; the bound is
# one bf16 ulp at 1 (2^-7) so that another backend's op order still passes.
TOL_BF16 = dict(rtol=2**-7, atol=2**-7)

B, R, T, S, H, K = 2, 1, 6, 8, 3, 8


def _qkv(n, t, s, b, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (n, t, H, K), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, H, K), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, H, K), jnp.float32).astype(dtype)
  return q, k, v


def _masks(b, t, s):
  """The mask forms the model builds: padding, padding + causal, packed segments, cache lengths."""
  valid = jnp.asarray(np.arange(s)[None, :] < np.array([s, s - 3])[:b, None])
  qseg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0][:t]] * b)
  kseg = jnp.asarray([[1, 1, 2, 2, 2, 2, 0, 0][:s]] * b)
  return {
    "padding": layers.AttentionMask(key_valid=valid),
    "causal": layers.AttentionMask(key_valid=valid, causal=True) if t == s else None,
    "packed": layers.AttentionMask(key_valid=kseg != 0, query_segments=qseg, key_segments=kseg),
    "lengths": layers.AttentionMask(key_lengths=jnp.asarray([5])),
    "dense": valid[:, None, None, :],
    "none": None,
  }


def _check(q, k, v, bias, mask, tol, valid_rows=None):
  def f(impl):
    def out(q, k, v, bias):
      return layers.attend(q, k, v, bias, mask, impl=impl)

    @jax.jit
    def both(q, k, v, bias):
      o = out(q, k, v, bias)
      w = jax.random.normal(jax.random.key(9), o.shape, jnp.float32)
      if valid_rows is not None:  # rows with no valid key: their output is not defined alike
        w = w * valid_rows
      loss = lambda *a: jnp.sum(out(*a).astype(jnp.float32) * w)  # noqa: E731
      argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
      return o, jax.grad(loss, argnums=argnums)(q, k, v, bias)

    return both(q, k, v, bias)

  o_ref, g_ref = f("einsum")
  o, g = f("dot_product")
  rows = 1.0 if valid_rows is None else valid_rows
  np.testing.assert_allclose(
    np.asarray((o * rows).astype(jnp.float32)),
    np.asarray((o_ref * rows).astype(jnp.float32)),
    **tol,
  )
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(
      np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)), **tol
    )
  # Non-trivial: the bias and the masks change the output (a path ignoring them fails above).
  assert float(jnp.abs(o_ref.astype(jnp.float32)).max()) > 0.1


@pytest.mark.parametrize(
  "mask_kind, bias_batch, bias_dtype",
  [(m, 1, jnp.float32) for m in ("padding", "causal", "packed", "lengths", "dense", "none")]
  + [("padding", B, jnp.float32), ("causal", 1, jnp.bfloat16), ("packed", None, None)],
)
def test_attend_fused_equals_einsum(mask_kind, bias_batch, bias_dtype):
  s = T if mask_kind == "causal" else S
  q, k, v = _qkv(B, T, s, B)
  bias = None
  if bias_batch is not None:  # (1, H, T, S) as the model's stacks share it, or one per row
    bias = jax.random.normal(jax.random.key(3), (bias_batch, H, T, s)).astype(bias_dtype)
  mask = _masks(B, T, s)[mask_kind]
  # Packed rows: query rows of segment 0 (padding) see no key; their output is not compared.
  rows = None
  if mask_kind == "packed":
    rows = jnp.asarray(np.array([1, 1, 1, 1, 1, 0])[None, :, None, None] * np.ones((B, 1, H, K)))
  _check(q, k, v, bias, mask, TOL, rows)


@pytest.mark.parametrize("mask_kind", ["padding", "per_row", "lengths"])
def test_attend_fused_equals_einsum_grouped_query_rows(mask_kind):
  # Beams: N = B*r query rows against B key rows (decoding's cross attention), one query each.
  r, t = 3, 1
  q, k, v = _qkv(B * r, t, S, B, seed=1)
  valid = jnp.asarray(np.arange(S)[None, :] < np.array([S, 4])[:, None])
  mask = {
    "padding": layers.AttentionMask(key_valid=valid),
    # one mask per query row, different within an example's group
    "per_row": jnp.asarray(np.arange(S)[None, :] < np.arange(S, S - B * r, -1)[:, None])[
      :, None, None, :
    ],
    "lengths": layers.AttentionMask(key_lengths=jnp.asarray([6])),
  }[mask_kind]
  bias = jax.random.normal(jax.random.key(4), (1, H, t, S))
  _check(q, k, v, bias, mask, TOL)


@pytest.mark.parametrize("impl", ["einsum", "dot_product"])
@pytest.mark.parametrize("axes", [layers.EINSUM_KV_AXES, ("bhsk", "bhks")])
def test_attend_takes_keys_and_values_in_any_axis_order(impl, axes):
  # The model passes keys [B, H, K, S] and values [B, H, S, K] (`layers.kv_axes("einsum")`): the
  # same attention as [B, S, H, K], grouped query rows included. S=7, H=3, K=8 all differ, so a
  # mislabelled axis cannot line up by accident.
  s = 7
  q, k, v = _qkv(2 * B, T, s, B, seed=5)
  bias = jax.random.normal(jax.random.key(6), (1, H, T, s))
  mask = _masks(B, T, s)["padding"]
  ref = layers.attend(q, k, v, bias, mask, impl=impl)
  k, v = (jnp.transpose(x, ["bshk".index(c) for c in a]) for x, a in zip((k, v), axes, strict=True))
  out = layers.attend(q, k, v, bias, mask, impl=impl, axes=axes)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), **TOL)


def test_attend_fused_bf16():
  q, k, v = _qkv(B, T, S, B, jnp.bfloat16)
  bias = jax.random.normal(jax.random.key(3), (1, H, T, S)).astype(jnp.bfloat16)
  _check(q, k, v, bias, _masks(B, T, S)["padding"], TOL_BF16)


def test_unknown_attention_impl_is_refused():
  with pytest.raises(ValueError, match="attention_impl"):
    t5jax.T5Config(attention_impl="flash")


# --- the model -------------------------------------------------------------------------------

CFG = t5jax.T5Config(
  vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2, num_decoder_layers=2,
  feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
  dropout_rate=0.0,
)  # fmt: skip
FUSED = CFG.replace(attention_impl="dot_product")


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, 64, (3, 10))
  enc[0, 7:] = 0
  enc[1, 4:] = 0
  dec = rng.integers(2, 64, (3, 6))
  return jnp.asarray(enc), jnp.asarray(dec)


def _params(cfg=CFG):
  return model.init_params(cfg, jax.random.key(0))


def _assert_trees_close(a, b, tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


@pytest.mark.parametrize("per_layer", [False, True])  # T5 / UMT5 position bias
def test_forward_and_gradients_equal_einsum(per_layer):
  cfg = CFG.replace(per_layer_position_bias=per_layer)
  params, (enc, dec) = _params(cfg), _batch()

  def loss(p, c):
    return jnp.sum(model.forward(p, c, enc, dec) ** 2) / 100

  fused = cfg.replace(attention_impl="dot_product")
  np.testing.assert_allclose(
    model.forward(params, fused, enc, dec), model.forward(params, cfg, enc, dec), **TOL
  )
  _assert_trees_close(jax.grad(loss)(params, fused), jax.grad(loss)(params, cfg), TOL)


def test_packed_rows_equal_einsum_and_separate_rows():
  params = _params()
  enc_seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0]] * 2)
  enc_pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0, 0, 0]] * 2)
  dec_seg = jnp.asarray([[1, 1, 2, 2, 2, 0]] * 2)
  dec_pos = jnp.asarray([[0, 1, 0, 1, 2, 0]] * 2)
  rng = np.random.default_rng(1)
  enc = jnp.where(enc_seg > 0, jnp.asarray(rng.integers(2, 64, (2, 10))), 0)
  dec = jnp.asarray(rng.integers(2, 64, (2, 6)))
  kw = dict(
    encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg, encoder_positions=enc_pos,
    decoder_positions=dec_pos,
  )  # fmt: skip
  real = np.asarray(dec_seg > 0)

  def loss(p, c):
    return jnp.sum(jnp.where(real[..., None], model.forward(p, c, enc, dec, **kw), 0) ** 2) / 100

  fused = model.forward(params, FUSED, enc, dec, **kw)
  np.testing.assert_allclose(
    np.asarray(fused)[real], np.asarray(model.forward(params, CFG, enc, dec, **kw))[real], **TOL
  )
  _assert_trees_close(jax.grad(loss)(params, FUSED), jax.grad(loss)(params, CFG), TOL)
  # The second packed segment equals the same example alone in its own row (fused path).
  alone = model.forward(params, FUSED, enc[:, 3:7], dec[:, 2:5])
  np.testing.assert_allclose(np.asarray(fused)[:, 2:5], np.asarray(alone), **TOL)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_decoding_equals_einsum(method):
  params, (enc, _) = _params(), _batch()
  a = t5jax.generate(params, CFG, enc, method=method, num_beams=3, max_new_tokens=6)
  b = t5jax.generate(params, FUSED, enc, method=method, num_beams=3, max_new_tokens=6)
  np.testing.assert_array_equal(a.sequences, b.sequences)
  np.testing.assert_allclose(a.scores, b.scores, **TOL)
  if method == "greedy":  # cached decoding with the fused path equals its own teacher forcing
    logits = model.forward(params, FUSED, enc, model.shift_right(b.sequences))
    gen = np.asarray(b.sequences) != 0
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1))[gen], b.sequences[gen])


def test_dropout_in_training_falls_back_to_einsum():
  cfg = CFG.replace(dropout_rate=0.3)
  params, (enc, dec) = _params(cfg), _batch()
  key = jax.random.key(5)
  a = model.forward(params, cfg, enc, dec, dropout_rng=key)
  b = model.forward(params, cfg.replace(attention_impl="dot_product"), enc, dec, dropout_rng=key)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
