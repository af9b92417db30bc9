"""Training throughput: the t5jax train step next to transformers' T5ForConditionalGeneration.

  python benchmarks/train.py                       # CPU: t5-v1_1-small, batch 8, 128 in, 32 out
  python benchmarks/train.py --load 1              # the same with a CPU-bound busy loop running
  python benchmarks/train.py --preset t5-v1_1-base --batch 64 --input_len 512 \\
      --target_len 128 --dtype bfloat16            # accelerator setting
  python benchmarks/train.py --scan_layers 1 --remat full   # layer scan, full rematerialisation

Both sides train the same model from the same weights: t5jax.init_params, written once with
t5jax.save_hf and loaded by both (t5jax.load_hf; transformers from_pretrained). Do not let
transformers initialise its own T5: its untied `lm_head` at std 1.0 gives logits near +-30 whose
gradients are denormal floats and slow its CPU step about 2.3x, which is not a fair peer. Same fixed
batch of random tokens (no padding), same optimizer: Adafactor at a constant learning rate of 1e-3
with parameter scaling (t5jax.optim `adafactor`, schedule `constant`;
transformers.optimization.Adafactor(scale_parameter=True, relative_step=False, warmup_init=False,
lr=1e-3)), or `--optimizer adamw` (torch.optim.AdamW with the same betas, eps, no weight decay).
Dropout off (`--dropout`); loss is the mean token cross-entropy without z-loss on both sides.

Every measurement is a fresh Python process (`--repeats` of each, interleaved, best one kept):
  * t5jax: trainer.make_train_step jitted over a mesh of all local devices, state donated;
    compile time (lower + compile) measured apart, in the first process of each variant (the
    others reuse a persistent compilation cache in a temporary folder). Variants (`--xla`):
    `default`, and `eigen1` = XLA_FLAGS --xla_cpu_multi_thread_eigen=false.
  * transformers: PyTorch eager, at each of `--threads` (default 1 and 2; OMP_NUM_THREADS and
    torch.set_num_threads), under the default OpenMP wait policy (OMP_WAIT_POLICY unset): torch at
    its best. Its better thread count is the reference for the ratio.
Each process runs --warmup steps, then --steps timed steps, each waited for; a process's step
time is the median of its timed steps; tokens/s = batch * (input_len + target_len) / step time;
model TFLOP/s = t5jax.flops.train_step_flops / step time.

`--matmul` (on by default on CPU) also times the step's dense matmuls alone (every projection and
the output layer, forward and both backward products, at their shapes in this step) in XLA and in
torch, in fresh processes at the same settings, so a floor shows when the matmul library itself is
the difference. `--load N` keeps N `python -c 'while 1: pass'` processes running during every
measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402

from t5jax.config import REMAT_POLICIES  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=128)
  p.add_argument("--target_len", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"))
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--scan_layers", type=int, default=0, choices=(0, 1), help="T5Config.scan_layers")
  p.add_argument("--remat", default="none", choices=REMAT_POLICIES, help="T5Config.remat")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--steps", type=int, default=6, help="timed steps per process")
  p.add_argument(
    "--repeats",
    type=int,
    default=2,
    help="fresh processes per variant, best kept (0: matmuls only)",
  )
  p.add_argument("--matmul", type=int, default=1, help="1: also compare the step's matmuls alone")
  H.add_common_args(p, ("t5jax", "torch", "mm_xla", "mm_torch"))
  return p.parse_args(argv)


def build_step(config, params, batch_np, optimizer: str, lr: float):
  """(jitted sharded train step, its state, the device batch) on a one-device mesh: the step the
  benchmark times (constant learning rate, no z-loss or smoothing, num_tokens normaliser)."""
  import jax

  from t5jax import optim, sharding, trainer
  from t5jax.train_config import LossConfig, MeshConfig, OptimizerConfig

  opt_cfg = OptimizerConfig(name=optimizer, learning_rate=lr, schedule="constant", warmup_steps=0)
  schedule = optim.make_schedule(opt_cfg)
  tx = optim.make_optimizer(opt_cfg, schedule)
  loss_cfg = LossConfig(label_smoothing=0.0, z_loss=0.0, normalizer="num_tokens")
  mesh = sharding.create_mesh(MeshConfig())
  state_sh = trainer.state_shardings(config, tx, mesh)
  state = trainer.state_from_params(params, tx, state_sh)
  step = trainer.jit_train_step(
    trainer.make_train_step(config, tx, schedule, loss_cfg), state_sh, mesh
  )
  return step, state, jax.device_put(batch_np, sharding.batch_sharding(mesh))


def _rss_gib() -> tuple[float, float]:
  """(current, peak) resident set size of this process in GiB; NaN where unavailable."""
  vals = {}
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith(("VmRSS:", "VmHWM:")):
          vals[line[:5]] = int(line.split()[1]) / 2**20
  except OSError:
    pass
  return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def make_batch(config, args):
  import numpy as np

  import t5jax

  rng = np.random.default_rng(args.seed)
  hi = min(config.vocab_size, 32000)  # T5 vocabularies pad the embedding past the real ids
  enc = rng.integers(3, hi, size=(args.batch, args.input_len), dtype=np.int32)
  tgt = rng.integers(3, hi, size=(args.batch, args.target_len), dtype=np.int32)
  enc[:, -1] = tgt[:, -1] = config.eos_token_id
  return {
    "encoder_input_tokens": enc,
    "decoder_input_tokens": np.asarray(t5jax.shift_right(tgt, config.decoder_start_token_id)),
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": np.ones_like(tgt),
  }


def matmul_shapes(config, b: int, s: int, t: int) -> list[tuple[int, int, int, int]]:
  """(M, K, N, count) of every dense matmul in one train step: forward x @ W and the two
  backward products (dX = dY W^T: M,N,K; dW = X^T dY: K,M,N). Attention score/value products
  (batched, small at these lengths) are left out, as are the loss and optimizer."""
  d, a, f, v = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
  m_mlp = 2 if config.feed_forward_proj.startswith("gated") else 1
  fwd: dict[tuple[int, int, int], int] = {}

  def add(m, k, n, c):
    fwd[(m, k, n)] = fwd.get((m, k, n), 0) + c

  le, ld = config.num_layers, config.num_decoder_layers
  add(b * s, d, a, 3 * le)  # encoder q, k, v
  add(b * s, a, d, le)  # encoder o
  add(b * s, d, f, m_mlp * le)  # encoder wi (wi_0, wi_1)
  add(b * s, f, d, le)  # encoder wo
  add(b * t, d, a, 4 * ld)  # decoder self q, k, v; cross q
  add(b * t, a, d, 2 * ld)  # decoder self o, cross o
  add(b * s, d, a, 2 * ld)  # cross k, v over the encoder output
  add(b * t, d, f, m_mlp * ld)
  add(b * t, f, d, ld)
  add(b * t, d, v, 1)  # output layer
  out: dict[tuple[int, int, int], int] = {}
  for (m, k, n), c in fwd.items():
    for shape in ((m, k, n), (m, n, k), (k, m, n)):
      out[shape] = out.get(shape, 0) + c
  return [(m, k, n, c) for (m, k, n), c in out.items()]


# --- workers (each in its own process) -------------------------------------------------------


def worker_t5jax(args) -> dict:
  import jax

  import t5jax

  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  config, params = t5jax.load_hf(args._ckpt, scan_layers=bool(args.scan_layers))
  config = config.replace(dtype=args.dtype, dropout_rate=args.dropout, remat=args.remat)
  batch_np = make_batch(config, args)
  step, state, batch = build_step(config, params, batch_np, args.optimizer, args.lr)
  rng = jax.random.key(args.seed)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  losses, times = [], []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    losses.append(float(metrics["loss"]))  # waits for the step
    times.append(time.perf_counter() - t0)
  return dict(
    compile_s=compile_s,
    times=times[args.warmup :],
    losses=losses,
    temp_bytes=getattr(mem, "temp_size_in_bytes", None) if mem is not None else None,
    rss=_rss_gib(),
    versions=f"jax {jax.__version__}",
  )


def worker_torch(args) -> dict:
  import torch
  import transformers

  from t5jax.train_config import OptimizerConfig

  torch.set_num_threads(args._nthreads)
  model = transformers.T5ForConditionalGeneration.from_pretrained(
    args._ckpt, dtype=torch.float32, attn_implementation="eager"
  )
  import t5jax

  config = t5jax.load_hf(args._ckpt)[0]
  model.config.dropout_rate = args.dropout
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = args.dropout
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model.to(device).train()
  if args.optimizer == "adafactor":
    opt = transformers.optimization.Adafactor(
      model.parameters(), lr=args.lr, scale_parameter=True, relative_step=False, warmup_init=False
    )
  else:
    a = OptimizerConfig().adamw
    opt = torch.optim.AdamW(
      model.parameters(), lr=args.lr, betas=(a.b1, a.b2), eps=a.eps, weight_decay=0.0
    )
  batch_np = make_batch(config, args)
  ids = torch.tensor(batch_np["encoder_input_tokens"], dtype=torch.long, device=device)
  labels = torch.tensor(batch_np["decoder_target_tokens"], dtype=torch.long, device=device)
  labels = labels.masked_fill(labels == config.pad_token_id, -100)
  mask = ids != config.pad_token_id
  amp = args.dtype == "bfloat16"
  losses, times = [], []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  return dict(
    compile_s=None,
    times=times[args.warmup :],
    losses=losses,
    rss=_rss_gib(),
    versions=f"transformers {transformers.__version__}, torch {torch.__version__} on {device},"
    f" {torch.get_num_threads()} threads",
  )


def _best_time(fn, reps: int = 5, inner: int = 3) -> float:
  fn()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    best = min(best, (time.perf_counter() - t0) / inner)
  return best


def worker_mm(args, config_shapes) -> dict:
  import numpy as np

  rng = np.random.default_rng(0)
  res = {}
  if args._worker == "mm_xla":
    import jax
    import jax.numpy as jnp

    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    mm = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    for m, k, n, _ in config_shapes:
      x = jnp.asarray(rng.standard_normal((m, k), np.float32), dt)
      w = jnp.asarray(rng.standard_normal((k, n), np.float32), dt)
      res[f"{m}x{k}x{n}"] = _best_time(lambda x=x, w=w: mm(x, w).block_until_ready())
    version = f"jax {jax.__version__}"
  else:
    import torch

    torch.set_num_threads(args._nthreads)
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with torch.no_grad():
      for m, k, n, _ in config_shapes:
        x = torch.from_numpy(rng.standard_normal((m, k), np.float32)).to(dt)
        w = torch.from_numpy(rng.standard_normal((k, n), np.float32)).to(dt)
        res[f"{m}x{k}x{n}"] = _best_time(lambda x=x, w=w: torch.mm(x, w))
    version = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
  return dict(times=res, versions=version)


# --- the driver ------------------------------------------------------------------------------


def _tiny(config):
  return config.replace(
    d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2
  )


def main():
  args = parse_args()
  if args._worker:
    import t5jax

    if args._worker in ("mm_xla", "mm_torch"):
      config = t5jax.load_hf(args._ckpt)[0]
      shapes = matmul_shapes(config, args.batch, args.input_len, args.target_len)
      H.write_result(args._out, worker_mm(args, shapes))
    else:
      fn = worker_t5jax if args._worker == "t5jax" else worker_torch
      H.write_result(args._out, fn(args))
    return
  H.require_reference("benchmarks/train.py", args.no_hf)

  import jax

  import t5jax
  from t5jax import flops

  config = t5jax.get_config(args.preset, dropout_rate=args.dropout, dtype=args.dtype)
  if args.tiny:
    config = _tiny(config)
  b, s, t = args.batch, args.input_len, args.target_len
  step_flops = flops.train_step_flops(config, b, s, t)
  tokens = b * (s + t)
  params = jax.device_get(t5jax.init_params(config, jax.random.key(args.seed)))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  threads = [int(x) for x in args.threads.split(",") if x]
  variants = [x for x in args.xla.split(",") if x]
  for v in variants:
    H.xla_variant_env(v)  # validates the name before anything runs

  print(f"machine: {H.machine_state()}; busy-loop load processes: {args.load}")
  print(
    f"model: {args.preset}{' (tiny)' if args.tiny else ''}, {n_params / 1e6:.1f}M parameters,"
    f" dtype {args.dtype}, dropout {args.dropout}, scan_layers {args.scan_layers}, remat"
    f" {args.remat}; optimizer {args.optimizer}, constant lr"
    f" {args.lr}; batch {b} x ({s} + {t}) = {tokens} tokens/step; {args.warmup} warm-up +"
    f" {args.steps} timed steps per process, {args.repeats} fresh processes per variant",
    flush=True,
  )
  script = os.path.abspath(__file__)
  passthrough = [
    f"--batch={b}", f"--input_len={s}", f"--target_len={t}", f"--dtype={args.dtype}",
    f"--optimizer={args.optimizer}", f"--lr={args.lr}", f"--dropout={args.dropout}",
    f"--warmup={args.warmup}", f"--steps={args.steps}", f"--seed={args.seed}",
    f"--scan_layers={args.scan_layers}", f"--remat={args.remat}",
  ]  # fmt: skip
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "model")
    t5jax.save_hf(config, params, ckpt)
    cache = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tmp, "jax_cache")}
    jobs = [(f"t5jax xla={v}", "t5jax", {**cache, **H.xla_variant_env(v)}) for v in variants]
    if not args.no_hf:
      jobs += [(f"torch {n} thr", "torch", H.thread_env(n)) for n in threads]

    def report(r):
      r["step"] = statistics.median(r["times"])
      compile_s = f", compile {r['compile_s']:.1f} s" if r.get("compile_s") else ""
      return f"step {r['step']:.3f} s{compile_s}"

    results = H.run_jobs(script, passthrough, jobs, ckpt, args, report)
    mm = {}
    if args.matmul:
      shapes = matmul_shapes(config, b, s, t)
      mm_jobs = [("XLA (default)", "mm_xla", H.xla_variant_env("default"))]
      if "eigen1" in variants:
        mm_jobs.append(("XLA (eigen1)", "mm_xla", H.xla_variant_env("eigen1")))
      if not args.no_hf:
        mm_jobs += [(f"torch {n} thr", "mm_torch", H.thread_env(n)) for n in threads]
      for name, kind, env in mm_jobs:
        wa = H.worker_args(passthrough, kind, ckpt, env)
        r = H.run_worker(script, wa, env=env, load=args.load, timeout=args.worker_timeout)
        if r is None:
          print(f"  matmuls {name}: timed out (> {args.worker_timeout:.0f} s)")
        else:
          mm[name] = r

  best = {name: min(rs, key=lambda r: r["step"]) for name, rs in results.items() if rs}
  print()
  print(
    f"{'impl':20} {'compile s':>9} {'step s':>8} {'tokens/s':>9} {'TFLOP/s':>8}"
    f" {'loss first':>10} {'loss last':>9}  versions"
  )
  for name, r in best.items():
    first_compile = results[name][0].get("compile_s")
    comp = f"{first_compile:9.1f}" if first_compile else f"{'-':>9}"
    print(
      f"{name:20} {comp} {r['step']:8.3f} {tokens / r['step']:9.1f}"
      f" {step_flops / r['step'] / 1e12:8.3f} {r['losses'][0]:10.4f} {r['losses'][-1]:9.4f}"
      f"  {r['versions']}"
    )
  ours_name = ref_name = None
  if any(n.startswith("t5jax") for n in best):
    ours_name = min((n for n in best if n.startswith("t5jax")), key=lambda n: best[n]["step"])
  theirs = [n for n in best if n.startswith("torch")]
  if theirs and ours_name:
    ref_name = min(theirs, key=lambda n: best[n]["step"])
    ratio = best[ref_name]["step"] / best[ours_name]["step"]
    print(
      f"t5jax/transformers throughput: {ratio:.2f}x  (best t5jax: {ours_name}; best reference:"
      f" {ref_name}; load {args.load} busy process(es))"
    )
    if "t5jax xla=default" in best:
      r0 = best[ref_name]["step"] / best["t5jax xla=default"]["step"]
      print(f"  with t5jax xla=default: {r0:.2f}x")
  if mm:
    print()
    shapes = matmul_shapes(config, b, s, t)
    names = list(mm)
    print("dense matmuls of one step alone (M x K x N, count; ms each, best of 5):")
    print(f"{'shape':22} {'count':>5} " + " ".join(f"{n:>14}" for n in names))
    totals = dict.fromkeys(names, 0.0)
    for m, k, n, c in sorted(shapes, key=lambda x: -x[0] * x[1] * x[2] * x[3]):
      key = f"{m}x{k}x{n}"
      for nm in names:
        totals[nm] += c * mm[nm]["times"][key]
      print(f"{key:22} {c:5d} " + " ".join(f"{mm[nm]['times'][key] * 1e3:14.2f}" for nm in names))
    print(f"{'total s per step':28} " + " ".join(f"{totals[nm]:14.3f}" for nm in names))
    xla_best = min((v for k, v in totals.items() if k.startswith("XLA")), default=float("nan"))
    torch_tot = [v for k, v in totals.items() if k.startswith("torch")]
    if torch_tot:
      print(f"matmul-only XLA/torch speed (best of each): {min(torch_tot) / xla_best:.2f}x")
    if ours_name:
      share = f"matmul share of the step: t5jax {xla_best / best[ours_name]['step'] * 100:.0f}%"
      if ref_name:
        share += f", torch {min(torch_tot) / best[ref_name]['step'] * 100:.0f}%"
      print(share)
  print(f"machine after: {H.machine_state()}")


if __name__ == "__main__":
  main()
