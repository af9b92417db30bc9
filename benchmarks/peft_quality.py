"""LoRA and prompt tuning against full fine-tuning on a task the base model never saw.

  python -m benchmarks.peft_quality                    # ~10 min on 2 idle cores
  python -m benchmarks.peft_quality --base_steps 3000 --steps 1000 --seeds 0,1

1. A base model (the demo's architecture and recipe, `configs/demo.py`) is trained on three of
   the built-in tasks: add, reverse and sort.
2. Its HuggingFace export is adapted to the fourth, number_to_words, in three ways with the
   same data, batch and number of steps: full fine-tuning (AdamW 1e-3, constant), LoRA (rank 8 on
   q, k, v, o of every attention and the MLP's wi/wo, alpha 2 x rank, AdamW 3e-3; --lora_targets,
   --lora_rank, --lora_lr) and prompt tuning (20 vectors initialised from vocabulary embeddings,
   Adafactor 0.3); --schedule cosine decays every method's rate instead. Each ends with greedy
   exact match on 200 held-out inputs of the new task (`config.eval_generate_examples`).
3. The table gives each method's trained parameters and exact match, and its ratio to full
   fine-tuning's; with several seeds, one row per seed and method (the base is trained per seed).

Everything runs in this process through `t5jax.train.train_and_evaluate`, as train.py would; the
workdirs go to a temporary folder (or --workdir) and are kept only with --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from configs.demo import get_config as demo_config
from t5jax import checkpoint, train
from t5jax.tasks import BUILTIN_TASKS
from t5jax.workdir import Paths


def _old_tasks(new_task: str) -> str:
  return ",".join(t for t in BUILTIN_TASKS if t != new_task)


def _base(seed: int, steps: int, new_task: str):
  c = demo_config()
  c.seed = seed
  c.data.builtin_tasks = _old_tasks(new_task)
  c.num_train_steps = steps
  c.optimizer.total_steps = steps
  c.optimizer.warmup_steps = min(100, steps // 10)
  c.eval_every = steps
  c.checkpoint_every = steps
  c.best_metric = ""
  c.progress_bar = False
  return c


def _adapt(
  seed,
  steps,
  base_hf,
  method,
  new_task,
  lora_targets="all",
  lora_lr=3e-3,
  lora_rank=8,
  schedule="constant",
):
  c = demo_config()
  c.seed = seed
  c.model = {}  # the architecture is the base's
  c.init_from = base_hf
  c.data.builtin_tasks = new_task
  c.data.pack = False  # prompt tuning does not pack; every method gets the same rows
  c.num_train_steps = steps
  c.eval_every = steps
  c.checkpoint_every = steps
  c.best_metric = ""
  c.progress_bar = False
  c.optimizer.name = "adamw"
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.learning_rate = 1e-3
  if method == "lora":
    c.lora.rank = lora_rank
    c.lora.alpha = 2.0 * lora_rank
    for stack in ("encoder", "decoder", "cross"):
      every = "q,k,v,o" if stack == "cross" else "q,k,v,o,wi,wo"
      setattr(c.lora, stack, every if lora_targets == "all" else lora_targets)
    c.optimizer.learning_rate = lora_lr
  elif method == "prompt":
    c.prompt.length = 20
    c.prompt.init = "vocab"
    c.optimizer.name = "adafactor"
    c.optimizer.learning_rate = 0.3
    c.optimizer.weight_decay = 1e-5
    c.optimizer.adafactor.multiply_by_parameter_scale = False
  if schedule == "cosine":  # every method: a short warmup, then cosine decay to 0 at `steps`
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = min(30, steps // 10)
    c.optimizer.total_steps = steps
  return c


def _last_exact_match(out: dict, workdir: str) -> float:
  """The run's final greedy exact match: from its result, or (a run already complete, resumed
  with nothing to do) from the last eval row of its metrics.jsonl."""
  if "exact_match" in (out.get("eval") or {}):
    return out["eval"]["exact_match"]
  rows = [json.loads(line) for line in open(Paths(workdir).metrics) if line.strip()]
  return next((r["exact_match"] for r in reversed(rows) if "exact_match" in r), float("nan"))


def _trained_params(workdir: str) -> int:
  """Parameters the run trained: a full run's checkpoints hold the model, a PEFT run's only the
  adapters / prompt."""
  _, params = checkpoint.restore_params(workdir)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base_steps", type=int, default=1500)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seeds", default="0")
  p.add_argument(
    "--new_task",
    default="number_to_words",
    choices=sorted(BUILTIN_TASKS),
    help="the task adapted to; the base is trained on the other three",
  )
  p.add_argument("--methods", default="full,lora,prompt")
  p.add_argument("--lora_targets", default="all", help="'all' or projections, e.g. 'q,v'")
  p.add_argument("--lora_lr", type=float, default=3e-3)
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument(
    "--schedule",
    default="constant",
    choices=["constant", "cosine"],
    help="every method's learning-rate schedule (cosine: 30 warmup steps, decay to 0)",
  )
  p.add_argument("--workdir", default="")
  p.add_argument("--keep", action="store_true")
  args = p.parse_args()
  root = args.workdir or tempfile.mkdtemp(prefix="t5jax_peft_quality_")
  rows = []
  try:
    for seed in (int(s) for s in args.seeds.split(",")):
      t0 = time.time()
      base_dir = os.path.join(root, f"base{seed}")
      base = train.train_and_evaluate(_base(seed, args.base_steps, args.new_task), base_dir)
      base_em = _last_exact_match(base, base_dir)
      print(
        f"seed {seed}: base ({_old_tasks(args.new_task)}) exact match {base_em:.3f} "
        f"in {time.time() - t0:.0f} s"
      )
      full_em = None
      for method in args.methods.split(","):
        t0 = time.time()
        base_hf = os.path.join(base_dir, "export", "hf")
        cfg = _adapt(
          seed,
          args.steps,
          base_hf,
          method,
          args.new_task,
          args.lora_targets,
          args.lora_lr,
          args.lora_rank,
          args.schedule,
        )
        tag = f"_{args.lora_targets}_{args.lora_lr:g}_r{args.lora_rank}" if method == "lora" else ""
        tag += "" if args.schedule == "constant" else f"_{args.schedule}"
        workdir = os.path.join(root, f"{method}{tag}{seed}")
        out = train.train_and_evaluate(cfg, workdir)
        em = _last_exact_match(out, workdir)
        full_em = em if method == "full" else full_em
        n = _trained_params(workdir)
        rows.append((seed, method, n, em, time.time() - t0))
        ratio = f"{em / full_em:.3f}" if full_em else "-"
        print(f"  {method:6s} trained {n:>9,d} params  exact match {em:.3f}  / full {ratio}  "
              f"({time.time() - t0:.0f} s)")  # fmt: skip
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  print(f"\n{'seed':>4} {'method':8} {'trained':>10} {'exact match':>12} {'/ full':>7}")
  for seed, method, n, em, _ in rows:
    full = next((r[3] for r in rows if r[0] == seed and r[1] == "full"), 0)
    ratio = f"{em / full:.3f}" if full else "-"
    print(f"{seed:>4} {method:8} {n:>10,d} {em:>12.3f} {ratio:>7}")
  print(f"adapted to {args.new_task!r} after {args.base_steps} base steps on "
        f"{_old_tasks(args.new_task)}; "
        f"{args.steps} adaptation steps each; target LoRA >= 0.95 x full")  # fmt: skip


if __name__ == "__main__":
  main()
