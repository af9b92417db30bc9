"""T5 building blocks: pure functions for the math, small linen modules that own parameters.

Legend for shape suffixes: B batch, S source (keys), T target (queries), D model width, H heads,
K head width, F feed-forward width, N = B * r decoding rows, L preallocated decode length.

Every parameter carries logical axis names ("vocab", "embed", "heads", "kv", "mlp",
"relpos_buckets"); `t5jax.partitioning` maps them to mesh axes, so no mesh name appears here.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5jax.config import ACTIVATIONS, T5Config

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
  }
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
    bias = jnp.take(table_NbH.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [..., T, S, H]
    return jnp.moveaxis(bias, -1, -3)


# --- norm, attention, feed-forward -----------------------------------------------------------


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


def attend(
  q_BTHK: jax.Array,
  k_BSHK: jax.Array,
  v_BSHK: jax.Array,
  bias: jax.Array | None,
  mask: jax.Array | None,
  *,
  dropout: nn.Module | None = None,
  deterministic: bool = True,
) -> jax.Array:
  """Unscaled dot-product attention (T5 folds 1/sqrt(K) into the query init).

  Args:
    q_BTHK, k_BSHK, v_BSHK: queries, keys, values. Queries may have `B * r` rows for `B` key rows:
      each group of `r` consecutive query rows then attends to one key row (beams, samples).
    bias: float32, broadcastable to `[B*r, H, T, S]`, or None.
    mask: bool, broadcastable to `[B*r, H, T, S]`, True where attention is allowed, or None.

  Returns:
    `[B*r, T, H, K]` in the queries' dtype.
  """
  n, t, h, kd = q_BTHK.shape
  b = k_BSHK.shape[0]
  r = n // b
  q = q_BTHK.reshape(b, r, t, h, kd)
  scores = jnp.einsum("brthk,bshk->brhts", q, k_BSHK, preferred_element_type=jnp.float32)

  def group(x):  # leading dim 1, B or N -> broadcastable to [B, r, ...]
    if x.shape[0] == n and r > 1:
      return x.reshape((b, r) + x.shape[1:])
    return x[:, None]

  if bias is not None:
    scores = scores + group(bias)
  if mask is not None:
    scores = jnp.where(group(mask), scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs, deterministic=deterministic)
  probs = probs.astype(v_BSHK.dtype)
  out = jnp.einsum("brhts,bshk->brthk", probs, v_BSHK)
  return out.reshape(n, t, h, kd)


class Attention(nn.Module):
  """Multi-head attention projections; `attend` does the math."""

  config: T5Config

  def setup(self):
    cfg = self.config
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    self.query = param(self, "query", (d, h, k), ("embed", "heads", "kv"))
    self.key = param(self, "key", (d, h, k), ("embed", "heads", "kv"))
    self.value = param(self, "value", (d, h, k), ("embed", "heads", "kv"))
    self.out = param(self, "out", (h, k, d), ("heads", "kv", "embed"))
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def _proj(self, x_BTD, w_DHK):
    return jnp.einsum("btd,dhk->bthk", x_BTD, w_DHK.astype(self.config.dtype))

  def project_kv(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self._proj(x_BSD, self.key), self._proj(x_BSD, self.value)

  def project_q(self, x_BTD: jax.Array) -> jax.Array:
    return self._proj(x_BTD, self.query)

  def output(self, o_BTHK: jax.Array) -> jax.Array:
    return jnp.einsum("bthk,hkd->btd", o_BTHK, self.out.astype(self.config.dtype))

  def __call__(self, x_q, k_BSHK, v_BSHK, bias, mask, deterministic: bool):
    o = attend(
      self.project_q(x_q),
      k_BSHK,
      v_BSHK,
      bias,
      mask,
      dropout=self.dropout,
      deterministic=deterministic,
    )
    return self.output(o)


def _activation(name: str):
  kind = ACTIVATIONS[name]
  if kind == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return getattr(jax.nn, kind) if kind != "tanh" else jnp.tanh


class MLP(nn.Module):
  """`wo(act(wi x))`, or gated: `wo(act(wi_0 x) * wi_1 x)`."""

  config: T5Config

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    d, f, dt = cfg.d_model, cfg.d_ff, cfg.dtype
    act = _activation(cfg.activation)

    def dense_in(name):
      w = param(self, name, (d, f), ("embed", "mlp"))
      return jnp.einsum("btd,df->btf", x_BTD, w.astype(dt))

    if cfg.is_gated:
      h_BTF = act(dense_in("wi_0")) * dense_in("wi_1")
    else:
      h_BTF = act(dense_in("wi"))
    h_BTF = nn.Dropout(cfg.dropout_rate)(h_BTF, deterministic=deterministic)
    wo = param(self, "wo", (f, d), ("mlp", "embed"))
    return jnp.einsum("btf,fd->btd", h_BTF, wo.astype(dt))
