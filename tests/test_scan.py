"""Layer scan and rematerialisation: the scanned model equals the unrolled one on the same weights.

`T5Config.scan_layers` stacks each stack's layer parameters on a leading `layers` axis and runs
them under one `nn.scan`; `T5Config.remat` wraps each layer in `nn.remat`. Both must change
nothing but compile time and memory: logits, gradients, train steps (Adafactor factoring each
layer's matrix), cached decoding, greedy and beam search, HuggingFace import/export and workdir
checkpoints are compared against the unrolled, non-rematerialised model.

Tiny models; the measured differences are written next to each bound.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.hf_models import make_hf_model, random_batch
from helpers.runs import tiny_run_config

import t5jax
from t5jax import inference, model, optim, partitioning, sharding, trainer
from t5jax.train import TrainingError, train_and_evaluate
from t5jax.train_config import AdamWConfig, LossConfig, OptimizerConfig

# Shapes that exercise every branch: the shared (T5 1.0/1.1) and per-layer (UMT5) position bias,
# heads * d_kv != d_model, a decoder deeper than the encoder, tied and untied output layers.
CONFIGS = {
  "t5_tied_relu": dict(feed_forward_proj="relu", num_layers=2, num_decoder_layers=2),
  "umt5": dict(
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
    per_layer_position_bias=True, num_layers=2, num_decoder_layers=3,
  ),
  "odd_dims": dict(
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
    d_model=24, d_kv=5, num_heads=3, num_layers=1, num_decoder_layers=3,
  ),
}  # fmt: skip
BASE = dict(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_heads=4, dropout_rate=0.0)

# Forward passes: measured 0 (bit-identical) on CPU at -O0 and at the default level; the bound
# leaves room for another summation order in XLA's fusion of the scanned body.
TOL = dict(atol=1e-5, rtol=1e-5)


def _pair(name: str, seed: int = 0):
  """(unrolled config, scanned config, unrolled params, the same params stacked)."""
  cfg = t5jax.T5Config(**{**BASE, **CONFIGS[name]})
  scanned = cfg.replace(scan_layers=True)
  params = t5jax.init_params(cfg, jax.random.PRNGKey(seed))
  return cfg, scanned, params, model.convert_params(params, scanned)


def _max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


def _batch(vocab: int, seed: int = 1):
  ids, dec, labels = random_batch(vocab, 2, 11, 7, seed=seed, pad_from=[11, 6])
  return jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()), jnp.asarray(labels.numpy())


def _loss(params, config, enc, dec, labels):
  logits = t5jax.forward(params, config, enc, dec)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))


# --- layout ------------------------------------------------------------------------------------


def test_stacked_layout_and_axes():
  cfg, scanned, params, stacked = _pair("umt5")
  shapes = jax.eval_shape(lambda: t5jax.init_params(scanned, jax.random.PRNGKey(0)))
  assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, stacked)
  enc, dec = stacked["encoder"]["layers"], stacked["decoder"]["layers"]
  assert enc["attention"]["query"].shape == (2, 32, 4, 8)
  assert dec["mlp"]["wo"].shape == (3, 48, 32)
  assert dec["relpos_bias"]["rel_embedding"].shape == (3, 32, 4)  # UMT5: one table per layer
  axes = t5jax.param_axes(scanned)
  assert axes["decoder"]["layers"]["self_attention"]["out"] == ("layers", "heads", "kv", "embed")
  assert axes["decoder"]["layers"]["relpos_bias"]["rel_embedding"] == (
    "layers", "relpos_buckets", "heads",
  )  # fmt: skip
  assert axes["shared"] == ("vocab", "embed")
  # Replicated along the layer axis by default, the other dimensions as unstacked.
  spec = partitioning.logical_to_spec(("layers", "embed", "mlp"), {"fsdp": 2, "tensor": 2})
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  # The layer axis of the stacked arrays is the layer index.
  np.testing.assert_array_equal(enc["mlp"]["wi_0"][1], params["encoder"]["layers_1"]["mlp"]["wi_0"])
  # Round trip, and layer-count mismatches are named.
  back = model.convert_params(stacked, cfg)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  with pytest.raises(ValueError, match=r"params\['decoder'\] stacks \[3\] layers, config has 2"):
    model.convert_params(stacked, scanned.replace(num_decoder_layers=2))
  with pytest.raises(ValueError, match=r"params\['encoder'\] has 2 layers, config has 3"):
    model.convert_params(params, cfg.replace(num_layers=3))


# --- forward, gradients, remat -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_equals_unrolled_logits_and_gradients(name):
  cfg, scanned, params, stacked = _pair(name)
  enc, dec, labels = _batch(cfg.vocab_size)
  np.testing.assert_allclose(
    t5jax.forward(stacked, scanned, enc, dec), t5jax.forward(params, cfg, enc, dec), **TOL
  )
  np.testing.assert_allclose(
    t5jax.encode(stacked, scanned, enc), t5jax.encode(params, cfg, enc), **TOL
  )
  g = jax.grad(_loss)(params, cfg, enc, dec, labels)
  gs = jax.grad(_loss)(stacked, scanned, enc, dec, labels)
  # Measured: 0 to 3e-8 for gradients of magnitude ~1e-2.
  assert _max_diff(model.convert_params(gs, cfg), g) < 1e-6


def test_scanned_packed_rows_equal_unrolled():
  cfg, scanned, params, stacked = _pair("umt5")
  enc = jnp.asarray([[5, 6, 7, 1, 8, 9, 1, 0]])
  dec = jnp.asarray([[0, 3, 4, 0, 5, 0]])
  packing = dict(
    encoder_segment_ids=jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]]),
    decoder_segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 0]]),
    encoder_positions=jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0]]),
    decoder_positions=jnp.asarray([[0, 1, 2, 0, 1, 0]]),
  )
  np.testing.assert_allclose(
    t5jax.forward(stacked, scanned, enc, dec, **packing),
    t5jax.forward(params, cfg, enc, dec, **packing),
    **TOL,
  )


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_gradients_equal_no_remat(remat, scan):
  cfg, scanned, params, stacked = _pair("umt5")
  enc, dec, labels = _batch(cfg.vocab_size)
  base_cfg, base_params = (scanned, stacked) if scan else (cfg, params)
  rem = base_cfg.replace(remat=remat)
  grad = jax.grad(_loss)
  # Measured: 1.7e-8 to 4.1e-8 (recomputation may fuse differently), gradients ~1e-2.
  want = grad(base_params, base_cfg, enc, dec, labels)
  assert _max_diff(grad(base_params, rem, enc, dec, labels), want) < 1e-6

  # The policy is in effect: every layer runs under jax.checkpoint with it (one per layer
  # unrolled, one per stack scanned), and nothing is rematerialised without it.
  def policies(config):
    jaxpr = jax.make_jaxpr(lambda p: _loss(p, config, enc, dec, labels))(base_params)
    return _checkpoint_policies(jaxpr.jaxpr)

  layers = 2 if scan else cfg.num_layers + cfg.num_decoder_layers
  assert policies(rem) == [model._REMAT_POLICIES[remat]] * layers
  assert policies(base_cfg) == []


def _checkpoint_policies(jaxpr) -> list:
  """The policy of every `jax.checkpoint` (remat) equation in `jaxpr`, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("checkpoint", "remat2"):
      found.append(eqn.params["policy"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          found += _checkpoint_policies(sub)
  return found


def test_remat_is_validated():
  with pytest.raises(ValueError, match="T5Config.remat='some'"):
    t5jax.T5Config(remat="some")


# --- train step and optimizer state ------------------------------------------------------------


def _train_pair():
  """Dimensions of 128 and more, so that Adafactor factors the kernels (min_dim_size 128)."""
  cfg = t5jax.T5Config(
    vocab_size=64, d_model=128, d_kv=40, d_ff=256, num_heads=4, num_layers=2,
    num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    scale_decoder_outputs=False, per_layer_position_bias=True, dropout_rate=0.0,
  )  # fmt: skip
  scanned = cfg.replace(scan_layers=True)
  params = t5jax.init_params(cfg, jax.random.PRNGKey(0))
  return cfg, scanned, params, model.convert_params(params, scanned)


def test_adafactor_factors_each_layer_never_the_layer_axis():
  cfg, scanned, params, stacked = _train_pair()
  tx = optim.make_optimizer(OptimizerConfig(name="adafactor"))
  per_layer_state = tx.init(params)
  state = tx.init(stacked)
  assert isinstance(state, optim.PerLayerState) and not isinstance(
    per_layer_state, optim.PerLayerState
  )
  factored = state.stacked["decoder"][0]  # optax's FactoredState of the decoder's layers
  mlp, attn = factored.v_row["decoder"]["layers"]["mlp"], factored.v_row["decoder"]["layers"]
  # One factored pair per layer: wi_0 [3, 128, 256] -> rows [3, 128], columns [3, 256];
  # query [3, 128, 4, 40] seen as the matrix [128, 160] per layer -> [3, 128], [3, 160].
  assert mlp["wi_0"].shape == (3, 128)
  assert factored.v_col["decoder"]["layers"]["mlp"]["wi_0"].shape == (3, 256)
  assert attn["self_attention"]["query"].shape == (3, 128)
  assert factored.v_col["decoder"]["layers"]["self_attention"]["query"].shape == (3, 160)
  # Norm scales [3, 128] and the per-layer bias tables [3, 32, 4] keep full second moments.
  v = factored.v["decoder"]["layers"]
  assert v["pre_mlp_layer_norm"]["scale"].shape == (3, 128)
  assert v["relpos_bias"]["rel_embedding"].shape == (3, 32, 4)
  # The same shapes as the unrolled model's, layer by layer.
  row = per_layer_state[0].v_row["decoder"]["layers_1"]["self_attention"]["query"]
  assert row.shape == (128,)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_train_steps_scanned_equal_unrolled(name):
  cfg, scanned, params, stacked = _train_pair()
  ocfg = OptimizerConfig(
    name=name, schedule="constant", learning_rate=1e-2, warmup_steps=0, grad_clip_norm=1.0,
    weight_decay=0.1 if name == "adamw" else 0.0,
    # AdamW's first updates are lr * g / (|g| + eps): with the default eps 1e-8, a gradient at
    # float32 rounding level moves its weight by up to lr either way, and scanned vs unrolled
    # (another summation order) differed by 5.4e-6 on one machine and 2.3e-5 on another. An eps
    # near the gradients' scale keeps the update smooth in g, so the comparison stays tight.
    adamw=AdamWConfig(eps=1e-4),
  )  # fmt: skip
  mesh = sharding.create_mesh(sharding.MeshConfig(), jax.devices()[:1])
  enc, dec, labels = _batch(cfg.vocab_size, seed=2)
  batch = dict(encoder_input_tokens=enc, decoder_input_tokens=dec, decoder_target_tokens=labels)
  out = []
  for c, p in ((cfg, params), (scanned, stacked)):
    steps = trainer.build(c, ocfg, LossConfig(), mesh)
    step, state = steps.train_step, steps.state_from_params(p)
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.PRNGKey(0))
    out.append((model.convert_params(state.params, cfg), state.opt_state, metrics))
  (p_un, s_un, m_un), (p_sc, s_sc, m_sc) = out
  moved = _max_diff(p_un, params)
  diff = _max_diff(p_sc, p_un)
  # Measured after two steps (at -O0 and XLA's default level): Adafactor 2.4e-7-4.8e-7, AdamW
  # 3.2e-7-3.5e-7, against updates of about 2.3e-2: 1.5e-5 of them at most.
  assert moved > 5e-4 and diff < 5e-4 * moved, (diff, moved)
  for key in ("loss", "grad_norm", "update_norm", "param_norm"):
    np.testing.assert_allclose(m_sc[key], m_un[key], rtol=1e-4)
  if name == "adafactor":  # the factored moments, layer by layer
    inner_un = s_un[1][0]
    inner_sc = s_sc[1].stacked["encoder"][0]
    for i in range(2):
      for kind in ("v_row", "v_col"):
        a = getattr(inner_un, kind)["encoder"][f"layers_{i}"]["mlp"]["wi_1"]
        b = getattr(inner_sc, kind)["encoder"]["layers"]["mlp"]["wi_1"][i]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-12)


# --- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["umt5", "odd_dims"])
def test_scanned_decoding_equals_unrolled(name):
  cfg, scanned, params, stacked = _pair(name, seed=3)
  enc, dec, _ = _batch(cfg.vocab_size, seed=4)
  # The scanned self cache stacks the layers after the rows, so beams reorder it as any leaf.
  cache = t5jax.init_self_cache(scanned, 6, 9)
  n, h, k = cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv
  assert cache["layers"]["k"].shape == (6, n, h, k, 9)  # keys [N, H, K, L] per layer
  assert cache["layers"]["v"].shape == (6, n, h, 9, k)  # values [N, H, L, K]
  # Cached decoding (rows sharing one example's cross cache, as beams do) = teacher forcing.
  encoded = t5jax.encode(stacked, scanned, enc)
  cross = t5jax.init_cross_cache(stacked, scanned, encoded, enc)
  assert cross["layers"]["k"].shape == (n, 2, h, k, 11)
  assert cross["layers"]["v"].shape == (n, 2, h, 11, k)
  rows = jnp.repeat(dec, 3, axis=0)
  steps = []
  for s in range(dec.shape[1]):
    logits, cache = t5jax.decode_step(stacked, scanned, rows[:, s], cache, cross, s)
    steps.append(logits)
  full = t5jax.forward(params, cfg, enc, dec)
  np.testing.assert_allclose(jnp.stack(steps, 1), jnp.repeat(full, 3, axis=0), atol=1e-4)
  for method, extra in (("greedy", {}), ("beam", dict(num_beams=3, num_return_sequences=2))):
    a = t5jax.generate(params, cfg, enc, method=method, max_new_tokens=6, **extra)
    b = t5jax.generate(stacked, scanned, enc, method=method, max_new_tokens=6, **extra)
    np.testing.assert_array_equal(b.sequences, a.sequences)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)  # measured 0


# --- HuggingFace ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["umt5", "t5_odd_dims"])
def test_load_hf_scanned_matches_transformers_and_saves_back(family, tmp_path):
  hf_model = make_hf_model(family, seed=5)
  hf_model.save_pretrained(tmp_path / "hf")
  config, params = t5jax.load_hf(str(tmp_path / "hf"), scan_layers=True)
  assert config.scan_layers and "layers" in params["decoder"]
  ids, dec, _ = random_batch(config.vocab_size, 2, 13, 7, seed=6, pad_from=[13, 5])
  with torch.no_grad():
    ref = hf_model(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=dec).logits
  ours = t5jax.forward(params, config, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()))
  np.testing.assert_allclose(ours, ref.numpy(), atol=1e-4, rtol=1e-5)  # test_model's bound
  # save_hf from stacked parameters writes per-layer tensors transformers reads.
  t5jax.save_hf(config, params, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(
    tmp_path / "out", attn_implementation="eager"
  )
  with torch.no_grad():
    again = reloaded(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=dec).logits
  np.testing.assert_array_equal(again.numpy(), ref.numpy())
  config2, params2 = t5jax.load_hf(str(tmp_path / "out"))
  assert config2 == config.replace(scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, params2, model.convert_params(params, config2))


# --- training checkpoints ------------------------------------------------------------------------


@pytest.mark.slow
def test_workdir_trained_scanned_loads_unrolled_and_resume_is_checked(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_run_config(tmp_path, **{"model.scan_layers": True, "model.remat": "full"})
  config.model.num_layers = 2
  train_and_evaluate(config, str(workdir))
  scan_cfg, scan_params, tok = inference.load(str(workdir))
  assert scan_cfg.scan_layers and "layers" in scan_params["encoder"]
  flat_cfg, flat_params, _ = inference.load(str(workdir), scan_layers=False)
  assert not flat_cfg.scan_layers and "layers_1" in flat_params["encoder"]
  jax.tree.map(
    np.testing.assert_array_equal, model.convert_params(scan_params, flat_cfg), flat_params
  )
  tokens = np.zeros((2, 10), np.int32)
  for row, text in enumerate(["ab cd", "ef gh ij"]):
    ids = tok.encode(text)[:10]
    tokens[row, : len(ids)] = ids
  a = t5jax.generate(scan_params, scan_cfg, tokens, max_new_tokens=5)
  b = t5jax.generate(flat_params, flat_cfg, tokens, max_new_tokens=5)
  np.testing.assert_array_equal(a.sequences, b.sequences)
  # The export is a per-layer HuggingFace folder; the run's config (stacked) reads it back.
  export_cfg, export_params = t5jax.load_hf(str(workdir / "export" / "hf"), config=scan_cfg)
  jax.tree.map(np.testing.assert_array_equal, export_params, scan_params)
  # Resuming with the other layout is refused, naming the field; remat may change.
  config.num_train_steps = 6
  config.model.scan_layers = False
  with pytest.raises(TrainingError, match="scan_layers: saved True, now False"):
    train_and_evaluate(config, str(workdir))
  config.model.scan_layers = True
  config.model.remat = "none"
  train_and_evaluate(config, str(workdir))
  assert inference.load(str(workdir))[0].scan_layers


# --- combined with the fused attention ---------------------------------------------------------


@pytest.mark.parametrize("name", ["umt5", "odd_dims"])
def test_scanned_remat_fused_attention_equals_unrolled_einsum(name):
  """The three switches together: logits, gradients and cached greedy/beam decoding."""
  cfg, _, params, _ = _pair(name, seed=5)
  fast = cfg.replace(scan_layers=True, remat="full", attention_impl="dot_product")
  stacked = model.convert_params(params, fast)
  enc, dec, labels = _batch(cfg.vocab_size, seed=6)
  np.testing.assert_allclose(
    t5jax.forward(stacked, fast, enc, dec), t5jax.forward(params, cfg, enc, dec), **TOL
  )
  g = jax.grad(_loss)(params, cfg, enc, dec, labels)
  gs = jax.grad(_loss)(stacked, fast, enc, dec, labels)
  assert _max_diff(model.convert_params(gs, cfg), g) < 1e-6  # as scanned alone: <= 3e-8
  for method, extra in (("greedy", {}), ("beam", dict(num_beams=3, num_return_sequences=2))):
    a = t5jax.generate(params, cfg, enc, method=method, max_new_tokens=6, **extra)
    b = t5jax.generate(stacked, fast, enc, method=method, max_new_tokens=6, **extra)
    np.testing.assert_array_equal(b.sequences, a.sequences)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
