"""Training-state memory per device under FSDP: the largest T5 that fits, and one measured point.

  python -m benchmarks.memory                    # tables + measured point (8 CPU devices, ~1 min)
  python -m benchmarks.memory --no_measure       # tables only (seconds)
  python -m benchmarks.memory --remat            # temporaries per remat policy (~1 min)
  python -m benchmarks.memory --peft             # full fine-tuning vs LoRA vs prompt tuning
  python -m benchmarks.memory --peft --target h100   # the same compiled for an H100, without one

Model state per parameter, all float32 (t5jax keeps parameters in float32 whatever the compute
dtype): parameters 4 B + gradients 4 B + optimizer state: Adafactor (T5's default) keeps factored
row/column second moments, a few bytes per *row*, so ~0 B/param for matrices; AdamW keeps two
moments, 8 B/param. Counts are exact, from `jax.eval_shape` of `init_params` and `tx.init`.
FSDP (`--config.mesh.fsdp=N`) splits all three N ways (`t5jax.sharding`: the `embed` dimension
of every matrix), so the per-device state is total / N. Activations are not included: they scale
with the per-device batch and sequence lengths, and `num_microbatches` trades them for steps;
the tables keep 25% of the device for them (a model "fits" when state <= 75% of memory).

The measured point compiles the real train step at a small config for one device and for an
8-device FSDP mesh on CPU (`--xla_force_host_platform_device_count=8`) and prints XLA's
`memory_analysis()` per device: arguments (the train state and the batch, donated), temporaries
(activations, gradients, gathered parameters), next to the bytes predicted from the shapes.

`--target h100` / `h200` compiles the same programs for that GPU on this machine, with no GPU
(XLA's deviceless compilation: `jax.experimental.topologies` and the GPU's device description,
`GPU_TARGETS`), and reports the GPU compiler's `memory_analysis()`: what the step needs there,
where XLA:CPU's choices (e.g. a float32 copy of bfloat16 weights, since it has no bfloat16
matmul) would mislead. It needs the CUDA plugin of this jax version (~480 MB, no CUDA libraries),
in a folder of its own so that other runs do not look for a GPU (`make setup-gpu-aot`):

  make setup-gpu-aot
  PYTHONPATH=.venv-gpu-aot .venv/bin/python -m benchmarks.memory --peft --target h100

Compiled without a device, XLA cannot autotune: it uses cuBLAS for every matmul (Triton's tile
search needs the device and fails on some shapes) and its default schedule, so a real device may
use somewhat different temporaries.
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--no_measure" not in sys.argv:
  # Must precede the jax import: 8 host devices for the measured FSDP point.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from t5jax import model, optim, sharding, trainer  # noqa: E402
from t5jax.config import get_config  # noqa: E402
from t5jax.layers import float32_sums  # noqa: E402
from t5jax.train_config import LossConfig, OptimizerConfig  # noqa: E402

PRESETS = [
  "t5-v1_1-small",
  "t5-v1_1-base",
  "t5-v1_1-large",
  "t5-v1_1-xl",
  "t5-v1_1-xxl",
  "mt5-xxl",
]
DEVICE_COUNTS = [1, 2, 4, 8, 16]  # from 16 devices on, every preset fits (mt5-xxl is largest)
MEMORY_GB = [16, 40, 80]  # e.g. TPU v5e / V100-16G, A100-40G, A100/H100-80G
HEADROOM = 0.75  # fraction of device memory the state may use; the rest is for activations
GB = 1e9

# Device descriptions for compiling without the GPU (XLA's GpuTargetConfig, text format): the
# Hopper parts' published limits (132 SMs, compute capability 9.0), bandwidth and memory.
_HOPPER = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  registers_per_core_limit: 65536 registers_per_block_limit: 65536 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 memory_bandwidth: {bandwidth} device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
GPU_TARGETS = {
  "h100": _HOPPER.format(bandwidth=3_350_000_000_000, memory=80_000_000_000, name="NVIDIA H100"),
  "h200": _HOPPER.format(bandwidth=4_800_000_000_000, memory=141_000_000_000, name="NVIDIA H200"),
}


def target_devices(target: str, n: int) -> list:
  """`n` devices to compile for: this process's CPU devices, or compile-only devices of the GPU
  `target` (no GPU needed; exits with one line when jax's CUDA plugin is not installed)."""
  if target == "cpu":
    return jax.devices()[:n]
  import importlib.util

  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    sys.exit(
      f"benchmarks.memory: error: --target {target} compiles for a GPU without one and needs "
      "jax's CUDA plugin: run `make setup-gpu-aot`, then PYTHONPATH=.venv-gpu-aot (or pip install "
      f"--target DIR --no-deps jax-cuda12-plugin=={jax.__version__} "
      f"jax-cuda12-pjrt=={jax.__version__}, then PYTHONPATH=DIR)"
    )
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(
    platform="cuda", target_config=GPU_TARGETS[target], topology=f"1x1x{n}"
  )
  return list(topology.devices)


def compile_options(target: str) -> dict:
  """XLA options of the compiles for `target`: a GPU compiled for without one uses cuBLAS for
  its matmuls (Triton's tile search needs the device)."""
  return {} if target == "cpu" else {"xla_gpu_enable_triton_gemm": False}


def where(target: str, n: int = 1) -> str:
  """The table headers' words for the devices compiled for."""
  if target == "cpu":
    return f"{'one CPU device' if n == 1 else f'{n} CPU devices'}, XLA CPU memory_analysis"
  return (
    f"{'one' if n == 1 else n} {target.upper()} (compiled without one), XLA GPU memory_analysis"
  )


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def state_bytes(preset: str) -> dict[str, float]:
  """Parameter count and total train-state bytes (params + grads + optimizer) per optimizer."""
  cfg = get_config(preset)
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  p = _nbytes(params)
  out = {"params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))}
  for name in ("adafactor", "adamw"):
    ocfg = OptimizerConfig(name=name)
    opt = _nbytes(jax.eval_shape(optim.make_optimizer(ocfg).init, params))
    out[name] = 2 * p + opt  # params + grads + optimizer state
    out[name + "_opt"] = opt
  return out


def print_tables() -> dict[str, dict[str, float]]:
  sizes = {name: state_bytes(name) for name in PRESETS}
  print("## Train state (fp32 params + grads + optimizer), total over all devices\n")
  print("| model | params | Adafactor state | bytes/param | AdamW state | bytes/param |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, s in sizes.items():
    n = s["params"]
    print(
      f"| {name} | {n / 1e6:,.0f}M | {s['adafactor'] / GB:,.1f} GB | {s['adafactor'] / n:.2f} "
      f"| {s['adamw'] / GB:,.1f} GB | {s['adamw'] / n:.2f} |"
    )
  print(
    f"\n## Largest model whose state fits with FSDP over N devices "
    f"(state / N <= {HEADROOM:.0%} of device memory)\n"
  )
  head = " | ".join(f"{m} GB Adafactor | {m} GB AdamW" for m in MEMORY_GB)
  print(f"| devices | {head} |")
  print("|---:|" + "---|---|" * len(MEMORY_GB))
  for n in DEVICE_COUNTS:
    cells = []
    for mem in MEMORY_GB:
      for opt in ("adafactor", "adamw"):
        fits = [name for name, s in sizes.items() if s[opt] / n <= HEADROOM * mem * GB]
        cells.append(fits[-1] if fits else "-")
    print(f"| {n} | " + " | ".join(cells) + " |")
  return sizes


def measure(num_layers: int = 2, batch: int = 8, target: str = "cpu") -> None:
  """Compiled train step's per-device memory, one device vs 8-way FSDP, at a small config."""
  cfg = get_config("t5-v1_1-small", num_layers=num_layers, num_decoder_layers=num_layers)
  ocfg = OptimizerConfig()
  loss_cfg = LossConfig(label_smoothing=0.0, z_loss=1e-4, normalizer="num_tokens")
  s_len, t_len = 128, 32
  shapes = trainer.state_shapes(cfg, optim.make_optimizer(ocfg))
  # Arguments hold the state (params + optimizer) and the batch; gradients are temporaries.
  predicted_state = _nbytes(shapes.params) + _nbytes(shapes.opt_state)
  predicted_grads = _nbytes(shapes.params)
  print(
    f"\n## Measured: t5-v1_1-small with {num_layers}+{num_layers} layers "
    f"({_nbytes(shapes.params) / 4 / 1e6:.1f}M params), Adafactor, batch {batch} x "
    f"{s_len}/{t_len} tokens, {where(target, 8)}, per device\n"
  )
  print(
    "| mesh (data, fsdp, tensor) | arguments | predicted params + opt / N "
    "| temporaries | predicted grads / N |"
  )
  print("|---|---:|---:|---:|---:|")
  # The last row lowers under `jax.set_mesh(mesh)`, which turns on the model's activation
  # constraints (hidden states split over the batch, whole along `embed`).
  for mesh_shape, set_mesh in [((1, 1, 1), False), ((1, 8, 1), False), ((1, 8, 1), True)]:
    n = int(np.prod(mesh_shape))
    devices = target_devices(target, n)
    if len(devices) < n:
      print(f"| {mesh_shape} | (needs {n} devices) | | | |")
      continue
    mesh = sharding.create_mesh(sharding.MeshConfig(*mesh_shape), devices)
    steps = trainer.build(cfg, ocfg, loss_cfg, mesh)
    batch_sh = steps.batch_sharding
    abstract_state = steps.abstract_state()
    abstract_batch = {
      name: jax.ShapeDtypeStruct((batch, length), dtype, sharding=batch_sh)
      for name, length, dtype in [
        ("encoder_input_tokens", s_len, np.int32),
        ("decoder_input_tokens", t_len, np.int32),
        ("decoder_target_tokens", t_len, np.int32),
        ("decoder_loss_weights", t_len, np.float32),
      ]
    }
    jitted = steps.train_step
    rng = jax.ShapeDtypeStruct((2,), np.uint32)  # a raw key: nothing placed on a device
    if set_mesh:  # activates the model's activation sharding constraints
      with jax.set_mesh(mesh):
        lowered = jitted.lower(abstract_state, abstract_batch, rng)
    else:
      lowered = jitted.lower(abstract_state, abstract_batch, rng)
    mem = lowered.compile(compile_options(target)).memory_analysis()
    label = f"{mesh_shape}{' + set_mesh' if set_mesh else ''}"
    if mem is None:
      print(f"| {label} | (memory_analysis unavailable on this backend) | | | |")
      continue
    print(
      f"| {label} | {mem.argument_size_in_bytes / 1e6:.1f} MB | {predicted_state / n / 1e6:.1f} MB "
      f"| {mem.temp_size_in_bytes / 1e6:.1f} MB | {predicted_grads / n / 1e6:.1f} MB |"
    )


def measure_remat(
  preset: str, batch: int, s_len: int, t_len: int, scan: bool = True, target: str = "cpu"
) -> None:
  """Compiled train step's temporaries with each `T5Config.remat` policy (one device).

  Temporaries hold the gradients (as many bytes as the parameters) plus the activations kept
  for the backward pass; the issue's target compares `temporaries - parameter bytes` with full
  remat against none (<= 25%).
  """
  from t5jax.config import REMAT_POLICIES

  ocfg = OptimizerConfig()
  mesh = sharding.create_mesh(sharding.MeshConfig(), target_devices(target, 1))
  loss_cfg = LossConfig(label_smoothing=0.0, z_loss=1e-4, normalizer="num_tokens")
  batch_shapes = {
    name: jax.ShapeDtypeStruct((batch, length), dtype)
    for name, length, dtype in [
      ("encoder_input_tokens", s_len, np.int32),
      ("decoder_input_tokens", t_len, np.int32),
      ("decoder_target_tokens", t_len, np.int32),
      ("decoder_loss_weights", t_len, np.float32),
    ]
  }
  print(
    f"\n## Remat: {preset} ({'scanned' if scan else 'unrolled'}), batch {batch} x {s_len}/{t_len}, "
    f"Adafactor, {where(target)}\n"
  )
  print("| remat | temporaries | temporaries - params | vs none |")
  print("|---|---:|---:|---:|")
  base = None
  for remat in REMAT_POLICIES:
    cfg = get_config(preset, scan_layers=scan, remat=remat)
    steps = trainer.build(cfg, ocfg, loss_cfg, mesh)
    state = steps.abstract_state()
    rng = jax.ShapeDtypeStruct((2,), np.uint32)
    lowered = steps.train_step.lower(state, batch_shapes, rng)
    mem = lowered.compile(compile_options(target)).memory_analysis()
    if mem is None:
      print(f"| {remat} | (memory_analysis unavailable) | | |")
      continue
    extra = mem.temp_size_in_bytes - _nbytes(state.params)
    base = extra if remat == "none" else base
    share = f"{extra / base:.0%}" if base else ""
    print(f"| {remat} | {mem.temp_size_in_bytes / 1e6:,.0f} MB | {extra / 1e6:,.0f} MB | {share} |")


def _functional_lora_step(cfg, tx, schedule, loss_cfg):
  """A LoRA step the other way round: merge `W + scale * A @ B` outside the model, then run the
  plain model on the merged weights (for docs/peft.md's comparison only)."""
  import jax.numpy as jnp
  import optax

  from t5jax import peft

  base_cfg = cfg.without_peft()

  def merged(frozen, trainable):
    out = jax.tree.map(lambda x: x, frozen)
    for path, name in peft._pairs(trainable):
      node, sub = out, trainable
      for k in path:
        node, sub = node[k], sub[k]
      a, b = sub[f"{name}_lora_a"], sub[f"{name}_lora_b"]
      stacked = "layers" in path
      lead = a.shape[:1] if stacked else ()
      r = a.shape[-1]
      d = jnp.matmul(a.reshape(lead + (-1, r)), b.reshape(lead + (r, -1))) * cfg.lora_scale
      w = node[name]
      node[name] = (w.astype(jnp.float32) + d.reshape(w.shape)).astype(w.dtype)
    return out

  def step(state, batch, rng, frozen):
    def loss(p):
      return trainer._sums(merged(frozen, p), base_cfg, batch, rng, loss_cfg)

    grads, sums = jax.grad(loss, has_aux=True)(state.params)
    norm = jnp.maximum(sums["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / norm, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return trainer.TrainState(state.step + 1, params, opt_state), sums["loss_sum"] / norm

  return step


def measure_peft(
  preset: str, batch: int, s_len: int, t_len: int, remat: str, opt: str, target: str = "cpu"
) -> None:
  """Compiled train step's bytes (one device, XLA memory_analysis): full fine-tuning against
  LoRA r=8 on q, v (in-layer, as t5jax computes it, and merged outside the model) and prompt
  tuning with 100 vectors, all in bfloat16 compute with scanned layers."""
  from t5jax import peft

  ocfg = OptimizerConfig(name=opt)
  mesh = sharding.create_mesh(sharding.MeshConfig(), target_devices(target, 1))
  loss_cfg = LossConfig(label_smoothing=0.0, z_loss=1e-4, normalizer="num_tokens")
  cfg = get_config(preset, scan_layers=True, remat=remat, dtype="bfloat16", dropout_rate=0.0)
  qv = tuple(f"{s}.{n}" for s in ("encoder", "decoder", "cross") for n in ("q", "v"))
  variants = [
    ("full fine-tuning", cfg, None),
    ("LoRA r=8 q,v (in-layer)", cfg.replace(lora_rank=8, lora_alpha=16.0, lora_targets=qv), None),
    ("LoRA r=8 q,v (merged outside)", cfg.replace(lora_rank=8, lora_alpha=16.0, lora_targets=qv),
     "functional"),
    ("prompt tuning N=100", cfg.replace(prompt_length=100), None),
  ]  # fmt: skip
  batch_shapes = {
    name: jax.ShapeDtypeStruct((batch, length), dtype)
    for name, length, dtype in [
      ("encoder_input_tokens", s_len, np.int32),
      ("decoder_input_tokens", t_len, np.int32),
      ("decoder_target_tokens", t_len, np.int32),
      ("decoder_loss_weights", t_len, np.float32),
    ]
  }
  print(
    f"\n## PEFT: {preset}, batch {batch} x {s_len}/{t_len}, bf16 compute, remat {remat}, "
    f"{opt}, {where(target)}\n"
  )
  print("| run | trained params | arguments | temporaries | total | vs full |")
  print("|---|---:|---:|---:|---:|---:|")
  full = None
  rng = jax.ShapeDtypeStruct((2,), np.uint32)
  for label, vcfg, kind in variants:
    steps = trainer.build(vcfg, ocfg, loss_cfg, mesh)
    state = steps.abstract_state()
    args = (state, batch_shapes, rng)
    if trainer.is_peft(vcfg):
      shapes = jax.eval_shape(lambda c=vcfg: model.init_params(c, jax.random.key(0)))
      frozen = jax.eval_shape(lambda f, c=vcfg: peft.cast_frozen(f, c), peft.split(shapes)[1])
      args += (frozen,)
    step = steps.train_step
    if kind == "functional":
      step = jax.jit(
        _functional_lora_step(vcfg, steps.tx, steps.schedule, loss_cfg), donate_argnums=0
      )
    mem = step.lower(*args).compile(compile_options(target)).memory_analysis()
    if mem is None:
      print(f"| {label} | (memory_analysis unavailable) | | | | |")
      continue
    total = (
      mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
    )  # fmt: skip
    full = total if full is None else full
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    print(
      f"| {label} | {n / 1e6:,.2f}M | {mem.argument_size_in_bytes / GB:,.2f} GB "
      f"| {mem.temp_size_in_bytes / GB:,.2f} GB | {total / GB:,.2f} GB | {total / full:.0%} |",
      flush=True,
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no_measure", action="store_true", help="only the computed tables")
  parser.add_argument("--layers", type=int, default=2, help="layers of the measured config")
  parser.add_argument("--batch", type=int, default=8, help="global rows of the measured step")
  parser.add_argument(
    "--remat", action="store_true",
    help="only the remat comparison: t5-v1_1-base, batch 8, 512/128 (a few minutes per policy)",
  )  # fmt: skip
  parser.add_argument("--remat_preset", default="t5-v1_1-base")
  parser.add_argument(
    "--peft", action="store_true",
    help="only full fine-tuning vs LoRA vs prompt tuning: --peft_preset, batch 8, 512/128",
  )  # fmt: skip
  parser.add_argument("--peft_preset", default="t5-v1_1-xl")
  parser.add_argument("--peft_remat", default="none", help="T5Config.remat of the --peft runs")
  parser.add_argument("--peft_optimizer", default="adafactor", help="adafactor or adamw")
  parser.add_argument(
    "--target", default="cpu", choices=["cpu", *GPU_TARGETS],
    help="compile the measured steps for this device: this CPU, or a GPU without one (see the "
    "module's docstring: needs jax's CUDA plugin)",
  )  # fmt: skip
  args = parser.parse_args()
  # The products an accelerator compiles, also when compiled here for this CPU (as a proxy).
  with float32_sums(False):
    if args.peft:
      measure_peft(args.peft_preset, 8, 512, 128, args.peft_remat, args.peft_optimizer, args.target)
    elif args.remat:
      measure_remat(args.remat_preset, 8, 512, 128, target=args.target)
    else:
      print_tables()
      if not args.no_measure:
        measure(args.layers, args.batch, args.target)


if __name__ == "__main__":
  main()
