"""t5jax.quantize: int8 and bfloat16 weights for decoding, against the float32 model.

The bounds below are measured values with margin (CI may run on another CPU); each says what
it measured on the development machine (AMD EPYC, jax 0.10.2).
"""

import contextlib
import importlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

import t5jax
from t5jax.quantize import QuantizedWeight, quantize


def tiny_config(**kw):
  base = dict(
    d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2,
    vocab_size=128, dropout_rate=0.0,
  )  # fmt: skip
  return t5jax.get_config("t5-v1_1-small").replace(**{**base, **kw})


def tokens(seed, shape, vocab):
  return jnp.asarray(np.random.default_rng(seed).integers(2, vocab, shape), jnp.int32)


# --------------------------------------------------------------------------------------------------
# The weights.


@pytest.mark.parametrize("scan", [False, True])
def test_int8_weights_per_output_channel(scan):
  config = tiny_config(scan_layers=scan)
  params = t5jax.init_params(config, jax.random.key(0))
  q = quantize(params, config)
  layer = q["decoder"]["layers" if scan else "layers_0"]
  float_layer = params["decoder"]["layers" if scan else "layers_0"]
  lead = (2,) if scan else ()  # stacked layers keep one scale per layer
  for path, contracted in (
    (("self_attention", "query"), 1), (("self_attention", "out"), 2), (("mlp", "wo"), 1),
  ):  # fmt: skip
    w = layer[path[0]][path[1]]
    f = np.asarray(float_layer[path[0]][path[1]])
    assert isinstance(w, QuantizedWeight) and w.values.dtype == jnp.int8
    assert w.values.shape == f.shape
    assert w.scale.shape == lead + (1,) * contracted + f.shape[len(lead) + contracted :]
    # Each output channel's largest weight maps to +-127; every weight is within half a step.
    reduce = tuple(range(len(lead), len(lead) + contracted))
    np.testing.assert_array_equal(np.abs(np.asarray(w.values)).max(reduce), 127)
    err = np.abs(np.asarray(w.dequantize()) - f)
    assert np.all(err <= np.asarray(w.scale) * 0.5 + 1e-7)
  # Norms and relative-position tables stay float32; so does the untied embedding table.
  assert layer["pre_mlp_layer_norm"]["scale"].dtype == jnp.float32
  assert q["shared"].dtype == jnp.float32
  assert isinstance(q["lm_head"], QuantizedWeight)


def test_options_leave_output_layer_and_encoder_float():
  config = tiny_config()
  params = t5jax.init_params(config, jax.random.key(0))
  q = quantize(params, config, output_layer=False, encoder=False)
  assert q["lm_head"] is params["lm_head"]
  assert q["encoder"]["layers_0"]["mlp"]["wo"] is params["encoder"]["layers_0"]["mlp"]["wo"]
  assert isinstance(q["decoder"]["layers_0"]["mlp"]["wo"], QuantizedWeight)
  b = quantize(params, config, "bfloat16")
  assert b["decoder"]["layers_1"]["mlp"]["wi_0"].dtype == jnp.bfloat16
  assert b["decoder"]["layers_1"]["pre_mlp_layer_norm"]["scale"].dtype == jnp.float32
  with pytest.raises(ValueError, match="quantize mode"):
    quantize(params, config, "int4")
  with pytest.raises(ValueError, match="activations"):
    quantize(params, config, activations="int4")


# --------------------------------------------------------------------------------------------------
# Logits of random models: each mode's largest deviation from float32, relative to the largest
# float32 logit. Measured (random init, 3x7 inputs, 5 targets): int8 0.023 untied / 0.017 tied,
# int8 weight-only ("float" activations) 0.015 / 0.012, bfloat16 0.010 / 0.0048.
LOGIT_BOUNDS = {"int8": 0.06, "float": 0.04, "bfloat16": 0.03}


@pytest.mark.parametrize("tie,scan", [(False, False), (True, True)])
def test_logits_within_measured_bounds(tie, scan):
  config = tiny_config(tie_word_embeddings=tie, scan_layers=scan)
  params = t5jax.init_params(config, jax.random.key(1))
  enc, dec = tokens(0, (3, 7), 128), tokens(1, (3, 5), 128)
  ref = np.asarray(t5jax.forward(params, config, enc, dec))
  scale = np.abs(ref).max()
  for mode, bound in LOGIT_BOUNDS.items():
    if mode == "bfloat16":
      got = t5jax.forward(
        quantize(params, config, "bfloat16"), config.replace(dtype="bfloat16"), enc, dec
      )
    else:
      got = t5jax.forward(quantize(params, config, activations=mode), config, enc, dec)
    dev = np.abs(np.asarray(got) - ref).max() / scale
    assert 0 < dev <= bound, (mode, dev)
  # The tied table, quantized as the output layer, also serves the embedding lookup.
  if tie:
    assert isinstance(quantize(params, config)["shared"], QuantizedWeight)


# --------------------------------------------------------------------------------------------------
# A trained model: greedy tokens and beam scores against float32.


@pytest.fixture(scope="module")
def trained():
  """A tiny T5 trained for 400 steps to reverse 4-9 tokens (vocab 40), and held-out inputs."""
  config = tiny_config(vocab_size=40, d_model=96, d_ff=192)
  rng = np.random.default_rng(0)

  def batch(n):
    lengths = rng.integers(4, 10, n)
    src = np.zeros((n, 10), np.int32)
    tgt = np.zeros((n, 11), np.int32)
    for i, k in enumerate(lengths):
      seq = rng.integers(3, 40, k)
      src[i, :k], src[i, k] = seq, 1
      tgt[i, :k], tgt[i, k] = seq[::-1], 1
    return src, tgt

  params = t5jax.init_params(config, jax.random.key(0))
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, src, tgt):
    def loss_fn(p):
      logits = t5jax.forward(p, config, src, t5jax.shift_right(tgt))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
      w = (tgt != 0) | (jnp.cumsum(tgt == 1, axis=1) - (tgt == 1) == 0)
      return jnp.sum(ce * w) / jnp.sum(w)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  # Training is this fixture's setup, not what the tests check: compiled at XLA's default level,
  # where a step runs ~3x faster than in the suite's -O0 code (31 against 103 ms on a loaded
  # machine; 400 steps), for ~2 s more compile time.
  shapes = [jax.ShapeDtypeStruct(s, jnp.int32) for s in ((64, 10), (64, 11))]
  step = step.lower(params, state, *shapes).compile(
    compiler_options={"xla_backend_optimization_level": 2}
  )
  for _ in range(400):
    params, state, loss = step(params, state, *batch(64))
  assert float(loss) < 0.3, float(loss)  # it learned the task (measured: 0.077)
  return config, params, batch(256)[0]


@pytest.mark.slow
def test_trained_model_greedy_and_beam_agree_with_float32(trained):
  config, params, src = trained
  q = quantize(params, config)
  kw = dict(max_new_tokens=11)
  ref = t5jax.generate(params, config, src, **kw)
  got = t5jax.generate(q, config, src, **kw)
  same = np.mean(np.all(np.asarray(ref.sequences) == np.asarray(got.sequences), axis=1))
  assert same >= 0.98, same  # measured: 1.0 (256 rows; also without the output layer)
  beam = dict(method="beam", num_beams=4, max_new_tokens=11)
  ref_b = t5jax.generate(params, config, src, **beam)
  got_b = t5jax.generate(q, config, src, **beam)
  same_beams = np.all(np.asarray(ref_b.sequences) == np.asarray(got_b.sequences), axis=-1)
  assert np.mean(same_beams) >= 0.98, np.mean(same_beams)  # measured: 0.996 (1024 beams)
  # Scores (length-normalised log-probabilities) of the n-th beam of each example.
  diff = np.abs(np.asarray(ref_b.scores) - np.asarray(got_b.scores))
  assert diff.max() <= 0.05, diff.max()  # measured: 0.018 (0.012 where the beams are the same)


# --------------------------------------------------------------------------------------------------
# The formulation: the decoding loop's products read the int8 weights.


def _decoding_hlo(config, params, max_new_tokens: int) -> str:
  """The compiled text of greedy `generate` over 2 inputs of 6 tokens."""
  G = importlib.import_module("t5jax.generate")
  src = np.asarray(tokens(0, (2, 6), config.vocab_size))
  settings = G.GenerateConfig(max_new_tokens=max_new_tokens)._static()
  lowered = G._generate.lower(
    params, src, jax.random.key(0), jnp.float32(1.0), jnp.int32(0), config=config,
    settings=settings,
  )  # fmt: skip
  return lowered.compile().as_text()


def test_decoding_products_read_int8_weights():
  config = tiny_config(d_model=64, d_ff=256, vocab_size=320)
  params = quantize(t5jax.init_params(config, jax.random.key(0)), config)
  hlo = _decoding_hlo(config, params, max_new_tokens=4)
  dots = re.findall(r"= (\w+)\[[\d,]*\]\{[\d,]*\} dot\(", hlo)
  weight_products = [d for d in dots if d == "s32"]
  # 2 decoder layers x (self q, k, v, out; cross q, out; wi_0, wi_1, wo) + the output layer per
  # step, plus the encoder's and the cross keys/values.
  assert len(weight_products) >= 2 * 9 + 1
  # No float copy of an int8 weight: nothing converts a [64, 256] / [256, 64] / [64, 320] s8
  # parameter to float.
  for shape in ("64,256", "256,64", "64,320"):
    assert not re.search(rf"f32\[{shape}\]\{{[\d,]*\}} convert\(", hlo), shape


def test_one_row_product_equals_that_row_of_a_batch():
  """A single row (batch-1 greedy decoding) takes a padded two-row product on XLA:CPU; the sums
  are int32 and exact, so it equals the row's product within a batch bit for bit."""
  Q = importlib.import_module("t5jax.quantize")
  w = Q._quantize_one(jax.random.normal(jax.random.key(1), (64, 96)), (0,), "int8")
  x = jax.random.normal(jax.random.key(2), (3, 64))
  product = jax.jit(Q.int8_matmul, static_argnums=2)
  batch = np.asarray(product(x, w, jnp.float32))
  for i in range(3):
    np.testing.assert_array_equal(np.asarray(product(x[i : i + 1], w, jnp.float32))[0], batch[i])


def _weight_products(hlo: str) -> list[tuple[str, str, str]]:
  """(result, lhs, rhs) element types of every dot of a compiled CPU program whose second
  operand is a matrix (a weight), read from the fused computations that hold them."""
  found = []
  for comp in hlo.split("\n\n"):
    for res, lhs, rhs in re.findall(r"= (\w+)\[[\d,]*\]\S* dot\((%[\w.]+), (%[\w.]+)\)", comp):
      types = [re.search(re.escape(n) + r" = (\w+)\[([\d,]*)\]", comp) for n in (lhs, rhs)]
      if all(types) and types[1].group(2).count(",") == 1:
        found.append((res, types[0].group(1), types[1].group(1)))
  return found


def test_bfloat16_products_on_cpu_sum_into_float32():
  """On CPU a bfloat16 product is the float32-result product rounded to bfloat16
  (`t5jax.layers.float32_sums`). The plain bf16 -> bf16 product was compiled by XLA:CPU as a
  float32 product of converted operands, weights included. Here every weight product of bf16
  decoding reads bf16 operands into float32 sums; the values are those of that formulation, and
  within one bfloat16 rounding of the plain product (the two sum in a different order).
  With `float32_sums(False)` (accelerators) the product stays bf16 -> bf16."""
  config = tiny_config(dtype="bfloat16")
  params = quantize(t5jax.init_params(config, jax.random.key(0)), config, "bfloat16")
  products = _weight_products(_decoding_hlo(config, params, max_new_tokens=3))
  # Encoder, cross keys/values, decoder layers and the output layer, of 2 and of 12 rows.
  assert len(products) >= 2 * 9 + 1
  assert {p for p in products if p != ("f32", "bf16", "bf16")} == set(), products

  L = importlib.import_module("t5jax.layers")
  x = jax.random.normal(jax.random.key(1), (16, 64)).astype(jnp.bfloat16)
  w = (0.1 * jax.random.normal(jax.random.key(2), (64, 96))).astype(jnp.bfloat16)
  got = np.asarray(jax.jit(L.dense)(x, w), np.float32)
  f32 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))(x, w)
  np.testing.assert_array_equal(got, np.asarray(f32.astype(jnp.bfloat16), np.float32))
  plain = np.asarray(jax.jit(jnp.matmul)(x, w), np.float32)
  np.testing.assert_allclose(got, plain, rtol=2**-6, atol=1e-6)  # measured: <= 1 bf16 ulp
  # `float32_sums(False)` (accelerators, benchmarks/memory.py) keeps the plain product. New
  # functions per trace: jit's trace cache does not see the setting.
  with L.float32_sums(False):
    text = jax.jit(lambda a, b: L.dense(a, b)).lower(x, w).as_text()
  assert re.search(r"dot_general[^\n]*-> tensor<16x96xbf16>", text), text
  text = jax.jit(lambda a, b: L.dense(a, b)).lower(x, w).as_text()
  assert re.search(r"dot_general[^\n]*-> tensor<16x96xf32>", text), text


@pytest.mark.parametrize("on", [False, True])
def test_remat_saves_one_result_per_bfloat16_product(on):
  """Under a remat policy that saves dots, each bf16 product leaves one saved result: bf16 with
  `float32_sums(False)` (what accelerators trace), its float32 sums on CPU. A choice made inside
  the jaxpr (a `lax.platform_dependent` cond) kept both, on every backend."""
  L = importlib.import_module("t5jax.layers")
  x = jnp.ones((8, 64), jnp.bfloat16)
  w1, w2 = jnp.ones((64, 64), jnp.bfloat16), jnp.ones((64, 32), jnp.bfloat16)

  def f(x, w1, w2):
    return jnp.sum(jnp.tanh(L.dense(jnp.tanh(L.dense(x, w1)), w2)).astype(jnp.float32))

  out = io.StringIO()
  policy = jax.checkpoint_policies.dots_saveable
  with L.float32_sums(on), contextlib.redirect_stdout(out):
    print_saved_residuals(jax.checkpoint(f, policy=policy), x, w1, w2)
  lines = out.getvalue().splitlines()
  saved = [line.split()[0] for line in lines if "from the argument" not in line]
  assert saved == (["f32[8,64]", "f32[8,32]"] if on else ["bf16[8,64]", "bf16[8,32]"]), saved
