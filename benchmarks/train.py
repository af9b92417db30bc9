"""Training throughput: the t5jax train step next to transformers' T5ForConditionalGeneration.

  python benchmarks/train.py                       # CPU: t5-v1_1-small, batch 8, 128 in, 32 out
  python benchmarks/train.py --preset t5-v1_1-base --batch 64 --input_len 512 \\
      --target_len 128 --dtype bfloat16            # accelerator setting

Both sides train the same model from the same random weights (t5jax.init_params, exported with
t5jax.save_hf and loaded by transformers) on the same fixed batch of random tokens (no padding),
with the same optimizer: Adafactor at a constant learning rate of 1e-3 with parameter scaling
(t5jax.optim `adafactor`, schedule `constant`; transformers.optimization.Adafactor(
scale_parameter=True, relative_step=False, warmup_init=False, lr=1e-3)), or `--optimizer adamw`
(t5jax.optim `adamw`; torch.optim.AdamW with the same betas, eps and no weight decay). Dropout is
off (`--dropout`), loss is the mean token cross-entropy without z-loss on both sides.

t5jax: trainer.make_train_step jitted over a (data, fsdp, tensor) mesh of all local devices with
the state donated; compile time is measured apart (lower + compile). transformers: PyTorch eager,
on cuda when available, under bfloat16 autocast with `--dtype bfloat16` (t5jax: bfloat16 compute,
float32 parameters and optimizer state on both sides). Each side runs --warmup steps, then --steps
timed steps, each waited for; the table reports the mean step time,
tokens/s = batch * (input_len + target_len) / step time, and model TFLOP/s =
t5jax.flops.train_step_flops (3 x the forward matmul FLOPs, see t5jax/flops.py) / step time.

OMP_WAIT_POLICY defaults to PASSIVE here: on a CPU shared with other jobs, torch's spinning OpenMP
threads stall each other whenever one is descheduled (measured 10x slower steps at 2 threads under
load); set OMP_WAIT_POLICY=ACTIVE to override on a dedicated machine.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP) loads

import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import t5jax  # noqa: E402
from t5jax import flops, optim, sharding, trainer  # noqa: E402
from t5jax.train_config import LossConfig, MeshConfig, OptimizerConfig  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=128)
  p.add_argument("--target_len", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--optimizer", default="adafactor", choices=("adafactor", "adamw"))
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--steps", type=int, default=8, help="timed steps")
  p.add_argument("--no_hf", action="store_true", help="skip transformers")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--tiny", action="store_true", help="shrink the preset to 2 layers, d_model 64 (smoke test)"
  )
  return p.parse_args()


# --- memory ----------------------------------------------------------------------------------


def _reset_peak_rss() -> bool:
  """Resets this process's peak resident set size (Linux), so the next phase's peak is its own."""
  try:
    with open("/proc/self/clear_refs", "w") as fh:
      fh.write("5")
    return True
  except OSError:
    return False


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


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# --- the two sides ---------------------------------------------------------------------------


def make_batch(config, args) -> dict[str, np.ndarray]:
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


def run_t5jax(config, params, batch_np, args) -> dict:
  opt_cfg = OptimizerConfig(
    name=args.optimizer, learning_rate=args.lr, schedule="constant", warmup_steps=0
  )
  schedule = optim.make_schedule(opt_cfg)
  tx = optim.make_optimizer(opt_cfg, schedule)
  loss_cfg = LossConfig(label_smoothing=0.0, z_loss=0.0, normalizer="num_tokens")

  mesh = sharding.create_mesh(MeshConfig())
  state_sh = trainer.state_shardings(config, tx, mesh)
  state = trainer.state_from_params(params, tx, state_sh)
  param_bytes, opt_bytes = _tree_bytes(state.params), _tree_bytes(state.opt_state)
  step_fn = trainer.make_train_step(config, tx, schedule, loss_cfg)
  step = trainer.jit_train_step(step_fn, state_sh, mesh)
  batch = jax.device_put(batch_np, sharding.batch_sharding(mesh))
  rng = jax.random.key(args.seed)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()

  losses, times = [], []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    loss = float(metrics["loss"])  # waits for the step
    times.append(time.perf_counter() - t0)
    losses.append(loss)
  dev_stats = jax.local_devices()[0].memory_stats() or {}
  return dict(
    compile_s=compile_s,
    times=times[args.warmup :],
    losses=losses,
    mesh=dict(mesh.shape),
    param_bytes=param_bytes,
    opt_bytes=opt_bytes,
    temp_bytes=getattr(mem, "temp_size_in_bytes", None) if mem is not None else None,
    device_peak=dev_stats.get("peak_bytes_in_use"),
  )


def run_transformers(config, params, batch_np, args) -> dict:
  import torch
  import transformers

  torch.set_num_threads(os.cpu_count() or 1)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  with tempfile.TemporaryDirectory() as d:
    t5jax.save_hf(config, params, d)
    model = transformers.T5ForConditionalGeneration.from_pretrained(
      d, dtype=torch.float32, attn_implementation="eager"
    )
  model.config.dropout_rate = args.dropout
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = args.dropout
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
  ids = torch.tensor(batch_np["encoder_input_tokens"], dtype=torch.long, device=device)
  labels = torch.tensor(batch_np["decoder_target_tokens"], dtype=torch.long, device=device)
  labels = labels.masked_fill(labels == config.pad_token_id, -100)
  mask = ids != config.pad_token_id
  amp = args.dtype == "bfloat16"

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  losses, times = [], []
  for _ in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = float(loss.detach())
    sync()
    times.append(time.perf_counter() - t0)
    losses.append(loss)
  return dict(
    compile_s=None,
    times=times[args.warmup :],
    losses=losses,
    device=device,
    versions=f"transformers {transformers.__version__}, torch {torch.__version__}",
    device_peak=torch.cuda.max_memory_allocated() if device == "cuda" else None,
  )


# --- report ----------------------------------------------------------------------------------


def main():
  args = parse_args()
  config = t5jax.get_config(args.preset, dropout_rate=args.dropout, dtype=args.dtype)
  if args.tiny:
    config = config.replace(
      d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2
    )
  b, s, t = args.batch, args.input_len, args.target_len
  step_flops = flops.train_step_flops(config, b, s, t)
  parts = flops.forward_flops_breakdown(config, b, s, t)
  tokens = b * (s + t)
  params = jax.device_get(t5jax.init_params(config, jax.random.key(args.seed)))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  batch = make_batch(config, args)

  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}) x{jax.device_count()},"
    f" jax {jax.__version__}; {os.cpu_count()} CPUs, load average "
    f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; OMP_WAIT_POLICY "
    f"{os.environ['OMP_WAIT_POLICY']}"
  )
  print(
    f"model: {args.preset}{' (tiny)' if args.tiny else ''}, {n_params / 1e6:.1f}M parameters,"
    f" dtype {args.dtype}, dropout {args.dropout}; optimizer {args.optimizer},"
    f" constant lr {args.lr}"
  )
  print(
    f"batch {b} x ({s} input + {t} target) = {tokens} tokens/step; {args.warmup} warm-up +"
    f" {args.steps} timed steps"
  )
  print(
    f"model FLOPs/step (3 x forward): {step_flops / 1e9:.1f} GFLOP; forward parts (GFLOP): "
    + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items() if k != "total"),
    flush=True,
  )

  rows = []
  _reset_peak_rss()
  ours = run_t5jax(config, params, batch, args)
  ours["rss"] = _rss_gib()
  print(
    f"t5jax: mesh {ours['mesh']}, compile {ours['compile_s']:.1f} s; params "
    f"{_gib(ours['param_bytes'])}, optimizer state {_gib(ours['opt_bytes'])}, XLA temp "
    + (_gib(ours["temp_bytes"]) if ours["temp_bytes"] is not None else "n/a")
    + (f", device peak {_gib(ours['device_peak'])}" if ours["device_peak"] else "")
    + f"; process RSS now {ours['rss'][0]:.2f} GiB, peak {ours['rss'][1]:.2f} GiB",
    flush=True,
  )
  rows.append(("t5jax", ours))
  if not args.no_hf:
    peak_reset = _reset_peak_rss()
    theirs = run_transformers(config, params, batch, args)
    theirs["rss"] = _rss_gib()
    print(
      f"transformers: {theirs['versions']} on {theirs['device']} (eager"
      + (", bf16 autocast" if args.dtype == "bfloat16" else "")
      + ")"
      + (f"; device peak {_gib(theirs['device_peak'])}" if theirs["device_peak"] else "")
      + f"; process RSS now {theirs['rss'][0]:.2f} GiB, peak {theirs['rss'][1]:.2f} GiB"
      + ("" if peak_reset else " (peak includes t5jax)"),
      flush=True,
    )
    rows.append(("transformers", theirs))

  print()
  print(
    f"{'impl':13} {'compile s':>9} {'step s':>8} {'min s':>8} {'tokens/s':>9} {'TFLOP/s':>8}"
    f" {'loss first':>10} {'loss last':>9}"
  )
  for name, r in rows:
    mean = statistics.mean(r["times"])
    comp = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else f"{'-':>9}"
    print(
      f"{name:13} {comp} {mean:8.3f} {min(r['times']):8.3f} {tokens / mean:9.1f}"
      f" {step_flops / mean / 1e12:8.3f} {r['losses'][0]:10.4f} {r['losses'][-1]:9.4f}"
    )
  if len(rows) == 2:
    ratio = statistics.mean(rows[1][1]["times"]) / statistics.mean(rows[0][1]["times"])
    print(f"{'t5jax/transformers throughput':29} {ratio:.2f}x")
  print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
