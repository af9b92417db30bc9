"""Decode text with a T5 checkpoint: one output per input, in input order.

  python decode.py --checkpoint DIR [--input_file F] [--output_file G] [--method greedy|beam|sample]

DIR is a HuggingFace model folder (config.json + model.safetensors, tokenizer spiece.model / a
.model / ByT5 marker) or a t5jax training workdir (both through `t5jax.inference.load`).
Inputs: one per line (text), or a named column of a TSV file with a header row or of JSONL
objects; a file's extension says which, on stdin its first line does (a JSON object: JSONL; a
tab-separated line with a field named as the input column: a TSV header; else text). Outputs:
the best sequence per line (text), or JSON objects with every returned sequence and its score
(jsonl). Inputs are grouped into power-of-two length buckets and fixed-size batches
(the last one padded), so the decoder compiles once per bucket.

`--quantize int8` decodes with int8 weights (per output channel, converted once after loading,
`t5jax.quantize`), `--quantize bf16` with bfloat16 weights and products; docs/quantization.md
has their accuracy and speed.

Several devices: the parameters are placed on a `("data", "fsdp", "tensor")` mesh of this
process's devices (`--mesh_data/--mesh_fsdp/--mesh_tensor`, `t5jax.sharding`; default plain data
parallelism over all of them, a no-op on one device) and each batch's rows are split over
data x fsdp, so a model too large for one device still decodes. Outputs equal a one-device run.

A decoder prefix (--decoder_prefix_column, a TSV/JSONL field) is forced as the start of that
row's output, and the output printed is what the model generates after it (the prefix is not
repeated, as `t5jax.generate` leaves it out of its sequences).

Bad input (missing or unreadable files, invalid UTF-8, no inputs, a checkpoint without weights or
tokenizer, a column flag on plain-text input, flags that the method or rank classification would
ignore, a length, beam count or batch whose memory cannot be allocated, a mesh that does not fit
the devices) exits with status 2 and a one-line error naming the flag, file or line.
--output_file is written to a temporary file (opened before the model loads, so an unwritable path
fails first) and renamed over it at the end; the input file itself is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence

import jax
from tqdm import tqdm

from t5jax import inference, sharding
from t5jax.errors import CheckpointError, ConfigError
from t5jax.generate import GenerateConfig, check_token_ids
from t5jax.inference import bucket_length as bucket_length  # noqa: F401 (decode.bucket_length)
from t5jax.inference import make_batches as make_batches  # noqa: F401 (decode.make_batches)
from t5jax.quantize import quantize
from t5jax.train_config import INPUT_COLUMNS, MeshConfig

PROG = "decode.py"
DEFAULT_COLUMNS = INPUT_COLUMNS  # the names a training TSV's header row may use too
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


def _token_lists(flag: str, text: str, kind: str):
  """'5 7;9' -> ((5, 7), (9,)) for kind "seqs", '5 7' -> (5, 7) for "ids" (commas allowed)."""
  try:
    seqs = [tuple(int(t) for t in part.replace(",", " ").split()) for part in text.split(";")]
  except ValueError as e:
    raise CLIError(f"--{flag}: token ids must be integers, got {text!r}") from e
  if kind == "ids":
    return tuple(t for seq in seqs for t in seq)
  return tuple(seqs) if any(seqs) else ()


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
    choices=("auto", "text", "tsv", "jsonl"),
    default="auto",
    help="auto: a file by its extension (.tsv, .jsonl/.json, else text); stdin by its first line "
    "(a JSON object: jsonl; tab-separated with a field named as the input column, i.e. a "
    "header: tsv; else text, one prompt per line)",
  )
  p.add_argument("--input_column", help=f"TSV/JSONL field (default: first of {DEFAULT_COLUMNS})")
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
  given = {f.name: getattr(args, f.name) for f in GENERATE_FLAGS}
  for f in GENERATE_FLAGS:  # flag spellings of non-string values, e.g. --early_stopping true
    if isinstance(f.metadata.get("choices"), dict) and given[f.name] is not None:
      given[f.name] = f.metadata["choices"][given[f.name]]
    if f.metadata.get("parse") and given[f.name] is not None:
      given[f.name] = _token_lists(f.name, given[f.name], f.metadata["parse"])
  try:
    return GenerateConfig(**{k: v for k, v in given.items() if v is not None})
  except ValueError as e:
    names = "|".join(f.name for f in GENERATE_FLAGS)
    raise CLIError(re.sub(rf"\b({names})\b", r"--\1", str(e))) from e


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
  if lines:
    lines[0] = lines[0].removeprefix("\ufeff")  # a UTF-8 byte order mark is not input
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


def detect_format(lines: list[str], name: str, column: str | None) -> str:
  """What --input_format auto means: a file's extension (.tsv; .jsonl or .json; else text); on
  stdin, the first non-blank line: a JSON object -> jsonl; tab-separated fields one of which is
  the input column's name (--input_column, else one of DEFAULT_COLUMNS) -> tsv; else text."""
  if name != "<stdin>":
    ext = os.path.splitext(name)[1].lower()
    return {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(ext, "text")
  first = next((line for line in lines if line.strip()), "")
  try:
    if isinstance(json.loads(first), dict):
      return "jsonl"
  except ValueError:
    pass
  names = (column,) if column is not None else DEFAULT_COLUMNS
  if "\t" in first and any(field in names for field in first.split("\t")):
    return "tsv"
  return "text"


def parse_inputs(lines: list[str], name: str, fmt: str, column: str | None) -> list[str]:
  """The input texts, in order, from text / TSV (header row) / JSONL lines (`fmt` as
  `detect_format` resolves "auto")."""
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


# --- devices ---------------------------------------------------------------------------------


def make_mesh(args: argparse.Namespace):
  """The `("data", "fsdp", "tensor")` mesh over this process's devices, from the --mesh_* flags."""
  devices = jax.local_devices()
  try:
    return sharding.create_mesh(
      MeshConfig(args.mesh_data, args.mesh_fsdp, args.mesh_tensor), devices
    )
  except ConfigError as e:
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


# --- output ----------------------------------------------------------------------------------


class Output:
  """Where the outputs go: stdout, or `--output_file` through a temporary file in its folder
  (opened before decoding, so an unwritable path fails first), renamed over it once complete."""

  def __init__(self, path: str | None):
    self.path, self.tmp, self._fh = path, None, None
    if path is None:
      return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise CLIError(f"output folder does not exist: {folder}")
    if os.path.isdir(path):
      raise CLIError(f"--output_file {path} is a folder")
    self.tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
      self._fh = open(self.tmp, "w", encoding="utf-8")
    except OSError as e:
      raise CLIError(f"cannot write {path}: {e.strerror or e}") from e

  def commit(self, body: str) -> None:
    if self.path is None:
      sys.stdout.write(body)
      sys.stdout.flush()
      return
    try:
      self._fh.write(body)
      self._fh.flush()
      os.fsync(self._fh.fileno())
      self._fh.close()
      os.replace(self.tmp, self.path)
    except OSError as e:
      raise CLIError(f"cannot write {self.path}: {e.strerror or e} (left unchanged)") from e
    self.tmp = None

  def discard(self) -> None:
    """Removes the temporary file of an unfinished run (the old output stays as it was)."""
    if self._fh is not None and not self._fh.closed:
      self._fh.close()
    if self.tmp is not None:
      try:
        os.remove(self.tmp)
      except OSError:
        pass
      self.tmp = None


def open_output(output_file: str | None, input_file: str | None) -> Output:
  """The `Output` of --output_file, refusing the input file itself."""
  if output_file and input_file and os.path.exists(output_file):
    if os.path.samefile(output_file, input_file):
      raise CLIError(f"--output_file {output_file} is the input file; write elsewhere")
  return Output(output_file)


def _device_bytes() -> int:
  """Memory of one local device (its allocator's limit; a CPU: the machine's RAM)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The defaults of the flags that size the decoder cache: the one raised furthest above its default
# is the one an error names.
_CACHE_DEFAULTS = dict(batch_size=16, num_beams=4, num_return_sequences=1, max_new_tokens=64)


def check_memory(config, gen_cfg: GenerateConfig, batch_size: int, given=frozenset()) -> None:
  """Refuses a decoder cache that cannot fit in one device's memory, naming the flag (of those
  given) that makes it too large: --max_new_tokens, --num_beams, --num_return_sequences or
  --batch_size."""
  factors = {"batch_size": batch_size}
  if gen_cfg.method == "beam":
    factors["num_beams"] = gen_cfg.num_beams
  elif gen_cfg.method == "sample":
    factors["num_return_sequences"] = gen_cfg.num_return_sequences
  factors["max_new_tokens"] = gen_cfg.max_new_tokens
  # Self-attention keys and values of every decoder layer, float32, per row and position.
  unit = config.num_decoder_layers * 2 * config.num_heads * config.d_kv * 4
  need = unit * math.prod(factors.values())
  limit = _device_bytes()
  if need <= limit:
    return
  raised = [f for f in factors if f in given and factors[f] > 1] or ["max_new_tokens"]
  lead = max(raised, key=lambda f: factors[f] / _CACHE_DEFAULTS[f])
  most = max(1, limit // (need // factors[lead]))
  sizes = " x ".join(f"--{f} {v}" for f, v in factors.items())
  raise CLIError(
    f"--{lead} {factors[lead]} cannot be allocated: the decoder cache of {sizes} would take "
    f"{need / 2**30:.1f} GiB of the device's {limit / 2**30:.1f} GiB (at most {most} with the "
    "other settings as they are)"
  )


def check_input_memory(config, token_ids, batch_size: int, max_input_length: int, given) -> None:
  """Refuses inputs whose encoder attention cannot fit in one device's memory: the scores of one
  layer (float32 [batch, heads, S, S]), the position bias ([heads, S, S]) and the decoder's cross-
  attention keys and values, at S the longest input's bucket (at most --max_input_length)."""
  longest = max(len(ids) for ids in token_ids)
  s = bucket_length(longest, max_input_length)
  cross = batch_size * config.num_decoder_layers * 2 * config.num_heads * config.d_kv * 4

  def need(n: int) -> int:
    return 4 * config.num_heads * (batch_size + 1) * n * n + cross * n

  limit = _device_bytes()
  if need(s) <= limit:
    return
  most = s
  while most > 1 and need(most) > limit:
    most = int(most * 0.9)
  blame_batch = "batch_size" in given and "max_input_length" not in given
  lead = f"--batch_size {batch_size}" if blame_batch else f"--max_input_length {max_input_length}"
  raise CLIError(
    f"{lead} cannot be allocated: the encoder's attention over {s} tokens (the longest input has "
    f"{longest}) at --batch_size {batch_size} would take {need(s) / 2**30:.1f} GiB of the "
    f"device's {limit / 2**30:.1f} GiB (about {most} tokens fit; a lower --max_input_length "
    "truncates longer inputs)"
  )


def check_ids(token_lists, vocab_size: int, what: str) -> None:
  """`t5jax.generate.check_token_ids` on each input's token list (numbered from 1)."""
  for number, ids in enumerate(token_lists, start=1):
    try:
      check_token_ids(ids, vocab_size, f"{what} {number}: token")
    except (TypeError, ValueError) as e:
      raise CLIError(f"{e} (is the tokenizer the model's?)") from e


# --- main --------------------------------------------------------------------------------------


def load(args: argparse.Namespace):
  """(config, params, tokenizer) of --checkpoint (`t5jax.inference.load`), errors as CLIError."""
  try:
    config, params, tokenizer = inference.load(args.checkpoint, args.tokenizer)
  except inference.TokenizerNotFound as e:
    raise CLIError(f"{e}{'' if args.tokenizer else '; pass --tokenizer'}") from e
  except CheckpointError as e:
    raise CLIError(str(e)) from e
  if args.quantize == "bf16":
    if args.dtype == "float32":
      raise CLIError("--quantize bf16 computes in bfloat16; drop --dtype float32")
    return config.replace(dtype="bfloat16"), params, tokenizer
  return (config.replace(dtype=args.dtype) if args.dtype else config), params, tokenizer


def quantize_params(args: argparse.Namespace, config, params):
  """--quantize: the placed parameters converted once (`t5jax.quantize`), or as they are."""
  if args.float_output_layer and not args.quantize:
    raise CLIError("--float_output_layer applies only with --quantize")
  if not args.quantize:
    return params
  mode = "bfloat16" if args.quantize == "bf16" else "int8"
  return quantize(params, config, mode, output_layer=not args.float_output_layer)


def read_candidates(args: argparse.Namespace, lines: list[str], name: str, n: int):
  """Candidate texts per input from --candidates FILE (tab-separated) or --candidates_column."""
  if args.candidates and args.candidates_column:
    raise CLIError("pass --candidates or --candidates_column, not both")
  if args.candidates:
    cand_lines, cand_name = read_lines(args.candidates)
    groups = [line.split("\t") for line in cand_lines]
    where = lambda i: f"{cand_name}:{i + 1}"
  else:
    groups, where = [], lambda i: f"{name}:{i + 1}"
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        value = json.loads(line).get(args.candidates_column)
      except (ValueError, AttributeError) as e:
        raise CLIError(f"{name}:{number}: invalid JSON object ({e})") from e
      if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise CLIError(
          f"{name}:{number}: field {args.candidates_column!r} is not a list of strings"
        )
      groups.append(value)
  if len(groups) != n:
    raise CLIError(f"{len(groups)} candidate lines for {n} inputs")
  for i, g in enumerate(groups):
    if not g or any(c == "" for c in g):
      raise CLIError(f"{where(i)}: empty candidate list or empty candidate")
  return groups


def _drop_eos(ids: list[int], eos: int = 1) -> list[int]:
  return ids[:-1] if ids and ids[-1] == eos else ids


# Flags that only generation reads: rank classification (--candidates) refuses them.
NOT_RANKING = [f.name for f in GENERATE_FLAGS] + ["seed", "decoder_prefix_column"]
COLUMN_FLAGS = ("input_column", "decoder_prefix_column", "candidates_column")


def run(args: argparse.Namespace) -> int:
  given = getattr(args, "given", set())
  ranking = bool(args.candidates or args.candidates_column)
  if ranking:
    for flag in NOT_RANKING:
      if flag in given:
        raise CLIError(
          f"--{flag} does not apply to rank classification (--candidates / "
          "--candidates_column score the candidates given; nothing is generated)"
        )
  gen_cfg = generate_config(args)
  lines, name = read_lines(args.input_file)
  fmt = args.input_format
  if fmt == "auto":  # decided once, by the input column (the prefix column is another)
    fmt = detect_format(lines, name, args.input_column)
  if fmt == "text":  # one input per line: a column flag would be ignored (or misread)
    for flag in COLUMN_FLAGS:
      if getattr(args, flag):
        why = ""
        if args.input_format == "auto" and name == "<stdin>":
          why = " (its first line is neither a JSON object nor a TSV header naming the input)"
        raise CLIError(
          f"--{flag} {getattr(args, flag)}: {name} is read as plain text, one input per line with "
          f"no columns{why}; give a TSV with a header row or JSONL (.tsv / .jsonl, or "
          "--input_format tsv|jsonl)"
        )
  texts = parse_inputs(lines, name, fmt, args.input_column)
  candidates = read_candidates(args, lines, name, len(texts)) if ranking else None
  prefixes = None
  if args.decoder_prefix_column:
    prefixes = parse_inputs(lines, name, fmt, args.decoder_prefix_column)
  output = open_output(args.output_file, args.input_file)
  try:
    return _decode_and_write(args, gen_cfg, texts, output, candidates, prefixes)
  finally:
    output.discard()


def _decode_and_write(
  args, gen_cfg: GenerateConfig, texts: list[str], output: Output, candidates, prefixes
) -> int:
  ranking = candidates is not None
  mesh = make_mesh(args)
  batch_size = round_batch_size(args.batch_size, mesh)
  config, params, tokenizer = load(args)
  given = getattr(args, "given", set())
  if not ranking:
    check_memory(config, gen_cfg, batch_size, given)
  ids = [t for w in gen_cfg.bad_words_ids or () for t in w] + list(gen_cfg.suppress_tokens or ())
  if any(t >= config.vocab_size for t in ids):
    raise CLIError(
      f"--bad_words_ids/--suppress_tokens: ids must be < the vocabulary size {config.vocab_size}"
    )
  token_ids = encode_inputs(tokenizer, texts, args.max_input_length, args.strict)
  check_ids(token_ids, config.vocab_size, "input")
  check_input_memory(config, token_ids, batch_size, args.max_input_length, given)
  params = jax.device_put(params, sharding.param_shardings(config, mesh))
  params = quantize_params(args, config, params)
  with tqdm(total=len(texts), file=sys.stderr, disable=args.no_progress, unit="ex") as bar:
    if ranking:
      cand_ids = [[list(tokenizer.encode(c)) for c in g] for g in candidates]
      check_ids(cand_ids, config.vocab_size, "candidates of input")
      rank_scores, best = inference.rank_all(
        params, config, token_ids, cand_ids, batch_size=batch_size,
        max_len=args.max_input_length, on_batch=bar.update,
      )  # fmt: skip
    else:
      prefix_ids = None
      if prefixes is not None:
        prefix_ids = [_drop_eos(list(tokenizer.encode(t))) for t in prefixes]
        check_ids(prefix_ids, config.vocab_size, "prefix of input")
      token_scores: list = []
      sequences, scores = inference.generate_all(
        params, config, token_ids, gen_cfg, batch_size=batch_size, max_len=args.max_input_length,
        rng=jax.random.key(args.seed or 0), mesh=mesh, on_batch=bar.update, prefixes=prefix_ids,
        token_scores=token_scores if gen_cfg.return_token_scores else None,
      )  # fmt: skip
  if ranking:
    if args.output_format == "text":
      body = "".join(g[b].replace("\n", " ") + "\n" for g, b in zip(candidates, best, strict=True))
    else:
      body = "".join(
        json.dumps(
          {"input": t, "candidates": g, "scores": s.tolist(), "best": b}, ensure_ascii=False
        )
        + "\n"
        for t, g, s, b in zip(texts, candidates, rank_scores, best, strict=True)
      )
    output.commit(body)
    return 0
  results = [
    ([tokenizer.decode(s.tolist()).replace("\n", " ") for s in seqs], sc.tolist())
    for seqs, sc in zip(sequences, scores, strict=True)
  ]

  if args.output_format == "text":
    body = "".join(outputs[0] + "\n" for outputs, _ in results)
  else:
    records = []
    for i, (t, (o, s)) in enumerate(zip(texts, results, strict=True)):
      record = {"input": t, "outputs": o, "scores": s}
      if gen_cfg.return_token_scores:  # each output's generated tokens, EOS included
        record["token_scores"] = [
          ts[: len(inference_length(seq))].tolist()
          for seq, ts in zip(sequences[i], token_scores[i], strict=True)
        ]
      records.append(json.dumps(record, ensure_ascii=False) + "\n")
    body = "".join(records)
  output.commit(body)
  return 0


def inference_length(seq) -> list[int]:
  """The generated tokens of a returned sequence: up to and including the first EOS."""
  seq = list(seq)
  return seq[: seq.index(1) + 1] if 1 in seq else seq


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except CLIError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
