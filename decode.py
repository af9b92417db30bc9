"""Decode text with a T5 checkpoint: one output per input, in input order.

  python decode.py --checkpoint DIR [--input_file F] [--output_file G] [--method greedy|beam|sample]

DIR is a HuggingFace model folder (config.json + model.safetensors, tokenizer spiece.model / a
.model / ByT5 marker) or a t5jax training workdir (through `t5jax.checkpoint.load_for_inference`).
Inputs: one per line (text), or a named column of a TSV file with a header row or of JSONL
objects. Outputs: the best sequence per line (text), or JSON objects with every returned sequence
and its score (jsonl). Inputs are grouped into power-of-two length buckets and fixed-size batches
(the last one padded), so the decoder compiles once per bucket.

Several devices: the parameters are placed on a `("data", "fsdp", "tensor")` mesh of this
process's devices (`--mesh_data/--mesh_fsdp/--mesh_tensor`, `t5jax.sharding`; default plain data
parallelism over all of them, a no-op on one device) and each batch's rows are split over
data x fsdp, so a model too large for one device still decodes. Outputs equal a one-device run.

Bad input (missing or unreadable files, invalid UTF-8, no inputs, a checkpoint without weights or
tokenizer, incompatible flags, a mesh that does not fit the devices) exits with status 2 and a
one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

PROG = "decode.py"
DEFAULT_COLUMNS = ("inputs", "input", "text", "source")


class CLIError(Exception):
  """A user error reported as one line on stderr with exit status 2."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="HuggingFace model folder or t5jax workdir")
  p.add_argument("--tokenizer", help="'byt5', a SentencePiece .model, or a folder holding one")
  p.add_argument("--input_file", help="default: stdin")
  p.add_argument("--output_file", help="default: stdout")
  p.add_argument("--input_format", choices=("auto", "text", "tsv", "jsonl"), default="auto")
  p.add_argument("--input_column", help=f"TSV/JSONL field (default: first of {DEFAULT_COLUMNS})")
  p.add_argument("--output_format", choices=("text", "jsonl"), default="text")
  p.add_argument("--method", choices=("greedy", "beam", "sample"), default="greedy")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--max_input_length", type=int, default=512)
  p.add_argument("--strict", action="store_true", help="reject (not truncate) too-long inputs")
  p.add_argument("--num_return_sequences", type=int, default=1)
  # Beam search only (None = not given, so that misuse is detected).
  p.add_argument("--num_beams", type=int)
  p.add_argument("--length_penalty", type=float)
  p.add_argument("--early_stopping", choices=("true", "false", "never"))
  # Sampling only.
  p.add_argument("--temperature", type=float)
  p.add_argument("--top_k", type=int)
  p.add_argument("--top_p", type=float)
  p.add_argument("--seed", type=int)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="computation dtype")
  p.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
  # Device mesh (t5jax.sharding); the product must equal the device count, -1 = the rest.
  p.add_argument("--mesh_data", type=int, default=-1, help="data-parallel replicas (-1: the rest)")
  p.add_argument("--mesh_fsdp", type=int, default=1, help="parameters split along embed")
  p.add_argument("--mesh_tensor", type=int, default=1, help="heads/mlp/vocab split")
  return p.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
  """Rejects flag combinations that would be silently ignored."""
  beam_flags = ("num_beams", "length_penalty", "early_stopping")
  sample_flags = ("temperature", "top_k", "top_p", "seed")
  for name in beam_flags:
    if getattr(args, name) is not None and args.method != "beam":
      raise CLIError(f"--{name} requires --method beam (got --method {args.method})")
  for name in sample_flags:
    if getattr(args, name) is not None and args.method != "sample":
      raise CLIError(f"--{name} requires --method sample (got --method {args.method})")
  for name in ("max_new_tokens", "batch_size", "max_input_length", "num_return_sequences"):
    if getattr(args, name) < 1:
      raise CLIError(f"--{name} must be >= 1")
  if args.method == "greedy" and args.num_return_sequences > 1:
    raise CLIError("--num_return_sequences > 1 requires --method beam or sample")
  num_beams = 4 if args.num_beams is None else args.num_beams
  if args.method == "beam" and not 1 <= args.num_return_sequences <= num_beams:
    raise CLIError(f"--num_return_sequences must be <= --num_beams ({num_beams})")
  if args.temperature is not None and not args.temperature > 0:
    raise CLIError("--temperature must be > 0")
  if args.top_k is not None and args.top_k < 0:
    raise CLIError("--top_k must be >= 0 (0 disables)")
  if args.top_p is not None and not 0 < args.top_p <= 1:
    raise CLIError("--top_p must be in (0, 1] (1 disables)")


# --- input -----------------------------------------------------------------------------------


def read_lines(path: str | None) -> tuple[list[str], str]:
  """Lines of a file (or stdin) as strings; invalid UTF-8 is an error naming its line."""
  name = path or "<stdin>"
  try:
    if path is None:
      data = sys.stdin.buffer.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except OSError as e:
    raise CLIError(f"cannot read {name}: {e.strerror or e}") from e
  lines = []
  for number, raw in enumerate(data.split(b"\n"), start=1):
    raw = raw.removesuffix(b"\r")
    try:
      lines.append(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise CLIError(f"{name}:{number}: invalid UTF-8 ({e.reason} at byte {e.start})") from e
  if lines and lines[-1] == "":
    lines.pop()  # the final newline ends the last line; it does not start an empty one
  return lines, name


def _pick_column(columns: Sequence[str], wanted: str | None, where: str) -> str:
  if wanted is not None:
    if wanted not in columns:
      raise CLIError(f"{where}: no column {wanted!r} (have {list(columns)})")
    return wanted
  for c in DEFAULT_COLUMNS:
    if c in columns:
      return c
  raise CLIError(f"{where}: no input column among {list(columns)}; pass --input_column")


def parse_inputs(lines: list[str], name: str, fmt: str, column: str | None) -> list[str]:
  """The input texts, in order, from text / TSV (header row) / JSONL lines."""
  if fmt == "auto":
    ext = os.path.splitext(name)[1].lower()
    fmt = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(ext, "text")
  if fmt == "text":
    texts = lines
  elif fmt == "tsv":
    if not lines:
      raise CLIError(f"{name}: empty input (no header row)")
    header = lines[0].split("\t")
    col = header.index(_pick_column(header, column, name))
    texts = []
    for number, line in enumerate(lines[1:], start=2):
      fields = line.split("\t")
      if len(fields) != len(header):
        raise CLIError(f"{name}:{number}: {len(fields)} fields, header has {len(header)}")
      texts.append(fields[col])
  else:
    texts = []
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise CLIError(f"{name}:{number}: invalid JSON ({e})") from e
      if not isinstance(obj, dict):
        raise CLIError(f"{name}:{number}: expected a JSON object")
      key = _pick_column(list(obj), column, f"{name}:{number}")
      if not isinstance(obj[key], str):
        raise CLIError(f"{name}:{number}: field {key!r} is not a string")
      texts.append(obj[key])
  if not texts:
    raise CLIError(f"{name}: empty input (no lines to decode)")
  return texts


def encode_inputs(tokenizer, texts, max_len: int, strict: bool) -> list[list[int]]:
  """Token ids per text, truncated to `max_len` (keeping the final EOS) or rejected if strict."""
  out, long_lines = [], []
  for number, text in enumerate(texts, start=1):
    ids = list(tokenizer.encode(text))
    if len(ids) > max_len:
      long_lines.append(number)
      ids = ids[: max_len - 1] + [ids[-1]]
    out.append(ids)
  if long_lines and strict:
    raise CLIError(
      f"input {long_lines[0]} is longer than --max_input_length {max_len} tokens "
      f"({len(long_lines)} inputs in all; drop --strict to truncate)"
    )
  if long_lines:
    print(
      f"{PROG}: warning: truncated {len(long_lines)} of {len(texts)} inputs to "
      f"--max_input_length {max_len} tokens",
      file=sys.stderr,
    )
  return out


# --- checkpoint --------------------------------------------------------------------------------


def _has_hf_weights(folder: str) -> bool:
  names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
  return any(os.path.exists(os.path.join(folder, n)) for n in names)


def load_checkpoint(path: str, tokenizer_path: str | None):
  """(config, params, tokenizer) from a HuggingFace folder or a t5jax workdir."""
  from t5jax.hf import load_hf
  from t5jax.tokenizer import load_tokenizer

  if not os.path.isdir(path):
    raise CLIError(f"checkpoint folder not found: {path}")
  if os.path.exists(os.path.join(path, "config.json")):
    if not _has_hf_weights(path):
      raise CLIError(f"{path}: config.json but no weights (model.safetensors)")
    try:
      config, params = load_hf(path)
    except (OSError, ValueError) as e:
      raise CLIError(f"cannot load {path}: {e}") from e
    found_tokenizer = path
  else:
    try:
      from t5jax.checkpoint import load_for_inference
    except ImportError as e:
      raise CLIError(
        f"{path}: no config.json + model.safetensors, and t5jax.checkpoint.load_for_inference "
        "is unavailable to read a t5jax workdir"
      ) from e
    try:
      config, params, found_tokenizer = load_for_inference(path)
    except (OSError, ValueError, KeyError) as e:
      raise CLIError(f"cannot load t5jax workdir: {e}") from e
  source = tokenizer_path or found_tokenizer
  if source is None:
    raise CLIError(f"{path}: no tokenizer found; pass --tokenizer")
  try:
    tokenizer = load_tokenizer(source)
  except (OSError, ValueError) as e:
    hint = "" if tokenizer_path else "; pass --tokenizer"
    raise CLIError(f"no tokenizer in {source}: {e}{hint}") from e
  if tokenizer.vocab_size > config.vocab_size:
    raise CLIError(
      f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's ({config.vocab_size})"
    )
  return config, params, tokenizer


# --- batching ------------------------------------------------------------------------------------


def bucket_length(n: int, max_len: int, minimum: int = 8) -> int:
  """Smallest power of two >= n (at least `minimum`), capped at `max_len`."""
  b = minimum
  while b < n:
    b *= 2
  return min(b, max_len)


def make_batches(token_ids: list[list[int]], batch_size: int, max_len: int):
  """Yields (row indices, int32 [batch_size, bucket]) batches; padding rows have index -1.

  Inputs are sorted by length so each batch has one bucket length; the last batch of a bucket is
  filled with copies of a one-token input, so shapes repeat and compile once per bucket.
  """
  order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
  buckets: dict[int, list[int]] = {}
  for i in order:
    buckets.setdefault(bucket_length(len(token_ids[i]), max_len), []).append(i)
  for length, rows in sorted(buckets.items()):
    for start in range(0, len(rows), batch_size):
      idx = rows[start : start + batch_size]
      batch = np.zeros((batch_size, length), np.int32)
      batch[:, 0] = 1  # padding rows: a lone EOS
      for r, i in enumerate(idx):
        batch[r, : len(token_ids[i])] = token_ids[i]
      yield idx + [-1] * (batch_size - len(idx)), batch


# --- devices ---------------------------------------------------------------------------------


def make_mesh(args: argparse.Namespace):
  """The `("data", "fsdp", "tensor")` mesh over this process's devices, from the --mesh_* flags."""
  import jax

  from t5jax import sharding

  cfg = sharding.default_mesh_config()
  cfg.data, cfg.fsdp, cfg.tensor = args.mesh_data, args.mesh_fsdp, args.mesh_tensor
  devices = jax.local_devices()
  try:
    return sharding.create_mesh(cfg, devices)
  except ValueError as e:
    raise CLIError(
      f"bad --mesh_data/--mesh_fsdp/--mesh_tensor ({len(devices)} "
      f"{devices[0].platform} devices): {e}"
    ) from e


def round_batch_size(batch_size: int, mesh) -> int:
  """--batch_size rounded up to a multiple of the batch shards (data x fsdp), with a warning."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rounded = -(-batch_size // shards) * shards
  if rounded != batch_size:
    print(
      f"{PROG}: warning: --batch_size {batch_size} rounded up to {rounded}, a multiple of the "
      f"{shards} batch shards (mesh data x fsdp)",
      file=sys.stderr,
    )
  return rounded


# --- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
  check_flags(args)
  lines, name = read_lines(args.input_file)
  texts = parse_inputs(lines, name, args.input_format, args.input_column)
  if args.output_file:
    out_dir = os.path.dirname(os.path.abspath(args.output_file))
    if not os.path.isdir(out_dir):
      raise CLIError(f"output folder does not exist: {out_dir}")

  import jax
  from tqdm import tqdm

  from t5jax import sharding
  from t5jax.generate import generate

  mesh = make_mesh(args)
  batch_size = round_batch_size(args.batch_size, mesh)
  config, params, tokenizer = load_checkpoint(args.checkpoint, args.tokenizer)
  if args.dtype:
    config = config.replace(dtype=args.dtype)
  token_ids = encode_inputs(tokenizer, texts, args.max_input_length, args.strict)
  params = jax.device_put(params, sharding.param_shardings(config, mesh))
  inputs_sharding = sharding.batch_sharding(mesh)
  kwargs = dict(
    method=args.method,
    max_new_tokens=args.max_new_tokens,
    num_return_sequences=args.num_return_sequences,
  )
  if args.method == "beam":
    kwargs.update(
      num_beams=4 if args.num_beams is None else args.num_beams,
      length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
      early_stopping={"true": True, "false": False, "never": "never", None: False}[
        args.early_stopping
      ],
    )
  if args.method == "sample":
    kwargs.update(
      temperature=1.0 if args.temperature is None else args.temperature,
      top_k=0 if args.top_k is None else args.top_k,
      top_p=1.0 if args.top_p is None else args.top_p,
    )
  rng = jax.random.key(0 if args.seed is None else args.seed)
  results: list = [None] * len(texts)
  n = args.num_return_sequences
  with tqdm(total=len(texts), file=sys.stderr, disable=args.no_progress, unit="ex") as bar:
    for k, (idx, batch) in enumerate(make_batches(token_ids, batch_size, args.max_input_length)):
      with jax.set_mesh(mesh):
        batch = jax.device_put(batch, inputs_sharding)
        out = generate(params, config, batch, rng=jax.random.fold_in(rng, k), **kwargs)
      seqs = np.asarray(out.sequences).reshape(len(idx), n, -1)
      scores = np.asarray(out.scores).reshape(len(idx), n)
      for r, i in enumerate(idx):
        if i >= 0:
          outputs = [tokenizer.decode(s.tolist()).replace("\n", " ") for s in seqs[r]]
          results[i] = (outputs, scores[r].tolist())
      bar.update(sum(i >= 0 for i in idx))

  if args.output_format == "text":
    body = "".join(outputs[0] + "\n" for outputs, _ in results)
  else:
    body = "".join(
      json.dumps({"input": t, "outputs": o, "scores": s}, ensure_ascii=False) + "\n"
      for t, (o, s) in zip(texts, results, strict=True)
    )
  if args.output_file:
    try:
      with open(args.output_file, "w", encoding="utf-8") as f:
        f.write(body)
    except OSError as e:
      raise CLIError(f"cannot write {args.output_file}: {e.strerror or e}") from e
  else:
    sys.stdout.write(body)
    sys.stdout.flush()
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except CLIError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
