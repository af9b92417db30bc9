"""LoRA and prompt tuning: equal to the base at init, only adapters trained, merge, PEFT parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft as hf_peft  # the reference: PEFT's LoRA on transformers' T5 (a test extra)
import pytest
import torch
import transformers
from helpers.hf_models import make_hf_model, random_batch

import t5jax
from t5jax import model, peft
from t5jax.config import T5Config

TOL = dict(atol=1e-4, rtol=1e-5)
ALL_ATTENTION = tuple(f"{s}.{n}" for s in ("encoder", "decoder", "cross") for n in "qkvo")


def _targets(config: T5Config) -> tuple[str, ...]:
  mlp = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
  return ALL_ATTENTION + tuple(f"{s}.{n}" for s in ("encoder", "decoder") for n in mlp)


def _hf(family: str, tmp_path):
  hf_model = make_hf_model(family)
  hf_model.save_pretrained(tmp_path / "base")
  config, base = t5jax.load_hf(str(tmp_path / "base"))
  return hf_model, config, base


def _lora(config: T5Config, base, targets, seed=0, rank=4, alpha=8.0, noise=0.2):
  """An adapted config and trained-looking adapters (B nonzero)."""
  cfg = config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
  trainable = peft.init_trainable(cfg, base, seed)
  rng = np.random.default_rng(seed + 1)
  trainable = jax.tree.map(
    lambda x: x + noise * rng.standard_normal(x.shape).astype(np.float32), trainable
  )
  return cfg, trainable


def _ours(config, params, ids, dec):
  return np.asarray(model.forward(params, config, jnp.asarray(ids.numpy()), jnp.asarray(dec)))


def _batch():
  ids, dec, _ = random_batch(96, 2, 11, 6, seed=3, pad_from=[11, 5])
  return ids, dec.numpy()


@pytest.mark.parametrize("family", ["t5_tied_relu", "t5_untied_gated", "umt5"])
def test_zero_b_equals_base_and_peft_parity(family, tmp_path):
  hf_model, config, base = _hf(family, tmp_path)
  ids, dec = _batch()
  # Fresh adapters (B = 0): the adapted model is its base, logits and decoding.
  cfg = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=_targets(config))
  fresh = peft.combine(base, peft.init_trainable(cfg, base, 0))
  np.testing.assert_array_equal(_ours(cfg, fresh, ids, dec), _ours(config, base, ids, dec))
  enc = jnp.asarray(ids.numpy())
  gen = t5jax.GenerateConfig(max_new_tokens=5)
  np.testing.assert_array_equal(
    t5jax.generate(fresh, cfg, enc, gen).sequences, t5jax.generate(base, config, enc, gen).sequences
  )
  # Trained adapters on every projection: PEFT loads our export onto transformers' model and
  # gives our logits; the merged export through save_hf gives them too.
  cfg, trainable = _lora(config, base, _targets(config))
  ours = _ours(cfg, peft.combine(base, trainable), ids, dec)
  assert np.abs(ours - _ours(config, base, ids, dec)).max() > 0.1  # the adapters matter
  peft.save_peft(cfg, trainable, str(tmp_path / "adapter"))
  loaded = hf_peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = loaded(
      input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=torch.tensor(dec)
    ).logits.numpy()
  np.testing.assert_allclose(ours, theirs, **TOL)
  merged_cfg, merged = peft.merge(peft.combine(base, trainable), cfg)
  t5jax.save_hf(merged_cfg, merged, str(tmp_path / "merged"))
  hf_merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(
    tmp_path / "merged", attn_implementation="eager"
  )
  with torch.no_grad():
    theirs = hf_merged(
      input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=torch.tensor(dec)
    ).logits.numpy()
  np.testing.assert_allclose(ours, theirs, **TOL)


def test_peft_parity_subset_of_targets(tmp_path):
  """PEFT's default T5 targets (q, v everywhere) and a per-stack choice, scanned layers."""
  hf_model, config, base = _hf("t5_odd_dims", tmp_path)
  ids, dec = _batch()
  targets = ("encoder.q", "encoder.v", "cross.k", "decoder.wo")
  cfg, trainable = _lora(config, base, targets, rank=3, alpha=5.0)
  ours = _ours(cfg, peft.combine(base, trainable), ids, dec)
  scfg = cfg.replace(scan_layers=True)
  stacked = model.convert_params(peft.combine(base, trainable), scfg)
  np.testing.assert_allclose(_ours(scfg, stacked, ids, dec), ours, atol=1e-6, rtol=1e-6)
  # Exported from the stacked layout.
  peft.save_peft(scfg, peft.split(stacked)[0], str(tmp_path / "adapter"))
  loaded = hf_peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = loaded(
      input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=torch.tensor(dec)
    ).logits.numpy()
  np.testing.assert_allclose(ours, theirs, **TOL)
  _, merged = peft.merge(stacked, scfg)
  np.testing.assert_allclose(_ours(config.replace(scan_layers=True), merged, ids, dec), ours, **TOL)


def test_prompt_of_length_zero_is_base_and_prompt_masks():
  config = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
                    num_decoder_layers=2, dropout_rate=0.0)  # fmt: skip
  base = model.init_params(config, jax.random.key(0))
  ids, dec = _batch()
  assert not peft.init_trainable(config.replace(prompt_length=0), base, 0)
  cfg = config.replace(prompt_length=3)
  prompt = peft.init_trainable(cfg, base, 0)
  assert prompt["prompt"].shape == (3, 32)
  params = peft.combine(base, prompt)
  enc = jnp.asarray(ids.numpy())
  # A prompt equal to the embeddings of tokens p is the base model with p before every input:
  # the prompt positions are valid keys of the encoder and of cross-attention, and come first in
  # the relative positions (google-research/prompt-tuning's semantics).
  p = np.array([7, 3, 50])
  params = peft.combine(base, {"prompt": np.asarray(base["shared"])[p]})
  ext = jnp.concatenate([jnp.broadcast_to(jnp.asarray(p), (2, 3)), enc], axis=1)
  got = model.encode(params, cfg, enc)
  assert got.shape == (2, 3 + 11, 32)
  np.testing.assert_allclose(got, model.encode(base, config, ext), atol=1e-6)
  np.testing.assert_allclose(
    model.forward(params, cfg, enc, jnp.asarray(dec)),
    model.forward(base, config, ext, jnp.asarray(dec)),
    atol=1e-5,
  )
  gen = t5jax.GenerateConfig(max_new_tokens=4)
  np.testing.assert_array_equal(
    t5jax.generate(params, cfg, enc, gen).sequences,
    t5jax.generate(base, config, ext, gen).sequences,
  )
  with pytest.raises(ValueError, match="packed"):
    model.encode(params, cfg, enc, segment_ids=jnp.ones_like(enc))
