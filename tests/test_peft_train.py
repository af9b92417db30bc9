"""LoRA and prompt-tuning runs end to end: only adapters trained, exact resume, load, export."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from helpers.cli import run_script
from helpers.hf_models import make_hf_model
from helpers.runs import set_fields, tsv_run_config, write_tsv

from t5jax import checkpoint, inference, model, peft, trainer
from t5jax.errors import ConfigError
from t5jax.train import train_and_evaluate
from t5jax.train_config import LoraConfig, from_config_dict
from t5jax.workdir import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
  """A tiny gated HuggingFace T5 over ByT5's 384 byte ids."""
  folder = tmp_path_factory.mktemp("base")
  hf_model = make_hf_model("t5_untied_gated", vocab_size=384, num_layers=1, num_decoder_layers=2)
  hf_model.save_pretrained(folder)
  return str(folder)


def _config(tmp_path, base_folder, **overrides):
  c = tsv_run_config(tmp_path)
  c.model = {}
  c.init_from = base_folder
  c.optimizer.learning_rate = 1e-2
  c.eval_generate_examples = 4
  c.async_checkpoints = False
  return set_fields(c, overrides)


def _trained(workdir, step=None):
  return checkpoint.restore_params(workdir, step)[1]


LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "lora.decoder": "q,v,wi,wo"}


@pytest.mark.slow
def test_lora_run_trains_adapters_only_resumes_exactly_and_exports(tmp_path, base_folder):
  whole = str(tmp_path / "whole")
  train_and_evaluate(_config(tmp_path, base_folder, **LORA), whole)
  # The checkpoint holds the adapters and their optimizer state, nothing of the base.
  saved = _trained(whole)
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(saved)[0]}
  assert names and all(peft.is_trainable(n) for n in names), names
  assert "wi_0_lora_a" in names and "wi_1_lora_b" in names  # "wi" of a gated MLP: both
  with open(Paths(whole).peft_pointer) as fh:
    assert json.load(fh)["base"] == os.path.abspath(base_folder)
  # The adapters moved (B left zero) and the base did not.
  b = [x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0] if "lora_b" in str(p[-1])]
  assert all(np.abs(x).max() > 0 for x in b)
  config, params, tok = inference.load(whole)
  _, base = inference.load(base_folder, "byt5")[:2]
  frozen = peft.split(params)[1]
  jax.tree.map(np.testing.assert_array_equal, frozen, base)
  # Resume: stopped at step 2 (its checkpoint), then continued to 4, equals the uninterrupted run
  # bit for bit (dropout on the adapters' input included).
  parted = str(tmp_path / "parted")
  train_and_evaluate(_config(tmp_path, base_folder, num_train_steps=2, **LORA), parted)
  train_and_evaluate(_config(tmp_path, base_folder, **LORA), parted)
  jax.tree.map(np.testing.assert_array_equal, _trained(parted), saved)
  # Exports: the merged model in transformers, the adapters in PEFT, both with our logits.
  ids = np.array([[5, 9, 33, 70, 1, 0], [40, 41, 42, 1, 0, 0]], np.int32)
  dec = np.array([[0, 7, 8, 9], [0, 3, 4, 5]], np.int32)
  ours = np.asarray(model.forward(params, config, ids, dec))
  t_ids, t_dec = torch.tensor(ids, dtype=torch.long), torch.tensor(dec, dtype=torch.long)

  def logits(m):
    with torch.no_grad():
      return m(input_ids=t_ids, attention_mask=(t_ids != 0).long(), decoder_input_ids=t_dec).logits

  merged = transformers.AutoModelForSeq2SeqLM.from_pretrained(
    os.path.join(whole, "export", "hf"), attn_implementation="eager"
  )
  np.testing.assert_allclose(ours, logits(merged).numpy(), **TOL)
  base_hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(
    base_folder, attn_implementation="eager"
  )
  adapted = hf_peft.PeftModel.from_pretrained(base_hf, os.path.join(whole, "export", "peft"))
  np.testing.assert_allclose(ours, logits(adapted.eval()).numpy(), **TOL)
  # decode.py --checkpoint on the workdir: base + adapters, as the library decodes.
  inputs = tmp_path / "in.txt"
  inputs.write_text("ab cd\nef\n")
  out = tmp_path / "out.txt"
  args = ["--checkpoint", whole, "--input_file", inputs, "--output_file", out]
  args += ["--max_new_tokens", 6]
  assert run_script("decode.py", args) == 0
  rows = np.zeros((2, 8), np.int32)
  for i, text in enumerate(["ab cd", "ef"]):
    enc = tok.encode(text)
    rows[i, : len(enc)] = enc
  from t5jax.generate import GenerateConfig, generate

  seqs = np.asarray(generate(params, config, rows, GenerateConfig(max_new_tokens=6)).sequences)
  assert out.read_text().split("\n")[:2] == [tok.decode(s.tolist()) for s in seqs]


@pytest.mark.slow
def test_prompt_tuning_run_trains_the_prompt_alone(tmp_path, base_folder):
  workdir = str(tmp_path / "prompt")
  c = _config(
    tmp_path,
    base_folder,
    **{
      "prompt.length": 3,
      "num_train_steps": 2,
      "eval_every": 2,
      "data.eval_file": write_tsv(tmp_path / "eval.tsv", 8, seed=1),
    },
  )
  train_and_evaluate(c, workdir)
  saved = _trained(workdir)
  assert list(saved) == ["prompt"] and saved["prompt"].shape == (3, 32)
  config, params, _ = inference.load(workdir)
  assert config.prompt_length == 3
  np.testing.assert_array_equal(params["prompt"], saved["prompt"])
  assert not os.path.exists(os.path.join(workdir, "export", "hf"))  # no transformers form
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any(r["split"] == "eval" and "exact_match" in r for r in rows)


@pytest.mark.parametrize("opt,scan", [("adamw", False), ("adafactor", True)])
def test_only_adapters_get_gradients_and_optimizer_state(base_folder, opt, scan):
  # Scanned, every adapter is stacked: Adafactor's per-layer split has an empty unstacked part.
  config, base, _ = inference.load(base_folder, "byt5", scan_layers=scan)
  cfg = config.replace(lora_rank=2, lora_alpha=2.0, lora_targets=("encoder.q", "cross.v"))
  from t5jax import optim
  from t5jax.train_config import LossConfig, OptimizerConfig

  ocfg = OptimizerConfig(name=opt, schedule="constant", warmup_steps=0, learning_rate=0.1)
  tx = optim.make_optimizer(ocfg, optim.make_schedule(ocfg))
  trainable = peft.init_trainable(cfg, base, 0)
  state = trainer.create_train_state(jax.tree.map(np.asarray, trainable), tx)
  opt_leaves = jax.tree.leaves(state.opt_state)
  assert sum(x.size for x in opt_leaves) <= 2 * sum(x.size for x in jax.tree.leaves(trainable)) + 4
  step = trainer.make_train_step(cfg, tx, optim.make_schedule(ocfg), LossConfig())
  batch = {
    "encoder_input_tokens": np.array([[5, 6, 7, 1]], np.int32),
    "decoder_input_tokens": np.array([[0, 8, 9]], np.int32),
    "decoder_target_tokens": np.array([[8, 9, 1]], np.int32),
    "decoder_loss_weights": np.ones((1, 3), np.float32),
  }
  new, metrics = jax.jit(step)(state, batch, jax.random.key(0), base)
  assert jax.tree.structure(new.params) == jax.tree.structure(state.params)
  assert float(metrics["grad_norm"]) > 0
  # With B = 0 the first gradient reaches B alone (A's is (x^T dy) B^T = 0): every B moves.
  flat_new = jax.tree_util.tree_flatten_with_path(new.params)[0]
  for (path, x), y in zip(flat_new, jax.tree.leaves(state.params), strict=True):
    if str(path[-1].key).endswith("_lora_b"):
      assert np.abs(np.asarray(x) - np.asarray(y)).max() > 0, path


def test_bad_peft_configs_name_the_field(tmp_path, base_folder):
  with pytest.raises(ConfigError, match="config.lora.encoder: unknown projection 'x'"):
    LoraConfig(rank=2, encoder="q,x")
  with pytest.raises(ConfigError, match="cross: unknown projection 'wo'"):
    LoraConfig(rank=2, cross="wo")
  with pytest.raises(ConfigError, match="init_from"):
    from_config_dict({"lora": {"rank": 4}})
  with pytest.raises(ConfigError, match="packing"):
    from_config_dict({"init_from": base_folder, "prompt": {"length": 2}, "data": {"pack": True}})
  with pytest.raises(ConfigError, match="wi_0 exists only in a gated MLP"):
    LoraConfig(rank=2, encoder="wi_0").targets(gated=False)
