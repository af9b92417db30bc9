"""Device mesh, logical axis rules, and the shardings of parameters, optimizer state and batches.

The model names every parameter dimension with a logical axis (`t5jax.model.param_axes`); this
module maps those names to the axes of a 3-D mesh `("data", "fsdp", "tensor")` through a table of
rules, so data, fully-sharded data (FSDP) and tensor parallelism are configuration, not code:

* `data`: replicas of the model; the batch is split over it.
* `fsdp`: the batch is split over it too, and parameters and optimizer state are split along
  their `embed` dimension, so each device holds 1/fsdp of them (gathered on use by XLA).
* `tensor`: heads, feed-forward hidden units and the vocabulary are split over it (Megatron style).

A single `jax.jit` with these shardings runs on one device, many devices, or many hosts: each
process calls the same functions and feeds only its local rows with `shard_batch`.

Divisibility fallback: a dimension is only split over mesh axes whose size product divides it.
If it does not, mesh axes are dropped from the end of the rule's tuple until it does (possibly
all, i.e. the dimension is replicated) instead of failing. E.g. a vocabulary of 32100 on a
tensor axis of 8 is replicated; 32128 is split. Batches get no fallback: `shard_batch` raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes): mesh axes may be a name, a tuple of names (split over their product)
# or None (replicated). A name may appear in several rules: the first whose mesh axes are not
# already used by another dimension of the same array (and survive the divisibility fallback) wins.
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("joined_kv", "tensor"),  # heads * kv fused in one dimension
  ("kv", None),
  ("relpos_buckets", None),
  ("length", None),
  ("layers", None),  # stacked (scanned) layers
)


def default_mesh_config() -> ml_collections.ConfigDict:
  """The `config.mesh` section: sizes of the mesh axes (their product = number of devices)."""
  c = ml_collections.ConfigDict()
  c.data = -1  # Data-parallel replicas; -1 = all devices left over by the other axes.
  c.fsdp = 1  # Parameter/optimizer-state sharding along `embed`; the batch is split over it too.
  c.tensor = 1  # Tensor parallelism over heads, mlp and vocab; keep it within a host.
  return c


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves the `-1` in a `config.mesh` section; checks the product equals `num_devices`."""
  sizes = [int(cfg[name]) for name in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive with at most one -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices cannot be split as {sizes}")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {sizes} (data, fsdp, tensor) needs {math.prod(sizes)} devices, have {num_devices}"
    )
  return tuple(sizes)


def create_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the `("data", "fsdp", "tensor")` mesh over all (global) devices.

  `jax.make_mesh` orders devices for the interconnect; on several hosts `jax.devices()` lists every
  process's devices, process by process, so the outer `data` axis spans hosts and the inner
  `tensor` axis stays within one.

  Args:
    cfg: a `config.mesh` section (see `default_mesh_config`).
    devices: defaults to `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _as_tuple(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  if isinstance(mesh_axes, str):
    return (mesh_axes,)
  return tuple(mesh_axes)


def logical_to_spec(
  axes: Sequence[str | None],
  mesh_sizes: Mapping[str, int],
  rules: Rules = DEFAULT_RULES,
  shape: Sequence[int] | None = None,
) -> P:
  """PartitionSpec for one array from its logical axis names.

  Args:
    axes: one logical name (or None) per dimension.
    mesh_sizes: mesh axis name -> size (`dict(mesh.shape)`); axes absent from it are ignored.
    rules: the logical-to-mesh table.
    shape: the array's shape; with it, the divisibility fallback applies (module docstring).

  Returns:
    A PartitionSpec with one entry per dimension: None, a mesh axis name, or a tuple of names.

  Raises:
    KeyError: a logical name has no rule.
  """
  if shape is not None and len(shape) != len(axes):
    raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  entries = []
  for dim, name in enumerate(axes):
    chosen: tuple[str, ...] = ()
    if name is not None:
      candidates = [m for logical, m in rules if logical == name]
      if not candidates:
        raise KeyError(f"no sharding rule for logical axis {name!r}")
      for mesh_axes in candidates:
        picked = [a for a in _as_tuple(mesh_axes) if a in mesh_sizes and a not in used]
        if shape is not None:
          while picked and shape[dim] % math.prod(mesh_sizes[a] for a in picked):
            picked.pop()
        if picked:
          chosen = tuple(picked)
          break
    used.update(chosen)
    entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return P(*entries)


def is_axes_leaf(x: Any) -> bool:
  """True for a tuple of logical names (a leaf of a `param_axes` tree)."""
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def logical_to_sharding(
  axes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, shapes: Any = None
) -> Any:
  """NamedSharding tree from a tree of logical-axis tuples.

  Args:
    axes_tree: pytree whose leaves are tuples of logical names (e.g. `model.param_axes(config)`).
    mesh: the device mesh.
    rules: the logical-to-mesh table.
    shapes: optional tree of the same structure whose leaves have `.shape` (arrays or
      `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`); enables the divisibility fallback.
      Always pass it for real parameters.

  Returns:
    A tree of `NamedSharding` with the structure of `axes_tree`.
  """
  sizes = dict(mesh.shape)
  if shapes is None:
    return jax.tree.map(
      lambda a: NamedSharding(mesh, logical_to_spec(a, sizes, rules)),
      axes_tree,
      is_leaf=is_axes_leaf,
    )
  return jax.tree.map(
    lambda a, s: NamedSharding(mesh, logical_to_spec(a, sizes, rules, s.shape)),
    axes_tree,
    shapes,
    is_leaf=is_axes_leaf,
  )


def with_logical_constraint(
  x: jax.Array, axes: Sequence[str | None], rules: Rules = DEFAULT_RULES
) -> jax.Array:
  """Constrains an activation's sharding by logical names, under `jax.set_mesh(mesh)`.

  A no-op when no mesh is set, so model code can call it unconditionally. Activations use the
  same table as parameters: for `("batch", "length", "embed")` the batch takes `data` and `fsdp`,
  so `embed` (whose rule is `fsdp`, already used) stays whole, as FSDP wants.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(axes, dict(mesh.shape), rules, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)


def param_shardings(config: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Shardings of `t5jax.model.init_params(config, rng)` from `model.param_axes(config)`."""
  from t5jax import model  # Lazy: the rest of this module does not need the model.

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


def opt_state_sharding(
  opt_state_shapes: Any, param_shapes: Any, param_shardings: Any, mesh: Mesh
) -> Any:
  """Optimizer-state shardings derived from the parameters' (see `derive_shardings`)."""
  return derive_shardings(opt_state_shapes, param_shapes, param_shardings, mesh)


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, shardings: Any) -> Any:
  """Runs `init_fn(rng)` under jit with `out_shardings`: each device creates only its shards.

  A model too large for one device never materialises whole. The same applies to optimizer
  state: `jax.jit(tx.init, out_shardings=opt_shardings)(params)`.
  """
  return jax.jit(init_fn, out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
  """Sharding of batch arrays: the leading (batch) dimension split over the `batch` rule's axes."""
  batch_rule = next((m for logical, m in rules if logical == "batch"), None)
  axes = tuple(a for a in _as_tuple(batch_rule) if a in mesh.shape)
  return NamedSharding(mesh, P(axes if axes else None))


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
