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


# How each variant's random weights are redrawn (seed 1). Chosen so that greedy rows of
# `random_inputs(6, 9, 24, 1)` end with EOS at various steps while others run to the 12-token
# limit (checked by test_generate.test_greedy_has_early_eos_and_full_rows):
# - eos_swap: the output row swapped with EOS's;
# - qk_scale: query/key weights scaled down so that attention logits stay moderate. At 1.0
#   (std 2/sqrt(fan_in), like the other matrices) saturated softmaxes amplified float32 rounding
#   about 100x: transformers' float32 log-probs were up to 4.3e-4 away from the same model in
#   float64. At 0.5 that error is <= 4e-5 (v1_1) and 3e-6 (v1_0), measured on these inputs;
# - embed_std: the tied v1_0 head divides logits by sqrt(d_model); std 2 keeps them peaked
#   enough for EOS to win at some steps.
DRAWS = {
  "v1_1": dict(eos_swap=11, qk_scale=0.5, embed_std=1.0),
  "v1_0": dict(eos_swap=22, qk_scale=0.5, embed_std=2.0),
}


def make_hf_model(variant="v1_1", seed=1, scale=2.0, eos_swap="default", **overrides):
  """A random eager-attention `T5ForConditionalGeneration` in eval mode.

  transformers' own initialisation makes tiny models emit token 0 forever; weights are redrawn
  with `scale / sqrt(fan_in)` (query/key matrices `qk_scale` times that, embeddings and position
  biases std `embed_std` / 1, norm scales near 1) so that outputs vary, some rows end with EOS
  early and others run to the length limit. `eos_swap=None` keeps the head as drawn.
  """
  import torch
  import transformers

  draw = DRAWS[variant]
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
      elif "relative_attention_bias" in name:
        p.normal_(0, 1.0)
      elif name == "shared.weight":
        p.normal_(0, draw["embed_std"])
      elif name.endswith((".q.weight", ".k.weight")):
        p.normal_(0, draw["qk_scale"] * scale * p.shape[1] ** -0.5)
      else:
        p.normal_(0, scale * p.shape[1] ** -0.5)
    if eos_swap == "default":
      eos_swap = draw["eos_swap"] if seed == 1 else None
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


def float64_copy(model):
  """The same transformers model computing in float64: the exact reference for float32 scores."""
  import copy

  import torch

  return copy.deepcopy(model).to(torch.float64)


def exact_token_log_probs(model64, tokens, targets, eos=1):
  """Float64 log p(target_t | inputs, targets_<t) [B, T], 0 after the first EOS (numpy)."""
  import torch

  targets = np.asarray(targets)
  ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
  labels = torch.tensor(targets, dtype=torch.long)
  with torch.no_grad():
    logits = model64(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].numpy()
  is_eos = targets == eos
  scored = (np.cumsum(is_eos, axis=-1) - is_eos) == 0
  return np.where(scored, logp, 0.0), scored
