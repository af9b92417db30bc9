"""Decoding throughput: t5jax.generate next to transformers generate(), same weights, same run.

  python benchmarks/decode.py                      # CPU: t5-v1_1-small, batch 8, 64 in, 32 out
  python benchmarks/decode.py --preset t5-v1_1-base --batch 64 --input_len 512 \\
      --new_tokens 128 --dtype bfloat16            # accelerator setting

Random weights (t5jax.init_params), exported with t5jax.save_hf and loaded by transformers, so
both decode the same model. Every row generates exactly --new_tokens tokens: t5jax with
`ignore_eos=True`, transformers with `min_new_tokens` (EOS suppressed until then). Reported:
t5jax compile time (first call minus a warm call) apart from the steady-state time; the median of
--repeats timed calls for each; tokens/s = batch * new_tokens / time (returned tokens, beams not
counted). `--no_hf` skips transformers (e.g. where torch has no GPU build).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import t5jax  # noqa: E402
from t5jax.generate import generate  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="t5-v1_1-small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--methods", default="greedy,beam", help="comma-separated: greedy, beam, sample")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no_hf", action="store_true", help="skip transformers")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch_threads", type=int, help="torch.set_num_threads (default: torch's)")
  p.add_argument(
    "--tiny", action="store_true", help="shrink the preset to 2 layers, d_model 64 (smoke test)"
  )
  return p.parse_args()


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def main():
  args = parse_args()
  config = t5jax.get_config(args.preset, dropout_rate=0.0, dtype=args.dtype)
  if args.tiny:
    config = config.replace(
      d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2
    )
  params = t5jax.init_params(config, jax.random.key(args.seed))
  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(3, config.vocab_size - 200, size=(args.batch, args.input_len))
  tokens[:, -1] = config.eos_token_id
  tokens = tokens.astype(np.int32)
  n_tok = args.batch * args.new_tokens
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(
    f"model: {args.preset}{' (tiny)' if args.tiny else ''}, dtype {args.dtype}; batch {args.batch},"
    f" input {args.input_len} tokens, {args.new_tokens} new tokens forced, beams {args.num_beams}"
  )

  hf_model = None
  if not args.no_hf:
    import torch
    import transformers

    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as d:
      t5jax.save_hf(config, params, d)
      hf_model = transformers.T5ForConditionalGeneration.from_pretrained(
        d, dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
      ).eval()
    hf_model.generation_config.decoder_start_token_id = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_model.to(device)
    hf_ids = torch.tensor(tokens, dtype=torch.long, device=device)
    print(
      f"transformers {transformers.__version__}, torch {torch.__version__} on {device}, "
      f"{torch.get_num_threads()} threads"
    )

  params = jax.device_put(params)
  print(f"{'method':8} {'impl':13} {'compile s':>9} {'time s':>8} {'tokens/s':>10}")
  for method in args.methods.split(","):
    kw = dict(method=method, max_new_tokens=args.new_tokens, ignore_eos=True)
    if method == "beam":
      kw["num_beams"] = args.num_beams

    def run_jax(kw=kw):
      out = generate(params, config, tokens, **kw)
      return jax.block_until_ready(out.sequences)

    t0 = time.perf_counter()
    run_jax()
    first = time.perf_counter() - t0
    steady, ours = timed(run_jax, args.repeats)
    print(
      f"{method:8} {'t5jax':13} {first - steady:9.2f} {steady:8.3f} {n_tok / steady:10.1f}",
      flush=True,
    )
    if hf_model is None:
      continue
    hf_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    hf_kw.update(num_beams=args.num_beams if method == "beam" else 1, do_sample=method == "sample")

    def run_hf(hf_kw=hf_kw):
      with torch.inference_mode():
        out = hf_model.generate(input_ids=hf_ids, attention_mask=hf_ids != 0, **hf_kw)
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    run_hf()  # warm-up
    hf_time, theirs = timed(run_hf, args.repeats)
    print(f"{method:8} {'transformers':13} {'-':>9} {hf_time:8.3f} {n_tok / hf_time:10.1f}")
    same = ""
    if method != "sample":
      theirs = theirs[:, 1:].cpu().numpy()
      ours_np = np.asarray(ours).reshape(theirs.shape[0], -1)[:, : theirs.shape[1]]
      same = f", same tokens: {np.mean(np.all(ours_np == theirs, axis=1)) * 100:.0f}% of rows"
    print(f"{method:8} {'speed-up':13} {'':9} {'':8} {hf_time / steady:9.2f}x{same}", flush=True)


if __name__ == "__main__":
  main()
