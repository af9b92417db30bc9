"""Top ops by time of the CPU train step and decode loop: t5jax (XLA) next to transformers (torch).

  python -m benchmarks.profile_cpu --target train --side jax     # benchmarks/train.py defaults
  python -m benchmarks.profile_cpu --target train --side torch --threads 1
  python -m benchmarks.profile_cpu --target decode --side jax --method beam
  python -m benchmarks.profile_cpu --target train --side jax --dump /tmp/xla_dump  # + HLO dump

t5jax: the compiled step (or generate) runs --steps times under jax.profiler.trace; the trace's
host plane is read back (jax.profiler.ProfileData) and every event whose name is an HLO
instruction of the compiled module (XLA's CPU runtime records one per thunk: a fusion, a dot, a
copy, a while loop...) is summed per instruction, then shown with its opcode, the fused
computation's kind and root/dots, and its shape, per step. torch: torch.profiler over the same
steps, ops by self CPU time. Same model, batch and weights as benchmarks/train.py and
benchmarks/decode.py at their defaults (same flags). Run each side in its own process (this
script is one side per call) and on a machine as quiet as you can find; the share of each op is
more telling than its absolute time under load.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import tempfile
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--target", default="train", choices=("train", "decode"))
  p.add_argument("--side", default="jax", choices=("jax", "torch"))
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, help="default 128 (train), 64 (decode)")
  p.add_argument("--target_len", type=int, default=32, help="train target tokens")
  p.add_argument("--new_tokens", type=int, default=32, help="decode new tokens")
  p.add_argument("--method", default="greedy", choices=("greedy", "beam"))
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--steps", type=int, default=3, help="profiled steps / generate calls")
  p.add_argument("--threads", type=int, default=1, help="torch threads")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--dump", help="also write XLA's HLO dump here (--xla_dump_to)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--quantize", default="none", choices=("none", "int8", "bf16"),
    help="decode, t5jax side: the weights as `decode.py --quantize` makes them",
  )  # fmt: skip
  a = p.parse_args()
  if a.input_len is None:
    a.input_len = 128 if a.target == "train" else 64
  return a


_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")


def hlo_index(hlo_text: str) -> dict[str, dict]:
  """name -> {opcode, shape, desc} for every instruction of the compiled module's text."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  cur = None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      head = line.split("(")[0].split()
      cur = head[-1].lstrip("%") if head else None
      comps[cur] = []
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      comps[cur].append(m.groups())
  index = {}
  for instrs in comps.values():
    for name, shape, opcode, rest in instrs:
      desc = ""
      if opcode == "fusion":
        kind = re.search(r"kind=(\w+)", rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = comps.get(called.group(1), []) if called else []
        ops = collections.Counter(o for _, _, o, _ in body if o not in ("parameter", "constant"))
        main = [o for o in ("dot", "convolution", "reduce", "transpose", "copy") if o in ops]
        root = body[-1][2] if body else "?"
        desc = f"{kind.group(1) if kind else '?'} root={root} " + ",".join(
          f"{o}x{ops[o]}" for o in main
        )
      elif opcode in ("dot", "custom-call"):
        dims = re.search(
          r"(lhs_contracting_dims=\{[\d,]*\}.*?rhs_contracting_dims=\{[\d,]*\})", rest
        )
        desc = dims.group(1) if dims else ""
      op_name = re.search(r'op_name="([^"]*)"', rest)
      where = re.sub(r"layers_\d+", "layers_N", op_name.group(1)) if op_name else ""
      where = where.replace("transpose(jvp(", "BWD(").replace("jvp(", "FWD(")
      index[name] = dict(opcode=opcode, shape=shape[:60], desc=desc, where=where)
  return index


def profile_jax(args):
  if args.dump:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
    ).strip()
  import jax
  import numpy as np

  import t5jax

  config = t5jax.get_config(args.preset, dropout_rate=0.0)
  args.vocab = config.vocab_size
  params = jax.device_get(t5jax.init_params(config, jax.random.key(args.seed)))
  if args.target == "train":
    from benchmarks import train as bench_train

    bargs = argparse.Namespace(
      batch=args.batch, input_len=args.input_len, target_len=args.target_len, seed=args.seed
    )
    batch_np = bench_train.make_batch(config, bargs)
    step, state, batch = bench_train.build_step(config, params, batch_np, "adafactor", 1e-3)
    rng = jax.random.key(args.seed)
    compiled = step.lower(state, batch, rng).compile()
    texts = [compiled.as_text()]
    holder = [state]

    def run():
      holder[0], m = compiled(holder[0], batch, rng)
      float(m["loss"])

  else:
    from t5jax.generate import generate

    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, config.vocab_size - 200, size=(args.batch, args.input_len))
    tokens[:, -1] = config.eos_token_id
    tokens = tokens.astype(np.int32)
    params = jax.device_put(params)
    if args.quantize != "none":
      params = t5jax.quantize(params, config, {"int8": "int8", "bf16": "bfloat16"}[args.quantize])
      config = config.replace(dtype="bfloat16") if args.quantize == "bf16" else config
    kw = dict(method=args.method, max_new_tokens=args.new_tokens, ignore_eos=True)
    if args.method == "beam":
      kw["num_beams"] = args.num_beams

    def run():
      jax.block_until_ready(generate(params, config, tokens, **kw).sequences)

    run()  # compiles; the optimized HLO comes from the dump folder
    texts = _compiled_texts_from_dump(args)

  run()  # warm
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    for _ in range(args.steps):
      run()
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / args.steps
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith("xplane.pb")]
    prof = jax.profiler.ProfileData.from_file(files[0])
  index = {}
  for t in texts:
    index.update(hlo_index(t))
  totals: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  other: collections.Counter = collections.Counter()
  for plane in prof.planes:
    if not plane.name.startswith("/host"):
      continue
    for line in plane.lines:
      for ev in line.events:
        if ev.name in index:
          totals[ev.name] += ev.duration_ns
          counts[ev.name] += 1
        else:
          other[ev.name] += ev.duration_ns
  return wall, totals, counts, index, other


def _compiled_texts_from_dump(args) -> list[str]:
  if not args.dump:
    return []
  out = []
  for r, _, fs in os.walk(args.dump):
    for f in fs:
      if f.endswith("after_optimizations.txt"):
        with open(os.path.join(r, f)) as fh:
          out.append(fh.read())
  return out


def _category(info: dict, vocab: int) -> str:
  """Coarse kind of one HLO instruction, for the per-kind table."""
  op, desc, shape = info["opcode"], info["desc"], info["shape"]
  if op in ("dot", "convolution") or "dotx" in desc or "convolutionx" in desc:
    return "matmul (dot, incl. fused)"
  if op in ("copy", "transpose") or "transposex" in desc or "copyx" in desc:
    return "transpose / layout copy"
  if str(vocab) in shape:
    return f"vocab-sized elementwise/reduce ({vocab})"
  if op == "reduce" or "reducex" in desc or "root=reduce" in desc:
    return "reduce (norms, softmax, loss)"
  if op in ("fusion",) or op in ("add", "multiply", "select", "broadcast", "exp"):
    return "elementwise fusion"
  return op


def report_jax(args, wall, totals, counts, index, other):
  total = sum(totals.values()) / args.steps
  print(
    f"t5jax {args.target}: {wall * 1e3:.1f} ms per step (wall, under the profiler); HLO"
    f" instruction events sum to {total / 1e6:.1f} ms/step (while-loop and call thunks contain"
    " their bodies' events, so nested time is counted twice)"
  )
  by_op: collections.Counter = collections.Counter()
  leaf = {
    n: v for n, v in totals.items() if index[n]["opcode"] not in ("while", "call", "conditional")
  }
  leaf_total = sum(leaf.values()) / args.steps
  for n, v in leaf.items():
    by_op[_category(index[n], args.vocab)] += v
  print(f"leaf instructions sum: {leaf_total / 1e6:.1f} ms/step; by kind:")
  for k, v in by_op.most_common(12):
    print(
      f"  {k:32} {v / args.steps / 1e6:9.1f} ms {v / args.steps / max(leaf_total, 1) * 100:5.1f}%"
    )
  print(f"top {args.top} instructions (ms per step, calls per step, share of leaf time):")
  for n, v in collections.Counter(leaf).most_common(args.top):
    info = index[n]
    print(
      f"  {v / args.steps / 1e6:8.2f} ms {counts[n] / args.steps:6.0f}x"
      f" {v / args.steps / max(leaf_total, 1) * 100:5.1f}%"
      f"  {n:28} {info['opcode']:12} {info['shape']:40} {info['desc'][:50]}"
      f"  {info['where'][-90:]}"
    )
  loops = {
    n: v for n, v in totals.items() if index[n]["opcode"] in ("while", "call", "conditional")
  }
  for n, v in collections.Counter(loops).most_common(3):
    print(
      f"  container {n}: {v / args.steps / 1e6:.1f} ms per step ({counts[n] / args.steps:.0f}x)"
    )
  copies: collections.Counter = collections.Counter()
  ncopies: collections.Counter = collections.Counter()
  for n in leaf:
    info = index[n]
    if _category(info, args.vocab).startswith("transpose"):
      dims = re.match(r"\w+\[([\d,]*)\]", info["shape"])
      size = 4 * math.prod(int(d) for d in dims.group(1).split(",") if d) if dims else 0
      copies[info["where"]] += size * counts[n] / args.steps  # a loop body's run every step
      ncopies[info["where"]] += 1
  print(
    f"layout copies: {sum(ncopies.values())} instructions, {sum(copies.values()) / 2**20:.1f} MiB"
    " written per step (output size x runs; an in-place update counts its whole buffer);"
    " by source:"
  )
  for w, v in copies.most_common(10):
    print(f"  {v / 2**20:8.1f} MiB {ncopies[w]:4d}x  {w[-100:]}")
  print("other host events (top 5, ms per step):")
  for n, v in other.most_common(5):
    print(f"  {v / args.steps / 1e6:8.2f}  {n[:90]}")


def profile_torch(args):
  os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
  import jax
  import numpy as np
  import torch
  import transformers

  import t5jax

  torch.set_num_threads(args.threads)
  config = t5jax.get_config(args.preset, dropout_rate=0.0)
  params = jax.device_get(t5jax.init_params(config, jax.random.key(args.seed)))
  with tempfile.TemporaryDirectory() as d:
    t5jax.save_hf(config, params, d)
    model = transformers.T5ForConditionalGeneration.from_pretrained(
      d, dtype=torch.float32, attn_implementation="eager"
    )
  if args.target == "train":
    from benchmarks import train as bench_train

    bargs = argparse.Namespace(
      batch=args.batch, input_len=args.input_len, target_len=args.target_len, seed=args.seed
    )
    b = bench_train.make_batch(config, bargs)
    model.train()
    opt = transformers.optimization.Adafactor(
      model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False
    )
    ids = torch.tensor(b["encoder_input_tokens"], dtype=torch.long)
    labels = torch.tensor(b["decoder_target_tokens"], dtype=torch.long)

    def run():
      loss = model(input_ids=ids, attention_mask=ids != 0, labels=labels).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
      float(loss)

  else:
    model.eval()
    model.generation_config.decoder_start_token_id = 0
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(3, config.vocab_size - 200, size=(args.batch, args.input_len))
    tokens[:, -1] = config.eos_token_id
    ids = torch.tensor(tokens, dtype=torch.long)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    kw["num_beams"] = args.num_beams if args.method == "beam" else 1

    def run():
      with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=ids != 0, **kw)

  run()
  run()
  t0 = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      run()
  wall = (time.perf_counter() - t0) / args.steps
  print(
    f"torch {args.target} ({args.threads} threads): {wall * 1e3:.1f} ms per step under the profiler"
  )
  print(
    prof.key_averages().table(
      sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40
    )
  )


def main():
  args = parse_args()
  print(
    f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
  )
  if args.side == "torch":
    profile_torch(args)
  else:
    if args.target == "decode" and not args.dump:
      args.dump = tempfile.mkdtemp(prefix="t5jax_dump_")
    report_jax(args, *profile_jax(args))


if __name__ == "__main__":
  main()
