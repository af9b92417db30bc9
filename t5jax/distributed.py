"""Multi-host start-up: `jax.distributed.initialize` when launched as several processes.

Every process runs the same program; after `maybe_initialize`, `jax.devices()` lists the devices
of all processes and one `jax.jit` over a mesh of them is one program across hosts. How the
processes find each other, first match wins:

1. explicit arguments (`train.py --coordinator_address host:port --num_processes N
   --process_id i`), else the environment variables `T5JAX_COORDINATOR`, `T5JAX_NUM_PROCESSES`,
   `T5JAX_PROCESS_ID`;
2. SLURM: inside an `srun` step with more than one task (`SLURM_STEP_NODELIST` set and
   `SLURM_NTASKS` > 1); JAX derives the coordinator from the node list and the job id;
3. `T5JAX_DISTRIBUTED=auto`: JAX's own cluster detection (Cloud TPU slices, GKE, Open MPI), for
   multi-host TPU slices where no SLURM variables exist; `TPU_WORKER_HOSTNAMES` listing several
   hosts also selects it.

Otherwise (one process) nothing happens. On CPU-only processes (tests, debugging) the collectives
between processes go through gloo.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from t5jax.errors import ConfigError


def _cpu_collectives() -> None:
  """Cross-process collectives on CPU devices need an implementation; gloo ships with jaxlib."""
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  if platforms.split(",")[0] == "cpu":
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an option some jax versions lack or default
      pass


def _int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "")
  return int(value) if value.strip() else None


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: Sequence[int] | None = None,
  env: Mapping[str, str] | None = None,
) -> bool:
  """Initialises JAX's distributed runtime when this is one of several processes.

  Must run before anything touches a JAX device (no arrays created, no `jax.devices()` yet).

  Args:
    coordinator_address: `host:port` of process 0 (any free port; every process passes the same).
    num_processes: the number of processes.
    process_id: this process's index in `[0, num_processes)`.
    local_device_ids: the local devices this process uses (default: all it sees).
    env: the environment to read (default `os.environ`).

  Returns:
    True if the distributed runtime was initialised (or already was), False for a single process.

  Raises:
    ValueError: a multi-process setting is incomplete (e.g. no process id).
  """
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or env.get("T5JAX_COORDINATOR") or None
  if num_processes is None:
    num_processes = _int(env, "T5JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int(env, "T5JAX_PROCESS_ID")
  if num_processes is not None and num_processes > 1:
    if not coordinator_address or process_id is None:
      raise ConfigError(
        f"{num_processes} processes need a coordinator address (host:port of process 0) and a "
        "process id for each: pass --coordinator_address and --process_id "
        "(or T5JAX_COORDINATOR / T5JAX_PROCESS_ID)"
      )
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
    _cpu_collectives()
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, local_device_ids=local_device_ids
    )
    return True
  slurm = "SLURM_STEP_NODELIST" in env and (_int(env, "SLURM_NTASKS") or 1) > 1
  tpu_hosts = env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
  if slurm or tpu_hosts or env.get("T5JAX_DISTRIBUTED") == "auto":
    _cpu_collectives()
    jax.distributed.initialize(local_device_ids=local_device_ids)  # JAX detects the cluster
    return True
  return False


def barrier(name: str, timeout_s: float = 900.0) -> None:
  """Waits until every process reaches `name`, through the coordination service (no devices).

  Device collectives on CPU (gloo) give up when the processes reach their first collective more
  than ~30 s apart, e.g. when one compiles much more slowly; compile ahead of time
  (`.lower(...).compile()`), then meet here, then run. A no-op for a single process.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client has no public accessor

  jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def shutdown() -> None:
  """Leaves a multi-process run together: waits for every process, then disconnects.

  Process 0 hosts the coordination service; if it exits while another process is still closing
  its checkpoint manager, that process loses the service and aborts (seen on 2 loaded CPUs). A
  no-op for a single process.
  """
  if jax.process_count() == 1:
    return
  barrier("t5jax: shutdown")
  jax.distributed.shutdown()


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and exports."""
  return jax.process_index() == 0


def gather_json(obj: Any) -> dict[str, Any]:
  """Every process's JSON-able `obj`, keyed by process index (for data iterator states)."""
  if jax.process_count() == 1:
    return {"0": obj}
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
  padded = np.zeros(n, np.uint8)
  padded[: raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return {str(i): json.loads(bytes(row).rstrip(b"\0").decode()) for i, row in enumerate(everything)}


def agreed_stop(signal_number: int | None, step: int, every: int) -> int | None:
  """The signal to stop on at this step, the same on every process.

  One process alone may receive SIGTERM; if it saved and left while the others ran on, the next
  collective would hang. With several processes the flags are compared every `every` steps (a
  small all-gather), and all stop together at the first such step after any was signalled.
  """
  if jax.process_count() == 1:
    return signal_number
  if step % every:
    return None
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array([signal_number or 0], np.int32))
  return int(np.max(flags)) or None


def describe() -> str:
  """One line on the topology, e.g. `process 0/2, 2 local of 4 devices (cpu)`."""
  return (
    f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local of "
    f"{jax.device_count()} devices ({jax.devices()[0].platform})"
  )
