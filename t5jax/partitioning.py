"""Logical axis names to mesh axes: the rule table, partition specs, activation constraints.

The lowest layer of sharding: it knows mesh axis *names* and a table of rules, nothing of the model
or of meshes' construction, so `t5jax.model` can import `with_logical_constraint` from here while
`t5jax.sharding` (meshes, state and batch shardings) imports the model. No import circle.

Divisibility fallback: a dimension is only split over mesh axes whose size product divides it.
If it does not, mesh axes are dropped from the end of the rule's tuple until it does (possibly
all, i.e. the dimension is replicated) instead of failing. E.g. a vocabulary of 32100 on a
tensor axis of 8 is replicated; 32128 is split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# With `T5Config.scan_layers`, a stack's layers live under this key, their parameters stacked on a
# leading axis of this logical name (`params["encoder"]["layers"]["mlp"]["wo"]`: `[layers, F, D]`).
STACKED = "layers"


def is_stacked(path: Sequence[Any]) -> bool:
  """True for the path (jax tree-path keys) of a parameter stacked over layers."""
  return any(getattr(k, "key", None) == STACKED for k in path)


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
