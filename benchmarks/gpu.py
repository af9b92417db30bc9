"""The accelerator benchmark in one command (about 5-7 minutes on one H100/H200):

  python -m benchmarks.gpu              # on the GPU machine; results also in $OUT/gpu.json if set
  python -m benchmarks.gpu --smoke      # tiny sizes, any machine (CPU: ~1 min, mostly compiles)

1. **cuDNN attention = einsum attention** on a tiny bf16 model (d_kv 64, 2+2 layers, batch 4,
   64/32 tokens, trailing padding, and a packed batch): logits and parameter gradients of
   `attention_impl="cudnn"` (on CPU: "dot_product", i.e. XLA's kernel) against "einsum". Both are
   bf16 computations, so each is compared with the float32 einsum model as the truth: the check
   passes when the fused path's relative error is at most twice the bf16 einsum path's plus one
   bf16 rounding (2^-8): the fused kernel may round in another order, but may not be less exact
   than the path it replaces by more than that.
2. **Train step** at t5-v1_1-base, batch 64, 512/128 tokens, bf16 compute (float32 parameters,
   Adafactor), for a small grid of (attention_impl, scan_layers, remat, loss block_size); model
   TFLOP/s (benchmarks.flops: 3 x forward matmul FLOPs) and MFU against the device's dense bf16 peak
   (989 TFLOP/s for H100/H200 SXM, 835 NVL, 756 H100 PCIe; `--peak_tflops` otherwise), next to
   transformers' eager PyTorch step (bf16 autocast, same optimizer) measured in the same run. A
   grid entry whose T5Config field does not exist in this checkout is skipped with a note.
3. **Decoding**: greedy, beam-4 and sampling new tokens/s at batch 64, 512 input tokens, 128 new
   tokens forced (`ignore_eos`), bf16, next to transformers' generate() (bf16 weights): the
   workers of benchmarks.decode, run in this process, best of `--repeats` timed calls.

Each phase stops cleanly when its time budget is spent (`--budget_s`), printing what was skipped;
`$OUT/gpu.json` is rewritten after every result, so a run cut short keeps what it measured, and a
run still going `--budget_s` + 150 s after its start dumps its threads' stacks and exits. Any
failure of one entry (a kernel refusal, out of memory) is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import statistics
import tempfile
import time

# JAX would take 75% of the GPU at its first operation, leaving transformers (same process) too
# little; and the device has no network, so the Hub must not be asked.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import t5jax  # noqa: E402
from benchmarks import decode as bench_decode  # noqa: E402
from benchmarks import flops  # noqa: E402
from benchmarks import train as bench_train  # noqa: E402
from t5jax import model, sharding, trainer  # noqa: E402
from t5jax.train_config import LossConfig, OptimizerConfig  # noqa: E402

# Dense bf16 peaks (vendor datasheets, without sparsity), the most specific name first: the PCIe
# and NVL boards run lower clocks and power than the SXM parts.
PEAK_BF16_TFLOPS = (
  ("H100 PCIe", 756.0),
  ("H100 NVL", 835.0),
  ("H200 NVL", 835.0),
  ("H100", 989.0),
  ("H200", 989.0),
  ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float:
  """The dense bf16 peak of a device by its `device_kind` name; 0 when unknown."""
  return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in device_kind.lower()), 0.0)


# attention_impl, scan_layers, remat, loss block_size (0 = whole logits)
DEFAULT_GRID = (
  "einsum,0,none,0;dot_product,0,none,0;dot_product,1,none,0;dot_product,1,full,0;"
  "dot_product,1,none,32"
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds per phase")
  p.add_argument("--preset", default="t5-v1_1-base")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--input_len", type=int, default=512)
  p.add_argument("--target_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--grid", default=DEFAULT_GRID, help="';'-separated impl,scan,remat,block")
  p.add_argument("--steps", type=int, default=5, help="timed train steps per grid entry")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2, help="timed generate() calls per method (best)")
  p.add_argument("--methods", default="greedy,beam,sample")
  p.add_argument("--decode_attention", default="dot_product")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak; 0 = by name")
  p.add_argument("--no_hf", action="store_true", help="skip transformers")
  p.add_argument("--budget_s", type=float, default=400.0, help="stop starting new work after")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.input_len, args.target_len, args.new_tokens = 2, 32, 16, 4
    args.steps, args.warmup, args.repeats = 1, 1, 1
  return args


def _model_config(args, **fields):
  config = t5jax.get_config(args.preset, dropout_rate=0.0, dtype="bfloat16")
  if args.smoke:
    config = config.replace(
      vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2,
      num_decoder_layers=2,
    )  # fmt: skip
  known = {f.name for f in dataclasses.fields(config)}
  missing = sorted(set(fields) - known)
  if missing:
    return None, f"T5Config has no field {', '.join(missing)} in this checkout"
  try:
    return config.replace(**fields), None
  except ValueError as e:
    return None, str(e)


# --- 1. cuDNN = einsum -----------------------------------------------------------------------


def check_attention(results):
  fused_impl = "cudnn" if jax.default_backend() == "gpu" else "dot_product"
  base = t5jax.T5Config(
    vocab_size=512, d_model=128, d_kv=64, d_ff=256, num_heads=4, num_layers=2,
    num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    scale_decoder_outputs=False, dropout_rate=0.0,
  )  # fmt: skip
  params = model.init_params(base, jax.random.key(1))
  rng = np.random.default_rng(0)
  b, s, t = 4, 64, 32
  enc = rng.integers(3, 512, (b, s)).astype(np.int32)
  tgt = rng.integers(3, 512, (b, t)).astype(np.int32)
  for row, n in enumerate((64, 50, 17, 33)):
    enc[row, n:] = 0  # trailing padding
  packed = dict(
    encoder_segment_ids=np.repeat([[1] * 30 + [2] * 24 + [0] * 10], b, 0).astype(np.int32),
    decoder_segment_ids=np.repeat([[1] * 14 + [2] * 14 + [0] * 4], b, 0).astype(np.int32),
  )
  packed["encoder_positions"] = np.repeat(
    [list(range(30)) + list(range(24)) + [0] * 10], b, 0
  ).astype(np.int32)
  packed["decoder_positions"] = np.repeat(
    [list(range(14)) + list(range(14)) + [0] * 4], b, 0
  ).astype(np.int32)
  dec = np.asarray(model.shift_right(tgt))

  def loss_and_grads(cfg, extra):
    valid = extra.get("decoder_segment_ids", np.ones_like(tgt)) != 0

    def loss(p):
      logits = model.forward(p, cfg, enc, dec, **extra)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
      ll = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
      return -jnp.sum(jnp.where(valid, ll, 0)) / valid.sum(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.where(valid[..., None], np.asarray(logits, np.float32), 0), grads

  def rel(a, b):
    pairs = zip(a, b, strict=True)
    num = sum(float(jnp.sum((jnp.asarray(x, jnp.float32) - y) ** 2)) for x, y in pairs)
    den = sum(float(jnp.sum(jnp.asarray(y, jnp.float32) ** 2)) for y in b)
    return (num / den) ** 0.5

  ok_all = True
  for name, extra in (("padded", {}), ("packed", packed)):
    with jax.default_matmul_precision("highest"):  # not TF32: the float32 einsum is the truth
      ref_l, ref_g = loss_and_grads(base, extra)
    out = {}
    for impl in ("einsum", fused_impl):
      try:
        lg, g = loss_and_grads(base.replace(dtype="bfloat16", attention_impl=impl), extra)
      except Exception as e:  # noqa: BLE001 - report any kernel refusal and go on
        out[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        continue
      out[impl] = (rel([lg], [ref_l]), rel(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
    if isinstance(out.get(fused_impl), str) or isinstance(out.get("einsum"), str):
      ok = False
      print(f"attention check [{name}]: {out}")
    else:
      (el, eg), (fl, fg) = out["einsum"], out[fused_impl]
      ok = fl <= 2 * el + 2**-8 and fg <= 2 * eg + 2**-8
      print(
        f"attention check [{name}] vs float32 einsum, relative L2 error: bf16 einsum logits "
        f"{el:.2e} grads {eg:.2e}; bf16 {fused_impl} logits {fl:.2e} grads {fg:.2e} -> "
        f"{'OK' if ok else 'MISMATCH'}",
        flush=True,
      )
    ok_all &= ok
    results["attention_check"][name] = {k: v for k, v in out.items()} | {"ok": ok}
  results["attention_check"]["ok"] = ok_all
  results["attention_check"]["fused_impl"] = fused_impl


# --- 2. train step ---------------------------------------------------------------------------


def train_grid(args, results, peak, deadline):
  b, s, t = args.batch, args.input_len, args.target_len
  ns = argparse.Namespace(
    seed=0, batch=b, input_len=s, target_len=t, optimizer="adafactor", lr=1e-3, dropout=0.0,
    dtype="bfloat16", warmup=args.warmup, steps=args.steps,
  )  # fmt: skip
  opt_cfg = OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_steps=0)
  mesh = sharding.create_mesh(sharding.MeshConfig())
  header = f"{'attention':12} {'scan':>4} {'remat':>6} {'block':>5} {'compile s':>9}"
  print(f"\n{header} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6}")
  for entry in args.grid.split(";"):
    impl, scan, remat, block = entry.split(",")
    label = f"{impl:12} {scan:>4} {remat:>6} {block:>5}"
    if time.perf_counter() > deadline:
      print(f"{label} skipped: time budget spent")
      continue
    fields = {"attention_impl": impl}
    if scan != "0":
      fields["scan_layers"] = True
    if remat != "none":
      fields["remat"] = remat
    config, why = _model_config(args, **fields)
    if config is None:
      print(f"{label} skipped: {why}")
      results["train"].append({"entry": entry, "skipped": why})
      continue
    step_flops = flops.train_step_flops(config, b, s, t)
    batch = bench_train.make_batch(config, ns)
    try:
      loss_cfg = LossConfig(z_loss=0.0, block_size=int(block))
      steps = trainer.build(config, opt_cfg, loss_cfg, mesh)
      state = steps.init_state(jax.random.key(0))
      batch = jax.device_put(batch, steps.batch_sharding)
      t0 = time.perf_counter()
      compiled = steps.train_step.lower(state, batch, jax.random.key(0)).compile()
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, jax.random.key(0))
        float(metrics["loss"])
        times.append(time.perf_counter() - t0)
      del state
    except Exception as e:  # noqa: BLE001 - one failing combination must not stop the grid
      why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      print(f"{label} {why}")
      results["train"].append({"entry": entry, "failed": why})
      continue
    step_s = statistics.mean(times[args.warmup :])
    tflops = step_flops / step_s / 1e12
    mfu = f"{tflops / peak * 100:5.1f}%" if peak else "  n/a"
    print(f"{label} {compile_s:9.1f} {step_s:8.4f} {tflops:8.1f} {mfu:>6}", flush=True)
    results["train"].append(
      {"entry": entry, "compile_s": compile_s, "step_s": step_s, "tflops": tflops}
    )
    save(results)
  if args.no_hf:
    return
  label = f"{'transformers eager':36}"
  if time.perf_counter() > deadline:
    print(f"{label} skipped: time budget spent")
    return
  try:
    config, _ = _model_config(args)
    params = jax.device_get(model.init_params(config, jax.random.key(0)))
    with tempfile.TemporaryDirectory() as d:
      t5jax.save_hf(config, params, d)
      worker = argparse.Namespace(**vars(ns), _ckpt=d, _nthreads=os.cpu_count() or 1)
      theirs = bench_train.worker_torch(worker)  # bf16 autocast, same Adafactor settings
  except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, go on to decoding
    why = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(f"{label} {why}")
    results["train"].append({"entry": "transformers eager", "failed": why})
    return
  step_s = statistics.mean(theirs["times"])
  tflops = flops.train_step_flops(config, b, s, t) / step_s / 1e12
  mfu = f"{tflops / peak * 100:5.1f}%" if peak else "  n/a"
  print(f"{label} {'-':>9} {step_s:8.4f} {tflops:8.1f} {mfu:>6}", flush=True)
  results["train"].append(
    {
      "entry": "transformers eager",
      "step_s": step_s,
      "tflops": tflops,
      "versions": theirs["versions"],
    }
  )


# --- 3. decoding -----------------------------------------------------------------------------


def decode(args, results, deadline):
  """benchmarks.decode's t5jax and transformers workers, one method at a time (so that the time
  budget is checked between methods), on random weights written once as a HuggingFace folder."""
  config, why = _model_config(args, attention_impl=args.decode_attention)
  if config is None:
    print(f"decode skipped: {why}")
    return
  n_tok = args.batch * args.new_tokens
  name = f"t5jax ({args.decode_attention})"
  print(f"\n{'decode':8} {'impl':26} {'compile s':>9} {'time s':>8} {'new tokens/s':>12}")
  with tempfile.TemporaryDirectory() as d:
    t5jax.save_hf(config, jax.device_get(model.init_params(config, jax.random.key(0))), d)
    for method in args.methods.split(","):
      if time.perf_counter() > deadline:
        print(f"{method:8} skipped: time budget spent")
        continue
      worker = argparse.Namespace(
        _ckpt=d, _nthreads=os.cpu_count() or 1, methods=method, batch=args.batch,
        input_len=args.input_len, new_tokens=args.new_tokens, num_beams=4, dtype="bfloat16",
        scan_layers=0, attention_impl=args.decode_attention, calls=args.repeats, seed=0,
      )  # fmt: skip
      row = {"method": method}
      try:
        r = bench_decode.worker_t5jax(worker)["methods"][method]
        ours = r["time"]
        print(
          f"{method:8} {name:26} {r['compile_s']:9.1f} {ours:8.3f} {n_tok / ours:12.0f}",
          flush=True,
        )
        row |= {"t5jax_s": ours, "t5jax_tokens_per_s": n_tok / ours}
      except Exception as e:  # noqa: BLE001 - a kernel refusal or out of memory: record, go on
        ours = None
        row["t5jax_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{method:8} {name:26} failed: {row['t5jax_failed']}", flush=True)
      results["decode"].append(row)
      save(results)
      if args.no_hf:
        continue
      if time.perf_counter() > deadline:
        print(f"{method:8} transformers skipped: time budget spent")
        continue
      try:
        theirs = bench_decode.worker_torch(worker)["methods"][method]["time"]
      except Exception as e:  # noqa: BLE001
        row["transformers_failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"{method:8} transformers failed: {row['transformers_failed']}", flush=True)
      else:
        ratio = f"   t5jax {theirs / ours:.2f}x" if ours else ""
        print(
          f"{method:8} {'transformers (bf16 eager)':26} {'-':>9} {theirs:8.3f} "
          f"{n_tok / theirs:12.0f}{ratio}",
          flush=True,
        )
        row |= {"transformers_s": theirs, "transformers_tokens_per_s": n_tok / theirs}
      save(results)


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  deadline = start + args.budget_s
  dev = jax.devices()[0]
  peak = args.peak_tflops or peak_tflops(dev.device_kind)
  print(
    f"device: {dev.device_kind} ({jax.default_backend()}) x{jax.device_count()}, jax "
    f"{jax.__version__}; peak bf16 {peak or 'unknown'} TFLOP/s; {args.preset}"
    f"{' (smoke: tiny)' if args.smoke else ''}, batch {args.batch}, {args.input_len}/"
    f"{args.target_len} tokens, {args.new_tokens} new tokens",
    flush=True,
  )
  results = {
    "device": dev.device_kind,
    "jax": jax.__version__,
    "args": vars(args),
    "attention_check": {},
    "train": [],
    "decode": [],
  }
  # A hang (a compile that never ends) still leaves gpu.json and says where it was.
  faulthandler.dump_traceback_later(args.budget_s + 150, exit=True)
  try:
    for phase in (
      lambda: check_attention(results),
      lambda: train_grid(args, results, peak, start + args.budget_s * 0.6),
      lambda: decode(args, results, deadline),
    ):
      try:
        phase()
      except Exception as e:  # noqa: BLE001 - one phase failing must not lose the others
        results.setdefault("errors", []).append(f"{type(e).__name__}: {str(e)[:300]}")
        print(f"phase failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
      save(results)
  finally:
    faulthandler.cancel_dump_traceback_later()
    results["wall_s"] = time.perf_counter() - start
    print(f"\nwall time {results['wall_s']:.0f} s")
    path = save(results)
    if path:
      print(f"results: {path}")
  return results


def save(results) -> str | None:
  """Writes `results` to `$OUT/gpu.json` (atomically) when OUT is set; returns the path."""
  out = os.environ.get("OUT")
  if not out:
    return None
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "gpu.json")
  with open(path + ".tmp", "w") as fh:
    json.dump(results, fh, indent=1, default=str)
  os.replace(path + ".tmp", path)
  return path


if __name__ == "__main__":
  main()
