"""Reduced-precision weights for decoding: int8 per output channel, or bfloat16.

`quantize(params, config)` turns a float checkpoint's projection matrices into `QuantizedWeight`s
once, before decoding; the model's layers take them where they take float weights (every
projection goes through `t5jax.layers.dense`, the one place that turns a stored weight into a
product). Norm scales and relative-position tables stay float32; so does the embedding table
unless it is also the output layer (tied embeddings) and the output layer is quantized.

An int8 weight is `values * scale`: `values` int8 with the float weight's shape, `scale` float32
with one value per output channel (`max |w| / 127` over the channel's inputs), shaped to broadcast
(1 on the contracted axes). How a product is computed (`QuantizedWeight.activations`):

- "int8" (default): each row of the activations is scaled to int8 by its own `max |x| / 127` at
  every product and multiplied with the int8 values into int32 (`lax.dot_general`,
  `preferred_element_type=int32`), then rescaled by both scales. The dot reads the int8 weights
  as they are stored: on CPU, a step streams a quarter of float32's bytes.
- "float": weight-only; the weight is dequantized to the compute dtype and the product is
  float. XLA hoists the dequantization of a loop-invariant weight out of the decoding loop, so
  this materialises a float copy of every weight per call and streams float weights per step:
  accuracy of int8 weights, speed of float32 (for measuring what the activations cost).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from t5jax.config import T5Config

MODES = ("int8", "bfloat16")
ACTIVATIONS = ("int8", "float")
# The projection matrices and the axes each contracts (its inputs), counted after the leading
# "layers" axis of stacked parameters; every other axis is an output channel.
_CONTRACTED = {
  "query": (0,),
  "key": (0,),
  "value": (0,),
  "out": (0, 1),  # [heads, kv, embed]
  "wi": (0,),
  "wi_0": (0,),
  "wi_1": (0,),
  "wo": (0,),
  "lm_head": (0,),
  "shared": (1,),  # [vocab, embed], as the tied output layer: x @ shared.T
}
_STACKED = "layers"  # t5jax.partitioning.STACKED


@flax.struct.dataclass
class QuantizedWeight:
  """An int8 matrix with per-output-channel float32 scales (see the module docstring).

  Attributes:
    values: int8, the float weight's shape.
    scale: float32, broadcastable to `values`, 1 on the contracted axes.
    activations: "int8" (dynamic per-row int8 activations, int32 accumulation) or "float"
      (weight-only: the dequantized weight in the compute dtype).
  """

  values: jax.Array
  scale: jax.Array
  activations: str = flax.struct.field(pytree_node=False, default="int8")

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
    return (self.values.astype(jnp.float32) * self.scale).astype(dtype)

  def matrix(self, rows: int, cols: int) -> QuantizedWeight:
    """The weight as `[rows, cols]`: contracted (leading) axes merged, output axes merged."""
    return self.replace(values=self.values.reshape(rows, cols), scale=self.scale.reshape(1, cols))

  @property
  def T(self) -> QuantizedWeight:  # noqa: N802 (numpy's name)
    return self.replace(values=self.values.T, scale=self.scale.T)

  def take_rows(self, ids: jax.Array, dtype: Any) -> jax.Array:
    """Rows `ids` of a `[V, D]` table quantized per row (the tied embedding), dequantized."""
    rows = jnp.take(self.values, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(self.scale[:, 0], ids, axis=0)[..., None]).astype(dtype)


def int8_matmul(x_MI: jax.Array, w: QuantizedWeight, out_dtype: Any) -> jax.Array:
  """`x [M, I] @ w [I, O]` for a `QuantizedWeight` with `scale [1, O]` (see the module docstring).

  With int8 activations each row gets the scale `max |x_m| / 127` (rows of zeros: 1) and is
  rounded to int8; the int32 sums are exact, so the error is the two roundings'.
  """
  if w.activations == "float":
    return jnp.matmul(x_MI, w.dequantize(x_MI.dtype), preferred_element_type=out_dtype)
  x32 = x_MI.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  row_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  xq = jnp.clip(jnp.round(x32 / row_scale), -127, 127).astype(jnp.int8)
  rows = xq.shape[0]
  if rows == 1:
    # XLA:CPU's int8 vector-matrix product (one row: batch-1 greedy decoding) is ~20x slower
    # than its int8 matrix product of two rows; a row of zeros beside it costs nothing.
    xq = jnp.pad(xq, ((0, 1), (0, 0)))
  acc = jax.lax.dot_general(
    xq, w.values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )[:rows]
  return (acc.astype(jnp.float32) * (row_scale * w.scale)).astype(out_dtype)


def _quantize_one(w: jax.Array, contracted: tuple[int, ...], activations: str) -> QuantizedWeight:
  w32 = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=contracted, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return QuantizedWeight(values=values, scale=scale, activations=activations)


def quantize(
  params: Any,
  config: T5Config,
  mode: str = "int8",
  *,
  output_layer: bool = True,
  encoder: bool = True,
  activations: str = "int8",
) -> Any:
  """The projection matrices of `params` in reduced precision, computed once from float weights.

  Args:
    params: float parameters in the layout of `config.scan_layers` (`t5jax.load_hf`,
      `t5jax.init_params`).
    config: their architecture.
    mode: "int8": `QuantizedWeight`s with per-output-channel scales; "bfloat16": the matrices
      cast to bfloat16 (decode them with `config.replace(dtype="bfloat16")`, so the products
      run in bfloat16 as on accelerators).
    output_layer: also the output layer (`lm_head`, or `shared` when embeddings are tied; a
      quantized tied table also serves the embedding lookup, dequantized row by row).
    encoder: also the encoder's matrices (it runs once per batch; the decoder once per token).
    activations: int8 only, how products are computed: "int8" or "float" (`QuantizedWeight`).

  Returns:
    A params pytree for `t5jax.generate`, `decode_step` and the other inference entry points
    (not for training or `t5jax.save_hf`).

  Raises:
    ValueError: an unknown mode or activations.
  """
  if mode not in MODES:
    raise ValueError(f"quantize mode must be one of {MODES}, got {mode!r}")
  if activations not in ACTIVATIONS:
    raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")

  def convert(path, w):
    keys = [str(getattr(k, "key", k)) for k in path]
    name = keys[-1]
    if name not in _CONTRACTED or (keys[0] == "encoder" and not encoder):
      return w
    if name in ("lm_head", "shared") and not output_layer:
      return w
    if name == "shared" and not config.tie_word_embeddings:
      return w  # only the embedding lookup reads it
    if mode == "bfloat16":
      return jnp.asarray(w).astype(jnp.bfloat16)
    lead = 1 if _STACKED in keys[:-1] else 0
    return _quantize_one(w, tuple(a + lead for a in _CONTRACTED[name]), activations)

  return jax.tree_util.tree_map_with_path(
    convert, params, is_leaf=lambda x: isinstance(x, QuantizedWeight)
  )


def is_quantized(w: Any) -> bool:
  return isinstance(w, QuantizedWeight)
