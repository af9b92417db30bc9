"""Optax optimizers and learning-rate schedules built from an `OptimizerConfig`.

* `t5jax.train_config.OptimizerConfig`: the settings, every field commented (T5's pretraining
  recipe), validated when built.
* `make_schedule(cfg)`: an `optax.Schedule` mapping the update count (0 for the first update) to
  the learning rate; the train loop logs `schedule(step)`.
* `make_optimizer(cfg)`: `[clip by global norm] -> Adafactor | AdamW`, driven by that schedule.
* `adafactor(...)`: optax's Adafactor chain, with a one-pass parameter scaling
  (`scale_by_param_rms`) and CPU-friendly factored means (`scale_by_factored_rms`).

Optimizer state is float32 (parameters are float32). Gradient accumulation over microbatches is the
train step's job, not the optimizer's.

Adafactor uses T5's settings: factored second moments for matrices whose two largest dimensions
are at least `min_dim_size_to_factor`, second-moment decay `1 - (t + 1)**-0.8` (t = 0 for the first
update, so the first estimate is the squared gradient), update clipping at RMS 1.0, updates
scaled by the parameter's RMS (at least 1e-3), no momentum, epsilon 1e-30.

Optax factors the two largest dimensions of a parameter. Our attention kernels are 3-D
(`[D, H, K]`, `[H, K, D]`), where T5 / t5x factor rows `D` against columns `H*K`; optax alone
would leave e.g. `[512, 8, 64]` unfactored (second-largest dim 64 < 128). With
`adafactor.matrix_view` (default on) such parameters are seen by Adafactor as the matrix
`[D, H*K]` / `[H*K, D]` (the split of the dimensions whose two products are closest), which
reproduces T5's factoring. Clipping and parameter scaling use whole-tensor RMS, unchanged by the
view.

Parameters stacked over layers (`T5Config.scan_layers`, `[layers, ...]` under a `layers` key) are
optimised layer by layer (`per_layer`): the optimizer is `vmap`ped over the stacked axis, so
Adafactor factors each layer's matrix (never across layers) and clips and scales each layer's
update by that layer's RMS, exactly as for the same parameters unrolled; AdamW's weight-decay
mask sees each layer's rank. Unrolled parameters keep today's optimizer state, unchanged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5jax.partitioning import STACKED, is_stacked
from t5jax.train_config import OptimizerConfig


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Learning rate as a function of the update count (see `OptimizerConfig.schedule`)."""
  base = float(cfg.learning_rate)
  warmup = int(cfg.warmup_steps)
  kind = cfg.schedule

  if kind == "rsqrt":

    def rsqrt(step):
      return base * jax.lax.rsqrt(jnp.maximum(jnp.asarray(step, jnp.float32), max(warmup, 1)))

    return rsqrt

  if kind == "constant":
    if warmup <= 0:
      return optax.constant_schedule(base)
    return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup), optax.constant_schedule(base)], [warmup]
    )

  # "cosine" or "linear" (OptimizerConfig checked the name, and total_steps > warmup_steps).
  total = int(cfg.total_steps)
  end = float(cfg.end_learning_rate)
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup, total, end)
  decay = optax.linear_schedule(base, end, total - warmup)
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


def decay_mask(params) -> object:
  """True for parameters that get weight decay: everything of rank 2 or more."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _matrix_shape(shape: tuple[int, ...], min_dim: int) -> tuple[int, ...]:
  """2-D view of a rank > 2 shape if that view gets factored, else the shape unchanged."""
  if len(shape) <= 2:
    return shape
  splits = [(math.prod(shape[:k]), math.prod(shape[k:])) for k in range(1, len(shape))]
  rows, cols = min(splits, key=lambda rc: abs(math.log(rc[0]) - math.log(rc[1])))
  return (rows, cols) if min(rows, cols) >= min_dim else shape


def as_matrices(inner: optax.GradientTransformation, min_dim: int) -> optax.GradientTransformation:
  """Runs `inner` on 2-D views of rank > 2 parameters that would then be factored.

  Parameters that would not be factored keep their shape, so their full second moments keep the
  parameter's shape (and sharding). Updates are reshaped back.
  """

  def view(x):
    return jnp.reshape(x, _matrix_shape(tuple(x.shape), min_dim))

  def init_fn(params):
    return inner.init(jax.tree.map(view, params))

  def update_fn(updates, state, params=None):
    viewed_params = None if params is None else jax.tree.map(view, params)
    new, state = inner.update(jax.tree.map(view, updates), state, viewed_params)
    return jax.tree.map(lambda n, u: jnp.reshape(n, u.shape), new, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


class PerLayerState(NamedTuple):
  """State of `per_layer`: the inner state of the unstacked parameters, and per stack (e.g.
  "encoder", "decoder") that of its stacked parameters, every leaf with a leading layer axis
  (Adafactor's factored moments of a `[layers, D, F]` kernel are `[layers, D]`, `[layers, F]`)."""

  unstacked: Any
  stacked: dict[str, Any]


def _stack_names(tree) -> Any:
  """Per leaf: the stack it is stacked in ("encoder" for `encoder/layers/...`), or "" if none."""

  def name(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return "/".join(map(str, keys[: keys.index(STACKED)])) if is_stacked(path) else ""

  return jax.tree_util.tree_map_with_path(name, tree)


def _part(tree, names, want: str):
  """`tree` with None in place of every leaf not in stack `want` ("" = the unstacked ones)."""
  return jax.tree.map(lambda x, n: x if n == want else None, tree, names)


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Runs `inner` on each layer of parameters stacked over layers (`partitioning.is_stacked`
  paths), through `jax.vmap` over the leading axis of each stack, and as it is on every other
  parameter.

  Without stacked parameters it is `inner` itself, with the same state. `update` needs `params`
  whenever `inner` does.
  """

  def init_fn(params):
    names = _stack_names(params)
    stacks = sorted(set(jax.tree.leaves(names)) - {""})
    if not stacks:
      return inner.init(params)
    return PerLayerState(
      inner.init(_part(params, names, "")),
      {s: jax.vmap(inner.init)(_part(params, names, s)) for s in stacks},
    )

  def update_fn(updates, state, params=None):
    if not isinstance(state, PerLayerState):
      return inner.update(updates, state, params)
    names = _stack_names(updates)

    def run(stack, inner_state, update):
      p = None if params is None else _part(params, names, stack)
      return update(_part(updates, names, stack), inner_state, p)

    new, s_flat = run("", state.unstacked, inner.update)
    states = {}
    for stack, inner_state in state.stacked.items():
      if params is None:
        layer_update = jax.vmap(lambda u, s, _: inner.update(u, s), in_axes=(0, 0, None))
      else:
        layer_update = jax.vmap(inner.update)
      part, states[stack] = run(stack, inner_state, layer_update)
      new = jax.tree.map(lambda a, b: a if b is None else b, new, part, is_leaf=lambda x: x is None)
    return new, PerLayerState(s_flat, states)

  return optax.GradientTransformation(init_fn, update_fn)


# A factored mean over the leading axis of a matrix at least this wide runs as a loop over its rows
# on CPU (`_mean_of_squares`).
_WIDE = 16384


def _mean_of_squares(g: jax.Array, axis: int) -> jax.Array:
  """`mean(g**2, axis)`. On CPU, the mean over the rows of a wide matrix (the output layer's
  `[512, 32128]` -> `[32128]`) is a loop adding one squared row at a time: XLA:CPU (jax 0.10)
  reduced that axis at about 1 GB/s, 52 ms against the loop's 3 ms on the 2-core machine. Elsewhere
  the plain mean."""
  if jax.default_backend() == "cpu" and g.ndim == 2 and axis == 0 and g.shape[1] >= _WIDE:
    rows = g.shape[0]

    def add_row(i, acc):
      return acc + jnp.square(jax.lax.dynamic_index_in_dim(g, i, 0, keepdims=False))

    return jax.lax.fori_loop(0, rows, add_row, jnp.zeros(g.shape[1:], g.dtype)) / rows
  return jnp.mean(jnp.square(g), axis=axis)


def _factored_dims(shape, factored: bool, min_dim: int) -> tuple[int, int] | None:
  """(second-largest, largest) axis of `shape` when Adafactor factors it, else None (optax's
  rule, so that the state it initialises matches)."""
  if not factored or len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim:
    return None
  return int(order[-2]), int(order[-1])


def scale_by_factored_rms(
  factored: bool = True,
  decay_rate: float = 0.8,
  min_dim_size_to_factor: int = 128,
  epsilon: float = 1e-30,
) -> optax.GradientTransformation:
  """Adafactor's scaling by factored second moments: the state and values of
  `optax.scale_by_factored_rms` (decay `1 - (t + 1)**-decay_rate`, moments of `g**2 + epsilon`,
  row moments normalised by their mean), with the squared-gradient means taken by
  `_mean_of_squares`."""
  reference = optax.scale_by_factored_rms(
    factored=factored,
    decay_rate=decay_rate,
    min_dim_size_to_factor=min_dim_size_to_factor,
    epsilon=epsilon,
  )

  def update_fn(updates, state, params=None):
    del params
    beta = 1.0 - jnp.asarray(state.count + 1, jnp.float32) ** (-decay_rate)

    def one(g, v_row, v_col, v):
      dims = _factored_dims(g.shape, factored, min_dim_size_to_factor)
      if dims is None:
        new_v = (beta * v + (1.0 - beta) * (jnp.square(g) + epsilon)).astype(v.dtype)
        return g * new_v**-0.5, v_row, v_col, new_v
      d1, d0 = dims
      new_row = beta * v_row + (1.0 - beta) * (_mean_of_squares(g, d0) + epsilon)
      new_col = beta * v_col + (1.0 - beta) * (_mean_of_squares(g, d1) + epsilon)
      new_row, new_col = new_row.astype(v_row.dtype), new_col.astype(v_col.dtype)
      row_axis = d1 - 1 if d1 > d0 else d1  # d1's position once d0 is reduced away
      row_factor = (new_row / jnp.mean(new_row, axis=row_axis, keepdims=True)) ** -0.5
      col_factor = new_col**-0.5
      u = g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
      return u, new_row, new_col, v

    out = jax.tree.map(one, updates, state.v_row, state.v_col, state.v)
    treedef = jax.tree.structure(updates)
    # Transposed per leaf; a tree without leaves (every parameter stacked: LoRA adapters under
    # scan_layers leave the unstacked part empty) has four empty parts.
    parts = list(zip(*treedef.flatten_up_to(out), strict=True)) or [()] * 4
    u, v_row, v_col, v = (treedef.unflatten(p) for p in parts)
    count = optax.safe_increment(state.count)
    return u, optax.FactoredState(count=count, v_row=v_row, v_col=v_col, v=v)

  return optax.GradientTransformation(reference.init, update_fn)


def scale_by_param_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
  """Multiplies each update by `max(rms(param), min_scale)`: Adafactor's parameter scaling.

  The same values as `optax.scale_by_param_block_rms` (float32 parameters; others get their RMS
  in float32), computed in one pass over each parameter.
  optax's RMS is written to be differentiable at zero (a `where` over the whole parameter, then a
  second mean), which XLA materialises: two more passes over all the weights. Standalone, the
  Adafactor update at t5-v1_1-small went from 302 to 242 ms on a 2-core CPU; inside the train
  step the gain was within run-to-run noise. Nothing differentiates through an optimizer update.
  """

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_param_rms needs params")

    def scale(u, p):
      rms = jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32))))
      return u * jnp.maximum(rms, min_scale).astype(u.dtype)

    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def adafactor(
  learning_rate: optax.ScalarOrSchedule,
  *,
  min_dim_size_to_factor: int = 128,
  decay_rate: float = 0.8,
  multiply_by_parameter_scale: bool = True,
  clipping_threshold: float | None = 1.0,
  momentum: float | None = None,
  weight_decay_rate: float | None = None,
  weight_decay_mask: Any = None,
  eps: float = 1e-30,
  factored: bool = True,
) -> optax.GradientTransformation:
  """`optax.adafactor` with two pieces of its chain replaced, `scale_by_factored_rms` and
  `scale_by_param_rms` (see each): the same transformations in the same order, so the same updates
  and the same state (checkpoints written with either restore into the other; tested)."""
  tx = [
    scale_by_factored_rms(
      factored=factored,
      decay_rate=decay_rate,
      min_dim_size_to_factor=min_dim_size_to_factor,
      epsilon=eps,
    )
  ]
  if clipping_threshold is not None:
    tx.append(optax.clip_by_block_rms(clipping_threshold))
  tx.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if multiply_by_parameter_scale:
    tx.append(scale_by_param_rms())
  if momentum is not None:
    tx.append(optax.ema(momentum, debias=False, accumulator_dtype=jnp.float32))
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  tx.append(optax.scale(-1.0))
  return optax.chain(*tx)


def make_optimizer(
  cfg: OptimizerConfig, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
  """Builds the optimizer described by `cfg`.

  Args:
    cfg: the optimizer settings.
    schedule: the learning-rate schedule; defaults to `make_schedule(cfg)`. Pass the one you log.

  Returns:
    An `optax.GradientTransformation`; its `update` needs `params` (both optimizers use them).
  """
  if schedule is None:
    schedule = make_schedule(cfg)
  weight_decay = float(cfg.weight_decay)

  if cfg.name == "adafactor":
    a = cfg.adafactor
    opt = adafactor(
      learning_rate=schedule,
      min_dim_size_to_factor=int(a.min_dim_size_to_factor),
      decay_rate=float(a.decay_rate),
      multiply_by_parameter_scale=bool(a.multiply_by_parameter_scale),
      clipping_threshold=float(a.clipping_threshold) or None,
      momentum=float(a.momentum) or None,
      weight_decay_rate=weight_decay or None,
      weight_decay_mask=decay_mask if weight_decay else None,
      eps=float(a.eps),
      factored=bool(a.factored),
    )
    if a.matrix_view and a.factored:
      opt = as_matrices(opt, int(a.min_dim_size_to_factor))
  else:  # "adamw" (OptimizerConfig checked the name)
    a = cfg.adamw
    opt = optax.adamw(
      learning_rate=schedule,
      b1=float(a.b1),
      b2=float(a.b2),
      eps=float(a.eps),
      mu_dtype=jnp.float32,
      weight_decay=weight_decay,
      mask=decay_mask,
    )

  opt = per_layer(opt)  # a no-op unless parameters are stacked over layers (scan_layers)
  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), opt)
  return opt
