"""Decode text with a T5 checkpoint: one output per input, in input order.

  python decode.py --checkpoint DIR [--input_file F] [--output_file G] [--method greedy|beam|sample]

DIR is a HuggingFace model folder or a t5jax training workdir. This file is flags and I/O only:
inputs are read by `t5jax.inputs`, encoded, checked, decoded (greedy, beam, sampling or rank
classification, on a mesh of this process's devices, optionally int8/bfloat16) by
`t5jax.inference`, formatted by `t5jax.outputs`, and written through `t5jax.workdir.AtomicFile`
(opened before the model loads, replaced only when complete). Bad input exits with status 2 and
one line naming the flag, file or line. Every flag, format and method: docs/decoding.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
from collections.abc import Sequence

import jax
from tqdm import tqdm

from t5jax import inference, inputs, outputs, sharding, workdir
from t5jax.errors import USER_ERRORS, ConfigError
from t5jax.generate import GenerateConfig
from t5jax.inference import TokenizerNotFound
from t5jax.sources import INPUT_COLUMNS

PROG = "decode.py"
EPILOG = "Every flag, format and method in detail: docs/decoding.md"
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
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=EPILOG)
  add = p.add_argument
  add("--checkpoint", required=True, help="HuggingFace model folder or t5jax workdir")
  add("--tokenizer", help="'byt5', a SentencePiece .model, or a folder holding one")
  add("--input_file", help="default: stdin")
  add("--output_file", help="default: stdout")
  add("--input_format", choices=inputs.FORMATS, default="auto", help="auto: by the file's "
      "extension (.tsv, .jsonl/.json, else text), or by stdin's first line")  # fmt: skip
  add("--input_column", help=f"TSV/JSONL field (default: first of {INPUT_COLUMNS})")
  add("--output_format", choices=outputs.FORMATS, default="text")
  add("--batch_size", type=int, default=16)
  add("--max_input_length", type=int, default=512)
  add("--strict", action="store_true", help="reject (not truncate) too-long inputs")
  _add_generate_flags(p)
  add("--seed", type=int, help="sampling seed (sample only)")
  add("--decoder_prefix_column", help="TSV/JSONL field whose text (no EOS) is forced as the "
      "start of that row's output; the output printed is what follows it (the prefix is not "
      "repeated)")  # fmt: skip
  add("--candidates", help="rank classification: a file, per input a line of tab-separated "
      "candidates")  # fmt: skip
  add("--candidates_column", help="rank classification: a JSONL field (list of strings)")
  add("--dtype", choices=("float32", "bfloat16"), help="computation dtype")
  add("--quantize", choices=("int8", "bf16"), help="weights converted once after loading: int8 "
      "per output channel, or bf16 computing in bfloat16 (docs/quantization.md)")  # fmt: skip
  add("--float_output_layer", action="store_true", help="with --quantize: output layer float")
  add("--no_progress", action="store_true", help="no progress bar on stderr")
  # Device mesh (t5jax.sharding); the product must equal the device count, -1 = the rest.
  add("--mesh_data", type=int, default=-1, help="data-parallel replicas (-1: the rest)")
  add("--mesh_fsdp", type=int, default=1, help="parameters split along embed")
  add("--mesh_tensor", type=int, default=1, help="heads/mlp/vocab split")
  args = p.parse_args(argv)
  # The flags given on the command line (whatever their values): parsed again without defaults.
  for action in p._actions:
    action.default, action.required = argparse.SUPPRESS, False
  args.given = set(vars(p.parse_args(argv)))
  args.candidates_given = bool(args.candidates or args.candidates_column)
  return args


def generate_config(args: argparse.Namespace) -> GenerateConfig:
  """The GenerateConfig of the flags, after the checks between flags: one that the method (or
  rank classification) would silently ignore is an error. GenerateConfig's own checks come back
  in terms of the flags."""
  ranking = [f for f in NOT_RANKING if f in args.given] if args.candidates_given else []
  if ranking:
    raise CLIError(
      f"--{ranking[0]} does not apply to rank classification (--candidates / "
      "--candidates_column score the given candidates; nothing is generated)"
    )
  methods = {f.name: f.metadata["method"] for f in GENERATE_FLAGS} | {"seed": "sample"}
  for name, method in methods.items():
    if method and getattr(args, name) is not None and args.method != method:
      raise CLIError(f"--{name} requires --method {method} (got --method {args.method})")
  for failed, message in [
    (args.batch_size < 1, "--batch_size must be >= 1"),
    (args.max_input_length < 1, "--max_input_length must be >= 1"),
    (args.return_token_scores and args.output_format != "jsonl",
     "--return_token_scores needs --output_format jsonl (text output has no scores)"),
    (args.float_output_layer and not args.quantize,
     "--float_output_layer applies only with --quantize"),
    (args.quantize == "bf16" and args.dtype == "float32",
     "--quantize bf16 computes in bfloat16; drop --dtype float32"),
  ]:  # fmt: skip
    if failed:
      raise CLIError(message)
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


def run(args: argparse.Namespace) -> int:
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
  if output is None:
    sys.stdout.write(_decode(args, gen_cfg, requests))
    return 0
  try:
    body = _decode(args, gen_cfg, requests)
    try:
      output.file.write(body)
      output.commit()
    except OSError as e:
      raise CLIError(f"cannot write {args.output_file}: {e.strerror or e} (left unchanged)") from e
  finally:
    output.discard()  # nothing once committed
  return 0


def _decode(args, gen_cfg: GenerateConfig, requests: inputs.Requests) -> str:
  """The output file's text: one line (or JSON object) per input."""
  texts, candidates = requests.texts, requests.candidates
  try:
    mesh_cfg = sharding.MeshConfig(args.mesh_data, args.mesh_fsdp, args.mesh_tensor)
    mesh, batch_size = inference.make_mesh(mesh_cfg, args.batch_size)
  except ConfigError as e:
    raise CLIError(f"bad --mesh_data/--mesh_fsdp/--mesh_tensor: {e}") from e
  if batch_size != args.batch_size:
    warn(f"--batch_size {args.batch_size} rounded up to {batch_size}, a multiple of the mesh's "
         "batch shards (data x fsdp)")  # fmt: skip
  try:
    config, params, tokenizer = inference.load(args.checkpoint, args.tokenizer)
  except TokenizerNotFound as e:
    raise CLIError(f"{e}{'' if args.tokenizer else '; pass --tokenizer'}") from e
  dtype = "bfloat16" if args.quantize == "bf16" else args.dtype
  config = config.replace(dtype=dtype) if dtype else config
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
      return outputs.ranked(texts, candidates, scores, best, args.output_format)
    token_scores: list | None = [] if gen_cfg.return_token_scores else None
    sequences, scores = inference.generate_all(
      params, config, enc.inputs, gen_cfg, **kw, rng=jax.random.key(args.seed or 0), mesh=mesh,
      on_batch=bar.update, prefixes=enc.prefixes, token_scores=token_scores,
    )  # fmt: skip
  return outputs.generated(tokenizer, texts, sequences, scores, args.output_format, token_scores)


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
