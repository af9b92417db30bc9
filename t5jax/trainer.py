"""Train state, the jitted train and eval steps, and their construction over a device mesh.

`train_step(state, batch, rng) -> (state, metrics)` is pure: the dropout key is `rng` folded with
the step, gradients are accumulated over `num_microbatches` with a `lax.scan` and normalised once
(so accumulation equals the large batch), and the step is jitted with explicit input/output
shardings over a `jax.sharding.Mesh` and donates the old state.

Parameter-efficient fine-tuning (`t5jax.peft`): the state's params are the adapters / prompt
alone, and the frozen base is a fourth, non-donated argument `frozen` of the step. Gradients are
taken with respect to the state's params only, so neither gradients nor optimizer state exist for
the base.

`build(config, optimizer, loss, mesh)` assembles the whole chain once (schedule -> optimizer ->
state shardings -> jitted train and eval steps) for the training run, the benchmarks and the tests;
the pieces below it stay public for a test of one of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from t5jax import losses, model, optim, peft, sharding
from t5jax.config import T5Config
from t5jax.train_config import LossConfig, OptimizerConfig

Batch = dict[str, jax.Array]

# Packing features passed to `model.forward` under their own names when a batch has them.
_MODEL_INPUTS = (
  "encoder_segment_ids",
  "decoder_segment_ids",
  "encoder_positions",
  "decoder_positions",
)


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position: step, params, optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any


def create_train_state(params, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _forward(params, config: T5Config, batch: Batch, dropout_rng, return_hidden=False):
  extra = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
  return model.forward(
    params,
    config,
    batch["encoder_input_tokens"],
    batch["decoder_input_tokens"],
    dropout_rng=dropout_rng,
    return_hidden=return_hidden,
    **extra,
  )


def _loss_sums(params, config: T5Config, batch: Batch, dropout_rng, loss_cfg: LossConfig):
  """`loss_sum`, `z_loss_sum`, `num_correct`, `num_tokens` of one (micro)batch: over the whole
  float32 logits, or a block of target positions at a time (`loss_cfg.block_size`)."""
  weights = batch.get("decoder_loss_weights")
  targets = batch["decoder_target_tokens"]
  if loss_cfg.block_size:
    hidden = _forward(params, config, batch, dropout_rng, return_hidden=True)
    return losses.blocked_loss_sums(
      hidden,
      targets,
      weights,
      lambda h: model.logits_from_hidden(params, config, h),
      block_size=loss_cfg.block_size,
      label_smoothing=loss_cfg.label_smoothing,
      z_loss=loss_cfg.z_loss,
    )
  _, aux = losses.compute_loss(
    _forward(params, config, batch, dropout_rng),
    targets,
    weights,
    label_smoothing=loss_cfg.label_smoothing,
    z_loss=loss_cfg.z_loss,
    normalizer=1.0,
  )
  return {k: aux[k] for k in ("loss_sum", "z_loss_sum", "num_correct", "num_tokens")}


def _sums(
  params, config: T5Config, batch: Batch, dropout_rng, loss_cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Unnormalised loss sum (what the gradient of one microbatch is taken of) and metric sums."""
  sums = _loss_sums(params, config, batch, dropout_rng, loss_cfg)
  # "total_tokens" normalises by every target position, padding included.
  sums["num_positions"] = jnp.float32(batch["decoder_target_tokens"].size)
  sums["num_rows"] = jnp.sum(
    jnp.max(batch["decoder_target_tokens"] != 0, axis=-1).astype(jnp.float32)
  )
  return sums["loss_sum"], sums


def _normalizer(loss_cfg: LossConfig, sums) -> jax.Array:
  """The divisor of the summed loss and gradients (`losses.parse_normalizer`, checked by
  `LossConfig`), from sums over the whole batch, so accumulation equals the large batch."""
  kind, constant = loss_cfg.normalizer_spec
  if kind == "num_tokens":
    return jnp.maximum(sums["num_tokens"], 1.0)
  if kind == "total_tokens":
    return sums["num_positions"]
  return jnp.asarray(constant, jnp.float32)


def _with_frozen(params, frozen):
  return params if frozen is None else peft.combine(frozen, params)


def make_train_step(
  config: T5Config,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss_cfg: LossConfig,
  num_microbatches: int = 1,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The pure train step `(state, batch, rng, frozen=None)` (not yet jitted; see
  `jit_train_step`). With `frozen` (the base of parameter-efficient fine-tuning), the state's
  params are the trainable part and the model runs on both (`peft.combine`)."""

  def train_step(state: TrainState, batch: Batch, rng: jax.Array, frozen=None):
    step_rng = jax.random.fold_in(rng, state.step)

    grad_fn = jax.grad(lambda p, *a: _sums(_with_frozen(p, frozen), *a), has_aux=True)

    if num_microbatches == 1:
      grads, sums = grad_fn(state.params, config, batch, step_rng, loss_cfg)
    else:
      micro = jax.tree.map(
        lambda x: x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:]),
        batch,
      )

      def body(carry, i_mb):
        i, mb = i_mb
        g, s = grad_fn(state.params, config, mb, jax.random.fold_in(step_rng, i), loss_cfg)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      # config and loss_cfg are static: close over them (eval_shape would trace them as arrays).
      shapes = jax.eval_shape(
        lambda p, b: grad_fn(p, config, b, step_rng, loss_cfg),
        state.params,
        jax.tree.map(lambda x: x[0], micro),
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(num_microbatches), micro))

    norm = _normalizer(loss_cfg, sums)
    grads = jax.tree.map(lambda g: g / norm, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": sums["loss_sum"] / norm,
      "z_loss": sums["z_loss_sum"] / norm,
      "accuracy": sums["num_correct"] / jnp.maximum(sums["num_tokens"], 1.0),
      "num_tokens": sums["num_tokens"],
      "learning_rate": schedule(state.step),
      "grad_norm": optax.tree.norm(grads),
      "update_norm": optax.tree.norm(updates),
      "param_norm": optax.tree.norm(params),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(
  config: T5Config, loss_cfg: LossConfig
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """Metric sums of one evaluation batch (no dropout); sum over batches, then normalise."""

  def eval_step(params, batch: Batch):
    return _sums(params, config, batch, None, loss_cfg)[1]

  return eval_step


def is_peft(config: T5Config) -> bool:
  """Whether `config` trains adapters / a prompt over a frozen base (`t5jax.peft`)."""
  return bool(config.lora_rank or config.prompt_length)


def _trained(tree, config: T5Config):
  """The part of a params-shaped tree the train state holds: all, or the PEFT part."""
  return peft.split(tree)[0] if is_peft(config) else tree


def state_shapes(config: T5Config, tx: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs of the whole train state (nothing is computed); with PEFT, its params
  are the adapters / prompt alone."""
  return jax.eval_shape(
    lambda: create_train_state(_trained(model.init_params(config, jax.random.key(0)), config), tx)
  )


def abstract_state(config: T5Config, tx, shardings: TrainState) -> TrainState:
  """The train state's shapes placed in `shardings`: the target of a checkpoint restore."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    state_shapes(config, tx),
    shardings,
  )


def state_shardings(config: T5Config, tx: optax.GradientTransformation, mesh) -> TrainState:
  """NamedShardings of the whole train state, derived from the parameters' logical axes."""
  param_sh = _trained(sharding.param_shardings(config, mesh), config)
  shapes = state_shapes(config, tx)
  state_sh = sharding.derive_shardings(shapes, shapes.params, param_sh, mesh)
  return state_sh.replace(params=param_sh)


def frozen_shardings(config: T5Config, mesh):
  """NamedShardings of the frozen base of a PEFT run (the parameters' own, as for training)."""
  return peft.split(sharding.param_shardings(config, mesh))[1]


def state_from_params(params, tx, shardings: TrainState) -> TrainState:
  """A fresh train state around given (e.g. HuggingFace) parameters, placed in `shardings`."""
  params = jax.device_put(jax.tree.map(jnp.asarray, params), shardings.params)
  return jax.jit(lambda p: create_train_state(p, tx), out_shardings=shardings)(params)


def jit_train_step(step_fn, state_sh: TrainState, mesh, frozen_sh=None):
  """The jitted step; with `frozen_sh` it takes the frozen base as a fourth argument (placed
  there, not donated)."""
  batch_sh = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  in_sh = (state_sh, batch_sh, replicated) + (() if frozen_sh is None else (frozen_sh,))
  return jax.jit(
    step_fn,
    in_shardings=in_sh,
    out_shardings=(state_sh, replicated),
    donate_argnums=(0,),
  )


def jit_eval_step(eval_fn, params_sh, mesh):
  batch_sh = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(eval_fn, in_shardings=(params_sh, batch_sh), out_shardings=replicated)


# --- the whole chain at once -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What `build` assembles: the optimizer, the state's shardings and the jitted steps.

  `train_step(state, batch, rng)` (PEFT: `(state, batch, rng, frozen)`) donates the state;
  `eval_step(params, batch)` returns metric sums and takes the model's whole parameters (PEFT:
  `peft.combine(frozen, state.params)`). Make the state with `init_state(rng)` (a fresh
  `model.init_params` at `rng`, made in its sharded layout; jitted once), `state_from_params`, or
  restore it into `abstract_state()`.
  """

  config: T5Config
  mesh: jax.sharding.Mesh
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  state_shardings: TrainState  # PEFT: of the adapters / prompt only
  frozen_shardings: Any  # PEFT: of the frozen base; else None
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  eval_step: Callable[[Any, Batch], dict[str, jax.Array]]
  init_state: Callable[[jax.Array], TrainState]

  def state_from_params(self, params) -> TrainState:
    """A fresh state around given parameters (PEFT: the trainable part), placed on the mesh."""
    return state_from_params(params, self.tx, self.state_shardings)

  def abstract_state(self) -> TrainState:
    """The state's shapes in their shardings (nothing computed): a restore or `lower` target."""
    return abstract_state(self.config, self.tx, self.state_shardings)


def build(
  config: T5Config,
  optimizer: OptimizerConfig,
  loss: LossConfig,
  mesh: jax.sharding.Mesh,
  *,
  num_microbatches: int = 1,
) -> TrainSetup:
  """Schedule -> optimizer -> state shardings -> jitted train and eval steps over `mesh`.

  Args:
    config: the model (with PEFT fields, the state holds the adapters / prompt alone).
    optimizer: the optimizer and its learning-rate schedule (`optim.make_schedule`).
    loss: the loss's settings (`LossConfig`).
    mesh: the device mesh (`sharding.create_mesh`); a one-device mesh for a plain step.
    num_microbatches: gradient-accumulation steps per batch (the batch splits evenly).

  Returns:
    A `TrainSetup`; nothing is compiled yet (the steps compile at their first call or `lower`).
  """
  schedule = optim.make_schedule(optimizer)
  tx = optim.make_optimizer(optimizer, schedule)
  state_sh = state_shardings(config, tx, mesh)
  frozen_sh = frozen_shardings(config, mesh) if is_peft(config) else None
  params_sh = state_sh.params if frozen_sh is None else peft.combine(frozen_sh, state_sh.params)
  step_fn = make_train_step(config, tx, schedule, loss, num_microbatches=num_microbatches)
  return TrainSetup(
    config=config,
    mesh=mesh,
    schedule=schedule,
    tx=tx,
    state_shardings=state_sh,
    frozen_shardings=frozen_sh,
    batch_sharding=sharding.batch_sharding(mesh),
    train_step=jit_train_step(step_fn, state_sh, mesh, frozen_sh),
    eval_step=jit_eval_step(make_eval_step(config, loss), params_sh, mesh),
    init_state=jax.jit(
      lambda r: create_train_state(_trained(model.init_params(config, r), config), tx),
      out_shardings=state_sh,
    ),
  )
