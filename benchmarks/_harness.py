"""Shared plumbing for the CPU benchmarks: fresh worker processes, busy-loop load, machine state.

Every measurement runs in its own Python process (`python -m benchmarks.X --_worker ...`, from
the directory the benchmark was started in) that writes one JSON result, so neither side
inherits the other's thread pools, allocator state or OpenMP spin threads. `--load N` starts N
`python -c 'while 1: pass'` processes for the duration of each measurement (started before the
worker, ended by pid after it), so a "loaded" number is one command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

# torch/OpenMP/MKL thread-count variables a worker sets from its --threads (before torch loads).
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def add_common_args(p, workers: tuple[str, ...]) -> None:
  """The options both benchmarks share: the reference's thread counts, XLA variants, load,
  timeouts, and the hidden flags of a worker process (one measurement in a fresh process)."""
  import argparse

  p.add_argument("--threads", default="1,2", help="torch thread counts to measure")
  p.add_argument("--xla", default="default,eigen1", help="t5jax XLA variants: default, eigen1")
  p.add_argument("--load", type=int, default=0, help="busy-loop processes during measurements")
  p.add_argument(
    "--worker_timeout",
    type=float,
    default=1800,
    help="s; a slower process is reported as timed out",
  )
  p.add_argument("--no_hf", action="store_true", help="skip transformers")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--tiny", action="store_true", help="shrink the preset to 2 layers, d_model 64 (smoke test)"
  )
  p.add_argument("--_worker", choices=workers, help=argparse.SUPPRESS)
  p.add_argument("--_ckpt", help=argparse.SUPPRESS)
  p.add_argument("--_out", help=argparse.SUPPRESS)
  p.add_argument("--_nthreads", type=int, default=0, help=argparse.SUPPRESS)


def require_reference(script: str, no_hf: bool) -> None:
  """Exits with one line when the reference cannot run: torch and transformers are test extras,
  which `make demo`'s environment does not have."""
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing and not no_hf:
    sys.exit(
      f"{script}: error: {' and '.join(missing)} not installed (the reference): run `make"
      " setup-test` (or pip install -e '.[test]') first, or pass --no_hf to time t5jax alone"
    )


def require_module(what: str, module: str) -> None:
  """Exits with one line when `module` (a test extra) is not installed."""
  if importlib.util.find_spec(module) is None:
    sys.exit(f"{what}: error: {module} not installed: run `make setup-test` first")


def machine_state() -> str:
  """One line: CPU count, load average, and whether OMP_WAIT_POLICY is set in this environment."""
  load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  omp = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)")
  return f"{os.cpu_count()} CPUs, load average {load}; OMP_WAIT_POLICY {omp}"


def start_load(n: int) -> list[subprocess.Popen]:
  """Starts n CPU-bound busy loops; returns their handles (stop them with stop_load)."""
  return [
    subprocess.Popen([sys.executable, "-c", "while 1: pass"], stdin=subprocess.DEVNULL)
    for _ in range(n)
  ]


def stop_load(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    p.kill()
  for p in procs:
    p.wait()


def run_worker(
  module: str,
  worker_args: list[str],
  *,
  env: dict[str, str] | None = None,
  load: int = 0,
  timeout: float | None = None,
) -> dict | None:
  """Runs `python -m module --_worker ... --_out FILE` in a fresh process and returns its JSON.

  `env` entries are added to (or, with value None, removed from) this process's environment.
  Returns None when the worker runs past `timeout` seconds (it is killed; on a shared CPU,
  torch at 2 threads under the default OpenMP policy can stall for minutes per step).
  Raises RuntimeError naming the worker when it fails (its stderr tail included).
  """
  full_env = dict(os.environ)
  for k, v in (env or {}).items():
    if v is None:
      full_env.pop(k, None)
    else:
      full_env[k] = v
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "result.json")
    cmd = [sys.executable, "-m", module, *worker_args, "--_out", out]
    busy = start_load(load)
    try:
      time.sleep(0.2 if load else 0)
      proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return None
    finally:
      stop_load(busy)
    if proc.returncode != 0 or not os.path.exists(out):
      tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
      raise RuntimeError(f"worker {' '.join(worker_args)} failed ({proc.returncode}):\n{tail}")
    with open(out) as fh:
      return json.load(fh)


def worker_args(passthrough: list[str], kind: str, ckpt: str, env: dict[str, str]) -> list[str]:
  """The argv of one worker process: the user's flags, its kind, the weights, torch's threads."""
  wa = [*passthrough, f"--_worker={kind}", f"--_ckpt={ckpt}"]
  if kind.endswith("torch") or kind == "ct2":
    wa.append(f"--_nthreads={env['OMP_NUM_THREADS']}")
  return wa


def run_jobs(module, passthrough, jobs, ckpt, args, report) -> dict[str, list[dict]]:
  """Every `(name, kind, env)` job `args.repeats` times, interleaved so load drifts hit every
  variant alike; prints `report(result)` per run and returns the results by name."""
  results: dict[str, list[dict]] = {name: [] for name, _, _ in jobs}
  for rep in range(args.repeats):
    for name, kind, env in jobs:
      wa = worker_args(passthrough, kind, ckpt, env)
      r = run_worker(module, wa, env=env, load=args.load, timeout=args.worker_timeout)
      tag = f"  [{rep + 1}/{args.repeats}] {name:16}"
      if r is None:
        print(f"{tag} timed out (> {args.worker_timeout:.0f} s)")
        continue
      results[name].append(r)
      print(f"{tag} {report(r)}; load average {os.getloadavg()[0]:.2f}", flush=True)
  return results


def thread_env(threads: int) -> dict[str, str]:
  """Environment that pins torch (OpenMP / MKL) to `threads`, leaving the wait policy default."""
  env: dict[str, str | None] = {k: str(threads) for k in _THREAD_VARS}
  env["OMP_WAIT_POLICY"] = None  # the default policy (spin, then sleep), torch at its best
  return env  # type: ignore[return-value]


def xla_variant_env(variant: str) -> dict[str, str]:
  """XLA_FLAGS for a t5jax CPU variant: `default`, or `eigen1` (single-threaded Eigen matmuls)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if variant == "default":
    return {"XLA_FLAGS": flags} if flags else {}
  if variant == "eigen1":
    return {"XLA_FLAGS": (flags + " --xla_cpu_multi_thread_eigen=false").strip()}
  raise ValueError(f"unknown XLA variant {variant!r} (expected default or eigen1)")


def write_result(path: str, result: dict) -> None:
  with open(path, "w") as fh:
    json.dump(result, fh)


def fmt_ratio(ours: float, theirs: float) -> str:
  return f"{ours / theirs:.2f}x" if theirs > 0 else "n/a"
