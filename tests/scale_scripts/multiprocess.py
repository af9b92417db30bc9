"""One of two processes of a real multi-process run on localhost (2 CPU devices each).

Usage: python multiprocess.py PORT PROCESS_ID WORKDIR STEPS  (XLA_FLAGS gives 2 host devices)

Both processes join through `t5jax.distributed.maybe_initialize`, build a (data 2, fsdp 2) mesh
over the 4 global devices (data spans the processes), feed only their own half of each global
batch, train `STEPS` steps, save an orbax checkpoint (each process writes its shards), restore it
onto a (1, 4, 1) mesh and check the values. Process 0 alone prints `losses <json>`.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402

from t5jax import checkpoint, distributed, sharding  # noqa: E402


def main(port: str, process_id: str, workdir: str, steps: str):
  assert distributed.maybe_initialize(f"localhost:{port}", 2, int(process_id))
  assert jax.process_count() == 2 and jax.local_device_count() == 2, distributed.describe()
  assert jax.device_count() == 4
  config = common.tiny_config(dropout_rate=0.1)
  mesh = sharding.create_mesh(common.mesh_cfg(2, 2, 1))
  setup = common.build(config, mesh)
  state = setup.init_state(jax.random.key(0))
  half = common.B // 2
  lo = jax.process_index() * half
  batches = [
    sharding.shard_batch({k: v[lo : lo + half] for k, v in common.batch(i).items()}, mesh)
    for i in range(int(steps))
  ]  # each process passes only its own rows
  train_step = setup.train_step.lower(state, batches[0], jax.random.key(7)).compile()
  # On a loaded machine one process may finish compiling long after the other: meet before the
  # first cross-process collective (gloo waits only ~30 s for its peers).
  distributed.barrier("compiled")
  losses = []
  for batch in batches:
    state, metrics = train_step(state, batch, jax.random.key(7))
    losses.append(float(metrics["loss"]))  # replicated: every process can read it

  from jax.experimental import multihost_utils

  distributed.barrier("trained")
  saved = multihost_utils.process_allgather(state, tiled=True)
  mgr = checkpoint.CheckpointManager(workdir, async_save=False)
  mgr.save(int(steps), state, {"0": {"pos": int(steps)}, "1": {"pos": int(steps)}}, force=True)
  mgr.wait()
  abstract = common.build(config, sharding.create_mesh(common.mesh_cfg(1, 4, 1))).abstract_state()
  restored, _ = mgr.restore(abstract, int(steps))
  mgr.close()
  distributed.barrier("restored")
  got = multihost_utils.process_allgather(restored, tiled=True)
  jax.tree.map(np.testing.assert_array_equal, got, saved)
  if distributed.is_main_process():
    print("losses " + json.dumps(losses), flush=True)
  print(f"process {jax.process_index()} ok", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
