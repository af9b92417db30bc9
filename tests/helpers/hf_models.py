"""Tiny random transformers T5-family models built inside the tests (no downloads), and the
reference computations the parity tests run on them.

One builder, `make_hf_model(family, seed, **overrides)`, for two sets of families:

- `FAMILIES`, the architectures the model/HF/scan/PEFT parity tests sweep: transformers' own
  initialisation (an untied head redrawn) with norm scales moved away from 1;
- `DECODING_FAMILIES`, the decoding tests' models: every weight redrawn (`REDRAW`) so that greedy
  rows end with EOS at various steps while others run to the length limit.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
import transformers

# Named architectures the parity tests sweep. Each is a dict of HF config fields plus "kind".
FAMILIES = {
  # T5 1.0: relu, tied embeddings, decoder output rescaled.
  "t5_tied_relu": dict(kind="t5", feed_forward_proj="relu", d_model=32, d_kv=8, d_ff=64,
                       num_heads=4, num_layers=2),
  # T5 1.1 / flan: gated-gelu with a separate lm_head.
  "t5_untied_gated": dict(kind="t5", feed_forward_proj="gated-gelu", untie=True, d_model=32,
                          d_kv=8, d_ff=48, num_heads=4, num_layers=2),
  # Odd dimensions: heads * d_kv != d_model, decoder deeper than the encoder.
  "t5_odd_dims": dict(kind="t5", feed_forward_proj="gated-gelu", untie=True, d_model=24, d_kv=5,
                      d_ff=40, num_heads=3, num_layers=1, num_decoder_layers=3),
  # UMT5: per-layer position bias tables.
  "umt5": dict(kind="umt5", feed_forward_proj="gated-gelu", untie=True, d_model=32, d_kv=8,
               d_ff=48, num_heads=4, num_layers=2),
  # ByT5-shaped: byte vocabulary, encoder deeper than the decoder.
  "byt5_shaped": dict(kind="t5", feed_forward_proj="gated-gelu", untie=True, vocab_size=384,
                      d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=3,
                      num_decoder_layers=1),
}  # fmt: skip

_DECODING_TINY = dict(
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

# How each decoding family's random weights are redrawn (`redraw`). Chosen so that greedy rows of
# `random_inputs(6, 9, 24, 1)` at seed 1 end with EOS at various steps while others run to the
# 12-token limit (checked by test_generate.test_greedy_has_early_eos_and_full_rows):
# - scale: matrices drawn with std scale / sqrt(fan_in) (transformers' own initialisation makes
#   tiny models emit token 0 forever);
# - eos_swap: the output row swapped with EOS's (`eos_swap=None` keeps the head as drawn);
# - qk_scale: query/key weights scaled down so that attention logits stay moderate. At 1.0
#   (std 2/sqrt(fan_in), like the other matrices) saturated softmaxes amplified float32 rounding
#   about 100x: transformers' float32 log-probs were up to 4.3e-4 away from the same model in
#   float64. At 0.5 that error is <= 4e-5 (v1_1) and 3e-6 (v1_0), measured on these inputs;
# - embed_std: the tied v1_0 head divides logits by sqrt(d_model); std 2 keeps them peaked
#   enough for EOS to win at some steps.
DECODING_FAMILIES = {
  # T5 1.1 / flan: gated-gelu, untied head.
  "v1_1": dict(
    _DECODING_TINY,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    redraw=dict(scale=2.0, eos_swap=11, qk_scale=0.5, embed_std=1.0),
  ),
  # T5 1.0: relu, tied and rescaled head.
  "v1_0": dict(
    _DECODING_TINY,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    redraw=dict(scale=2.0, eos_swap=22, qk_scale=0.5, embed_std=2.0),
  ),
}

# Float32 error of a summed log-probability, per summed token, against the same model in float64.
# Measured on both decoding models over every beam case of test_generate: ours <= 1.8e-6,
# transformers' <= 1.6e-6 (mean per token of a hypothesis), single tokens <= 1.9e-5. 2e-5 per
# token bounds all of them.
PER_TOKEN_ERROR = 2e-5


def make_hf_model(family: str | dict, seed: int = 0, eos_swap="family", **overrides):
  """A random eager-attention HF model in eval mode: `family` names an entry of `FAMILIES` or
  `DECODING_FAMILIES` (or is such a dict); `overrides` are HF config fields."""
  if isinstance(family, str):
    spec = dict(FAMILIES.get(family) or DECODING_FAMILIES[family])
  else:
    spec = dict(family)
  spec.update(overrides)
  kind = spec.pop("kind", "t5")
  untie = spec.pop("untie", False)
  redraw = spec.pop("redraw", None)
  spec.setdefault("vocab_size", 96)
  spec.setdefault("decoder_start_token_id", 0)
  spec.setdefault("dropout_rate", 0.0)
  if untie:
    spec["tie_word_embeddings"] = False
  torch.manual_seed(seed)
  cls = {
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
    "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
    "umt5": (transformers.UMT5Config, transformers.UMT5ForConditionalGeneration),
  }[kind]
  config = cls[0](**spec)
  config._attn_implementation = "eager"
  model = cls[1](config).to(torch.float32)
  model.generation_config.decoder_start_token_id = 0
  with torch.no_grad():
    if redraw is not None:
      _redraw(model, **{**redraw, **({} if eos_swap == "family" else {"eos_swap": eos_swap})})
    else:
      if untie:
        d, v = spec["d_model"], spec["vocab_size"]
        model.lm_head.weight = torch.nn.Parameter(torch.randn(v, d) * d**-0.5)
      for name, p in model.named_parameters():  # non-trivial norm scales: a missed norm shows
        if "layer_norm" in name:
          p.mul_(1 + 0.2 * torch.randn_like(p))
  return model.eval()


def _redraw(model, scale, eos_swap, qk_scale, embed_std):
  """Every weight redrawn (see `DECODING_FAMILIES`); norm scales near 1."""
  for name, p in model.named_parameters():
    if "layer_norm" in name:
      p.copy_(1 + 0.1 * torch.randn_like(p))
    elif "relative_attention_bias" in name:
      p.normal_(0, 1.0)
    elif name == "shared.weight":
      p.normal_(0, embed_std)
    elif name.endswith((".q.weight", ".k.weight")):
      p.normal_(0, qk_scale * scale * p.shape[1] ** -0.5)
    else:
      p.normal_(0, scale * p.shape[1] ** -0.5)
  if eos_swap:
    head = model.get_output_embeddings().weight
    head[[1, eos_swap]] = head[[eos_swap, 1]]


def save_hf_model(model, directory):
  os.makedirs(directory, exist_ok=True)
  model.save_pretrained(directory)
  return directory


def load_as_t5jax(model, directory):
  """Saves `model` to `directory` and loads it with `t5jax.load_hf`."""
  from t5jax.hf import load_hf

  save_hf_model(model, directory)
  return load_hf(directory)


def decoding_model(family, directory, seed=1):
  """(transformers model, t5jax config, t5jax params, float64 transformers copy) of a decoding
  family at `seed`, saved to and loaded from `directory`."""
  hf = make_hf_model(family, seed=seed)
  config, params = load_as_t5jax(hf, directory)
  return hf, config, params, float64_copy(hf)


def random_batch(vocab: int, batch: int, src: int, tgt: int, seed: int = 0, pad_from=None):
  """Random encoder ids (right-padded from `pad_from[i]`) and decoder inputs starting with 0."""
  g = torch.Generator().manual_seed(seed)
  ids = torch.randint(2, vocab, (batch, src), generator=g)
  if pad_from is not None:
    for i, n in enumerate(pad_from):
      ids[i, n:] = 0
  labels = torch.randint(2, vocab, (batch, tgt), generator=g)
  dec = torch.cat([torch.zeros(batch, 1, dtype=labels.dtype), labels[:, :-1]], dim=1)
  return ids, dec, labels


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
  return copy.deepcopy(model).to(torch.float64)


def exact_token_log_probs(model64, tokens, targets, eos=1):
  """Float64 log p(target_t | inputs, targets_<t) [B, T], 0 after the first EOS (numpy)."""
  targets = np.asarray(targets)
  ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
  labels = torch.tensor(targets, dtype=torch.long)
  with torch.no_grad():
    logits = model64(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].numpy()
  is_eos = targets == eos
  scored = (np.cumsum(is_eos, axis=-1) - is_eos) == 0
  return np.where(scored, logp, 0.0), scored
