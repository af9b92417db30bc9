"""Device meshes and the shardings of parameters, optimizer and train state, and batches.

The model names every parameter dimension with a logical axis (`t5jax.model.param_axes`);
`t5jax.partitioning` maps those names to the axes of a 3-D mesh `("data", "fsdp", "tensor")`
through a table of rules, so data, fully-sharded data (FSDP) and tensor parallelism are
configuration, not code:

* `data`: replicas of the model; the batch is split over it.
* `fsdp`: the batch is split over it too, and parameters and optimizer state are split along
  their `embed` dimension, so each device holds 1/fsdp of them (gathered on use by XLA).
* `tensor`: heads, feed-forward hidden units and the vocabulary are split over it (Megatron style).

A single `jax.jit` with these shardings runs on one device, many devices, or many hosts: each
process calls the same functions and feeds only its local rows with `shard_batch`. Parameters
get the divisibility fallback of `t5jax.partitioning`; batches get none: `shard_batch` raises.

The rule-table names (`DEFAULT_RULES`, `logical_to_spec`, `logical_to_sharding`,
`with_logical_constraint`, ...) are re-exported from `t5jax.partitioning`, their home.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t5jax import model
from t5jax.errors import ConfigError
from t5jax.partitioning import DEFAULT_RULES as DEFAULT_RULES
from t5jax.partitioning import MESH_AXES as MESH_AXES
from t5jax.partitioning import Rules as Rules
from t5jax.partitioning import _as_tuple
from t5jax.partitioning import is_axes_leaf as is_axes_leaf
from t5jax.partitioning import logical_to_sharding as logical_to_sharding
from t5jax.partitioning import logical_to_spec as logical_to_spec
from t5jax.partitioning import with_logical_constraint as with_logical_constraint


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh`: sizes of the `("data", "fsdp", "tensor")` mesh axes (see `t5jax.sharding`).

  Their product is the number of devices; one of them may be -1, the devices left over.
  """

  data: int = -1  # Data-parallel replicas; -1 = all devices left over by the other axes.
  fsdp: int = 1  # Parameter/optimizer-state sharding along `embed`; the batch is split over it too.
  tensor: int = 1  # Tensor parallelism over heads, mlp and vocab; keep it within a host.

  def replace(self, **changes: Any) -> MeshConfig:
    return dataclasses.replace(self, **changes)

  def __post_init__(self):
    sizes = [self.data, self.fsdp, self.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
      raise ConfigError(f"mesh sizes must be positive with at most one -1, got {sizes}")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Resolves the `-1` of a `MeshConfig` (which checked its sizes); checks the product equals
  `num_devices`."""
  sizes = [getattr(cfg, name) for name in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ConfigError(f"{num_devices} devices cannot be split as {sizes}")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"mesh {sizes} (data, fsdp, tensor) needs {math.prod(sizes)} devices, have {num_devices}"
    )
  return tuple(sizes)


def create_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the `("data", "fsdp", "tensor")` mesh over all (global) devices.

  `jax.make_mesh` orders devices for the interconnect; on several hosts `jax.devices()` lists every
  process's devices, process by process, so the outer `data` axis spans hosts and the inner
  `tensor` axis stays within one.

  Args:
    cfg: the mesh axes' sizes.
    devices: defaults to `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def param_shardings(config: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Shardings of `t5jax.model.init_params(config, rng)` from `model.param_axes(config)`."""
  shapes = jax.eval_shape(lambda rng: model.init_params(config, rng), jax.random.key(0))
  return logical_to_sharding(model.param_axes(config), mesh, rules, shapes)


def _key_name(k: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _path(path: Sequence[Any]) -> tuple[Any, ...]:
  return tuple(_key_name(k) for k in path)


def _reduced_spec(spec: P, param_shape: tuple[int, ...], shape: tuple[int, ...]) -> P | None:
  """Spec for a leaf whose shape is the param's with one dimension removed (factored moments)."""
  entries = tuple(spec) + (None,) * (len(param_shape) - len(spec))
  for drop in range(len(param_shape)):
    if param_shape[:drop] + param_shape[drop + 1 :] == shape:
      return P(*(entries[:drop] + entries[drop + 1 :]))
  return None


def derive_shardings(tree_shapes: Any, param_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose leaves mirror parameters: optimizer state, or a whole train state.

  Each leaf is matched to the parameter whose path (dict keys from the params root) is the
  longest suffix of the leaf's path: optax nests param-shaped trees under its own fields, e.g.
  `(0, 'v_row', 'encoder', ...)` or `('mu', 'encoder', ...)`. Then:
  * same shape as the parameter: the parameter's sharding;
  * the parameter's shape with one dimension removed (Adafactor's factored `v_row`/`v_col`): the
    parameter's spec with that dimension's entry removed;
  * anything else (step counters, Adafactor's `(1,)` placeholders, unmatched leaves): replicated.

  Args:
    tree_shapes: the tree to shard, leaves with `.shape` (e.g. `jax.eval_shape(tx.init, params)`).
    param_shapes: the parameters (leaves with `.shape`).
    param_shardings: NamedSharding tree of the parameters (e.g. `logical_to_sharding`).
    mesh: the mesh, for replicated leaves.

  Returns:
    A NamedSharding tree with the structure of `tree_shapes`.
  """
  by_path = {}
  flat_shapes = jax.tree_util.tree_flatten_with_path(param_shapes)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  for (path, s), sh in zip(flat_shapes, flat_shardings, strict=True):
    by_path[_path(path)] = (tuple(s.shape), sh.spec)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    keys = _path(path)
    shape = tuple(np.shape(leaf))
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is None:
        continue
      param_shape, spec = match
      if shape == param_shape:
        return NamedSharding(mesh, spec)
      if len(shape) == len(param_shape) - 1:
        reduced = _reduced_spec(spec, param_shape, shape)
        if reduced is not None:
          return NamedSharding(mesh, reduced)
      return replicated
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree_shapes)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of batch arrays: the leading (batch) dimension split over the `batch` rule's axes."""
  batch_rule = next((m for logical, m in rules if logical == "batch"), None)
  axes = tuple(a for a in _as_tuple(batch_rule) if a in mesh.shape)
  return NamedSharding(mesh, P(axes if axes else None))


def batch_shards(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
  """How many pieces a batch is split into (the product of the `batch` rule's mesh axes: data x
  fsdp by default); a global batch size must be a multiple of it."""
  return math.prod(mesh.shape[a] for a in _as_tuple(batch_sharding(mesh, rules).spec[0]))


def _local_batch_slices(mesh: Mesh, axes: tuple[str, ...]) -> int:
  """How many distinct batch slices this process's devices hold."""
  pid = jax.process_index()
  coords = {
    tuple(idx[mesh.axis_names.index(a)] for a in axes)
    for idx in np.ndindex(mesh.devices.shape)
    if mesh.devices[idx].process_index == pid
  }
  return len(coords)


def shard_batch(
  batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of a batch.

  Each process passes the rows its own devices need, `[B_local, ...]`, in process order: with
  the batch axes spanning hosts that is its `1 / num_processes` slice of the global batch; where
  processes share batch slices (e.g. a `tensor` axis across hosts) they pass the same rows. The
  result is global arrays sharded with `batch_sharding`; on one host, `jax.device_put` with it.

  Raises:
    ValueError: the rows cannot be split evenly over the batch shards.
  """
  sharding = batch_sharding(mesh, rules)
  axes = _as_tuple(sharding.spec[0])
  shards = math.prod(mesh.shape[a] for a in axes)
  local_slices = _local_batch_slices(mesh, axes)
  out = {}
  for name, x in batch.items():
    x = np.asarray(x)
    if x.shape[0] % local_slices:
      raise ValueError(
        f"batch '{name}' has {x.shape[0]} local rows, not divisible by the {local_slices} batch "
        f"shards on this process ({shards} in all)"
      )
    global_shape = (x.shape[0] // local_slices * shards, *x.shape[1:])
    out[name] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out
