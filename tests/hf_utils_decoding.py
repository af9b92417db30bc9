"""Tiny random transformers T5 models for the decoding parity tests, saved with save_pretrained."""

import os

import numpy as np

TINY = dict(
  vocab_size=24,
  d_model=32,
  d_kv=8,
  d_ff=48,
  num_heads=4,
  num_layers=2,
  num_decoder_layers=2,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=16,
  dropout_rate=0.0,
  decoder_start_token_id=0,
  pad_token_id=0,
  eos_token_id=1,
)

VARIANTS = {
  # T5 1.1 / flan: gated-gelu, untied head.
  "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
  # T5 1.0: relu, tied and rescaled head.
  "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


# Output rows swapped with EOS's (for seed 1) so that greedy rows of `random_inputs(6, 9, 24, 1)`
# end with EOS at various steps while others run to the limit.
EOS_SWAP = {"v1_1": 9, "v1_0": 22}


def make_hf_model(variant="v1_1", seed=1, scale=2.0, eos_swap="default", **overrides):
  """A random eager-attention `T5ForConditionalGeneration` in eval mode.

  transformers' own initialisation makes tiny models emit token 0 forever; weights are redrawn
  with `scale / sqrt(fan_in)` (embeddings and position biases std 1, norm scales near 1) so that
  outputs vary, some rows end with EOS early and others run to the length limit.
  """
  import torch
  import transformers

  kwargs = {**TINY, **VARIANTS[variant], **overrides}
  config = transformers.T5Config(**kwargs)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(config)
  model = model.to(torch.float32).eval()
  model.config._attn_implementation = "eager"
  model.generation_config.decoder_start_token_id = 0
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif "relative_attention_bias" in name or name == "shared.weight":
        p.normal_(0, 1.0)
      else:
        p.normal_(0, scale * p.shape[1] ** -0.5)
    if eos_swap == "default":
      eos_swap = EOS_SWAP[variant] if seed == 1 else None
    if eos_swap:
      head = model.get_output_embeddings().weight
      head[[1, eos_swap]] = head[[eos_swap, 1]]
  return model


def save_hf_model(model, directory):
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return directory


def load_as_t5jax(model, directory):
  """Saves `model` to `directory` and loads it with `t5jax.load_hf`."""
  from t5jax.hf import load_hf

  save_hf_model(model, directory)
  return load_hf(directory)


def random_inputs(batch, max_len, vocab, seed=0):
  """int32 [B, S] token ids in [2, vocab) with random lengths, EOS-terminated, 0-padded."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((batch, max_len), np.int32)
  for b in range(batch):
    n = int(rng.integers(2, max_len + 1))
    tokens[b, : n - 1] = rng.integers(2, vocab, size=n - 1)
    tokens[b, n - 1] = 1
  return tokens


def hf_generate(model, tokens, **kwargs):
  """transformers generate() on numpy inputs -> (sequences without start token, scores or None)."""
  import torch

  ids = torch.tensor(tokens, dtype=torch.long)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny matrices: threads only add contention with the other worker
  try:
    with torch.no_grad():
      out = model.generate(
        input_ids=ids,
        attention_mask=(ids != 0).long(),
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
      )
  finally:
    torch.set_num_threads(threads)
  seqs = out.sequences[:, 1:].numpy()
  scores = getattr(out, "sequences_scores", None)
  return seqs, None if scores is None else scores.numpy()


def normalise(seqs, length, eos=1, pad=0):
  """Pads [..., l] to `length`, `pad` after the first EOS (transformers' beams pad with EOS)."""
  seqs = np.asarray(seqs)
  out = np.full(seqs.shape[:-1] + (length,), pad, seqs.dtype)
  out[..., : seqs.shape[-1]] = seqs
  is_eos = out == eos
  out[(np.cumsum(is_eos, axis=-1) - is_eos) > 0] = pad
  return out
