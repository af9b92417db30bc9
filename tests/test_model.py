"""Parity of t5jax's model with transformers' PyTorch T5, and the model's invariants."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.hf_models import FAMILIES, make_hf_model, random_batch

import t5jax
from t5jax.layers import relative_position_bucket

TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """(name, hf_model, t5jax config, t5jax params) loaded through a saved HF folder."""
  name = request.param
  model = make_hf_model(name, seed=zlib.crc32(name.encode()) % 1000)  # same in every process
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  config, params = t5jax.load_hf(str(path))
  return name, model, config, jax.tree.map(jnp.asarray, params)


def _hf_outputs(model, ids, dec, labels):
  with torch.no_grad():
    out = model(
      input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=dec, labels=labels
    )
  return out.logits.numpy(), out.encoder_last_hidden_state.numpy(), float(out.loss)


def test_logits_encoder_and_loss_match_transformers(family):
  name, model, config, params = family
  ids, dec, labels = random_batch(config.vocab_size, 3, 37, 21, seed=1, pad_from=[37, 25, 9])
  ref_logits, ref_enc, ref_loss = _hf_outputs(model, ids, dec, labels)
  enc_j, dec_j = jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy())
  logits = np.asarray(t5jax.forward(params, config, enc_j, dec_j))
  np.testing.assert_allclose(logits, ref_logits, **TOL)
  encoded = np.asarray(t5jax.encode(params, config, enc_j))
  valid = ids.numpy() != 0
  np.testing.assert_allclose(encoded[valid], ref_enc[valid], **TOL)
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -np.take_along_axis(np.asarray(logp), labels.numpy()[..., None], -1).mean()
  np.testing.assert_allclose(loss, ref_loss, **TOL)


def test_sequences_longer_than_max_distance(family):
  name, model, config, params = family
  # 300 > max_distance 128: exercises the saturated buckets in both directions.
  ids, dec, labels = random_batch(config.vocab_size, 1, 300, 140, seed=2)
  ref_logits, _, _ = _hf_outputs(model, ids, dec, labels)
  logits = t5jax.forward(params, config, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()))
  np.testing.assert_allclose(np.asarray(logits), ref_logits, **TOL)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256), (16, 7)])
def test_buckets_equal_transformers_including_edges(bidirectional, num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention

  rel = np.arange(-400, 401)
  # 16, 32, 64 (and their negatives) sit exactly on bucket edges with the default settings.
  assert {16, 32, 64, -16, -32, -64} <= set(rel.tolist())
  ref = T5Attention._relative_position_bucket(
    torch.tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
    max_distance=max_distance,
  ).numpy()  # fmt: skip
  kw = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(np.asarray(relative_position_bucket(jnp.asarray(rel), **kw)), ref)
  np.testing.assert_array_equal(relative_position_bucket(rel, xp=np, **kw), ref)


def _incremental(params, config, enc, dec, num_rows_per_example=1):
  encoded = t5jax.encode(params, config, enc)
  cross = t5jax.init_cross_cache(params, config, encoded, enc)
  dec = jnp.repeat(dec, num_rows_per_example, axis=0)
  cache = t5jax.init_self_cache(config, dec.shape[0], dec.shape[1] + 3)
  step = t5jax.decode_step
  out = []
  for s in range(dec.shape[1]):
    logits, cache = step(params, config, dec[:, s], cache, cross, s)
    out.append(logits)
  return jnp.stack(out, axis=1)


def test_cached_decoding_equals_teacher_forcing(family):
  _, _, config, params = family
  ids, dec, _ = random_batch(config.vocab_size, 2, 19, 12, seed=3, pad_from=[19, 7])
  enc, dec = jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy())
  full = t5jax.forward(params, config, enc, dec)
  np.testing.assert_allclose(_incremental(params, config, enc, dec), full, **TOL)
  # Rows sharing one example's cross-attention cache (as beams do) give the same logits.
  rep = _incremental(params, config, enc, dec, num_rows_per_example=3)
  np.testing.assert_allclose(rep, jnp.repeat(full, 3, axis=0), **TOL)


def test_right_padding_does_not_change_outputs(family):
  _, _, config, params = family
  ids, dec, _ = random_batch(config.vocab_size, 2, 15, 9, seed=4)
  enc = jnp.asarray(ids.numpy())
  dec = jnp.asarray(dec.numpy())
  padded = jnp.pad(enc, ((0, 0), (0, 17)))
  a = t5jax.forward(params, config, enc, dec)
  b = t5jax.forward(params, config, padded, dec)
  np.testing.assert_allclose(a, b, **TOL)
  ea = t5jax.encode(params, config, enc)
  eb = t5jax.encode(params, config, padded)[:, :15]
  np.testing.assert_allclose(ea, eb, **TOL)


def test_jit_equals_no_jit():
  config = t5jax.T5Config(
    vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=1, num_decoder_layers=1,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
  )  # fmt: skip
  params = t5jax.init_params(config, jax.random.PRNGKey(3))
  ids, dec, _ = random_batch(config.vocab_size, 2, 5, 3, seed=5, pad_from=[5, 3])
  enc, dec = jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy())
  with jax.disable_jit():
    eager = t5jax.forward(params, config, enc, dec)
  jitted = t5jax.forward(params, config, enc, dec)
  np.testing.assert_allclose(eager, jitted, **TOL)


def test_packed_rows_equal_separate_rows():
  config = t5jax.T5Config(
    vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=2, num_decoder_layers=2
  )
  params = t5jax.init_params(config, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  a_in, b_in = rng.integers(2, 50, 5), rng.integers(2, 50, 7)
  a_tg, b_tg = rng.integers(2, 50, 4), rng.integers(2, 50, 3)

  def single(inp, tgt):
    dec = np.concatenate([[0], tgt[:-1]])
    return np.asarray(t5jax.forward(params, config, inp[None], dec[None]))[0]

  enc = np.concatenate([a_in, b_in, [0, 0]])[None]
  dec = np.concatenate([[0], a_tg[:-1], [0], b_tg[:-1], [0]])[None]
  packed = t5jax.forward(
    params, config, jnp.asarray(enc), jnp.asarray(dec),
    encoder_segment_ids=jnp.asarray([[1] * 5 + [2] * 7 + [0, 0]]),
    decoder_segment_ids=jnp.asarray([[1] * 4 + [2] * 3 + [0]]),
    encoder_positions=jnp.asarray([list(range(5)) + list(range(7)) + [0, 0]]),
    decoder_positions=jnp.asarray([list(range(4)) + list(range(3)) + [0]]),
  )[0]  # fmt: skip
  np.testing.assert_allclose(packed[:4], single(a_in, a_tg), **TOL)
  np.testing.assert_allclose(packed[4:7], single(b_in, b_tg), **TOL)


def test_dropout_is_active_only_with_rng():
  config = t5jax.T5Config(
    vocab_size=30, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=1, num_decoder_layers=1,
    dropout_rate=0.5,
  )  # fmt: skip
  params = t5jax.init_params(config, jax.random.PRNGKey(0))
  enc, dec = jnp.ones((1, 6), jnp.int32) * 3, jnp.ones((1, 4), jnp.int32) * 4
  det = t5jax.forward(params, config, enc, dec)
  np.testing.assert_array_equal(det, t5jax.forward(params, config, enc, dec))
  d1 = t5jax.forward(params, config, enc, dec, dropout_rng=jax.random.PRNGKey(1))
  d2 = t5jax.forward(params, config, enc, dec, dropout_rng=jax.random.PRNGKey(2))
  assert not np.allclose(d1, det) and not np.allclose(d1, d2)


def test_bfloat16_compute_is_close_to_float32():
  config = t5jax.T5Config(
    vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2, num_decoder_layers=2
  )
  params = t5jax.init_params(config, jax.random.PRNGKey(0))
  enc = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 2, 40)
  dec = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 2, 40)
  f32 = t5jax.forward(params, config, enc, dec)
  bf16 = t5jax.forward(params, config.replace(dtype="bfloat16"), enc, dec)
  assert bf16.dtype == jnp.float32
  err = np.abs(np.asarray(bf16) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  # bf16 keeps 8 significant bits (one rounding: 0.39% relative); measured 0.44-0.72% of the
  # largest logit over 5 seeds. Zero would mean the computation did not run in bf16.
  assert 0 < err < 0.02


def test_param_axes_cover_every_parameter():
  config = t5jax.get_config("umt5-small", vocab_size=64, num_layers=1, num_decoder_layers=1)
  shapes = jax.eval_shape(lambda: t5jax.init_params(config, jax.random.PRNGKey(0)))
  axes = t5jax.param_axes(config)
  leaves = jax.tree.leaves(jax.tree.map(lambda s, a: len(s.shape) == len(a), shapes, axes,
                                        is_leaf=lambda x: isinstance(x, tuple)))  # fmt: skip
  assert leaves and all(leaves)
