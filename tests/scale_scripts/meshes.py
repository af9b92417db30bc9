"""8-device checks (run as a script with `--xla_force_host_platform_device_count=8`).

1. On meshes (8,1,1), (2,4,1), (2,2,2), (1,1,8), sharded init (train.py's path) gives the
   target layout and the values of a plain single-device init; two train steps then give the
   single-device losses, metrics and parameters (dropout on: its mask must not depend on the
   layout); (2,4,1) and (2,2,2) run under `jax.set_mesh`, which activates the model's activation
   constraints.
2. A checkpoint saved on (2,2,2) restores onto (1,1,8) and onto a 4-device (1,4,1) mesh, with the
   target shardings and the saved values; a step after restoring matches the reference's.
3. Greedy and beam decoding with sharded params and inputs equal unsharded decoding.

Prints one `ok <check>` line per check and `meshes ok` at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402

from t5jax import checkpoint, model, sharding, trainer  # noqa: E402
from t5jax.generate import generate  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
MESH_CONTEXT = {(2, 4, 1), (2, 2, 2)}  # these train under `jax.set_mesh` (activation constraints)
RTOL, ATOL = 2e-5, 2e-6  # float reassociation of sharded reductions


def _close(a, b, what):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=what)


def _tree_close(a, b, what):
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
  ):
    _close(x, y, f"{what} {jax.tree_util.keystr(path)}")


class Run:
  """Train state, jitted step and shardings of one mesh."""

  def __init__(self, config, mesh):
    self.mesh = mesh
    self.mesh_context = tuple(mesh.shape.values()) in MESH_CONTEXT
    self.setup = common.build(config, mesh)
    self.state_sh = self.setup.state_shardings
    # As train.py starts: each device creates only its shards.
    self.state = self.setup.init_state(jax.random.key(0))
    self.step = self.setup.train_step

  def train(self, steps):
    losses = []
    for i in range(steps):
      batch = sharding.shard_batch(common.batch(i), self.mesh)
      if self.mesh_context:  # turns on the model's activation sharding constraints
        with jax.set_mesh(self.mesh):
          self.state, metrics = self.step(self.state, batch, jax.random.key(7))
      else:
        self.state, metrics = self.step(self.state, batch, jax.random.key(7))
      losses.append(jax.device_get(metrics))
    return losses


def check_train(config, steps=2):
  devices = jax.devices()
  ref = Run(config, sharding.create_mesh(common.mesh_cfg(1, 1, 1), devices[:1]))
  tx = ref.setup.tx
  # The reference init does not go through `TrainSetup.init_state`: a change there (another rng,
  # a layout-dependent draw) must show as a difference, not move both sides alike.
  with jax.default_device(devices[0]):
    ref_state0 = jax.device_get(
      jax.jit(lambda r: trainer.create_train_state(model.init_params(config, r), tx))(
        jax.random.key(0)
      )
    )
  _tree_close(ref.state, ref_state0, "(1,1,1) init")
  ref_metrics = ref.train(steps)
  runs = {}
  for shape in MESHES:
    # Sharded init on every mesh: in the target layout, with the single-device init's values.
    run = Run(config, sharding.create_mesh(common.mesh_cfg(*shape)))
    for (path, x), sh in zip(
      jax.tree_util.tree_flatten_with_path(run.state)[0], jax.tree.leaves(run.state_sh), strict=True
    ):
      where = (shape, jax.tree_util.keystr(path), x.sharding)
      assert x.sharding.is_equivalent_to(sh, x.ndim), where
    _tree_close(run.state, ref_state0, f"{shape} init")
    metrics = run.train(steps)
    for i, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
      for k in r:
        _close(m[k], r[k], f"{shape} step {i} {k}")
    _tree_close(run.state.params, ref.state.params, f"{shape} params")
    _tree_close(run.state.opt_state, ref.state.opt_state, f"{shape} opt_state")
    # The layout is really sharded: FSDP / tensor meshes hold a fraction of wi per device.
    wi = run.state.params["encoder"]["layers_0"]["mlp"]["wi_0"]
    per_device = {s.data.size for s in wi.addressable_shards}
    assert per_device == {wi.size // (shape[1] * shape[2])}, (shape, per_device)
    runs[shape] = run
    print("ok train", shape, "loss", [float(m["loss"]) for m in metrics], _t(), flush=True)
  return ref, runs


def check_checkpoint(config, ref, runs):
  src = runs[(2, 2, 2)]
  saved = jax.device_get(src.state)
  with tempfile.TemporaryDirectory() as workdir:
    mgr = checkpoint.CheckpointManager(workdir, async_save=False)
    mgr.save(2, src.state, {"0": {"pos": 2}}, force=True)
    mgr.wait()
    targets = [
      ("(1,1,8)", runs[(1, 1, 8)]),
      ("4 devices (1,4,1)", None),
    ]
    for name, run in targets:
      if run is None:
        setup = common.build(
          config, sharding.create_mesh(common.mesh_cfg(1, 4, 1), jax.devices()[:4])
        )
      else:
        setup = run.setup
      state_sh = setup.state_shardings
      state, data_state = mgr.restore(setup.abstract_state(), 2)
      assert data_state == {"0": {"pos": 2}}, data_state
      for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
        assert x.sharding.is_equivalent_to(sh, x.ndim), (name, x.sharding, sh)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved)
      if run is not None:  # training goes on from the restored state as it would have
        run.state = state
        after = run.train(1)[0]
        ref_after = ref.train(1)[0] if not hasattr(ref, "_after") else ref._after
        ref._after = ref_after
        _close(after["loss"], ref_after["loss"], f"{name} loss after restore")
      print("ok checkpoint (2,2,2) ->", name, _t(), flush=True)
    mgr.close()


def check_decoding(config, runs):
  run = runs[(2, 2, 2)]
  params = run.state.params
  host_params = jax.device_get(params)
  inputs = common.batch(5, rows=8)["encoder_input_tokens"]
  sharded_inputs = sharding.shard_batch({"x": inputs}, run.mesh)["x"]
  # Greedy as a caller would without a mesh context (layout from the inputs' shardings); beam
  # search (rows reordered every step) under `jax.set_mesh`, which activates the model's
  # activation sharding constraints.
  for kwargs, mesh_context in [
    (dict(method="greedy"), False),
    (dict(method="beam", num_beams=2), True),
  ]:
    want = generate(host_params, config, inputs, max_new_tokens=6, **kwargs)
    if mesh_context:
      with jax.set_mesh(run.mesh):
        got = generate(params, config, sharded_inputs, max_new_tokens=6, **kwargs)
    else:
      got = generate(params, config, sharded_inputs, max_new_tokens=6, **kwargs)
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(want.sequences))
    _close(got.scores, want.scores, f"decode {kwargs} scores")
    print("ok decode", kwargs["method"], _t(), flush=True)


T0 = time.perf_counter()


def _t():
  return f"({time.perf_counter() - T0:.1f}s)"


def main():
  assert jax.device_count() == 8, jax.devices()
  config = common.tiny_config(dropout_rate=0.1)
  ref, runs = check_train(config)
  check_checkpoint(config, ref, runs)
  check_decoding(config.replace(dropout_rate=0.0), runs)
  print("meshes ok", flush=True)


if __name__ == "__main__":
  main()
