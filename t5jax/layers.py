"""T5 building blocks: pure functions for the math, small linen modules that own parameters.

Legend for shape suffixes: B batch, S source (keys), T target (queries), D model width, H heads,
K head width, F feed-forward width, N = B * r decoding rows, L preallocated decode length.

Every parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp",
"relpos_buckets"); `t5jax.partitioning` maps them to mesh axes, so no mesh name appears here.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import flax.struct
import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np

from t5jax.config import ACTIVATIONS, T5Config, on_cpu, on_cuda
from t5jax.quantize import QuantizedWeight, int8_matmul

NEG_INF = float(np.finfo(np.float32).min)


def init_std(name: str, config: T5Config) -> float | None:
  """T5's initial standard deviation of the parameter called `name`; None means ones (norm scales).

  The one table of initial scales: the modules below declare their parameters with it (`param`)
  and `t5jax.model.init_params` draws the values with it.
  """
  d, k, h, f = config.d_model, config.d_kv, config.num_heads, config.d_ff
  table = {
    "shared": 1.0,
    "lm_head": d**-0.5,  # keeps initial logits O(1) when training from scratch
    "query": (d * k) ** -0.5,  # T5 folds attention's 1/sqrt(K) into the query init
    "key": d**-0.5,
    "value": d**-0.5,
    "out": (h * k) ** -0.5,
    "wi": d**-0.5,
    "wi_0": d**-0.5,
    "wi_1": d**-0.5,
    "wo": f**-0.5,
    "rel_embedding": d**-0.5,
    "scale": None,
    "prompt": 0.5,
  }
  if name.endswith("_lora_a"):  # LoRA's A: fan-in scaled, as the projection's own input
    return {"out": h * k, "wo": f}.get(name[: -len("_lora_a")], d) ** -0.5
  if name.endswith("_lora_b"):  # LoRA's B starts at zero: the adapted model equals its base
    return 0.0
  return table[name]


def param(module: nn.Module, name: str, shape, axes) -> jax.Array:
  """Declares parameter `name` of `module` (which has a `config`), with logical axis names.

  Its initialiser (normal with `init_std(name)`, or ones) serves `Module.init` callers;
  `t5jax.model.init_params` draws the same distribution in a handful of random ops.
  """
  cfg = module.config
  std = init_std(name, cfg)
  base = nn.initializers.ones if std is None else nn.initializers.normal(stddev=std)
  init = nn.with_logical_partitioning(base, axes)
  return module.param(name, init, shape, jnp.dtype(cfg.param_dtype))


# --- relative position buckets ---------------------------------------------------------------


def relative_position_bucket(
  relative_position: jax.Array | np.ndarray,
  *,
  bidirectional: bool,
  num_buckets: int,
  max_distance: int,
  xp=jnp,
):
  """Maps `key_pos - query_pos` to T5's bucket ids.

  Small distances get their own bucket; larger ones share log-spaced buckets up to
  `max_distance`. The log is taken in float32, as the reference does, so distances that land
  exactly on a bucket edge (16, 32, 64 with the defaults) round the same way. `xp` is `jnp` under
  jit or `np` for shapes known at trace time.
  """
  rel = relative_position
  buckets = 0
  if bidirectional:
    num_buckets //= 2
    buckets = (rel > 0).astype(np.int32) * num_buckets
    rel = xp.abs(rel)
  else:
    rel = -xp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  rel_f = xp.maximum(rel, 1).astype(np.float32)  # avoid log(0); those entries are "small"
  scale = np.float32(math.log(max_distance / max_exact))
  large = xp.log(rel_f / np.float32(max_exact)) / scale * np.float32(num_buckets - max_exact)
  large = max_exact + large.astype(np.int32)  # truncation toward zero, as a cast does
  large = xp.minimum(large, num_buckets - 1)
  return (buckets + xp.where(is_small, rel, large)).astype(np.int32)


class RelativePositionBias(nn.Module):
  """A `[num_buckets, H]` table turned into an additive attention bias."""

  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, relative_position: jax.Array) -> jax.Array:
    """int `[..., T, S]` relative positions (key - query) -> float32 `[..., H, T, S]` bias."""
    cfg = self.config
    table_NbH = param(
      self, "rel_embedding", (cfg.relative_attention_num_buckets, cfg.num_heads),
      ("relpos_buckets", "heads"),
    )  # fmt: skip
    xp = np if isinstance(relative_position, np.ndarray) else jnp
    buckets = relative_position_bucket(
      relative_position,
      bidirectional=self.bidirectional,
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      xp=xp,
    )
    # Gathered from the [H, buckets] table the bias comes out heads first, [H, ..., T, S]: the
    # moved axis is the leading 1 when positions are not given (gathered [..., T, S, H], the bias
    # was transposed into every layer's scores).
    bias = jnp.take(table_NbH.astype(jnp.float32).T, jnp.asarray(buckets), axis=1)
    return jnp.moveaxis(bias, 0, -3)


# --- norm, attention, feed-forward -----------------------------------------------------------


def dense(x: jax.Array, w_IO, dtype=None, **kwargs) -> jax.Array:
  """`x [..., I] @ w [I, O] -> [..., O]` as one 2-D matmul over the flattened leading axes.

  The one place a stored weight becomes a product: `w_IO` is a float array (cast to `dtype` when
  given) or a `t5jax.quantize.QuantizedWeight` (its int8 product, `int8_matmul`, in `dtype`, or
  in `preferred_element_type` when given).

  Contracting `[B, T]` as two axes (an einsum "btd,df->btf"'s weight gradient), XLA:CPU
  transposed the `[B, T, O]` cotangent into a copy before every weight-gradient product; flattened
  to `[B*T, I]` the products read their operands as they are. `kwargs` go to `jnp.matmul`
  (`preferred_element_type`).
  """
  x_MI = x.reshape(-1, x.shape[-1])
  if isinstance(w_IO, QuantizedWeight):
    out_dtype = kwargs.get("preferred_element_type") or dtype or x.dtype
    y = int8_matmul(x_MI, w_IO, out_dtype)
  else:
    w = w_IO if dtype is None else w_IO.astype(dtype)
    if not kwargs and x_MI.dtype == w.dtype == jnp.bfloat16:
      y = _dot_general(x_MI, w, (((1,), (0,)), ((), ())))
    else:
      y = jnp.matmul(x_MI, w, **kwargs)
  return y.reshape(x.shape[:-1] + (w_IO.shape[-1],))


# Whether bfloat16 products return float32 sums rounded to bfloat16: None = on CPU (the default
# backend), else as `float32_sums` sets it.
_FLOAT32_SUMS: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
  "t5jax_float32_sums", default=None
)


@contextlib.contextmanager
def float32_sums(enabled: bool):
  """Sets, for what is traced inside, whether bfloat16 products (`dense`, and attention's product
  of probabilities and values) are computed with float32 sums (`preferred_element_type`) and
  rounded to bfloat16. Outside, they are where the default backend is the CPU.

  XLA:CPU compiles a bf16 x bf16 -> bf16 dot as a float32 dot of converted operands (weights
  and caches converted at every use), while a bf16 x bf16 -> float32 dot reads the bf16 operands
  and runs on the CPU's bfloat16 dot-product instructions (AVX512-BF16): 1.4x faster than
  float32 and 1.6x faster than the converted product at 8-32 rows (t5-v1_1-small shapes). Both
  round float32 sums once, in a different order. On accelerators the plain product is kept.
  Training on CPU in bf16 uses it too (a remat policy that saves dots then keeps their float32
  sums).
  `benchmarks/memory.py` traces with `float32_sums(False)`, so that what it compiles for a GPU
  from a CPU host is what a GPU host would compile. Set it before the first trace: a jitted
  function already traced with the same shapes reuses that trace (jit's cache does not see it).
  """
  token = _FLOAT32_SUMS.set(enabled)
  try:
    yield
  finally:
    _FLOAT32_SUMS.reset(token)


def _dot_general(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """`lax.dot_general(a, b, dims)`, bfloat16 operands summed into float32 per `float32_sums`."""
  if a.dtype == b.dtype == jnp.bfloat16:
    on = _FLOAT32_SUMS.get()
    if on or (on is None and on_cpu()):
      return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)
  return jax.lax.dot_general(a, b, dims)


def as_matrix(w, rows: int, cols: int):
  """A stored weight (float array or `QuantizedWeight`) as `[rows, cols]` for `dense`."""
  return w.matrix(rows, cols) if isinstance(w, QuantizedWeight) else w.reshape(rows, cols)


class RMSNorm(nn.Module):
  """Scale-only RMS norm; statistics in float32."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = param(self, "scale", (x.shape[-1],), ("embed",))
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)
    return (y * scale.astype(jnp.float32)).astype(cfg.dtype)


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query may attend to, kept in parts so a fused kernel can use its fast forms.

  The einsum path builds the dense boolean mask (`dense`); the fused path passes key lengths and
  `is_causal` to `jax.nn.dot_product_attention` and only what is left (packed segments) as a mask.

  Attributes:
    key_valid: bool `[B, S]`, False at padding (trailing, as T5 pads), or None.
    key_lengths: int `[B]` or `[1]`, keys `0 .. length-1` are valid (decoding's cache), or None.
    query_segments, key_segments: int `[B, T]`, `[B, S]` packed-row segment ids, or None.
    causal: query `t` sees keys `<= t` (static).
  """

  key_valid: jax.Array | None = None
  key_lengths: jax.Array | None = None
  query_segments: jax.Array | None = None
  key_segments: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  def dense(self, t: int, s: int) -> jax.Array | None:
    """Boolean `[B|1, 1, T|1, S]` mask, True = may attend; None when everything may."""
    mask = None

    def both(m):
      return m if mask is None else mask & m

    if self.key_valid is not None:
      mask = both(self.key_valid[:, None, None, :])
    if self.key_lengths is not None:
      mask = both((jnp.arange(s)[None, :] < self.key_lengths[:, None])[:, None, None, :])
    if self.query_segments is not None:
      seg = self.query_segments[:, None, :, None] == self.key_segments[:, None, None, :]
      mask = both(seg)
    if self.causal:
      mask = both(jnp.asarray(np.tril(np.ones((t, s), bool)))[None, None])
    return mask


# Axis orders of keys and values as `attend` takes them and the decoding caches store them (b
# batch, h heads, s key positions, k head width). `attend` multiplies queries (first) by keys and
# probabilities (first) by values; XLA:CPU reads a batched dot's second operand as [batch axes,
# contracted, kept]: keys [b, h, k, s], values [b, h, s, k]. Stored [b, s, h, k], the decoding
# caches were copied into such orders at every step in every layer (14% of greedy decoding's time
# on CPU). The fused path, `jax.nn.dot_product_attention`, takes [b, s, h, k].
EINSUM_KV_AXES = ("bhks", "bhsk")
FUSED_KV_AXES = ("bshk", "bshk")


def kv_axes(impl: str) -> tuple[str, str]:
  """The axis orders of keys and values for `T5Config.attention_impl` `impl` (see above)."""
  return EINSUM_KV_AXES if impl == "einsum" else FUSED_KV_AXES


def _to_axes(x: jax.Array, have: str, want: str) -> jax.Array:
  return x if have == want else jnp.transpose(x, [have.index(c) for c in want])


def _group_queries(x, n: int, b: int, t: int):
  """`[1|B|N, h, T|1, S]` mask or bias -> `[1|B, h, r*T|1, S]`, for queries folded to `[B, r*T]`."""
  r = n // b
  if x is None or r == 1:
    return x
  if x.shape[0] == n:  # one per query row: [B, r, h, T, S] -> [B, h, r*T, S]
    x = jnp.broadcast_to(x, (n, x.shape[1], t, x.shape[3]))
    x = jnp.moveaxis(x.reshape(b, r, x.shape[1], t, x.shape[3]), 1, 2)
    return x.reshape(b, x.shape[1], r * t, x.shape[4])
  if x.shape[2] == 1:
    return x
  return jnp.tile(x, (1, 1, r, 1))


def _use_cudnn(impl: str, q, s: int, has_bias: bool) -> bool:
  """Whether `impl` runs on cuDNN's flash attention: forced by "cudnn"; for "dot_product", on a
  CUDA backend with bf16/fp16 inputs, a head width cuDNN takes (a multiple of 8, <= 128) and, with
  a bias, even lengths (its training kernels require them; one-query decoding steps are exempt)."""
  if impl != "dot_product":
    return impl == "cudnn"
  t, kd = q.shape[1], q.shape[3]
  return (
    on_cuda()
    and q.dtype in (jnp.bfloat16, jnp.float16)
    and kd % 8 == 0
    and kd <= 128
    and (not has_bias or t == 1 or (t % 2 == 0 and s % 2 == 0))
  )


def _attend_fused(q_BTHK, k, v, bias, mask, impl: str, axes: tuple[str, str]) -> jax.Array:
  """`attend` through `jax.nn.dot_product_attention` (scale 1: T5's scores are unscaled)."""
  k_BSHK, v_BSHK = _to_axes(k, axes[0], "bshk"), _to_axes(v, axes[1], "bshk")
  n, t, h, kd = q_BTHK.shape
  b, s = k_BSHK.shape[:2]
  r = n // b
  q = q_BTHK.reshape(b, r * t, h, kd)  # the r query rows of one example share its keys
  dense = mask if isinstance(mask, jax.Array) else None
  lengths, causal = None, False
  if isinstance(mask, AttentionMask):
    causal = mask.causal
    if causal and r > 1:
      raise ValueError("causal attention with grouped query rows is not supported")
    if mask.key_lengths is not None:
      lengths = jnp.broadcast_to(mask.key_lengths.astype(jnp.int32), (b,))
    elif mask.key_valid is not None:
      # Trailing padding as a length: the form cuDNN's kernels take without a dense mask. At least
      # 1, so an all-padding row stays finite (its output is never used).
      lengths = jnp.maximum(jnp.sum(mask.key_valid, axis=-1, dtype=jnp.int32), 1)
    if mask.query_segments is not None:
      dense = AttentionMask(query_segments=mask.query_segments, key_segments=mask.key_segments)
      dense = dense.dense(t, s)
  dense = _group_queries(dense, n, b, t)
  bias = _group_queries(bias, n, b, t)
  use_cudnn = _use_cudnn(impl, q, s, bias is not None)
  if bias is not None:
    bias = bias.astype(q.dtype) if use_cudnn else bias
    if use_cudnn:  # cuDNN takes a bias with the full [T, S] extent only
      bias = jnp.broadcast_to(bias, bias.shape[:2] + (r * t, s))
  if dense is not None:
    dense = jnp.broadcast_to(dense, dense.shape[:2] + (r * t, s))
  out = jax.nn.dot_product_attention(
    q,
    k_BSHK.astype(q.dtype),
    v_BSHK.astype(q.dtype),
    bias=bias,
    mask=dense,
    scale=1.0,
    is_causal=causal,
    key_value_seq_lengths=lengths,
    implementation="cudnn" if use_cudnn else "xla",
  )
  return out.reshape(n, t, h, kd)


def attend(
  q_BTHK: jax.Array,
  k: jax.Array,
  v: jax.Array,
  bias: jax.Array | None,
  mask: jax.Array | AttentionMask | None,
  *,
  dropout: nn.Module | None = None,
  deterministic: bool = True,
  impl: str = "einsum",
  axes: tuple[str, str] = FUSED_KV_AXES,
) -> jax.Array:
  """Unscaled dot-product attention (T5 folds 1/sqrt(K) into the query init).

  Args:
    q_BTHK, k, v: queries, keys, values; keys and values in the axis orders `axes` (the model
      passes `kv_axes(impl)`; the default is `[B, S, H, K]` for both). Queries may have `B * r`
      rows for `B` key rows: each group of `r` consecutive query rows then attends to one key row
      (beams, samples).
    bias: float (float32 or the compute dtype), broadcastable to `[B*r, H, T, S]`, or None.
    mask: an `AttentionMask`, or bool broadcastable to `[B*r, H, T, S]` (True where attention is
      allowed), or None.
    dropout, deterministic: dropout on the attention probabilities (einsum path only).
    impl: `T5Config.attention_impl`. "einsum" computes scores, softmax and values as einsums;
      "dot_product", "cudnn" and "xla" call `jax.nn.dot_product_attention` (see `_use_cudnn`),
      which equals the einsum path (tested), except that key padding is taken as trailing
      (T5 pads at the end) and a query row with no valid key attends to the first key instead of
      uniformly to all. With dropout active (training with `dropout_rate > 0`) the einsum path
      runs, since the fused kernels have no dropout on probabilities.

  Returns:
    `[B*r, T, H, K]` in the queries' dtype.
  """
  dropping = dropout is not None and not deterministic and dropout.rate > 0
  if impl != "einsum" and not dropping:
    return _attend_fused(q_BTHK, k, v, bias, mask, impl, axes)
  n, t, h, kd = q_BTHK.shape
  b, s = k.shape[0], k.shape[axes[0].index("s")]
  r = n // b
  if isinstance(mask, AttentionMask):
    mask = mask.dense(t, s)
  q = q_BTHK.reshape(b, r, t, h, kd)
  # Queries first, so that the scores come out [B, H, r, T, S] with the keys last for the
  # softmax (jnp.einsum put the keys first and the scores needed a transpose).
  ka, va = axes
  dims = (((4,), (ka.index("k"),)), ((0, 3), (0, ka.index("h"))))
  k = k.astype(q.dtype)
  scores = jax.lax.dot_general(q, k, dims, preferred_element_type=jnp.float32)

  def group(x):  # [1|B|N, H|1, T|1, S] -> broadcastable to [B, H, r, T, S]
    if x.shape[0] == n and r > 1:
      return jnp.moveaxis(x.reshape((b, r) + x.shape[1:]), 1, 2)
    return x[:, :, None]

  if bias is not None:
    scores = scores + group(bias)
  if mask is not None:
    scores = jnp.where(group(mask), scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:  # drawn over [B, r, H, T, S] as before (a reshape when r = 1)
    probs = jnp.moveaxis(dropout(jnp.moveaxis(probs, 2, 1), deterministic=deterministic), 1, 2)
  probs = probs.astype(v.dtype)
  dims = (((4,), (va.index("s"),)), ((0, 1), (0, va.index("h"))))
  out = _dot_general(probs, v, dims)  # [B, H, r, T, K]
  return jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(n, t, h, kd)


# --- LoRA ------------------------------------------------------------------------------------
# An adapted projection `y = x @ W` (W `[in..., out...]`) gains `scale * (dropout(x) @ A) @ B`
# with `A [in..., r]` and `B [r, out...]`, parameters `<W's name>_lora_a` / `_lora_b` of the same
# module. Computed beside the frozen product, never as a merged weight: nothing the size of W is
# materialised, and no gradient of W is computed (`docs/peft.md`).


def lora_params(module: nn.Module, name: str, in_shape, in_axes, out_shape, out_axes):
  """Declares `name`'s adapter pair `(A, B)` in `module` (rank axis replicated: `None`)."""
  r = module.config.lora_rank
  a = param(module, f"{name}_lora_a", (*in_shape, r), (*in_axes, None))
  b = param(module, f"{name}_lora_b", (r, *out_shape), (None, *out_axes))
  return a, b


def lora_update(x: jax.Array, pair, config: T5Config, dropout: nn.Module, deterministic: bool):
  """`lora_scale * (dropout(x) @ A) @ B` for `x [..., in]` flattened as `A`'s leading axes."""
  a, b = pair
  r = a.shape[-1]
  x = dropout(x, deterministic=deterministic)
  h = dense(x, a.astype(config.dtype).reshape(-1, r))
  return dense(h, b.astype(config.dtype).reshape(r, -1)) * jnp.asarray(config.lora_scale, x.dtype)


_ATTENTION_WEIGHTS = {"q": "query", "k": "key", "v": "value", "o": "out"}


class Attention(nn.Module):
  """Multi-head attention projections; `attend` does the math.

  `stack` ("encoder", "decoder", "cross") selects the projections `config.lora_targets` adapts.
  """

  config: T5Config
  stack: str = ""

  def setup(self):
    cfg = self.config
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    self.query = param(self, "query", (d, h, k), ("embed", "heads", "kv"))
    self.key = param(self, "key", (d, h, k), ("embed", "heads", "kv"))
    self.value = param(self, "value", (d, h, k), ("embed", "heads", "kv"))
    self.out = param(self, "out", (h, k, d), ("heads", "kv", "embed"))
    self.dropout = nn.Dropout(cfg.dropout_rate)
    adapters = {}
    for n in cfg.lora_names(self.stack):
      if n in _ATTENTION_WEIGHTS:
        ins, outs = ((d,), ("embed",)), ((h, k), ("heads", "kv"))
        if n == "o":
          ins, outs = outs, ins
        adapters[n] = lora_params(self, _ATTENTION_WEIGHTS[n], ins[0], ins[1], outs[0], outs[1])
    self.adapters = adapters
    self.lora_dropout = nn.Dropout(cfg.lora_dropout)

  def _lora(self, name, x, y, deterministic):
    if name not in self.adapters:
      return y
    return y + lora_update(x, self.adapters[name], self.config, self.lora_dropout, deterministic)

  def _proj(self, x_BTD, name, axes="bthk", deterministic=True):
    # Into [B, T, H, K] and then to `axes`: written as one einsum "btd,dhk->bhtk", jnp puts the
    # weights first and XLA:CPU then transposes the weights at every call.
    w_DHK = getattr(self, _ATTENTION_WEIGHTS[name])
    d, h, k = w_DHK.shape
    y = dense(x_BTD, as_matrix(w_DHK, d, h * k), self.config.dtype)
    y = self._lora(name, x_BTD, y, deterministic)
    return _to_axes(y.reshape(y.shape[:-1] + (h, k)), "bthk", axes)

  def project_kv(self, x_BSD: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Keys and values of `x_BSD`, in the axis orders `kv_axes(config.attention_impl)`."""
    k_axes, v_axes = (a.replace("s", "t") for a in kv_axes(self.config.attention_impl))
    return (
      self._proj(x_BSD, "k", k_axes, deterministic),
      self._proj(x_BSD, "v", v_axes, deterministic),
    )

  def project_q(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
    return self._proj(x_BTD, "q", deterministic=deterministic)

  def output(self, o_BTHK: jax.Array, deterministic: bool = True) -> jax.Array:
    h, k, d = self.out.shape
    o = o_BTHK.reshape(o_BTHK.shape[:-2] + (h * k,))
    y = dense(o, as_matrix(self.out, h * k, d), self.config.dtype)
    return self._lora("o", o, y, deterministic)

  def __call__(self, x_q, k, v, bias, mask, deterministic: bool):
    """Attention of `x_q`'s queries over keys and values from `project_kv`."""
    impl = self.config.attention_impl
    o = attend(
      self.project_q(x_q, deterministic),
      k,
      v,
      bias,
      mask,
      dropout=self.dropout,
      deterministic=deterministic,
      impl=impl,
      axes=kv_axes(impl),
    )
    return self.output(o, deterministic)


def _activation(name: str):
  kind = ACTIVATIONS[name]
  if kind == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return getattr(jax.nn, kind) if kind != "tanh" else jnp.tanh


class MLP(nn.Module):
  """`wo(act(wi x))`, or gated: `wo(act(wi_0 x) * wi_1 x)`; `stack` as for `Attention`."""

  config: T5Config
  stack: str = ""

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    d, f, dt = cfg.d_model, cfg.d_ff, cfg.dtype
    act = _activation(cfg.activation)
    adapted = cfg.lora_names(self.stack)
    lora_dropout = nn.Dropout(cfg.lora_dropout)

    def project(x, w, name, ins, outs):
      y = dense(x, w, dt)
      if name not in adapted:
        return y
      pair = lora_params(self, name, (ins[0],), (ins[1],), (outs[0],), (outs[1],))
      return y + lora_update(x, pair, cfg, lora_dropout, deterministic)

    def dense_in(name):
      w = param(self, name, (d, f), ("embed", "mlp"))
      return project(x_BTD, w, name, (d, "embed"), (f, "mlp"))

    if cfg.is_gated:
      h_BTF = act(dense_in("wi_0")) * dense_in("wi_1")
    else:
      h_BTF = act(dense_in("wi"))
    h_BTF = nn.Dropout(cfg.dropout_rate)(h_BTF, deterministic=deterministic)
    wo = param(self, "wo", (f, d), ("mlp", "embed"))
    return project(h_BTF, wo, "wo", (f, "mlp"), (d, "embed"))
