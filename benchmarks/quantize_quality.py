"""How far int8 / bfloat16 decoding strays from float32 on a trained model (no timing).

    python -m benchmarks.quantize_quality --checkpoint workdir/demo
    python -m benchmarks.quantize_quality --checkpoint PATH/TO/HF_T5 --tsv dev.tsv

Inputs: `--tsv` (input TAB target per line), or, for a model trained on the built-in tasks
(`make demo`), `--examples` held-out inputs of them (`t5jax.tasks.builtin_task_examples`,
validation split, `--seed`). Every mode decodes the same inputs greedy and beam-4; the table
gives, against float32: greedy rows with identical tokens, beams with identical tokens, the top
beam identical, and the largest gap between the scores (length-normalised log-probabilities) of
the same hypothesis in both (beams with identical tokens: the numeric error) and between the
top beams' scores; and each mode's exact match against the targets.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

MODES = {
  "int8": dict(mode="int8"),
  "int8-float-output": dict(mode="int8", output_layer=False),
  "int8-weight-only": dict(mode="int8", activations="float"),
  "bf16": dict(mode="bfloat16"),
}


def same_rows(a, b) -> np.ndarray:
  """Per input (and beam), whether two decodings' token rows are equal; rows of one input may
  differ in padded width (a batch is as wide as its longest output), and padding is 0."""
  out = []
  for x, y in zip(a, b, strict=True):
    w = min(x.shape[-1], y.shape[-1])
    rest = np.concatenate([x[..., w:], y[..., w:]], axis=-1)
    out.append(np.all(x[..., :w] == y[..., :w], axis=-1) & np.all(rest == 0, axis=-1))
  return np.stack(out)


def read_pairs(args) -> tuple[list[str], list[str]]:
  if args.tsv:
    from t5jax.data import read_tsv

    pairs = read_tsv(args.tsv)
    return [p[0] for p in pairs], [p[1] for p in pairs]
  from t5jax.tasks import builtin_task_examples

  pairs = builtin_task_examples("validation", args.examples, seed=args.seed)
  return [p[0] for p in pairs], [p[1] for p in pairs]


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="a t5jax workdir or a HuggingFace folder")
  p.add_argument("--tsv", help="input TAB target lines (default: held-out built-in tasks)")
  p.add_argument("--examples", type=int, default=1000, help="built-in held-out inputs")
  p.add_argument("--seed", type=int, default=1, help="seed of the built-in inputs")
  p.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
  p.add_argument("--max_input_length", type=int, default=64)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--num_beams", type=int, default=4)
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args(argv)
  modes = [m for m in args.modes.split(",") if m]
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    p.error(f"--modes: unknown {unknown[0]!r}; choose from {', '.join(MODES)}")

  import t5jax
  from t5jax import inference
  from t5jax.errors import CheckpointError, ConfigError
  from t5jax.generate import GenerateConfig

  try:
    config, params, tok = inference.load(args.checkpoint)
    inputs, targets = read_pairs(args)
    ids, _ = inference.encode_texts(tok, inputs, args.max_input_length, strict=True)
  except (CheckpointError, ConfigError, OSError, ValueError) as e:
    sys.exit(f"quantize_quality: error: {e}")
  greedy = GenerateConfig(max_new_tokens=args.max_new_tokens)
  beam = GenerateConfig(
    method="beam", num_beams=args.num_beams, num_return_sequences=args.num_beams,
    max_new_tokens=args.max_new_tokens,
  )  # fmt: skip
  run = dict(batch_size=args.batch_size, max_len=args.max_input_length)

  def decode(q, cfg):
    g, _ = inference.generate_all(q, cfg, ids, greedy, **run)
    b, s = inference.generate_all(q, cfg, ids, beam, **run)
    texts = [tok.decode(inference.drop_eos(list(x[0]))) for x in g]
    em = float(np.mean([t.strip() == y.strip() for t, y in zip(texts, targets, strict=True)]))
    return g, b, s, em

  ref_g, ref_b, ref_s, ref_em = decode(params, config)
  print(
    f"{args.checkpoint}: {len(ids)} inputs, greedy and beam-{args.num_beams}, "
    f"{args.max_new_tokens} new tokens at most"
  )
  print(f"{'mode':<20} {'greedy rows':>11} {'beams':>7} {'top beam':>8} "
        f"{'score gap same':>14} {'top gap':>8} {'exact match':>11}")  # fmt: skip
  print(f"{'float32':<20} {'':>11} {'':>7} {'':>8} {'':>14} {'':>8} {ref_em:>11.3f}")
  for name in modes:
    opts = dict(MODES[name])
    q = t5jax.quantize(params, config, opts.pop("mode"), **opts)
    cfg = config.replace(dtype="bfloat16") if name == "bf16" else config
    g, b, s, em = decode(q, cfg)
    greedy_same = same_rows([x[0] for x in ref_g], [x[0] for x in g]).mean()
    beams_same = same_rows(ref_b, b)
    gaps = np.abs(np.stack(ref_s) - np.stack(s))
    same_gap = float(gaps[beams_same].max()) if beams_same.any() else float("nan")
    print(
      f"{name:<20} {greedy_same:>11.3f} {beams_same.mean():>7.3f} {beams_same[:, 0].mean():>8.3f} "
      f"{same_gap:>14.4f} {gaps[:, 0].max():>8.4f} {em:>11.3f}"
    )


if __name__ == "__main__":
  main()
