"""Decode text with a T5 checkpoint: one output per input, in input order.

  python decode.py --checkpoint DIR [--input_file F] [--output_file G] [--method greedy|beam|sample]

DIR is a HuggingFace model folder or a t5jax training workdir (`t5jax.inference.load`). Inputs
(`t5jax.inputs`): one per line, a TSV column or a JSONL field, from a file or stdin. Outputs: the
best sequence per line (text) or JSON objects with every returned sequence and its score. Greedy,
beam search, sampling and rank classification (`t5jax.inference`), on one device or a mesh of
this process's devices, optionally int8 or bfloat16 (`--quantize`). Every flag, format and method
in detail: docs/decoding.md.

This file is flags and I/O only. Bad input exits with status 2 and one line naming the flag, file
or line (the library's messages name its parameters; they are printed as the flags).
--output_file is written through `t5jax.workdir.AtomicFile`: opened before the model loads, so an
unwritable path fails first, and renamed over the old file only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
from collections.abc import Sequence

import jax
from tqdm import tqdm

from t5jax import inference, inputs, sharding, workdir
from t5jax.errors import USER_ERRORS, ConfigError
from t5jax.generate import GenerateConfig
from t5jax.inference import TokenizerNotFound
from t5jax.sources import INPUT_COLUMNS

PROG = "decode.py"
# GenerateConfig fields with a flag, and decode.py's own defaults for some of them.
GENERATE_FLAGS = [f for f in dataclasses.fields(GenerateConfig) if f.metadata.get("flag", True)]
FLAG_DEFAULTS = {"max_new_tokens": 64}


class CLIError(Exception):
  """A user error reported as one line on stderr with exit status 2."""


def _add_generate_flags(p: argparse.ArgumentParser) -> None:
  """One flag per GenerateConfig field. A beam- or sample-only one defaults to None (= not given,
  so that its use with another method is detected), then to GenerateConfig's default."""
  for f in GENERATE_FLAGS:
    method, choices = f.metadata["method"], f.metadata.get("choices")
    default = None if method else FLAG_DEFAULTS.get(f.name, f.default)
    only = f" ({method} only)" if method else ""
    if str(f.type) == "bool":
      p.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"] + only)
      continue
    kind = {"int": int, "float": float, "float | None": float}.get(str(f.type))
    choices = list(choices) if choices else None
    p.add_argument(f"--{f.name}", type=kind, choices=choices, default=default,
                   help=f.metadata["help"] + only)  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog=PROG,
    description=__doc__.split("\n\n")[0],
    epilog="Every flag, format and method in detail: docs/decoding.md",
  )
  p.add_argument("--checkpoint", required=True, help="HuggingFace model folder or t5jax workdir")
  p.add_argument("--tokenizer", help="'byt5', a SentencePiece .model, or a folder holding one")
  p.add_argument("--input_file", help="default: stdin")
  p.add_argument("--output_file", help="default: stdout")
  p.add_argument(
    "--input_format",
    choices=inputs.FORMATS,
    default="auto",
    help="auto: a file by its extension (.tsv, .jsonl/.json, else text); stdin by its first line "
    "(a JSON object: jsonl; tab-separated with a field named as the input column, i.e. a "
    "header: tsv; else text, one prompt per line)",
  )
  p.add_argument("--input_column", help=f"TSV/JSONL field (default: first of {INPUT_COLUMNS})")
  p.add_argument("--output_format", choices=("text", "jsonl"), default="text")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_input_length", type=int, default=512)
  p.add_argument("--strict", action="store_true", help="reject (not truncate) too-long inputs")
  _add_generate_flags(p)
  p.add_argument("--seed", type=int, help="sampling seed (sample only)")
  p.add_argument(
    "--decoder_prefix_column",
    help="TSV/JSONL field whose text (without EOS) is forced as the start of that row's output; "
    "the output printed is what follows it (the prefix is not repeated)",
  )
  p.add_argument(
    "--candidates",
    help="rank classification: a file with one line per input, its candidates separated by tabs",
  )
  p.add_argument("--candidates_column", help="rank classification: a JSONL field (list of strings)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="computation dtype")
  p.add_argument(
    "--quantize",
    choices=("int8", "bf16"),
    help="weights in reduced precision, converted once after loading (t5jax.quantize): int8 per "
    "output channel with int8 activations per row; bf16 casts them to bfloat16 and computes in "
    "bfloat16 (docs/quantization.md)",
  )
  p.add_argument(
    "--float_output_layer", action="store_true", help="with --quantize: keep the output layer float"
  )
  p.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
  # Device mesh (t5jax.sharding); the product must equal the device count, -1 = the rest.
  p.add_argument("--mesh_data", type=int, default=-1, help="data-parallel replicas (-1: the rest)")
  p.add_argument("--mesh_fsdp", type=int, default=1, help="parameters split along embed")
  p.add_argument("--mesh_tensor", type=int, default=1, help="heads/mlp/vocab split")
  args = p.parse_args(argv)
  # The flags given on the command line (whatever their values): parsed again without defaults.
  for action in p._actions:
    action.default, action.required = argparse.SUPPRESS, False
  args.given = set(vars(p.parse_args(argv)))
  return args


def generate_config(args: argparse.Namespace) -> GenerateConfig:
  """The GenerateConfig of the flags; flags that the method would silently ignore are errors, and
  GenerateConfig's own checks come back in terms of the flags."""
  methods = {f.name: f.metadata["method"] for f in GENERATE_FLAGS} | {"seed": "sample"}
  for name, method in methods.items():
    if method and getattr(args, name) is not None and args.method != method:
      raise CLIError(f"--{name} requires --method {method} (got --method {args.method})")
  for name in ("batch_size", "max_input_length"):
    if getattr(args, name) < 1:
      raise CLIError(f"--{name} must be >= 1")
  if getattr(args, "return_token_scores", None) and args.output_format != "jsonl":
    raise CLIError("--return_token_scores needs --output_format jsonl (text output has no scores)")
  try:
    return GenerateConfig.from_strings({f.name: getattr(args, f.name) for f in GENERATE_FLAGS})
  except ValueError as e:
    raise CLIError(_flags(str(e), [f.name for f in GENERATE_FLAGS])) from e


# Flags that only generation reads: rank classification (--candidates) refuses them.
NOT_RANKING = [f.name for f in GENERATE_FLAGS] + ["seed", "decoder_prefix_column"]


def _flags(message: str, names) -> str:
  """A library message in terms of the flags: each of `names` (parameter names it uses) becomes
  `--name`, except inside a path or a quoted value."""
  alt = "|".join(sorted(names, key=len, reverse=True))
  return re.sub(rf"(?<![-\w'/.])({alt})(?![\w'/])(?!\.\w)", r"--\1", message)


@contextlib.contextmanager
def _named_as_flags(*names: str):
  """A library error raised within, printed in terms of the flags `names`."""
  try:
    yield
  except USER_ERRORS as e:
    raise CLIError(_flags(str(e), names)) from e


def load(args: argparse.Namespace):
  """(config, params, tokenizer) of --checkpoint (`t5jax.inference.load`), --dtype applied."""
  try:
    config, params, tokenizer = inference.load(args.checkpoint, args.tokenizer)
  except TokenizerNotFound as e:
    raise CLIError(f"{e}{'' if args.tokenizer else '; pass --tokenizer'}") from e
  dtype = args.dtype
  if args.quantize == "bf16":
    if args.dtype == "float32":
      raise CLIError("--quantize bf16 computes in bfloat16; drop --dtype float32")
    dtype = "bfloat16"
  return (config.replace(dtype=dtype) if dtype else config), params, tokenizer


def run(args: argparse.Namespace) -> int:
  given = getattr(args, "given", set())
  ranking = bool(args.candidates or args.candidates_column)
  for flag in NOT_RANKING if ranking else ():
    if flag in given:
      raise CLIError(
        f"--{flag} does not apply to rank classification (--candidates / --candidates_column "
        "score the candidates given; nothing is generated)"
      )
  if args.float_output_layer and not args.quantize:
    raise CLIError("--float_output_layer applies only with --quantize")
  gen_cfg = generate_config(args)
  columns = ("input_column", "decoder_prefix_column", "candidates", "candidates_column")
  with _named_as_flags(*columns, "input_format"):
    requests = inputs.read_requests(
      args.input_file, args.input_format, **{c: getattr(args, c) for c in columns}
    )
  if args.output_file and args.input_file and workdir.same_file(args.output_file, args.input_file):
    raise CLIError(f"--output_file {args.output_file} is the input file; write elsewhere")
  try:
    output = workdir.AtomicFile(args.output_file) if args.output_file else None
  except OSError as e:
    raise CLIError(f"cannot write {args.output_file}: {e.strerror or e}") from e
  try:
    body = _decode(args, gen_cfg, requests)
    if output is None:
      sys.stdout.write(body)
      sys.stdout.flush()
      return 0
    try:
      output.file.write(body)
      output.commit()
    except OSError as e:
      raise CLIError(f"cannot write {args.output_file}: {e.strerror or e} (left unchanged)") from e
  finally:
    if output is not None:
      output.discard()
  return 0


def _decode(args, gen_cfg: GenerateConfig, requests: inputs.Requests) -> str:
  """The output file's text: one line (or JSON object) per input."""
  texts, candidates = requests.texts, requests.candidates
  devices = jax.local_devices()
  try:
    mesh_cfg = sharding.MeshConfig(args.mesh_data, args.mesh_fsdp, args.mesh_tensor)
    mesh = sharding.create_mesh(mesh_cfg, devices)
  except ConfigError as e:
    n = f"{len(devices)} {devices[0].platform} devices"
    raise CLIError(f"bad --mesh_data/--mesh_fsdp/--mesh_tensor ({n}): {e}") from e
  shards = sharding.batch_shards(mesh)
  batch_size = -(-args.batch_size // shards) * shards
  if batch_size != args.batch_size:
    warn(f"--batch_size {args.batch_size} rounded up to {batch_size}, a multiple of the {shards} "
         "batch shards (mesh data x fsdp)")  # fmt: skip
  config, params, tokenizer = load(args)
  sizes = ("batch_size", "max_input_length", "max_new_tokens", "num_beams", "num_return_sequences")
  with _named_as_flags(*sizes, "strict", "bad_words_ids", "suppress_tokens"):
    enc = inference.encode_requests(
      tokenizer, config, texts, batch_size=batch_size, max_len=args.max_input_length,
      generate_config=None if candidates else gen_cfg, prefixes=requests.prefixes,
      candidates=candidates, strict=args.strict, given=getattr(args, "given", set()),
    )  # fmt: skip
  if enc.truncated:
    warn(f"truncated {enc.truncated} of {len(texts)} inputs to --max_input_length "
         f"{args.max_input_length} tokens")  # fmt: skip
  quantize = {"int8": "int8", "bf16": "bfloat16"}.get(args.quantize or "", "")
  params = inference.place(params, config, mesh, quantize=quantize,
                           output_layer=not args.float_output_layer)  # fmt: skip
  kw = dict(batch_size=batch_size, max_len=args.max_input_length)
  with tqdm(total=len(texts), file=sys.stderr, disable=args.no_progress, unit="ex") as bar:
    if candidates is not None:
      scores, best = inference.rank_all(params, config, enc.inputs, enc.candidates, **kw,
                                        on_batch=bar.update)  # fmt: skip
    else:
      token_scores: list | None = [] if gen_cfg.return_token_scores else None
      sequences, scores = inference.generate_all(
        params, config, enc.inputs, gen_cfg, **kw, rng=jax.random.key(args.seed or 0), mesh=mesh,
        on_batch=bar.update, prefixes=enc.prefixes, token_scores=token_scores,
      )  # fmt: skip
  if candidates is not None:
    rows = zip(texts, candidates, scores, best, strict=True)
    if args.output_format == "text":
      return "".join(g[b].replace("\n", " ") + "\n" for _, g, _, b in rows)
    keys = ("input", "candidates", "scores", "best")
    return "".join(_json(dict(zip(keys, row, strict=True))) for row in rows)
  outputs = [[tokenizer.decode(s.tolist()).replace("\n", " ") for s in seqs] for seqs in sequences]
  if args.output_format == "text":
    return "".join(o[0] + "\n" for o in outputs)
  records = []
  for i, text in enumerate(texts):
    record = {"input": text, "outputs": outputs[i], "scores": scores[i]}
    if token_scores is not None:  # each output's generated tokens, EOS included
      pairs = zip(sequences[i], token_scores[i], strict=True)
      record["token_scores"] = [ts[: inference.generated_length(seq)] for seq, ts in pairs]
    records.append(_json(record))
  return "".join(records)


def _json(record) -> str:
  """One JSONL line; numpy arrays as lists."""
  return json.dumps(record, ensure_ascii=False, default=lambda a: a.tolist()) + "\n"


def warn(message: str) -> None:
  print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except CLIError as e:
    message = str(e)
  except USER_ERRORS as e:  # the library's own one-line errors (a checkpoint, a file)
    message = str(e)
  print(f"{PROG}: error: {message}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main())
