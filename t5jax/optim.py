"""Optax optimizers and learning-rate schedules built from an `OptimizerConfig`.

* `t5jax.train_config.OptimizerConfig`: the settings, every field commented (T5's pretraining
  recipe), validated when built.
* `make_schedule(cfg)`: an `optax.Schedule` mapping the update count (0 for the first update) to
  the learning rate; the train loop logs `schedule(step)`.
* `make_optimizer(cfg)`: `[clip by global norm] -> Adafactor | AdamW`, driven by that schedule.

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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

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
    opt = optax.adafactor(
      learning_rate=schedule,
      min_dim_size_to_factor=int(a.min_dim_size_to_factor),
      decay_rate=float(a.decay_rate),
      multiply_by_parameter_scale=bool(a.multiply_by_parameter_scale),
      clipping_threshold=float(a.clipping_threshold) or None,
      momentum=float(a.momentum) or None,
      dtype_momentum=jnp.float32,
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

  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), opt)
  return opt
