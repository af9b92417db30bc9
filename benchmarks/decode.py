"""Decoding throughput: t5jax.generate next to transformers generate(), same weights, same run.

  python benchmarks/decode.py                      # CPU: t5-v1_1-small, batch 8, 64 in, 32 out
  python benchmarks/decode.py --load 1             # the same with a CPU-bound busy loop running
  python benchmarks/decode.py --preset t5-v1_1-base --batch 64 --input_len 512 \\
      --new_tokens 128 --dtype bfloat16            # accelerator setting
  python benchmarks/decode.py --scan_layers 1      # layers under one scan (T5Config.scan_layers)

Random weights (t5jax.init_params) written once with t5jax.save_hf and loaded by both sides
(t5jax.load_hf; transformers from_pretrained), so both decode the same model. Every row
generates exactly --new_tokens tokens: t5jax with `ignore_eos=True`, transformers with
`min_new_tokens` (EOS suppressed until then).

Every measurement is a fresh Python process (`--repeats` processes per variant, interleaved; the
best kept): t5jax per XLA variant (`--xla`: `default`, `eigen1` = XLA_FLAGS
--xla_cpu_multi_thread_eigen=false), transformers at each of `--threads` (default 1 and 2) under
the default OpenMP wait policy (OMP_WAIT_POLICY unset), the better thread count being the
reference for the ratio. Inside a process each method runs once to warm up (t5jax: compile time =
first call minus the best warm call), then --calls timed calls, the fastest kept. tokens/s =
batch * new_tokens / time (returned tokens, beams not counted). `--load N` keeps N
`python -c 'while 1: pass'` processes running during every measurement. `--no_hf` skips
transformers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--methods", default="greedy,beam", help="comma-separated: greedy, beam, sample")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--scan_layers", type=int, default=0, choices=(0, 1), help="T5Config.scan_layers")
  p.add_argument("--calls", type=int, default=3, help="timed calls per method per process")
  p.add_argument("--repeats", type=int, default=2, help="fresh processes per variant (best kept)")
  H.add_common_args(p, ("t5jax", "torch"))
  return p.parse_args(argv)


def make_tokens(config, args):
  import numpy as np

  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(3, config.vocab_size - 200, size=(args.batch, args.input_len))
  tokens[:, -1] = config.eos_token_id
  return tokens.astype(np.int32)


def _best(fn, calls):
  best, out = float("inf"), None
  for _ in range(calls):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def worker_t5jax(args) -> dict:
  import jax
  import numpy as np

  import t5jax
  from t5jax.generate import generate

  config, params = t5jax.load_hf(args._ckpt, scan_layers=bool(args.scan_layers))
  config = config.replace(dtype=args.dtype, dropout_rate=0.0)
  params = jax.device_put(params)
  tokens = make_tokens(config, args)
  res = {}
  for method in args.methods.split(","):
    kw = dict(method=method, max_new_tokens=args.new_tokens, ignore_eos=True)
    if method == "beam":
      kw["num_beams"] = args.num_beams

    def run(kw=kw):
      return jax.block_until_ready(generate(params, config, tokens, **kw).sequences)

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    best, out = _best(run, args.calls)
    seqs = np.asarray(out).reshape(args.batch, -1)[:, : args.new_tokens]
    res[method] = dict(time=best, compile_s=first - best, seqs=seqs.tolist())
  return dict(methods=res, versions=f"jax {jax.__version__}")


def worker_torch(args) -> dict:
  import torch
  import transformers

  import t5jax

  torch.set_num_threads(args._nthreads)
  config = t5jax.load_hf(args._ckpt)[0]
  dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  model = transformers.T5ForConditionalGeneration.from_pretrained(args._ckpt, dtype=dt).eval()
  model.generation_config.decoder_start_token_id = config.decoder_start_token_id
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device)
  ids = torch.tensor(make_tokens(config, args), dtype=torch.long, device=device)
  res = {}
  for method in args.methods.split(","):
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    kw.update(num_beams=args.num_beams if method == "beam" else 1, do_sample=method == "sample")

    def run(kw=kw):
      with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=ids != 0, **kw)
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    run()  # warm-up
    best, out = _best(run, args.calls)
    res[method] = dict(time=best, compile_s=None, seqs=out[:, 1:].cpu().numpy().tolist())
  return dict(
    methods=res,
    versions=f"transformers {transformers.__version__}, torch {torch.__version__} on {device},"
    f" {torch.get_num_threads()} threads",
  )


def main():
  args = parse_args()
  if args._worker:
    fn = worker_t5jax if args._worker == "t5jax" else worker_torch
    H.write_result(args._out, fn(args))
    return

  import jax
  import numpy as np

  import t5jax

  config = t5jax.get_config(args.preset, dropout_rate=0.0, dtype=args.dtype)
  if args.tiny:
    config = config.replace(
      d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2
    )
  params = jax.device_get(t5jax.init_params(config, jax.random.key(args.seed)))
  threads = [int(x) for x in args.threads.split(",") if x]
  variants = [x for x in args.xla.split(",") if x]
  for v in variants:
    H.xla_variant_env(v)
  methods = args.methods.split(",")
  n_tok = args.batch * args.new_tokens
  print(f"machine: {H.machine_state()}; busy-loop load processes: {args.load}")
  print(
    f"model: {args.preset}{' (tiny)' if args.tiny else ''}, dtype {args.dtype}, scan_layers"
    f" {args.scan_layers}; batch {args.batch},"
    f" input {args.input_len} tokens, {args.new_tokens} new tokens forced, beams {args.num_beams};"
    f" {args.calls} timed calls per method per process, {args.repeats} processes per variant",
    flush=True,
  )
  script = os.path.abspath(__file__)
  passthrough = [
    f"--batch={args.batch}", f"--input_len={args.input_len}", f"--new_tokens={args.new_tokens}",
    f"--num_beams={args.num_beams}", f"--methods={args.methods}", f"--dtype={args.dtype}",
    f"--calls={args.calls}", f"--seed={args.seed}", f"--scan_layers={args.scan_layers}",
  ]  # fmt: skip
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "model")
    t5jax.save_hf(config, params, ckpt)
    jobs = [(f"t5jax xla={v}", "t5jax", H.xla_variant_env(v)) for v in variants]
    if not args.no_hf:
      jobs += [(f"torch {n} thr", "torch", H.thread_env(n)) for n in threads]
    results = H.run_jobs(
      script, passthrough, jobs, ckpt, args,
      lambda r: ", ".join(f"{m} {r['methods'][m]['time']:.3f} s" for m in methods),
    )  # fmt: skip

  print()
  print(f"{'method':8} {'impl':18} {'compile s':>9} {'time s':>8} {'tokens/s':>10}  versions")
  for method in methods:
    best = {
      name: min((r["methods"][method] for r in rs), key=lambda x: x["time"])
      for name, rs in results.items()
      if rs
    }
    for name, r in best.items():
      comp = f"{r['compile_s']:9.2f}" if r["compile_s"] is not None else f"{'-':>9}"
      print(
        f"{method:8} {name:18} {comp} {r['time']:8.3f} {n_tok / r['time']:10.1f}"
        f"  {results[name][0]['versions']}"
      )
    ours = min(
      (n for n in best if n.startswith("t5jax")), key=lambda n: best[n]["time"], default=None
    )
    theirs = [n for n in best if n.startswith("torch")]
    if not theirs or ours is None:
      continue
    ref = min(theirs, key=lambda n: best[n]["time"])
    same = ""
    if method != "sample":
      a, b = np.asarray(best[ours]["seqs"]), np.asarray(best[ref]["seqs"])
      n = min(a.shape[1], b.shape[1])
      same = f"; same tokens: {np.mean(np.all(a[:, :n] == b[:, :n], axis=1)) * 100:.0f}% of rows"
    extra = ""
    if ours != "t5jax xla=default" and "t5jax xla=default" in best:
      extra = f" (xla=default: {best[ref]['time'] / best['t5jax xla=default']['time']:.2f}x)"
    print(
      f"{method:8} {'speed-up':18} {best[ref]['time'] / best[ours]['time']:>28.2f}x  {ours} vs"
      f" {ref}{extra}, load {args.load}{same}",
      flush=True,
    )
  print(f"machine after: {H.machine_state()}")


if __name__ == "__main__":
  main()
