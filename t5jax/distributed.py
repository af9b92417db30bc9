"""Multi-host start-up: `jax.distributed.initialize` when launched as several processes."""

from __future__ import annotations

import os

import jax


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Initialises JAX's distributed runtime when this is one of several processes.

  Explicit arguments win; otherwise T5JAX_COORDINATOR / T5JAX_NUM_PROCESSES / T5JAX_PROCESS_ID
  are read; otherwise, under SLURM (SLURM_JOB_ID with more than one task) or on a multi-host TPU,
  JAX's own cluster auto-detection is used. A single process does nothing.

  Returns:
    True if the distributed runtime was initialised.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("T5JAX_COORDINATOR")
  if num_processes is None and env.get("T5JAX_NUM_PROCESSES"):
    num_processes = int(env["T5JAX_NUM_PROCESSES"])
  if process_id is None and env.get("T5JAX_PROCESS_ID"):
    process_id = int(env["T5JAX_PROCESS_ID"])
  if coordinator_address and num_processes and num_processes > 1:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # JAX detects SLURM and TPU pods itself
    return True
  return False
