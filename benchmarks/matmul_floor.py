"""The decode floor: the output layer's matmul alone, XLA against torch, at decoding's row counts.

  python -m benchmarks.matmul_floor                    # [rows, 512] x [512, 32128], rows 8 and 32
  python -m benchmarks.matmul_floor --rows 8,32,256 --d 512 --vocab 32128

One decoding step of t5-v1_1-small at batch 8 multiplies 8 rows (greedy) or 32 (beam-4) by the
66 MB output matrix; the product reads the whole matrix for a few rows, so it runs at the memory
bandwidth the matmul library gets. Each side runs in a fresh process (torch at 1 and 2 threads,
as `benchmarks/decode.py` does), best of `--calls` timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

from benchmarks._harness import machine_state, thread_env


def _xla_call(matmul, a, w):
  return matmul(a, w).block_until_ready()


def _worker(side: str, rows: list[int], d: int, vocab: int, calls: int) -> dict[str, float]:
  import numpy as np

  rng = np.random.default_rng(0)
  w = rng.standard_normal((d, vocab), dtype=np.float32)
  out = {}
  for m in rows:
    a = rng.standard_normal((m, d), dtype=np.float32)
    if side == "xla":
      import jax

      matmul = jax.jit(lambda a, w: a @ w)
      call = functools.partial(_xla_call, matmul, jax.device_put(a), jax.device_put(w))
    else:
      import torch

      call = functools.partial(torch.matmul, torch.from_numpy(a), torch.from_numpy(w))
    call()
    best = float("inf")
    for _ in range(calls):
      t = time.perf_counter()
      call()
      best = min(best, time.perf_counter() - t)
    out[str(m)] = best
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default="8,32")
  p.add_argument("--d", type=int, default=512)
  p.add_argument("--vocab", type=int, default=32128)
  p.add_argument("--calls", type=int, default=50)
  p.add_argument("--threads", default="1,2", help="torch thread counts")
  p.add_argument("--_side", help=argparse.SUPPRESS)
  args = p.parse_args()
  rows = [int(r) for r in args.rows.split(",")]
  if args._side:
    print(json.dumps(_worker(args._side, rows, args.d, args.vocab, args.calls)))
    return
  sides = [("xla", "t5jax (XLA)", {})] + [
    ("torch", f"torch {n} thr", thread_env(int(n))) for n in args.threads.split(",")
  ]
  argv = [sys.executable, "-m", __spec__.name, "--rows", args.rows, "--d", str(args.d)]
  argv += ["--vocab", str(args.vocab), "--calls", str(args.calls), "--_side"]
  results = {}
  for side, name, overrides in sides:
    env = dict(os.environ)
    for key, value in overrides.items():  # None: unset
      env.pop(key, None) if value is None else env.__setitem__(key, value)
    proc = subprocess.run([*argv, side], env=env, capture_output=True, text=True, check=True)
    results[name] = json.loads(proc.stdout.splitlines()[-1])
  mb = args.d * args.vocab * 4 / 1e6
  print(f"[rows, {args.d}] x [{args.d}, {args.vocab}] float32 ({mb:.0f} MB of weights); ms, best")
  print("| rows | " + " | ".join(results) + " | XLA / best torch |")
  print("|---:|" + "---:|" * (len(results) + 1))
  for m in rows:
    times = [r[str(m)] for r in results.values()]
    best_torch = min(times[1:])
    cells = " | ".join(f"{t * 1e3:.2f} ({mb / 1e3 / t:.0f} GB/s)" for t in times)
    print(f"| {m} | {cells} | {times[0] / best_torch:.2f}x |")
  print(f"machine: {machine_state()}")


if __name__ == "__main__":
  main()
