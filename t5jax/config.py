"""`T5Config`: one frozen dataclass holding every architectural choice of a T5 model.

Every quirk that differs between T5 1.0, T5 1.1 / flan-t5, mT5, UMT5 and ByT5 is an explicit field
here, so the model code never branches on a model name. Named presets cover the published sizes,
and `from_hf_dict` / `to_hf_dict` convert to and from a HuggingFace `config.json` (transformers 4.x
and 5.x conventions both).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.extend.backend
import jax.numpy as jnp

SUPPORTED_HF_MODEL_TYPES = ("t5", "mt5", "umt5")
ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn", "xla")


def on_cpu() -> bool:
  """Whether the default backend is the CPU (where XLA:CPU-specific formulations apply)."""
  return jax.default_backend() == "cpu"


def on_cuda() -> bool:
  """Whether the default backend is an NVIDIA GPU (cuDNN); ROCm GPUs are "gpu" too."""
  backend = jax.extend.backend.get_backend()
  return backend.platform == "gpu" and "cuda" in backend.platform_version.lower()


def usable_attention_impls() -> tuple[str, ...]:
  """The `T5Config.attention_impl` values the default backend runs: "cudnn" needs an NVIDIA GPU
  (cuDNN); the others run everywhere ("dot_product" uses cuDNN where it applies)."""
  return ATTENTION_IMPLS if on_cuda() else tuple(i for i in ATTENTION_IMPLS if i != "cudnn")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture of an encoder-decoder T5.

  Attributes:
    vocab_size: rows of the shared embedding (and of the output layer).
    d_model: width of the residual stream.
    d_kv: width of one attention head; `num_heads * d_kv` need not equal `d_model`.
    d_ff: hidden width of the feed-forward block.
    num_heads: attention heads.
    num_layers: encoder blocks.
    num_decoder_layers: decoder blocks (ByT5 uses fewer than the encoder).
    relative_attention_num_buckets: buckets of the relative position bias.
    relative_attention_max_distance: distance at which the log-spaced buckets saturate.
    feed_forward_proj: "relu", "gated-gelu" (tanh approximation), or any "ACT" / "gated-ACT"
      where ACT is one of `ACTIVATIONS`.
    tie_word_embeddings: the output layer reuses the shared embedding (no `lm_head`).
    scale_decoder_outputs: multiply the decoder output by `d_model**-0.5` before the output layer
      (T5 1.0 does, T5 1.1 / mT5 / UMT5 do not).
    per_layer_position_bias: every self-attention layer owns its bias table (UMT5) instead of one
      table per stack owned by layer 0 (T5, mT5).
    dropout_rate: the one dropout rate T5 uses everywhere.
    layer_norm_epsilon: RMS norm epsilon.
    dtype: computation dtype ("float32", "bfloat16"); norms, softmax and logits stay float32.
    param_dtype: parameter dtype (float32 for training).
    pad_token_id, eos_token_id, decoder_start_token_id: special ids (0, 1, 0 in every T5).
    attention_impl: "einsum" (default: scores, softmax and values as einsums) or a fused kernel
      through `jax.nn.dot_product_attention`: "dot_product" (cuDNN flash attention on NVIDIA GPUs
      where it applies, XLA's otherwise), "cudnn" (forced) or "xla". See `t5jax.layers.attend`.
    scan_layers: run each stack's layers as one `scan` over parameters stacked on a leading
      `layers` axis (`params["encoder"]["layers"]`) instead of one unrolled block per layer
      (`params["encoder"]["layers_0"]`, ...): compile time no longer grows with depth. Same
      results; `t5jax.model.convert_params` moves parameters between the two layouts.
    remat: rematerialisation of each layer in the backward pass (`REMAT_POLICIES`): "none"
      keeps every activation; "full" keeps only each layer's input and recomputes the rest;
      "dots" keeps every matmul output (attention scores included) and recomputes the
      elementwise work; "dots_no_batch" keeps the weight matmuls' outputs (projections, MLP) and
      recomputes attention scores, softmax and the elementwise work. Same gradients.
    lora_rank: rank r of the LoRA adapters (0: none). Each adapted projection `x @ W` becomes
      `x @ W + (alpha / r) * (dropout(x) @ A) @ B` with `A [in, r]`, `B [r, out]` stored beside
      `W` (`<name>_lora_a`, `<name>_lora_b`), so they are stacked like the layers under
      `scan_layers` and sharded by their logical axes (see `t5jax.peft`).
    lora_alpha: LoRA's alpha; the update is scaled by `lora_alpha / lora_rank`.
    lora_dropout: dropout on the adapters' input (training only).
    lora_targets: the adapted projections as "stack.name": stack "encoder" (self-attention and
      MLP), "decoder" (self-attention and MLP) or "cross" (the decoder's cross-attention); name
      q, k, v, o (attention) or wi, wi_0, wi_1, wo (MLP: wi for T5 1.0, wi_0 / wi_1 gated).
    prompt_length: N learned soft-prompt vectors (`params["prompt"]`, `[N, D]`) prepended to the
      embedded encoder input (0: none): the encoder runs over N + S positions, the prompt
      positions valid in every mask and first in the relative positions (prompt tuning, as
      google-research/prompt-tuning does it; no packing).
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 8
  num_layers: int = 6
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool = True
  per_layer_position_bias: bool = False
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  attention_impl: str = "einsum"
  scan_layers: bool = False
  remat: str = "none"
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  prompt_length: int = 0

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives a list
    self._check_peft()
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
        f"T5Config.attention_impl={self.attention_impl!r}: use one of {', '.join(ATTENTION_IMPLS)}"
      )
    _ = self.activation  # validates feed_forward_proj
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat={self.remat!r}: expected one of {list(REMAT_POLICIES)}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"T5Config.{name}: unknown dtype {getattr(self, name)!r}") from e
    if self.scale_decoder_outputs and not self.tie_word_embeddings:
      # transformers never rescales an untied head; neither do we, so the combination is a bug.
      raise ValueError("T5Config: scale_decoder_outputs=True requires tie_word_embeddings=True")

  def _check_peft(self) -> None:
    if self.lora_rank < 0 or self.prompt_length < 0:
      raise ValueError("T5Config: lora_rank and prompt_length must be >= 0")
    if not 0.0 <= self.lora_dropout < 1.0:
      raise ValueError(f"T5Config.lora_dropout={self.lora_dropout} must be in [0, 1)")
    if bool(self.lora_rank) != bool(self.lora_targets):
      raise ValueError("T5Config: lora_rank > 0 needs lora_targets, and lora_targets a rank")
    mlp = ("wi_0", "wi_1") if self.is_gated else ("wi",)
    allowed = {"encoder": ("q", "k", "v", "o", *mlp, "wo"), "decoder": ("q", "k", "v", "o", *mlp,
               "wo"), "cross": ("q", "k", "v", "o")}  # fmt: skip
    for target in self.lora_targets:
      stack, _, name = target.partition(".")
      if name not in allowed.get(stack, ()):
        raise ValueError(
          f"T5Config.lora_targets: {target!r} is not one of "
          f"{[f'{s}.{n}' for s, ns in allowed.items() for n in ns]}"
        )

  def lora_names(self, stack: str) -> tuple[str, ...]:
    """The adapted projections of `stack` ("encoder", "decoder" or "cross"): q, k, v, o, wi..."""
    return tuple(t.split(".", 1)[1] for t in self.lora_targets if t.split(".", 1)[0] == stack)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def without_peft(self) -> T5Config:
    """The base architecture: no adapters, no prompt."""
    return self.replace(lora_rank=0, lora_alpha=0.0, lora_dropout=0.0, lora_targets=(),
                        prompt_length=0)  # fmt: skip

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    parts = self.feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
      raise ValueError(
        f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT'"
      )
    act = parts[-1]
    if act not in ACTIVATIONS:
      raise ValueError(
        f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: activation {act!r} is not one of "
        f"{sorted(ACTIVATIONS)}"
      )
    return act

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  def replace(self, **changes: Any) -> T5Config:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> T5Config:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"T5Config: unknown fields {unknown}")
    return cls(**d)

  # --- HuggingFace config.json -------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], *, has_lm_head: bool | None = None) -> T5Config:
    """Builds a config from a HuggingFace `config.json` dictionary.

    Args:
      hf: the parsed `config.json`.
      has_lm_head: whether the checkpoint holds an `lm_head.weight`. It decides tying, because a
        config written by transformers 5.x always says `tie_word_embeddings: true`. When None
        (no weights at hand), the 4.x meaning of `tie_word_embeddings` is used.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_HF_MODEL_TYPES:
      archs = hf.get("architectures") or []
      raise ValueError(
        f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
        f"t5jax supports model_type in {list(SUPPORTED_HF_MODEL_TYPES)}"
      )
    tie_flag = hf.get("tie_word_embeddings", True) is not False
    tied = tie_flag if has_lm_head is None else not has_lm_head
    if model_type == "mt5":
      scale = False  # transformers 5.x never rescales mT5 outputs
    elif "scale_decoder_outputs" in hf:
      scale = bool(hf["scale_decoder_outputs"])
    else:
      scale = tie_flag
    scale = scale and tied
    num_layers = int(hf.get("num_layers", 6))
    dec = hf.get("num_decoder_layers")
    return cls(
      vocab_size=int(hf.get("vocab_size", 32128)),
      d_model=int(hf.get("d_model", 512)),
      d_kv=int(hf.get("d_kv", 64)),
      d_ff=int(hf.get("d_ff", 2048)),
      num_heads=int(hf.get("num_heads", 8)),
      num_layers=num_layers,
      num_decoder_layers=int(dec) if dec is not None else num_layers,
      relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
      feed_forward_proj=str(hf.get("feed_forward_proj", "relu")),
      tie_word_embeddings=tied,
      scale_decoder_outputs=scale,
      per_layer_position_bias=model_type == "umt5",
      dropout_rate=float(hf.get("dropout_rate", 0.1)),
      layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
      pad_token_id=int(hf.get("pad_token_id", 0) or 0),
      eos_token_id=_first(hf.get("eos_token_id", 1)),
      decoder_start_token_id=int(hf.get("decoder_start_token_id", 0) or 0),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """A `config.json` that transformers 4.x and 5.x both read as this architecture."""
    model_type = "umt5" if self.per_layer_position_bias else "t5"
    arch = "UMT5ForConditionalGeneration" if model_type == "umt5" else "T5ForConditionalGeneration"
    act = self.activation
    return {
      "architectures": [arch],
      "model_type": model_type,
      "vocab_size": self.vocab_size,
      "d_model": self.d_model,
      "d_kv": self.d_kv,
      "d_ff": self.d_ff,
      "num_heads": self.num_heads,
      "num_layers": self.num_layers,
      "num_decoder_layers": self.num_decoder_layers,
      "relative_attention_num_buckets": self.relative_attention_num_buckets,
      "relative_attention_max_distance": self.relative_attention_max_distance,
      "feed_forward_proj": self.feed_forward_proj,
      "dense_act_fn": "gelu_new" if act == "gelu" else act,
      "is_gated_act": self.is_gated,
      # 4.x reads tying from this flag; 5.x reads the rescale from it and ties by the weights.
      "tie_word_embeddings": self.tie_word_embeddings,
      "scale_decoder_outputs": self.scale_decoder_outputs,
      "dropout_rate": self.dropout_rate,
      "layer_norm_epsilon": self.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": self.pad_token_id,
      "eos_token_id": self.eos_token_id,
      "decoder_start_token_id": self.decoder_start_token_id,
    }


def _first(x: Any) -> int:
  if isinstance(x, list | tuple):
    return int(x[0])
  return int(x if x is not None else 1)


# Rematerialisation settings (`T5Config.remat`); `t5jax.model` maps them to `jax.checkpoint`
# policies: none, nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Activations by the names HuggingFace configs use. gelu is the tanh approximation ("gelu_new"),
# which is what every released gated-gelu T5 was trained with.
ACTIVATIONS = {
  "relu": "relu",
  "gelu": "gelu_tanh",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "silu": "silu",
  "swish": "silu",
  "tanh": "tanh",
  "sigmoid": "sigmoid",
}


# --- presets ---------------------------------------------------------------------------------


def _t5_10(d_model, d_kv, d_ff, heads, layers):
  return dict(
    vocab_size=32128,
    d_model=d_model,
    d_kv=d_kv,
    d_ff=d_ff,
    num_heads=heads,
    num_layers=layers,
    num_decoder_layers=layers,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    scale_decoder_outputs=True,
  )


def _t5_11(d_model, d_ff, heads, layers, vocab=32128, dec_layers=None, **kw):
  return dict(
    vocab_size=vocab,
    d_model=d_model,
    d_kv=64,
    d_ff=d_ff,
    num_heads=heads,
    num_layers=layers,
    num_decoder_layers=dec_layers or layers,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    **kw,
  )


_V11 = {
  "small": (512, 1024, 6, 8),
  "base": (768, 2048, 12, 12),
  "large": (1024, 2816, 16, 24),
  "xl": (2048, 5120, 32, 24),
  "xxl": (4096, 10240, 64, 24),
}

PRESETS: dict[str, dict[str, Any]] = {
  "t5-small": _t5_10(512, 64, 2048, 8, 6),
  "t5-base": _t5_10(768, 64, 3072, 12, 12),
  "t5-large": _t5_10(1024, 64, 4096, 16, 24),
  "t5-3b": _t5_10(1024, 128, 16384, 32, 24),
  "t5-11b": _t5_10(1024, 128, 65536, 128, 24),
}
for _size, _dims in _V11.items():
  PRESETS[f"t5-v1_1-{_size}"] = _t5_11(*_dims)
  PRESETS[f"flan-t5-{_size}"] = _t5_11(*_dims)
  PRESETS[f"mt5-{_size}"] = _t5_11(*_dims, vocab=250112)
  PRESETS[f"umt5-{_size}"] = _t5_11(*_dims, vocab=256384, per_layer_position_bias=True)
# ByT5: a deeper encoder than decoder, 384 byte ids.
_BYT5 = {
  "small": (1472, 3584, 6, 12, 4),
  "base": (1536, 3968, 12, 18, 6),
  "large": (1536, 3840, 16, 36, 12),
  "xl": (2560, 6720, 32, 36, 12),
  "xxl": (4672, 12352, 64, 36, 12),
}
for _size, (_d, _f, _h, _l, _dl) in _BYT5.items():
  PRESETS[f"byt5-{_size}"] = _t5_11(_d, _f, _h, _l, vocab=384, dec_layers=_dl)


def get_config(name: str, **overrides: Any) -> T5Config:
  """Returns the named preset (e.g. "t5-v1_1-base"), with any field overridden."""
  if name not in PRESETS:
    raise ValueError(f"unknown T5 preset {name!r}; known: {', '.join(sorted(PRESETS))}")
  return T5Config(**{**PRESETS[name], **overrides})
