"""Tests for t5jax.sharding.

Spec logic runs in-process on the usual single CPU device. Checks that need several devices run
this file as a script in a subprocess with `--xla_force_host_platform_device_count=8` (the flag
must be set before jax is imported, so it cannot be set inside the pytest process).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from t5jax import optim, sharding
from t5jax.sharding import MeshConfig
from t5jax.train_config import AdafactorConfig, OptimizerConfig

SIZES = {"data": 2, "fsdp": 2, "tensor": 2}


def _mesh_cfg(data, fsdp, tensor):
  return MeshConfig(data, fsdp, tensor)


def _toy_params_and_axes():
  """A hand-made tree shaped like the model's (vocab 32, D 16, H 4, K 8, F 64)."""
  shapes = {
    "shared": (32, 16),
    "encoder": {
      "relpos_bias": {"rel_embedding": (32, 4)},
      "layers_0": {
        "attention": {"query": (16, 4, 8), "out": (4, 8, 16)},
        "mlp": {"wi": (16, 64), "wo": (64, 16)},
        "pre_mlp_layer_norm": {"scale": (16,)},
      },
    },
    "lm_head": (16, 30),  # vocab 30: divisible by 2, not by 4 or 8
  }
  axes = {
    "shared": ("vocab", "embed"),
    "encoder": {
      "relpos_bias": {"rel_embedding": ("relpos_buckets", "heads")},
      "layers_0": {
        "attention": {"query": ("embed", "heads", "kv"), "out": ("heads", "kv", "embed")},
        "mlp": {"wi": ("embed", "mlp"), "wo": ("mlp", "embed")},
        "pre_mlp_layer_norm": {"scale": ("embed",)},
      },
    },
    "lm_head": ("embed", "vocab"),
  }
  shape_tree = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
  )
  return shape_tree, axes


def test_mesh_shape_resolution():
  assert sharding.mesh_shape(_mesh_cfg(-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.mesh_shape(_mesh_cfg(2, -1, 1), 8) == (2, 4, 1)
  assert sharding.mesh_shape(_mesh_cfg(1, 1, -1), 8) == (1, 1, 8)
  assert sharding.mesh_shape(MeshConfig(), 1) == (1, 1, 1)
  for bad in [(-1, -1, 1), (3, 1, -1), (2, 2, 1), (0, 1, -1)]:
    with pytest.raises(ValueError):
      sharding.mesh_shape(_mesh_cfg(*bad), 8)


def test_logical_rules_specs():
  spec = lambda axes, shape=None: sharding.logical_to_spec(axes, SIZES, shape=shape)
  assert spec(("batch", "length")) == P(("data", "fsdp"), None)
  assert spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert spec(("embed", "heads", "kv")) == P("fsdp", "tensor", None)
  assert spec(("heads", "kv", "embed")) == P("tensor", None, "fsdp")
  assert spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert spec(("relpos_buckets", "heads")) == P(None, "tensor")
  assert spec(("embed",)) == P("fsdp")
  assert spec(()) == P()
  with pytest.raises(KeyError):
    spec(("nonsense",))


def test_divisibility_fallback_and_reuse():
  sizes = {"data": 2, "fsdp": 4, "tensor": 8}
  spec = lambda axes, shape: sharding.logical_to_spec(axes, sizes, shape=shape)
  assert spec(("vocab", "embed"), (32128, 512)) == P("tensor", "fsdp")
  assert spec(("vocab", "embed"), (32100, 512)) == P(None, "fsdp")  # 32100 % 8 != 0
  assert spec(("embed", "mlp"), (6, 12)) == P(None, None)
  # The batch rule keeps the prefix of its axes that divides: 6 rows on data=2, fsdp=4.
  assert spec(("batch", "length"), (6, 5)) == P("data", None)
  assert spec(("batch",), (3,)) == P(None)
  # A mesh axis is used once per array: the second "embed" dimension is replicated.
  assert spec(("embed", "embed"), (8, 8)) == P("fsdp", None)
  # Later rules for the same logical name are fallbacks.
  rules = (("vocab", "tensor"), ("vocab", "fsdp"), ("embed", "fsdp"))
  assert sharding.logical_to_spec(("vocab",), sizes, rules, (36,)) == P("fsdp")


def test_logical_to_sharding_tree_and_opt_state():
  mesh = sharding.create_mesh(MeshConfig())
  shapes, axes = _toy_params_and_axes()
  shard = sharding.logical_to_sharding(axes, mesh, shapes=shapes)
  assert jax.tree.structure(shard) == jax.tree.structure(shapes)
  assert shard["encoder"]["layers_0"]["attention"]["out"].spec == P("tensor", None, "fsdp")

  cfg = OptimizerConfig(adafactor=AdafactorConfig(min_dim_size_to_factor=8))
  tx = optim.make_optimizer(cfg)
  state_shapes = jax.eval_shape(tx.init, shapes)
  st = sharding.derive_shardings(state_shapes, shapes, shard, mesh)
  assert jax.tree.structure(st) == jax.tree.structure(state_shapes)
  # shared (32, 16): factored; v_row drops the largest dim (vocab), v_col the other (embed).
  assert st[0].v_row["shared"].spec == P("fsdp")
  assert st[0].v_col["shared"].spec == P("tensor")
  assert st[0].v["shared"].spec == P()  # (1,) placeholder
  assert st[0].v["encoder"]["layers_0"]["pre_mlp_layer_norm"]["scale"].spec == P("fsdp")
  assert st[0].count.spec == P()

  adam = OptimizerConfig(name="adamw")
  tx = optim.make_optimizer(adam)
  state_shapes = jax.eval_shape(tx.init, shapes)
  st = sharding.derive_shardings(state_shapes, shapes, shard, mesh)
  mu, nu = st[0].mu, st[0].nu
  assert mu["encoder"]["layers_0"]["mlp"]["wi"].spec == P("fsdp", "tensor")
  assert nu["lm_head"].spec == shard["lm_head"].spec


def test_derive_shardings_whole_train_state():
  mesh = sharding.create_mesh(MeshConfig())
  shapes, axes = _toy_params_and_axes()
  shard = sharding.logical_to_sharding(axes, mesh, shapes=shapes)
  tx = optim.make_optimizer(OptimizerConfig())
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": shapes}
  state["opt_state"] = jax.eval_shape(tx.init, shapes)
  st = sharding.derive_shardings(state, shapes, shard, mesh)
  assert st["step"].spec == P()
  assert st["params"]["shared"].spec == shard["shared"].spec
  assert st["opt_state"][0].v["encoder"]["layers_0"]["mlp"]["wo"].spec == P("tensor", "fsdp")


def test_model_param_shardings():
  from t5jax import model
  from t5jax.config import get_config

  cfg = get_config("t5-small", num_layers=1, num_decoder_layers=1)
  mesh = sharding.create_mesh(MeshConfig())
  shard = sharding.param_shardings(cfg, mesh)
  axes = model.param_axes(cfg)
  assert jax.tree.structure(shard) == jax.tree.structure(axes, is_leaf=sharding.is_axes_leaf)
  assert shard["shared"].spec == P("tensor", "fsdp")
  assert shard["encoder"]["layers_0"]["attention"]["query"].spec == P("fsdp", "tensor", None)


@pytest.mark.slow
def test_multidevice_subprocess():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  res = subprocess.run(
    [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stdout + res.stderr
  assert "multidevice ok" in res.stdout


# ---- run in the 8-device subprocess -------------------------------------------------------------


def _check_meshes():
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]:
    mesh = sharding.create_mesh(_mesh_cfg(*shape))
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == sharding.MESH_AXES
    assert len({d.id for d in mesh.devices.flat}) == 8


def _check_sharded_params_and_update():
  mesh = sharding.create_mesh(_mesh_cfg(2, 2, 2))
  shapes, axes = _toy_params_and_axes()
  shard = sharding.logical_to_sharding(axes, mesh, shapes=shapes)

  def init(rng):
    # Cheap deterministic values: sharded jax.random compiles slowly on 8 CPU devices.
    offset = jax.random.uniform(rng)
    return jax.tree.map(
      lambda s: jnp.sin(jnp.arange(s.size, dtype=jnp.float32) + offset).reshape(s.shape), shapes
    )

  params = jax.jit(init, out_shardings=shard)(jax.random.key(0))
  wi = params["encoder"]["layers_0"]["mlp"]["wi"]  # (16, 64) on (fsdp=2, tensor=2)
  assert {s.data.shape for s in wi.addressable_shards} == {(8, 32)}
  assert {s.data.shape for s in params["lm_head"].addressable_shards} == {(8, 15)}

  cfg = OptimizerConfig(adafactor=AdafactorConfig(min_dim_size_to_factor=8))
  tx = optim.make_optimizer(cfg)
  opt_shard = sharding.derive_shardings(jax.eval_shape(tx.init, params), shapes, shard, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
  v_row = opt_state[0].v_row["shared"]  # (16,) over fsdp
  assert {s.data.shape for s in v_row.addressable_shards} == {(8,)}

  def step(params, opt_state):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  sharded_step = jax.jit(step, out_shardings=(shard, opt_shard), donate_argnums=(0, 1))
  ref = jax.tree.map(np.asarray, params)
  new_params, _ = sharded_step(params, opt_state)
  assert new_params["shared"].sharding == shard["shared"]
  # Same numbers as unsharded on one device.
  p1 = jax.device_put(ref, jax.devices()[0])
  want = jax.jit(lambda p: step(p, tx.init(p))[0])(p1)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, want
  )


def _check_batch_round_trip():
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]:
    mesh = sharding.create_mesh(_mesh_cfg(*shape))
    batch = {
      "encoder_input_tokens": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
      "decoder_loss_weights": np.ones((16, 3), np.float32),
    }
    out = sharding.shard_batch(batch, mesh)
    for k, v in batch.items():
      np.testing.assert_array_equal(np.asarray(out[k]), v)
      assert out[k].sharding == sharding.batch_sharding(mesh)
    rows = 16 // (shape[0] * shape[1])
    assert {s.data.shape[0] for s in out["encoder_input_tokens"].addressable_shards} == {rows}
  mesh = sharding.create_mesh(_mesh_cfg(2, 2, 2))
  with pytest.raises(ValueError):
    sharding.shard_batch({"x": np.zeros((6, 2), np.int32)}, mesh)


def _check_fallback_on_mesh():
  mesh = sharding.create_mesh(_mesh_cfg(1, 1, 8))
  s = sharding.logical_to_sharding(
    {"a": ("vocab", "embed"), "b": ("vocab", "embed")},
    mesh,
    shapes={"a": jax.ShapeDtypeStruct((36, 4), jnp.float32), "b": np.zeros((40, 4))},
  )
  assert s["a"].spec == P(None, "fsdp") and s["b"].spec == P("tensor", "fsdp")
  x = jax.device_put(np.zeros((36, 4)), s["a"])  # would fail if the spec split 36 over 8
  assert x.shape == (36, 4)


def _check_activation_constraint():
  mesh = sharding.create_mesh(_mesh_cfg(2, 2, 2))
  x = np.zeros((8, 3, 4), np.float32)
  f = jax.jit(lambda x: sharding.with_logical_constraint(x * 2, ("batch", "length", "embed")))
  np.testing.assert_array_equal(f(x), x)  # no mesh set: a no-op
  with jax.set_mesh(mesh):
    y = f(x)
  want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None))
  assert y.sharding.is_equivalent_to(want, 3), y.sharding


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  _check_meshes()
  _check_sharded_params_and_update()
  _check_batch_round_trip()
  _check_fallback_on_mesh()
  _check_activation_constraint()
  print("multidevice ok")
