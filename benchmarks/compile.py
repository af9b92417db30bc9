"""Ahead-of-time compile time of the train step and of `generate`, scanned vs unrolled layers.

  python -m benchmarks.compile                              # small, base, large, xl; both layouts
  python -m benchmarks.compile --presets t5-v1_1-small,t5-v1_1-base --limit 300

For each preset and layout (`T5Config.scan_layers` True / False), a fresh Python process lowers
and compiles, on abstract shapes only (`jax.eval_shape` / `jax.ShapeDtypeStruct`: no parameter
is allocated, so t5-v1_1-xl compiles on a laptop):

* the train step (`trainer.build`, Adafactor, T5's loss, one device) at `--batch` rows of
  `--input_len` / `--target_len` tokens;
* greedy `generate` of `--new_tokens` tokens from `--input_len` input tokens.

Each process has the persistent compilation cache off and is killed after `--limit` seconds (the
row then says so). The table gives lower (trace + StableHLO) and compile (XLA) seconds apart and
their sum; the ratios the issue targets follow: scanned xl against scanned small (target <= 1.3x)
and unrolled base against scanned base (target >= 4x). Compile time depends on the machine and
its load, not on the batch shapes: report the machine state with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = ["t5-v1_1-small", "t5-v1_1-base", "t5-v1_1-large", "t5-v1_1-xl"]


def measure_one(preset: str, scan: bool, args) -> dict[str, float]:
  """Lower and compile seconds of the train step and of greedy generate (in this process)."""
  import jax
  import numpy as np

  import t5jax
  from t5jax import sharding, trainer
  from t5jax.config import get_config
  from t5jax.train_config import LossConfig, OptimizerConfig

  jax.config.update("jax_enable_compilation_cache", False)
  cfg = get_config(preset, scan_layers=scan, dtype=args.dtype, remat=args.remat)
  mesh = sharding.create_mesh(sharding.MeshConfig(), jax.devices()[:1])
  steps = trainer.build(cfg, OptimizerConfig(), LossConfig(), mesh)
  state = steps.abstract_state()

  def tokens(length):
    return jax.ShapeDtypeStruct((args.batch, length), np.int32)

  batch = {
    "encoder_input_tokens": tokens(args.input_len),
    "decoder_input_tokens": tokens(args.target_len),
    "decoder_target_tokens": tokens(args.target_len),
    "decoder_loss_weights": jax.ShapeDtypeStruct((args.batch, args.target_len), np.float32),
  }
  out = {}
  rng = jax.ShapeDtypeStruct((2,), np.uint32)
  out.update(_timed("train", lambda: steps.train_step.lower(state, batch, rng)))

  def greedy(params, enc):
    out = t5jax.generate(params, cfg, enc, method="greedy", max_new_tokens=args.new_tokens)
    return out.sequences, out.scores

  gen = jax.jit(greedy)
  out.update(_timed("generate", lambda: gen.lower(state.params, tokens(args.input_len))))
  return out


def _timed(name: str, lower) -> dict[str, float]:
  t0 = time.perf_counter()
  lowered = lower()
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {f"{name}_lower": t1 - t0, f"{name}_compile": t2 - t1}


def run_child(preset: str, scan: bool, args) -> dict[str, float] | str:
  cmd = [
    sys.executable, "-m", __spec__.name, "--_child", preset, "--_scan", str(int(scan)),
    "--batch", str(args.batch), "--input_len", str(args.input_len),
    "--target_len", str(args.target_len), "--new_tokens", str(args.new_tokens),
    "--dtype", args.dtype, "--remat", args.remat,
  ]  # fmt: skip
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit, env=env)
  except subprocess.TimeoutExpired:
    return f"over {args.limit:.0f} s"
  if done.returncode:
    errors = [x for x in done.stderr.splitlines() if "Error" in x] or ["?"]
    return "failed: " + errors[-1][:120]
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
  p.add_argument("--layouts", default="scanned,unrolled", help="scanned, unrolled or both")
  p.add_argument("--limit", type=float, default=600, help="seconds per preset and layout")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--input_len", type=int, default=64)
  p.add_argument("--target_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=16)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--_child", help=argparse.SUPPRESS)
  p.add_argument("--_scan", type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._child:
    print(json.dumps(measure_one(args._child, bool(args._scan), args)))
    return

  layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
  if not set(layouts) <= {"scanned", "unrolled"}:
    p.error(f"--layouts: expected scanned and/or unrolled, got {args.layouts!r}")
  print(
    f"AOT compile seconds (lower + XLA compile), CPU, batch {args.batch}, "
    f"{args.input_len}/{args.target_len} tokens, {args.new_tokens} new tokens, {args.dtype}, "
    f"remat {args.remat}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
  )
  print("| preset | layers | train lower | train compile | train total "
        "| generate lower | generate compile | generate total |")  # fmt: skip
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  results: dict[tuple[str, str], dict[str, float]] = {}
  for preset in [x.strip() for x in args.presets.split(",") if x.strip()]:
    for layout in layouts:
      r = run_child(preset, layout == "scanned", args)
      if isinstance(r, str):
        print(f"| {preset} | {layout} | {r} | | | | | |", flush=True)
        continue
      r["train_total"] = r["train_lower"] + r["train_compile"]
      r["generate_total"] = r["generate_lower"] + r["generate_compile"]
      results[preset, layout] = r
      cells = " | ".join(
        f"{r[f'{what}_{part}']:.1f}"
        for what in ("train", "generate")
        for part in ("lower", "compile", "total")
      )
      print(f"| {preset} | {layout} | {cells} |", flush=True)

  def ratio(a, b, what):
    if a in results and b in results:
      return f"{results[a][what] / results[b][what]:.2f}x"
    return "not measured"

  print()
  for what in ("train_total", "generate_total"):
    print(
      f"{what}: scanned xl / scanned small = "
      f"{ratio(('t5-v1_1-xl', 'scanned'), ('t5-v1_1-small', 'scanned'), what)} (target <= 1.3x); "
      f"unrolled base / scanned base = "
      f"{ratio(('t5-v1_1-base', 'unrolled'), ('t5-v1_1-base', 'scanned'), what)} (target >= 4x)"
    )


if __name__ == "__main__":
  main()
