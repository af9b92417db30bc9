"""What to decode, read from a file or stdin: texts, decoder prefixes and rank candidates.

Inputs are one per line (text), a named column of a TSV file with a header row, or a field of
JSONL objects. A file's extension says which (after an optional `.gz` / `.zst`); on stdin its
first non-blank line does: a JSON object means JSONL, tab-separated fields one of which names the
input column mean a TSV header, anything else text. Lines are read by `t5jax.sources.iter_lines`,
the reader the training data goes through, so invalid UTF-8, a corrupt gzip or zstd stream and a
bad JSON line are `DataError`s naming the file and line, as they are for training data.

`read_requests(...)` returns a `Requests` (texts, prefixes, candidate lists) or raises `DataError`
with one line; argument names in its messages are the parameters' own (decode.py spells them as
its flags). decode.py is its one caller; a program that builds its inputs itself passes token ids
to `t5jax.inference` directly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

from t5jax import sources
from t5jax.errors import DataError
from t5jax.sources import INPUT_COLUMNS

STDIN = "<stdin>"
FORMATS = ("auto", "text", "tsv", "jsonl")
COLUMN_ARGS = ("input_column", "decoder_prefix_column", "candidates_column")


@dataclasses.dataclass(frozen=True)
class Requests:
  """The inputs of one decode run, in order: `texts`; per text, the decoder prefix (or None) and
  the candidate texts of rank classification (or None)."""

  texts: list[str]
  prefixes: list[str] | None = None
  candidates: list[list[str]] | None = None


def read_lines(path: str | None) -> tuple[list[str], str]:
  """`(lines, name)` of a file (`.gz` / `.zst` decompressed), or of stdin when `path` is None."""
  name = path or STDIN
  try:
    if path is None:
      found = sources.iter_lines(name, file=sys.stdin.buffer)
    else:
      found = sources.iter_lines(path)
    return [line for _, line in found], name
  except OSError as e:
    raise DataError(f"cannot read {name}: {e.strerror or e}") from e


def _pick_column(columns: Sequence[str], wanted: str | None, where: str) -> str:
  if wanted is not None:
    if wanted not in columns:
      raise DataError(f"{where}: no column {wanted!r} (have {list(columns)})")
    return wanted
  for c in INPUT_COLUMNS:
    if c in columns:
      return c
  raise DataError(f"{where}: no input column among {list(columns)}; pass input_column")


def detect_format(lines: list[str], name: str, column: str | None) -> str:
  """What format "auto" means (module docstring); `column` is the input column's name (None: one
  of `INPUT_COLUMNS`)."""
  if name != STDIN:
    fmt = sources.split_extension(name)[0]
    return fmt if fmt in ("tsv", "jsonl") else "text"
  first = next((line for line in lines if line.strip()), "")
  try:
    if isinstance(json.loads(first), dict):
      return "jsonl"
  except ValueError:
    pass
  names = (column,) if column is not None else INPUT_COLUMNS
  if "\t" in first and any(field in names for field in first.split("\t")):
    return "tsv"
  return "text"


def parse_column(lines: list[str], name: str, fmt: str, column: str | None) -> list[str]:
  """The texts of one column, in order, from text / TSV (header row) / JSONL lines (`fmt` as
  `detect_format` resolves "auto"); `column` None: the first of `INPUT_COLUMNS` present."""
  if fmt == "text":
    texts = list(lines)
  elif fmt == "tsv":
    if not lines:
      raise DataError(f"{name}: empty input (no header row)")
    header = lines[0].split("\t")
    col = header.index(_pick_column(header, column, name))
    texts = []
    for number, line in enumerate(lines[1:], start=2):
      fields = line.split("\t")
      if len(fields) != len(header):
        raise DataError(f"{name}:{number}: {len(fields)} fields, header has {len(header)}")
      texts.append(fields[col])
  else:
    texts = []
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      where = f"{name}:{number}"
      obj = sources.json_object(line, where)
      key = _pick_column(list(obj), column, where)
      if not isinstance(obj[key], str):
        raise DataError(f"{where}: field {key!r} is not a string")
      texts.append(obj[key])
  if not texts:
    raise DataError(f"{name}: empty input (no lines to decode)")
  return texts


def _candidate_groups(
  lines: list[str], name: str, candidates: str | None, column: str | None
) -> tuple[list[list[str]], str]:
  if candidates:
    cand_lines, cand_name = read_lines(candidates)
    return [line.split("\t") for line in cand_lines], cand_name
  groups = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    value = sources.json_object(line, f"{name}:{number}").get(column)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
      raise DataError(f"{name}:{number}: field {column!r} is not a list of strings")
    groups.append(value)
  return groups, name


def read_requests(
  path: str | None,
  fmt: str = "auto",
  *,
  input_column: str | None = None,
  decoder_prefix_column: str | None = None,
  candidates: str | None = None,
  candidates_column: str | None = None,
) -> Requests:
  """The inputs of a decode run from `path` (None: stdin).

  Args:
    path: the input file, or None for stdin.
    fmt: "auto", "text", "tsv" or "jsonl" (the module docstring says what "auto" picks).
    input_column: the TSV / JSONL field of the inputs (default: the first of `INPUT_COLUMNS`).
    decoder_prefix_column: a field whose text is forced as the start of that row's output.
    candidates: a file with one line per input, its candidates separated by tabs (rank
      classification), or
    candidates_column: a JSONL field holding each input's candidates (a list of strings).

  Raises:
    DataError: one line naming the file and line, or the argument that cannot apply (a column
      of plain text, both candidate sources).
  """
  if fmt not in FORMATS:
    raise DataError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}")
  if candidates and candidates_column:
    raise DataError("pass candidates or candidates_column, not both")
  lines, name = read_lines(path)
  detected = fmt == "auto"
  if fmt == "auto":  # decided once, by the input column (the prefix column is another)
    fmt = detect_format(lines, name, input_column)
  columns = (input_column, decoder_prefix_column, candidates_column)
  if fmt == "text":  # one input per line: a column would be ignored (or misread)
    for arg, value in zip(COLUMN_ARGS, columns, strict=True):
      if value:
        why = ""
        if detected and path is None:
          why = " (its first line is neither a JSON object nor a TSV header naming the input)"
        raise DataError(
          f"{arg} {value}: {name} is read as plain text, one input per line with no columns"
          f"{why}; give a TSV with a header row or JSONL (.tsv / .jsonl, or input_format "
          "tsv|jsonl)"
        )
  texts = parse_column(lines, name, fmt, input_column)
  prefixes = None
  if decoder_prefix_column:
    prefixes = parse_column(lines, name, fmt, decoder_prefix_column)
  groups = None
  if candidates or candidates_column:
    groups, where = _candidate_groups(lines, name, candidates, candidates_column)
    if len(groups) != len(texts):
      raise DataError(f"{len(groups)} candidate lines for {len(texts)} inputs")
    for i, g in enumerate(groups):
      if not g or any(c == "" for c in g):
        raise DataError(f"{where}:{i + 1}: empty candidate list or empty candidate")
  return Requests(texts, prefixes, groups)
