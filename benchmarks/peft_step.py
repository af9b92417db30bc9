"""A LoRA train step against a full fine-tuning step on CPU, timed in one run.

  python -m benchmarks.peft_step                     # t5-v1_1-small, batch 8 x 128/32 (~2 min)
  python -m benchmarks.peft_step --preset t5-v1_1-base --rounds 10

Both steps are the real jitted `t5jax.trainer` steps (Adafactor, float32, unrolled layers) on the
same random model and batch: full fine-tuning differentiates and updates every parameter; LoRA
(r=8 on q, v of every attention, PEFT's default for T5) differentiates the adapters alone, the
base a frozen argument. After compiling and one warm-up each, the two are timed alternately
(one of each per round, so load changes touch both) and the medians printed with their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from t5jax import model, peft, sharding, trainer
from t5jax.config import get_config
from t5jax.train_config import LossConfig, OptimizerConfig


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--src", type=int, default=128)
  p.add_argument("--tgt", type=int, default=32)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--rounds", type=int, default=8)
  args = p.parse_args()

  ocfg = OptimizerConfig(name="adafactor", schedule="constant", warmup_steps=0, learning_rate=1e-3)
  loss_cfg = LossConfig()
  cfg = get_config(args.preset, dropout_rate=0.0)
  qv = tuple(f"{s}.{n}" for s in ("encoder", "decoder", "cross") for n in ("q", "v"))
  lcfg = cfg.replace(lora_rank=args.rank, lora_alpha=2.0 * args.rank, lora_targets=qv)
  base = model.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  tgt = rng.integers(2, cfg.vocab_size, (args.batch, args.tgt)).astype(np.int32)
  batch = {
    "encoder_input_tokens": rng.integers(2, cfg.vocab_size, (args.batch, args.src)).astype(
      np.int32
    ),
    "decoder_input_tokens": np.asarray(model.shift_right(tgt)),
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": np.ones_like(tgt, np.float32),
  }
  key = jax.random.key(1)

  mesh = sharding.create_mesh(sharding.MeshConfig(), jax.devices()[:1])
  full, lora = (trainer.build(c, ocfg, loss_cfg, mesh) for c in (cfg, lcfg))
  full_step, lora_step = full.train_step, lora.train_step
  full_state = full.state_from_params(base)  # a copy: the step donates it, `base` stays
  trainable = peft.init_trainable(lcfg, base, 0)
  lora_state = lora.state_from_params(trainable)
  frozen = peft.cast_frozen(base, lcfg)  # float32 compute: unchanged

  states = {"full": full_state, "lora": lora_state}
  steps = {
    "full": lambda s: full_step(s, batch, key),
    "lora": lambda s: lora_step(s, batch, key, frozen),
  }
  times = {"full": [], "lora": []}
  for name in ("full", "lora"):  # compile and warm up
    t0 = time.perf_counter()
    states[name], m = steps[name](states[name])
    jax.block_until_ready(m)
    print(f"{name}: compiled + first step {time.perf_counter() - t0:.1f} s", flush=True)
  for _ in range(args.rounds):
    for name in ("full", "lora"):
      t0 = time.perf_counter()
      states[name], m = steps[name](states[name])
      jax.block_until_ready((states[name], m))
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  n_full = sum(x.size for x in jax.tree.leaves(base))
  n_lora = sum(x.size for x in jax.tree.leaves(trainable))
  print(
    f"\n{args.preset}, batch {args.batch} x {args.src}/{args.tgt}, Adafactor, float32, "
    f"{jax.device_count()} CPU device, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
  )
  print("| step | trained params | median s/step | min | max |")
  print("|---|---:|---:|---:|---:|")
  for name, n in (("full fine-tuning", n_full), (f"LoRA r={args.rank} q,v", n_lora)):
    k = "full" if name.startswith("full") else "lora"
    lo, hi = min(times[k]), max(times[k])
    print(f"| {name} | {n / 1e6:,.2f}M | {med[k]:.3f} | {lo:.3f} | {hi:.3f} |")
  print(f"\nLoRA / full: {med['lora'] / med['full']:.2f}x the time per step")


if __name__ == "__main__":
  main()
