"""HuggingFace checkpoint import/export: round trips, formats, conventions and clear errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers.hf_models import make_hf_model, random_batch
from safetensors.numpy import load_file, save_file

import t5jax
from t5jax.hf import CheckpointError

TOL = dict(atol=1e-4, rtol=1e-5)


def _hf_logits(model, ids, dec):
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=dec).logits


def _ours(config, params, ids, dec):
  return np.asarray(
    t5jax.forward(params, config, jnp.asarray(ids.numpy()), jnp.asarray(dec.numpy()))
  )


@pytest.mark.parametrize("family", ["t5_tied_relu", "t5_untied_gated", "umt5"])
def test_save_hf_reloads_in_transformers_with_same_logits(family, tmp_path):
  config = t5jax.T5Config.from_hf_dict(make_hf_model(family).config.to_dict())
  config = config.replace(vocab_size=96)
  params = t5jax.init_params(config, jax.random.PRNGKey(7))
  t5jax.save_hf(config, params, str(tmp_path))
  model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation="eager")
  ids, dec, _ = random_batch(96, 2, 13, 7, seed=3, pad_from=[13, 6])
  np.testing.assert_allclose(_ours(config, params, ids, dec), _hf_logits(model, ids, dec), **TOL)
  # And our own reload is bit-exact.
  config2, params2 = t5jax.load_hf(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_load_save_load_is_bit_exact(tmp_path):
  model = make_hf_model("t5_odd_dims")
  model.save_pretrained(tmp_path / "a")
  config, params = t5jax.load_hf(str(tmp_path / "a"))
  t5jax.save_hf(config, params, str(tmp_path / "b"))
  a, b = (
    load_file(tmp_path / "a" / "model.safetensors"),
    load_file(tmp_path / "b/model.safetensors"),
  )
  assert set(b) <= set(a)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k])
  config2, params2 = t5jax.load_hf(str(tmp_path / "b"))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_safetensors_and_bf16(tmp_path):
  model = make_hf_model("t5_untied_gated")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  config, params = t5jax.load_hf(str(tmp_path / "sharded"))
  ids, dec, _ = random_batch(config.vocab_size, 2, 9, 5, seed=1)
  np.testing.assert_allclose(_ours(config, params, ids, dec), _hf_logits(model, ids, dec), **TOL)

  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  config, params = t5jax.load_hf(str(tmp_path / "bf16"))
  assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
  ref = _hf_logits(model.to(torch.float32), ids, dec)  # bf16 weights, upcast: exact in float32
  np.testing.assert_allclose(_ours(config, params, ids, dec), ref, **TOL)


def test_pickle_only_with_opt_in(tmp_path):
  model = make_hf_model("t5_tied_relu")
  model.save_pretrained(tmp_path)  # transformers 5.x writes safetensors: make the pickle by hand
  sd = {k: torch.from_numpy(v) for k, v in load_file(tmp_path / "model.safetensors").items()}
  torch.save(sd, tmp_path / "pytorch_model.bin")
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="pickle"):
    t5jax.load_hf(str(tmp_path))
  config, params = t5jax.load_hf(str(tmp_path), allow_pickle=True)
  ids, dec, _ = random_batch(config.vocab_size, 1, 8, 4)
  np.testing.assert_allclose(_ours(config, params, ids, dec), _hf_logits(model, ids, dec), **TOL)


def _saved(tmp_path, family="t5_tied_relu"):
  make_hf_model(family).save_pretrained(tmp_path)
  return load_file(tmp_path / "model.safetensors")


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
  sd = _saved(tmp_path)
  path = tmp_path / "model.safetensors"
  broken = dict(sd)
  del broken["encoder.block.1.layer.0.SelfAttention.k.weight"]
  save_file(broken, path)
  with pytest.raises(CheckpointError, match=r"missing tensors encoder\.block\.1\.layer\.0"):
    t5jax.load_hf(str(tmp_path))
  save_file({**sd, "encoder.block.9.layer.0.SelfAttention.q.weight": np.zeros((2, 2), "f")}, path)
  with pytest.raises(CheckpointError, match=r"unexpected tensors encoder\.block\.9"):
    t5jax.load_hf(str(tmp_path))
  bad = dict(sd)
  bad["decoder.block.0.layer.2.DenseReluDense.wo.weight"] = np.zeros((3, 3), "f")
  save_file(bad, path)
  with pytest.raises(CheckpointError, match=r"mis-shaped tensors decoder\.block\.0.*expected"):
    t5jax.load_hf(str(tmp_path))


def test_unsupported_architectures_and_missing_files(tmp_path):
  _saved(tmp_path)
  cfg = json.loads((tmp_path / "config.json").read_text())
  for model_type in ("longt5", "switch_transformers", "bart"):
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    with pytest.raises(ValueError, match=f"unsupported architecture: model_type='{model_type}'"):
      t5jax.load_hf(str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(CheckpointError, match="no config.json"):
    t5jax.load_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    t5jax.load_hf(str(tmp_path))


@pytest.mark.parametrize(
  "hf,has_head,tied,scale",
  [
    ({"model_type": "t5", "tie_word_embeddings": True}, False, True, True),  # T5 1.0
    ({"model_type": "t5", "tie_word_embeddings": False}, True, False, False),  # 4.x T5 1.1
    # 5.x writes tie=true with the wish kept in scale_decoder_outputs.
    ({"model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": False}, True,
     False, False),
    ({"model_type": "t5", "tie_word_embeddings": True, "scale_decoder_outputs": False}, False,
     True, False),
    ({"model_type": "mt5", "tie_word_embeddings": True}, False, True, False),  # mT5 never rescales
    ({"model_type": "umt5", "tie_word_embeddings": False}, True, False, False),
  ],
)  # fmt: skip
def test_tying_and_rescale_conventions(hf, has_head, tied, scale):
  config = t5jax.T5Config.from_hf_dict(hf, has_lm_head=has_head)
  assert (config.tie_word_embeddings, config.scale_decoder_outputs) == (tied, scale)
  assert config.per_layer_position_bias == (hf["model_type"] == "umt5")


def test_tied_without_rescale_matches_transformers(tmp_path):
  # A 5.x-era checkpoint: no lm_head, "tie_word_embeddings": true, "scale_decoder_outputs": false.
  model = make_hf_model("t5_tied_relu", tie_word_embeddings=False)
  model.save_pretrained(tmp_path)
  assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
  config, params = t5jax.load_hf(str(tmp_path))
  assert config.tie_word_embeddings and not config.scale_decoder_outputs
  ids, dec, _ = random_batch(config.vocab_size, 1, 8, 4)
  np.testing.assert_allclose(_ours(config, params, ids, dec), _hf_logits(model, ids, dec), **TOL)


def test_presets_round_trip_through_hf_config():
  for name in t5jax.PRESETS:
    config = t5jax.get_config(name)
    again = t5jax.T5Config.from_hf_dict(
      config.to_hf_dict(), has_lm_head=not config.tie_word_embeddings
    )
    assert again == config, name
  assert (
    t5jax.get_config("byt5-small").num_decoder_layers < t5jax.get_config("byt5-small").num_layers
  )
  with pytest.raises(ValueError, match="unknown T5 preset"):
    t5jax.get_config("t5-gigantic")
  with pytest.raises(ValueError, match="feed_forward_proj"):
    t5jax.T5Config(feed_forward_proj="gated-wobble")
