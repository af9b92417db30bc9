"""Tiny random HuggingFace T5-family models built inside the tests (no downloads)."""

from __future__ import annotations

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


def make_hf_model(family: str | dict, seed: int = 0, **overrides):
  """Returns a random eager-attention HF model in eval mode."""
  spec = dict(FAMILIES[family]) if isinstance(family, str) else dict(family)
  spec.update(overrides)
  kind = spec.pop("kind", "t5")
  untie = spec.pop("untie", False)
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
  model = cls[1](config)
  if untie:
    d, v = spec["d_model"], spec["vocab_size"]
    model.lm_head.weight = torch.nn.Parameter(torch.randn(v, d) * d**-0.5)
  with torch.no_grad():  # non-trivial norm scales, so a missed norm shows up
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.mul_(1 + 0.2 * torch.randn_like(p))
  return model.eval()


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
