"""Optax optimizers and learning-rate schedules built from a `config.optimizer` section.

* `default_optimizer_config()`: the section, every field commented (T5's pretraining recipe).
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
import ml_collections
import optax


def default_optimizer_config() -> ml_collections.ConfigDict:
  """The `config.optimizer` section with T5's pretraining defaults."""
  c = ml_collections.ConfigDict()
  c.name = "adafactor"  # "adafactor" or "adamw".
  c.learning_rate = 1.0  # Base (peak) rate; `schedule` shapes it over steps.
  # "rsqrt": base / sqrt(max(step, warmup_steps)) (T5 pretraining: base 1.0, warmup 10000 gives
  #   0.01 flat, then inverse square root decay); no ramp, as in T5.
  # "constant": base, after an optional linear warmup from 0 (T5 finetuning: 1e-3, no warmup).
  # "cosine": linear warmup from 0 to base, then cosine decay to end_learning_rate at total_steps.
  # "linear": linear warmup from 0 to base, then linear decay to end_learning_rate at total_steps.
  c.schedule = "rsqrt"
  c.warmup_steps = 10_000  # rsqrt: length of the flat start; others: steps of the linear ramp.
  c.total_steps = 0  # cosine/linear: step where decay ends (warmup included). Unused otherwise.
  c.end_learning_rate = 0.0  # cosine/linear: rate reached at total_steps and kept after.
  c.grad_clip_norm = 0.0  # Clip gradients to this global L2 norm before the optimizer; 0 = off.
  # Weight decay on parameters of rank >= 2 (not norm scales; T5 has no biases); 0 = off.
  # AdamW: decoupled, times the learning rate. Adafactor: `weight_decay * param` subtracted every
  # step, not scaled by the learning rate (optax's convention).
  c.weight_decay = 0.0

  c.adafactor = ml_collections.ConfigDict()  # Used when name == "adafactor". T5 / t5x defaults.
  c.adafactor.decay_rate = 0.8  # Second-moment decay is 1 - (t + 1)**-decay_rate.
  c.adafactor.min_dim_size_to_factor = 128  # Factor a matrix whose 2 largest dims are >= this.
  c.adafactor.factored = True  # Row/column second-moment statistics for large matrices.
  c.adafactor.clipping_threshold = 1.0  # Clip each update to this RMS; 0 = off.
  c.adafactor.multiply_by_parameter_scale = True  # Relative step: updates times param RMS.
  c.adafactor.momentum = 0.0  # First-moment decay; 0 = no momentum (T5).
  c.adafactor.eps = 1e-30  # Added to squared gradients.
  # Factor rank > 2 params as matrices, T5-style ([D, H, K] as [D, H*K]); see module docstring.
  c.adafactor.matrix_view = True

  c.adamw = ml_collections.ConfigDict()  # Used when name == "adamw".
  c.adamw.b1 = 0.9  # First-moment decay.
  c.adamw.b2 = 0.999  # Second-moment decay.
  c.adamw.eps = 1e-8  # Added to sqrt(second moment).
  return c


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Learning rate as a function of the update count (see `default_optimizer_config`)."""
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

  if kind in ("cosine", "linear"):
    total = int(cfg.total_steps)
    end = float(cfg.end_learning_rate)
    if total <= warmup:
      raise ValueError(f"{kind} schedule needs total_steps ({total}) > warmup_steps ({warmup})")
    if kind == "cosine":
      return optax.warmup_cosine_decay_schedule(0.0, base, warmup, total, end)
    decay = optax.linear_schedule(base, end, total - warmup)
    if warmup <= 0:
      return decay
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])

  raise ValueError(f"unknown schedule {kind!r}")


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
  cfg: ml_collections.ConfigDict, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
  """Builds the optimizer described by `cfg`.

  Args:
    cfg: a `config.optimizer` section (see `default_optimizer_config`).
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
  elif cfg.name == "adamw":
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
  else:
    raise ValueError(f"unknown optimizer {cfg.name!r}")

  if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(float(cfg.grad_clip_norm)), opt)
  return opt
