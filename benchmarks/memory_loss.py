"""The blocked loss takes the float32 `[B, T, V]` logits out of the train step's peak memory.

  python -m benchmarks.memory_loss                 # t5-v1_1-base, batch 8, 512/128 (CPU, minutes)
  python -m benchmarks.memory_loss --block_sizes 0,8,32,128 --layers 2
  python -m benchmarks.memory_loss --remat full --scan_layers 1   # with rematerialised layers

Compiles the real train step (Adafactor, z-loss, one device) on abstract shapes, nothing
allocated, once with the whole logits (`LossConfig.block_size=0`) and once per block size, and
prints XLA's `memory_analysis()`: arguments (the donated train state and the batch) and
temporaries (gradients, activations, logits), next to the bytes of one float32 `[B, T, V]` array.
The logits exist whole several times over in the unblocked step (logits, their gradient,
softmax intermediates); blocked, only `[B, block, V]` pieces do.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from t5jax import sharding, trainer
from t5jax.config import get_config
from t5jax.train_config import LossConfig, OptimizerConfig


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="t5-v1_1-base")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=512)
  p.add_argument("--target_len", type=int, default=128)
  p.add_argument("--block_sizes", default="0,16", help="comma-separated; 0 = whole logits")
  p.add_argument("--layers", type=int, default=0, help="override encoder/decoder depth (0 = keep)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none", help="T5Config.remat: none, full, dots, dots_no_batch")
  p.add_argument("--scan_layers", type=int, default=0, help="1 = T5Config.scan_layers")
  args = p.parse_args()
  depth = {"num_layers": args.layers, "num_decoder_layers": args.layers} if args.layers else {}
  cfg = get_config(
    args.preset,
    dtype=args.dtype,
    dropout_rate=0.0,
    remat=args.remat,
    scan_layers=bool(args.scan_layers),
    **depth,
  )
  mesh = sharding.create_mesh(sharding.MeshConfig(), jax.devices()[:1])
  state = trainer.build(cfg, OptimizerConfig(), LossConfig(), mesh).abstract_state()
  b, s, t = args.batch, args.input_len, args.target_len
  batch = {
    name: jax.ShapeDtypeStruct((b, n), dtype)
    for name, n, dtype in [
      ("encoder_input_tokens", s, np.int32),
      ("decoder_input_tokens", t, np.int32),
      ("decoder_target_tokens", t, np.int32),
      ("decoder_loss_weights", t, np.float32),
    ]
  }
  logits = b * t * cfg.vocab_size * 4
  params = _nbytes(state.params)
  print(
    f"{args.preset}{f' ({args.layers}+{args.layers} layers)' if args.layers else ''}, "
    f"{args.dtype}, remat {args.remat}, scan_layers {bool(args.scan_layers)}, batch {b}, "
    f"{s}/{t} tokens, vocab {cfg.vocab_size}; one float32 [B, T, V] = "
    f"{logits / 1e6:.1f} MB; parameters (= gradients) {params / 1e6:.1f} MB; "
    f"jax {jax.__version__} on {jax.default_backend()}\n"
  )
  print("| loss block_size | arguments | temporaries | temporaries - parameter bytes | vs whole |")
  print("|---:|---:|---:|---:|---:|")
  base = None
  for block in (int(x) for x in args.block_sizes.split(",")):
    loss_cfg = LossConfig(z_loss=1e-4, block_size=block)
    step = trainer.build(cfg, OptimizerConfig(), loss_cfg, mesh).train_step
    mem = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    temp = mem.temp_size_in_bytes
    base = temp if base is None else base
    print(
      f"| {block or 'whole'} | {mem.argument_size_in_bytes / 1e6:.1f} MB | {temp / 1e6:.1f} MB "
      f"| {(temp - params) / 1e6:.1f} MB | {(temp - base) / 1e6:+.1f} MB "
      f"({(temp - base) / logits:+.2f} x [B, T, V]) |",
      flush=True,
    )


if __name__ == "__main__":
  main()
