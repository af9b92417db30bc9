"""Training throughput: the t5jax train step next to transformers' T5ForConditionalGeneration.

  python -m benchmarks.train                       # CPU: t5-v1_1-small, batch 8, 128 in, 32 out
  python -m benchmarks.train --load 1              # the same with a CPU-bound busy loop running
  python -m benchmarks.train --preset t5-v1_1-base --batch 64 --input_len 512 \\
      --target_len 128 --dtype bfloat16            # accelerator setting
  python -m benchmarks.train --scan_layers 1 --remat full   # layer scan, full rematerialisation

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
  * t5jax: the train step of trainer.build, jitted over a mesh of all local devices, state donated;
    compile time (lower + compile) measured apart, in the first process of each variant (the
    others reuse a persistent compilation cache in a temporary folder). Variants (`--xla`):
    `default`, and `eigen1` = XLA_FLAGS --xla_cpu_multi_thread_eigen=false.
  * transformers: PyTorch eager, at each of `--threads` (default 1 and 2; OMP_NUM_THREADS and
    torch.set_num_threads), under the default OpenMP wait policy (OMP_WAIT_POLICY unset): torch at
    its best. Its better thread count is the reference for the ratio.
Each process runs --warmup steps, then --steps timed steps, each waited for; a process's step
time is the median of its timed steps; tokens/s = batch * (input_len + target_len) / step time;
model TFLOP/s = benchmarks.flops.train_step_flops / step time.

`--matmul` (on by default on CPU) also times the step's dense matmuls alone (every projection and
the output layer, forward and both backward products, at their shapes and in the operand layouts
each side's step uses) and the optimizer update alone (same parameters, random gradients) in XLA
and in torch, in fresh processes at the same settings, and prints the ceiling they set: the best
transformers step over XLA's matmul (+ optimizer) time. `--load N` keeps N
`python -c 'while 1: pass'` processes running during every measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from benchmarks import _harness as H
from t5jax.config import REMAT_POLICIES


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

  from t5jax import sharding, trainer
  from t5jax.train_config import LossConfig, OptimizerConfig

  opt_cfg = OptimizerConfig(name=optimizer, learning_rate=lr, schedule="constant", warmup_steps=0)
  loss_cfg = LossConfig(label_smoothing=0.0, z_loss=0.0, normalizer="num_tokens")
  steps = trainer.build(config, opt_cfg, loss_cfg, sharding.create_mesh(sharding.MeshConfig()))
  state = steps.state_from_params(params)
  return steps.train_step, state, jax.device_put(batch_np, steps.batch_sharding)


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


FORMS = ("fwd", "dx", "dw")


def matmul_shapes(config, b: int, s: int, t: int) -> list[tuple[str, int, int, int, int]]:
  """(form, M, K, N, count) of every dense matmul in one train step, for a layer `x [M, K] @ W`
  with `N` outputs: "fwd" the forward product, "dx" = dY Wᵀ and "dw" = Xᵀ dY the two backward
  products. Each side times a form as its step runs it (`mm_product`): the operands keep the
  layouts they have in the step, so a library that is slower on transposed operands shows it.
  Attention score/value products (batched, small at these lengths), the loss and the optimizer
  are left out."""
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
  return [(form, m, k, n, c) for (m, k, n), c in fwd.items() for form in FORMS]


def mm_key(form: str, m: int, k: int, n: int) -> str:
  return f"{form} {m}x{k}x{n}"


def mm_operands(side: str, form: str, m: int, k: int, n: int, rng):
  """Random float32 operands of one form as `side` ("xla" or "torch") holds them in its step:
  t5jax keeps weights `[K, N]` (x @ W), torch's Linear `[N, K]` (x @ Wᵀ)."""
  import numpy as np

  x = rng.standard_normal((m, k), np.float32)
  g = rng.standard_normal((m, n), np.float32)
  w = rng.standard_normal((k, n), np.float32)
  if side == "torch":
    w = np.ascontiguousarray(w.T)
  return {"fwd": (x, w), "dx": (g, w), "dw": (x, g) if side == "xla" else (g, x)}[form]


def mm_product(side: str, form: str):
  """The product of `form` on `side`'s operands (`mm_operands`), written as autodiff (XLA) or
  autograd (torch) runs it: XLA fwd x @ W, dx dot(dY, W) over N, dw dot(X, dY) over M -> [K, N];
  torch fwd x @ Wᵀ, dx dY @ W, dw dYᵀ @ X -> [N, K]."""
  if side == "xla":
    import jax

    dims = {"fwd": ((1,), (0,)), "dx": ((1,), (1,)), "dw": ((0,), (0,))}[form]
    return jax.jit(lambda p, q: jax.lax.dot_general(p, q, (dims, ((), ()))))
  import torch

  return {
    "fwd": lambda p, q: torch.mm(p, q.t()),
    "dx": torch.mm,
    "dw": lambda p, q: torch.mm(p.t(), q),
  }[form]


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


def torch_optimizer(args, parameters):
  """The reference's optimizer: transformers' Adafactor, or torch's AdamW (see the docstring)."""
  import torch
  import transformers

  from t5jax.train_config import OptimizerConfig

  if args.optimizer == "adafactor":
    return transformers.optimization.Adafactor(
      parameters, lr=args.lr, scale_parameter=True, relative_step=False, warmup_init=False
    )
  a = OptimizerConfig().adamw
  return torch.optim.AdamW(parameters, lr=args.lr, betas=(a.b1, a.b2), eps=a.eps, weight_decay=0.0)


def worker_torch(args) -> dict:
  import torch
  import transformers

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
  opt = torch_optimizer(args, model.parameters())
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
    for form, m, k, n, _ in config_shapes:
      mm = mm_product("xla", form)
      p, q = (jnp.asarray(a, dt) for a in mm_operands("xla", form, m, k, n, rng))
      res[mm_key(form, m, k, n)] = _best_time(lambda p=p, q=q, mm=mm: mm(p, q).block_until_ready())
    res["optimizer"] = _optimizer_time_xla(args)
    version = f"jax {jax.__version__}"
  else:
    import torch

    torch.set_num_threads(args._nthreads)
    dt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    with torch.no_grad():
      for form, m, k, n, _ in config_shapes:
        mm = mm_product("torch", form)
        p, q = (torch.from_numpy(a).to(dt) for a in mm_operands("torch", form, m, k, n, rng))
        res[mm_key(form, m, k, n)] = _best_time(lambda p=p, q=q, mm=mm: mm(p, q))
    res["optimizer"] = _optimizer_time_torch(args)
    version = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
  return dict(times=res, versions=version)


def _optimizer_time_xla(args) -> float:
  """Seconds of one optimizer update plus `apply_updates` alone, as the train step runs it
  (t5jax.optim.make_optimizer, parameters and state donated), on the model's parameters with
  random gradients; best of `_best_time`."""
  import jax
  import numpy as np
  import optax

  import t5jax
  from t5jax import optim
  from t5jax.train_config import OptimizerConfig

  params = t5jax.load_hf(args._ckpt)[1]
  cfg = OptimizerConfig(
    name=args.optimizer, learning_rate=args.lr, schedule="constant", warmup_steps=0
  )
  tx = optim.make_optimizer(cfg, optim.make_schedule(cfg))
  rng = np.random.default_rng(1)
  grads = jax.device_put(
    jax.tree.map(
      lambda p: (rng.standard_normal(p.shape, np.float32) * 1e-3).astype(p.dtype), params
    )
  )

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, donate_argnums=(0, 1))
  state = [jax.device_put(params), tx.init(params)]

  def run():
    state[0], state[1] = update(state[0], state[1], grads)
    jax.block_until_ready(state[0])

  return _best_time(run)


def _optimizer_time_torch(args) -> float:
  """Seconds of the reference optimizer's `step()` alone on the same model's parameters with
  random gradients; best of `_best_time`."""
  import torch
  import transformers

  model = transformers.T5ForConditionalGeneration.from_pretrained(
    args._ckpt, dtype=torch.float32, attn_implementation="eager"
  )
  gen = torch.Generator().manual_seed(1)
  for p in model.parameters():
    p.grad = torch.randn(p.shape, generator=gen) * 1e-3
  opt = torch_optimizer(args, model.parameters())
  return _best_time(opt.step)


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
  H.require_reference("benchmarks.train", args.no_hf)

  import jax

  import t5jax
  from benchmarks import flops

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
  module = __spec__.name  # benchmarks.train, also when run as __main__
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

    results = H.run_jobs(module, passthrough, jobs, ckpt, args, report)
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
        r = H.run_worker(module, wa, env=env, load=args.load, timeout=args.worker_timeout)
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
    print(
      "dense matmuls of one step alone (layer x [M, K] @ W -> N; fwd, dx = dY Wᵀ, dw = Xᵀ dY,"
      " each in its step's operand layouts; ms each, best of 5):"
    )
    print(f"{'product':26} {'count':>5} " + " ".join(f"{n:>14}" for n in names))
    totals = dict.fromkeys(names, 0.0)
    by_form = {nm: dict.fromkeys(FORMS, 0.0) for nm in names}
    for form, m, k, n, c in sorted(shapes, key=lambda x: (-x[1] * x[2] * x[3] * x[4], x[0])):
      key = mm_key(form, m, k, n)
      for nm in names:
        totals[nm] += c * mm[nm]["times"][key]
        by_form[nm][form] += c * mm[nm]["times"][key]
      print(f"{key:26} {c:5d} " + " ".join(f"{mm[nm]['times'][key] * 1e3:14.2f}" for nm in names))
    for form in FORMS:
      print(
        f"{'  all ' + form + ', s per step':32} "
        + " ".join(f"{by_form[nm][form]:14.3f}" for nm in names)
      )
    print(f"{'total s per step':32} " + " ".join(f"{totals[nm]:14.3f}" for nm in names))
    opt_s = {nm: mm[nm]["times"].get("optimizer", float("nan")) for nm in names}
    print(f"{'optimizer update alone, s':32} " + " ".join(f"{opt_s[nm]:14.3f}" for nm in names))
    floor = {nm: totals[nm] + opt_s[nm] for nm in names}
    print(f"{'matmuls + optimizer, s':32} " + " ".join(f"{floor[nm]:14.3f}" for nm in names))
    xla_best = min((v for k, v in totals.items() if k.startswith("XLA")), default=float("nan"))
    torch_tot = [v for k, v in totals.items() if k.startswith("torch")]
    if torch_tot:
      print(f"matmul-only XLA/torch speed (best of each): {min(torch_tot) / xla_best:.2f}x")
    if ours_name:
      share = f"matmul share of the step: t5jax {xla_best / best[ours_name]['step'] * 100:.0f}%"
      if ref_name:
        share += f", torch {min(torch_tot) / best[ref_name]['step'] * 100:.0f}%"
      print(share)
    if ref_name:
      xla_floor = min((v for k, v in floor.items() if k.startswith("XLA")), default=float("nan"))
      ref_s = best[ref_name]["step"]
      print(
        f"ceiling (best transformers step / XLA's time alone): {ref_s / xla_best:.2f}x over the"
        f" matmuls, {ref_s / xla_floor:.2f}x over matmuls + optimizer: the ratio t5jax would reach"
        " if nothing else in its step took time"
      )
  print(f"machine after: {H.machine_state()}")


if __name__ == "__main__":
  main()
