"""Scale-out tests: sharded training equals one device, checkpoints move between meshes and
device counts, a real two-process run matches one process, sharded decoding equals unsharded.

Multi-device checks run scripts from `tests/scale_scripts/` in subprocesses, since the CPU
device count (`--xla_force_host_platform_device_count`) must be set before jax is imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5jax import checkpoint, distributed, sharding, trainer

SCRIPTS = os.path.join(os.path.dirname(__file__), "scale_scripts")
sys.path.insert(0, SCRIPTS)

import common  # noqa: E402


def _env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--_unused")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_maybe_initialize_single_process_and_errors():
  assert not distributed.maybe_initialize(env={})
  assert not distributed.maybe_initialize(env={"SLURM_NTASKS": "4"})  # sbatch script, no srun
  assert not distributed.maybe_initialize(None, 1, 0, env={})
  with pytest.raises(ValueError, match="coordinator"):
    distributed.maybe_initialize(None, 2, 0, env={})
  with pytest.raises(ValueError, match="process id"):
    distributed.maybe_initialize(env={"T5JAX_COORDINATOR": "h:1", "T5JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="not in"):
    distributed.maybe_initialize("h:1", 2, 2, env={})
  assert distributed.is_main_process()
  distributed.barrier("single process: a no-op")
  assert distributed.describe().startswith("process 0/1")


@pytest.mark.slow
def test_meshes_train_checkpoint_decode():
  """(8,1,1), (2,4,1), (2,2,2), (1,1,8): steps, restore across meshes, decoding; one process."""
  res = subprocess.run(
    [sys.executable, os.path.join(SCRIPTS, "meshes.py")],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stdout + res.stderr[-5000:]
  assert "meshes ok" in res.stdout, res.stdout


def _reference(steps: int):
  """Single-device losses and final train state of the two-process run's schedule."""
  config = common.tiny_config(dropout_rate=0.1)
  tx, step_fn = common.train_step_fn(config, "adafactor")
  mesh = sharding.create_mesh(common.mesh_cfg(1, 1, 1), jax.devices()[:1])
  state_sh = trainer.state_shardings(config, tx, mesh)
  state = trainer.init_state_sharded(config, tx, mesh, jax.random.key(0), state_sh)
  train_step = trainer.jit_train_step(step_fn, state_sh, mesh)
  losses = []
  for i in range(steps):
    state, metrics = train_step(
      state, sharding.shard_batch(common.batch(i), mesh), jax.random.key(7)
    )
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """jax.distributed on localhost, 2 processes x 2 CPU devices: same losses as one device; the
  checkpoint both processes wrote restores in this (single-device) process to the same params."""
  steps, port = 3, _free_port()
  script = os.path.join(SCRIPTS, "multiprocess.py")
  procs = [
    subprocess.Popen(
      [sys.executable, script, str(port), str(i), str(tmp_path), str(steps)],
      env=_env(2),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  want_losses, want_state = _reference(steps)  # runs while the two processes start up
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f"process {i}:\n{out}\n{err[-5000:]}"
    assert f"process {i} ok" in out
  assert "losses" not in outs[1][0]  # only process 0 reports
  losses = json.loads(outs[0][0].split("losses ", 1)[1].splitlines()[0])
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)  # noqa: E731
  # The checkpoint both processes wrote, restored onto this process's single device.
  mgr = checkpoint.CheckpointManager(str(tmp_path), async_save=False)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), want_state
  )
  state, data_state = mgr.restore(abstract, steps)
  mgr.close()
  assert data_state == {"0": {"pos": steps}, "1": {"pos": steps}}
  jax.tree.map(close, jax.device_get(state), want_state)
  # Parameters alone, as decode.py loads them.
  step, params = checkpoint.restore_params(str(tmp_path))
  assert step == steps
  jax.tree.map(close, params, want_state.params)
