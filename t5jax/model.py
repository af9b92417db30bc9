"""The T5 encoder-decoder and its public pure functions.

Shapes: B batch, S encoder length, T decoder length, D d_model, H heads, K head width, V vocab,
N = B * r decoding rows (r beams or samples per example), L preallocated decode length.

Public functions take a plain params pytree and a `T5Config` (static under `jit`):

- `init_params(config, rng)` / `param_axes(config)` — parameters and their logical axis names.

`forward`, `encode`, `init_cross_cache` and `decode_step` are jitted with the config static, so
calling them directly compiles once per shape; under an outer `jit` they inline.
- `forward(params, config, encoder_input_tokens, decoder_input_tokens)` — teacher-forced logits.
- `encode`, `init_cross_cache`, `init_self_cache`, `decode_step` — incremental decoding with an
  explicit cache: the encoder runs once, cross-attention keys and values are computed once per
  example (batch B, shared by its r rows), the self-attention cache (N rows, L positions) is
  preallocated and filled one position per step, and each step computes only its own row of the
  relative position bias. Keys and values are stored in the axis orders the attention reads
  without a copy (`t5jax.layers.kv_axes`): with einsum attention keys `[., H, K, L]` and values
  `[., H, L, K]`, with the fused kernel both `[., L, H, K]`.

Token 0 is padding: the encoder mask is derived from it. Packed rows pass segment ids (1..n, 0
for padding) and positions that restart per segment; attention never crosses segments.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5jax.config import T5Config
from t5jax.layers import (
  MLP,
  Attention,
  AttentionMask,
  RelativePositionBias,
  RMSNorm,
  dense,
  init_std,
  kv_axes,
  param,
)
from t5jax.partitioning import STACKED, with_logical_constraint
from t5jax.quantize import QuantizedWeight

Params = dict[str, Any]
Cache = dict[str, Any]


def _hidden(x_BSD: jax.Array) -> jax.Array:
  """Keeps hidden states split over the batch (and whole along `embed`) under a mesh.

  Without it, propagation from FSDP-sharded weights can split activations along `embed` and then
  reshard them every layer; with it the weights are gathered instead. A no-op without
  `jax.set_mesh` (see `t5jax.partitioning.with_logical_constraint`).
  """
  return with_logical_constraint(x_BSD, ("batch", "length", "embed"))


# --- masks and relative positions ------------------------------------------------------------


def _relative_positions(q_len: int, k_len: int, q_pos=None, k_pos=None):
  """`key_pos - query_pos`: static numpy `[1, T, S]`, or `[B, T, S]` from explicit positions."""
  if q_pos is None and k_pos is None:
    return (np.arange(k_len)[None, :] - np.arange(q_len)[:, None])[None].astype(np.int32)
  q_pos = jnp.arange(q_len)[None] if q_pos is None else q_pos
  k_pos = jnp.arange(k_len)[None] if k_pos is None else k_pos
  return k_pos[:, None, :] - q_pos[:, :, None]


def _attention_mask(q_valid, k_valid, q_seg=None, k_seg=None, causal=False) -> AttentionMask:
  """Who may attend to whom (`AttentionMask.dense` is the boolean `[B, 1, T, S]` form)."""
  del q_valid  # every query row attends; padded queries' outputs are never read
  return AttentionMask(key_valid=k_valid, query_segments=q_seg, key_segments=k_seg, causal=causal)


# --- layers ----------------------------------------------------------------------------------

# `T5Config.remat` -> the `jax.checkpoint` policy of each layer (absent: no remat).
_REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class EncoderLayer(nn.Module):
  """One encoder block. `__call__` returns `(x, None)`, the signature `nn.scan` expects."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_attention_layer_norm = RMSNorm(cfg)
    self.attention = Attention(cfg, stack="encoder")
    self.pre_mlp_layer_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, stack="encoder")
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.per_layer_position_bias:
      self.relpos_bias = RelativePositionBias(cfg, bidirectional=True)

  def __call__(self, x_BSD, bias, rel_pos, mask, deterministic):
    if self.config.per_layer_position_bias:
      bias = self.relpos_bias(rel_pos).astype(self.config.dtype)
    h = self.pre_attention_layer_norm(x_BSD)
    k, v = self.attention.project_kv(h, deterministic)
    h = self.attention(h, k, v, bias, mask, deterministic)
    x_BSD = x_BSD + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x_BSD), deterministic)
    return _hidden(x_BSD + self.dropout(h, deterministic=deterministic)), None


class DecoderLayer(nn.Module):
  """One decoder block, in one of three modes under one signature (so that `nn.scan` and
  `nn.remat` wrap a single `__call__`):

  - "train": `carry = (y [B, T, D], None)`; cross-attention keys/values from `encoded`.
  - "step": `carry = (y [N, 1, D], cache)`, the token at `step`; `xs = (i, cross)` with `cross`
    this layer's `{"k", "v"}` over B rows and S positions. Unrolled, `i` is None and `cache` is
    this layer's `{"k", "v"}` over N rows and L positions; scanned, `cache` holds every layer on
    axis 1 and only this layer's slice `i` at position `step` is written. (Axis orders:
    `t5jax.layers.kv_axes`.)
  - "cross": returns this layer's cross-attention `(k, v)` of `encoded` as the scan output.
  """

  config: T5Config

  def setup(self):
    cfg = self.config
    self.pre_self_attention_layer_norm = RMSNorm(cfg)
    self.self_attention = Attention(cfg, stack="decoder")
    self.pre_cross_attention_layer_norm = RMSNorm(cfg)
    self.encoder_decoder_attention = Attention(cfg, stack="cross")
    self.pre_mlp_layer_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, stack="decoder")
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.per_layer_position_bias:
      self.relpos_bias = RelativePositionBias(cfg, bidirectional=False)

  def __call__(
    self, carry, xs, bias, rel_pos, self_mask, cross_mask, encoded_BSD, step, mode, deterministic
  ):
    if mode == "cross":
      return carry, self.encoder_decoder_attention.project_kv(encoded_BSD, deterministic)
    x, cache = carry
    layer_index, cross = xs
    if cross is None:
      cross_k, cross_v = self.encoder_decoder_attention.project_kv(encoded_BSD, deterministic)
    else:
      cross_k, cross_v = cross["k"], cross["v"]
    if self.config.per_layer_position_bias:
      bias = self.relpos_bias(rel_pos).astype(self.config.dtype)
    h = self.pre_self_attention_layer_norm(x)
    k, v = self.self_attention.project_kv(h, deterministic)
    if cache is not None:
      axes = kv_axes(self.config.attention_impl)
      k, v, cache = _update_cache(cache, k, v, step, layer_index, axes)
    h = self.self_attention(h, k, v, bias, self_mask, deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.pre_cross_attention_layer_norm(x)
    h = self.encoder_decoder_attention(h, cross_k, cross_v, None, cross_mask, deterministic)
    x = x + self.dropout(h, deterministic=deterministic)
    h = self.mlp(self.pre_mlp_layer_norm(x), deterministic)
    return (_hidden(x + self.dropout(h, deterministic=deterministic)), cache), None


def _update_cache(cache, k, v, step, layer_index, axes):
  """Writes this step's keys/values (one position, in the axis orders `axes`); returns this
  layer's full keys/values and the new cache.

  Unrolled (`layer_index` None), `cache` is the layer's `{"k", "v"}` over N rows and L positions.
  Scanned, it holds every layer on axis 1 (rows first, so beam search reorders it like any cache
  leaf): the layer reads its slice and writes back only position `step` of it, so a step never
  copies the whole cache.
  """
  out, new = [], {}
  for name, x, ax in (("k", k, axes[0]), ("v", v, axes[1])):
    full, pos = cache[name], ax.index("s")
    x = x.astype(full.dtype)
    if layer_index is None:
      new[name] = jax.lax.dynamic_update_slice_in_dim(full, x, step, pos)
      out.append(new[name])
      continue
    mine = jax.lax.dynamic_index_in_dim(full, layer_index, axis=1, keepdims=False)
    out.append(jax.lax.dynamic_update_slice_in_dim(mine, x, step, axis=pos))
    starts = [jnp.zeros((), jnp.int32)] * full.ndim
    starts[1], starts[pos + 1] = layer_index, step
    new[name] = jax.lax.dynamic_update_slice(full, x[:, None], starts)
  return out[0], out[1], new


def _stack(layer_cls, config: T5Config, num: int, in_axes: tuple, static_argnums: tuple):
  """The layers of one stack: a list of `num` modules, or one `nn.scan` over `num` layers whose
  parameters are stacked on a leading `layers` axis (`in_axes`: of the arguments after the
  carry, 0 = scanned over, `nn.broadcast` = the same for every layer). With `config.remat`, each
  layer is wrapped in `nn.remat` with that policy (`static_argnums` count `self` as 0)."""
  scan = config.scan_layers
  if config.remat != "none":
    layer_cls = nn.remat(
      layer_cls,
      policy=_REMAT_POLICIES[config.remat],
      prevent_cse=not scan,  # scan already keeps XLA from merging the recomputation away
      static_argnums=static_argnums,
    )
  if not scan:
    return [layer_cls(config) for _ in range(num)]
  return nn.scan(
    layer_cls,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=in_axes,
    length=num,
    metadata_params={nn.PARTITION_NAME: STACKED},
  )(config, name=STACKED)


# --- stacks ----------------------------------------------------------------------------------


class Encoder(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    if not cfg.per_layer_position_bias:
      self.relpos_bias = RelativePositionBias(cfg, bidirectional=True)
    # EncoderLayer(x, bias, rel_pos, mask, deterministic): deterministic is argument 5.
    self.layers = _stack(EncoderLayer, cfg, cfg.num_layers, (nn.broadcast,) * 4, (5,))
    self.encoder_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, x_BSD, valid_BS, segment_ids, positions, deterministic):
    cfg = self.config
    s = x_BSD.shape[1]
    rel = _relative_positions(s, s, positions, positions)
    # The shared bias is computed once per stack, in the compute dtype, and passed to every layer.
    bias = None if cfg.per_layer_position_bias else self.relpos_bias(rel).astype(cfg.dtype)
    mask = _attention_mask(valid_BS, valid_BS, segment_ids, segment_ids)
    x = _hidden(self.dropout(x_BSD, deterministic=deterministic))
    if cfg.scan_layers:
      x, _ = self.layers(x, bias, rel, mask, deterministic)
    else:
      for layer in self.layers:
        x, _ = layer(x, bias, rel, mask, deterministic)
    return self.dropout(self.encoder_norm(x), deterministic=deterministic)


class Decoder(nn.Module):
  config: T5Config

  def setup(self):
    cfg = self.config
    if not cfg.per_layer_position_bias:
      self.relpos_bias = RelativePositionBias(cfg, bidirectional=False)
    # DecoderLayer(carry, xs, bias, rel_pos, self_mask, cross_mask, encoded, step, mode,
    # deterministic): mode and deterministic are arguments 9 and 10; xs is scanned over.
    in_axes = (0,) + (nn.broadcast,) * 8
    self.layers = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, in_axes, (9, 10))
    self.decoder_norm = RMSNorm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def _bias(self, rel):
    cfg = self.config
    return None if cfg.per_layer_position_bias else self.relpos_bias(rel).astype(cfg.dtype)

  def _run(self, carry, xs, *args):
    """Every layer in order: one scan over stacked `xs`, or a loop over a list of per-layer
    `xs` (None: nothing per layer)."""
    if self.config.scan_layers:
      return self.layers(carry, (None, None) if xs is None else xs, *args)
    outs = []
    for i, layer in enumerate(self.layers):
      carry, out = layer(carry, (None, None) if xs is None else xs[i], *args)
      outs.append(out)
    return carry, outs

  def cross_kv(self, encoded_BSD) -> Cache:
    """Cross-attention keys/values of every layer: `{"layers_i": {"k", "v"}}`, or scanned
    `{"layers": {"k", "v"}}` with a leading `n_layers` axis (axis orders: `kv_axes`)."""
    _, kv = self._run((None, None), None, None, None, None, None, encoded_BSD, None, "cross", True)
    if self.config.scan_layers:
      return {STACKED: {"k": kv[0], "v": kv[1]}}
    return {f"layers_{i}": {"k": k, "v": v} for i, (k, v) in enumerate(kv)}

  def __call__(self, y_BTD, encoded_BSD, self_mask, cross_mask, positions, deterministic):
    t = y_BTD.shape[1]
    rel = _relative_positions(t, t, positions, positions)
    bias = self._bias(rel)
    y = _hidden(self.dropout(y_BTD, deterministic=deterministic))
    args = (bias, rel, self_mask, cross_mask, encoded_BSD, None, "train", deterministic)
    (y, _), _ = self._run((y, None), None, *args)
    return self.dropout(self.decoder_norm(y), deterministic=deterministic)

  def step(self, y_N1D, cache, cross, step):
    cfg = self.config
    names = [f"layers_{i}" for i in range(cfg.num_decoder_layers)]
    k = cache[STACKED if cfg.scan_layers else names[0]]["k"]
    max_len = k.shape[kv_axes(cfg.attention_impl)[0].index("s") + cfg.scan_layers]
    # Only this step's row of the bias: keys 0..L-1 against query position `step`.
    rel = (jnp.arange(max_len, dtype=jnp.int32) - step)[None, None, :]  # [1, 1, L]
    bias = self._bias(rel)
    self_mask = AttentionMask(key_lengths=jnp.reshape(step + 1, (1,)))  # keys 0..step
    cross_mask = AttentionMask(key_valid=cross["mask"])
    args = (bias, rel, self_mask, cross_mask, None, step, "step", True)
    if cfg.scan_layers:
      index = jnp.arange(cfg.num_decoder_layers, dtype=jnp.int32)
      (y, stacked), _ = self.layers((y_N1D, cache[STACKED]), (index, cross[STACKED]), *args)
      return self.decoder_norm(y), {STACKED: stacked}
    y, new_cache = y_N1D, {}
    for name, layer in zip(names, self.layers, strict=True):
      (y, new_cache[name]), _ = layer((y, cache[name]), (None, cross[name]), *args)
    return self.decoder_norm(y), new_cache


class T5(nn.Module):
  """Embedding, encoder, decoder and output layer."""

  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = param(self, "shared", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    if cfg.prompt_length:
      self.prompt = param(self, "prompt", (cfg.prompt_length, cfg.d_model), (None, "embed"))

  def embed(self, tokens):
    if isinstance(self.shared, QuantizedWeight):  # a quantized tied output layer
      return self.shared.take_rows(tokens, self.config.dtype)
    return jnp.take(self.shared, tokens, axis=0).astype(self.config.dtype)

  def encoder_valid(self, tokens_BS, segment_ids=None):
    """bool `[B, N + S]`: the encoder positions that may be attended to (the N prompt positions
    of prompt tuning first, always valid; then the non-padding tokens)."""
    valid = tokens_BS != self.config.pad_token_id if segment_ids is None else segment_ids != 0
    n = self.config.prompt_length
    if n:
      valid = jnp.concatenate([jnp.ones((valid.shape[0], n), bool), valid], axis=1)
    return valid

  def embed_encoder_input(self, tokens_BS):
    """`[B, N + S, D]`: the soft prompt (prompt tuning) before the embedded tokens."""
    x = self.embed(tokens_BS)
    n = self.config.prompt_length
    if n:
      prompt = jnp.broadcast_to(self.prompt.astype(x.dtype), (x.shape[0], n, x.shape[2]))
      x = jnp.concatenate([prompt, x], axis=1)
    return x

  def logits(self, y_BTD):
    cfg = self.config
    if cfg.tie_word_embeddings:
      if cfg.scale_decoder_outputs:
        y_BTD = y_BTD * (cfg.d_model**-0.5)
      w_DV = self.shared.T
    else:
      w_DV = self.lm_head
    logits_BTV = dense(y_BTD, w_DV, cfg.dtype, preferred_element_type=jnp.float32)
    return with_logical_constraint(logits_BTV, ("batch", "length", "vocab"))

  def encode(self, tokens_BS, segment_ids=None, positions=None, deterministic=True):
    if self.config.prompt_length and (segment_ids is not None or positions is not None):
      raise ValueError("prompt tuning does not support packed inputs (segment ids / positions)")
    valid = self.encoder_valid(tokens_BS, segment_ids)
    x = self.embed_encoder_input(tokens_BS)
    return self.encoder(x, valid, segment_ids, positions, deterministic)

  def decode(
    self, encoded_BSD, enc_tokens_BS, dec_tokens_BT, enc_segment_ids=None, dec_segment_ids=None,
    dec_positions=None, deterministic=True, return_hidden=False,
  ):  # fmt: skip
    enc_valid = self.encoder_valid(enc_tokens_BS, enc_segment_ids)
    dec_valid = jnp.ones(dec_tokens_BT.shape, bool)
    self_mask = _attention_mask(dec_valid, dec_valid, dec_segment_ids, dec_segment_ids, causal=True)
    cross_mask = _attention_mask(dec_valid, enc_valid, dec_segment_ids, enc_segment_ids)
    y = self.decoder(
      self.embed(dec_tokens_BT), encoded_BSD, self_mask, cross_mask, dec_positions, deterministic
    )
    return y if return_hidden else self.logits(y)

  def __call__(
    self, enc_tokens, dec_tokens, enc_segment_ids=None, dec_segment_ids=None, enc_positions=None,
    dec_positions=None, deterministic=True, return_hidden=False,
  ):  # fmt: skip
    encoded = self.encode(enc_tokens, enc_segment_ids, enc_positions, deterministic)
    return self.decode(
      encoded, enc_tokens, dec_tokens, enc_segment_ids, dec_segment_ids, dec_positions,
      deterministic, return_hidden,
    )  # fmt: skip

  def cross_cache(self, encoded_BSD, enc_tokens_BS):
    return {"mask": self.encoder_valid(enc_tokens_BS), **self.decoder.cross_kv(encoded_BSD)}

  def decode_step(self, tokens_N, cache, cross, step):
    y, cache = self.decoder.step(self.embed(tokens_N[:, None]), cache, cross, step)
    return self.logits(y)[:, 0], cache

  def candidate_logits(self, enc_tokens_BS, candidates_NT):
    """Logits of N = B*C teacher-forced candidates, C per input: the encoder and each layer's
    cross-attention keys/values run once per input and serve its C candidates."""
    encoded = self.encode(enc_tokens_BS)
    inputs = shift_right(candidates_NT, self.config.decoder_start_token_id)
    t = inputs.shape[1]
    self_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    cross_mask = self.encoder_valid(enc_tokens_BS)[:, None, None, :]
    y = self.decoder(self.embed(inputs), encoded, self_mask, cross_mask, None, True)
    return self.logits(y)


# --- public pure functions -------------------------------------------------------------------


def _apply(params, config, method, *args, rngs=None, **kwargs):
  return T5(config).apply({"params": params}, *args, method=method, rngs=rngs, **kwargs)


def _dummy_inputs():
  return jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)


def _boxed_shapes(config: T5Config):
  return jax.eval_shape(lambda: T5(config).init(jax.random.PRNGKey(0), *_dummy_inputs()))["params"]


def init_params(config: T5Config, rng: jax.Array) -> Params:
  """Random parameters in `config.param_dtype` as a plain nested dict. Jittable.

  Scales follow T5 and come from `t5jax.layers.init_std`, the table the modules' own initialisers
  read: embeddings std 1, queries `(D*K)^-0.5`, keys/values `D^-0.5`, attention output
  `(H*K)^-0.5`, feed-forward in `D^-0.5` and out `F^-0.5`, norm scales 1. All values come
  from one random draw: on CPU, compiling one random op per parameter takes tens of seconds.
  """
  shapes = nn.unbox(_boxed_shapes(config))
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  dtype = jnp.dtype(config.param_dtype)
  stds = [init_std(str(getattr(path[-1], "key", path[-1])), config) for path, _ in flat]
  sizes = [
    int(np.prod(s.shape)) if std is not None else 0 for (_, s), std in zip(flat, stds, strict=True)
  ]
  draws = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  values, offset = [], 0
  for (_, s), std, n in zip(flat, stds, sizes, strict=True):
    if std is None:
      values.append(jnp.ones(s.shape, dtype))
    else:
      values.append((draws[offset : offset + n].reshape(s.shape) * std).astype(dtype))
    offset += n
  return jax.tree.unflatten(jax.tree.structure(shapes), values)


def param_axes(config: T5Config) -> Params:
  """Logical axis names of every parameter: a pytree like `init_params`, leaves are tuples."""
  return jax.tree.map(
    lambda x: tuple(x.names),
    _boxed_shapes(config),
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def _rngs(dropout_rng):
  return None if dropout_rng is None else {"dropout": dropout_rng}


@partial(jax.jit, static_argnums=1, static_argnames=("return_hidden",))
def forward(
  params: Params,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  decoder_input_tokens: jax.Array,
  *,
  dropout_rng: jax.Array | None = None,
  encoder_segment_ids: jax.Array | None = None,
  decoder_segment_ids: jax.Array | None = None,
  encoder_positions: jax.Array | None = None,
  decoder_positions: jax.Array | None = None,
  return_hidden: bool = False,
) -> jax.Array:
  """Teacher-forced logits.

  Args:
    params: from `init_params` or `t5jax.load_hf`.
    config: the architecture (static under jit).
    encoder_input_tokens: int `[B, S]`, 0 = padding.
    decoder_input_tokens: int `[B, T]`, the targets shifted right with 0 first.
    dropout_rng: enables dropout when given.
    encoder_segment_ids, decoder_segment_ids: int `[B, S]`, `[B, T]` for packed rows.
    encoder_positions, decoder_positions: int positions restarting per packed segment.
    return_hidden: return the decoder's final hidden states `[B, T, D]` (compute dtype) instead,
      for `logits_from_hidden` (the blocked loss projects them a block of tokens at a time).

  Returns:
    float32 logits `[B, T, V]` (or the hidden states).
  """
  return _apply(
    params,
    config,
    T5.__call__,
    encoder_input_tokens,
    decoder_input_tokens,
    encoder_segment_ids,
    decoder_segment_ids,
    encoder_positions,
    decoder_positions,
    deterministic=dropout_rng is None,
    return_hidden=return_hidden,
    rngs=_rngs(dropout_rng),
  )


def logits_from_hidden(params: Params, config: T5Config, hidden_BTD: jax.Array) -> jax.Array:
  """The output layer: float32 logits `[..., T, V]` of decoder hidden states `[..., T, D]`
  (`forward(..., return_hidden=True)`); only `shared` / `lm_head` are read. Not jitted: it is
  meant to run inside a caller's blocks."""
  return _apply(params, config, T5.logits, hidden_BTD)


@partial(jax.jit, static_argnums=1)
def encode(
  params: Params,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  positions: jax.Array | None = None,
  dropout_rng: jax.Array | None = None,
) -> jax.Array:
  """Encoder output `[B, S, D]` in `config.dtype` (after the final norm)."""
  return _apply(
    params,
    config,
    T5.encode,
    encoder_input_tokens,
    segment_ids,
    positions,
    deterministic=dropout_rng is None,
    rngs=_rngs(dropout_rng),
  )


@partial(jax.jit, static_argnums=1)
def init_cross_cache(
  params: Params, config: T5Config, encoded: jax.Array, encoder_input_tokens: jax.Array
) -> Cache:
  """Cross-attention keys/values of every decoder layer (B rows, S positions, in the axis orders
  `t5jax.layers.kv_axes(config.attention_impl)`) and the encoder mask."""
  return _apply(params, config, T5.cross_cache, encoded, encoder_input_tokens)


def init_self_cache(config: T5Config, num_rows: int, max_len: int) -> Cache:
  """Zeroed self-attention cache: `{"layers_i": {"k", "v"}}` over N rows and L positions, in the
  axis orders `t5jax.layers.kv_axes(config.attention_impl)` (einsum: keys `[N, H, K, L]`, values
  `[N, H, L, K]`); with `config.scan_layers`, `{"layers": {"k", "v"}}` with the layers on axis 1
  (rows first, so that beam search reorders it like any cache leaf)."""
  n = config.num_decoder_layers
  sizes = dict(b=num_rows, h=config.num_heads, s=max_len, k=config.d_kv)
  cache = {}
  for name, axes in zip(("k", "v"), kv_axes(config.attention_impl), strict=True):
    shape = [sizes[a] for a in axes]
    if config.scan_layers:
      shape.insert(1, n)
    cache[name] = jnp.zeros(shape, config.dtype)
  if config.scan_layers:
    return {STACKED: cache}
  return {f"layers_{i}": dict(cache) for i in range(n)}


@partial(jax.jit, static_argnums=1)
def decode_step(
  params: Params,
  config: T5Config,
  tokens: jax.Array,
  cache: Cache,
  cross: Cache,
  step: jax.Array | int,
) -> tuple[jax.Array, Cache]:
  """Logits for the token at position `step` of each of N rows, and the updated cache.

  Args:
    tokens: int `[N]`, the decoder input at position `step` (0, the start token, at step 0).
    cache: from `init_self_cache(config, N, L)` or a previous step.
    cross: from `init_cross_cache`, batch B with N a multiple of B; rows `b*r .. b*r+r-1`
      attend to example b.
    step: int32 scalar, `0 <= step < L`.

  Returns:
    float32 logits `[N, V]` and the cache with position `step` filled.
  """
  step = jnp.asarray(step, jnp.int32)
  return _apply(params, config, T5.decode_step, tokens, cache, cross, step)


def candidate_logits(
  params: Params, config: T5Config, encoder_input_tokens: jax.Array, candidates: jax.Array
) -> jax.Array:
  """Float32 decoder logits `[B*C, T, V]` of C candidate outputs per input (`candidates` int
  `[B*C, T]`, input b's candidates in rows `b*C .. b*C+C-1`), teacher-forced. The encoder runs
  once per input (B rows) and its cross-attention keys/values serve that input's C candidates, as
  the cached decoder shares them among beams (`t5jax.generate.rank`). Not jitted."""
  return _apply(params, config, T5.candidate_logits, encoder_input_tokens, candidates)


def convert_params(params: Params, config: T5Config) -> Params:
  """`params` in the layout `config.scan_layers` asks for, from either layout.

  Per layer: `params[stack]["layers_i"][...]` with the layer's own shapes; stacked:
  `params[stack]["layers"][...]` with a leading axis over the layers. Other parameters are shared
  as they are. numpy leaves stay numpy (host memory), others become jax arrays.

  Raises:
    ValueError: the number of layers in `params` differs from `config`'s.
  """
  out = dict(params)
  for stack, num in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    sub = dict(params[stack])
    per_layer = sorted((k for k in sub if k.startswith("layers_")), key=lambda k: int(k[7:]))
    if STACKED in sub:
      have = {int(np.shape(x)[0]) for x in jax.tree.leaves(sub[STACKED])}
      if have != {num}:
        raise ValueError(f"params[{stack!r}] stacks {sorted(have)} layers, config has {num}")
      if not config.scan_layers:
        stacked = sub.pop(STACKED)
        for i in range(num):
          sub[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    elif per_layer:
      if per_layer != [f"layers_{i}" for i in range(num)]:
        raise ValueError(f"params[{stack!r}] has {len(per_layer)} layers, config has {num}")
      if config.scan_layers:
        layers = [sub.pop(k) for k in per_layer]
        sub[STACKED] = jax.tree.map(lambda *xs: _xp(xs[0]).stack(xs), *layers)
    out[stack] = sub
  return out


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def shift_right(targets: jax.Array, start_token: int = 0) -> jax.Array:
  """Decoder inputs from targets: `[start, t0, t1, ...]` (drops the last target)."""
  start = jnp.full(targets.shape[:-1] + (1,), start_token, targets.dtype)
  return jnp.concatenate([start, targets[..., :-1]], axis=-1)
