"""Reading corpora lazily: file specs, formats, compression, and one-line errors naming the record.

A *spec* names the files of one split: a file, a comma-separated list, a glob (`shards/*.jsonl.gz`)
or a directory (every regular, non-hidden file in it, sorted). Formats, by extension after an
optional `.gz` / `.zst`:

  `.tsv`                       input<TAB>target lines (an optional header row naming the columns)
  `.jsonl` / `.json`           one JSON object per line
  `.txt` (or anything else)    one document per non-blank line
  `.parquet`                   rows with named string columns (read a row group at a time)
  `.arrayrecord` / `.array_record`  records of UTF-8 JSON objects (random access)

Every reader yields `(index, value)` with `index` the record's position in its file (the line
number minus one for line formats, the row for Parquet and ArrayRecord), so a stream can stop and
resume at any record and errors say `file:line:`. `value` is an `(input, target)` pair for
`kind="pairs"` or a document string for `kind="text"`. Nothing is read before it is needed.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from t5jax.errors import DataError

FORMATS = ("tsv", "jsonl", "text", "parquet", "arrayrecord")
_EXTENSIONS = {
  ".tsv": "tsv",
  ".jsonl": "jsonl",
  ".json": "jsonl",
  ".txt": "text",
  ".text": "text",
  ".parquet": "parquet",
  ".arrayrecord": "arrayrecord",
  ".array_record": "arrayrecord",
}
_COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# Names a TSV header row gives its columns (see `is_tsv_header`).
INPUT_COLUMNS = ("inputs", "input", "text", "source")
TARGET_COLUMNS = ("targets", "target", "label", "output")


class Fields(NamedTuple):
  """Which fields hold the text: `input`/`target` for pairs, `text` for documents."""

  input: str = "input"
  target: str = "target"
  text: str = "text"


DEFAULT_FIELDS = Fields()


# ------------------------------------------------------------------------------------------------
# Files.


def _has_magic(path: str) -> bool:
  return any(c in path for c in "*?[")


def resolve_files(spec: str | Sequence[str], what: str = "data") -> list[str]:
  """The files a spec names, in a stable order (each glob and directory sorted).

  Args:
    spec: a path, a comma-separated list of paths, a glob or a directory (or a sequence of them).
    what: the flag or field the spec came from, for the error message.

  Raises:
    DataError naming `what` and the part that matched nothing.
  """
  parts = [spec] if isinstance(spec, str) else list(spec)
  parts = [p.strip() for part in parts for p in part.split(",") if p.strip()]
  if not parts:
    raise DataError(f"{what}: no data file given")
  files: list[str] = []
  for part in parts:
    if _has_magic(part):
      found = sorted(p for p in glob.glob(part, recursive=True) if os.path.isfile(p))
      if not found:
        raise DataError(f"{what}: {part}: the pattern matches no file")
      files += found
    elif os.path.isdir(part):
      found = sorted(
        os.path.join(part, n)
        for n in os.listdir(part)
        if not n.startswith((".", "_")) and os.path.isfile(os.path.join(part, n))
      )
      if not found:
        raise DataError(f"{what}: {part}: the directory holds no data file")
      files += found
    elif os.path.isfile(part):
      files.append(part)
    else:
      raise DataError(f"{what}: {part}: no such data file")
  return files


def split_extension(path: str) -> tuple[str, str]:
  """(format, compression) of a file name: compression "", "gzip" or "zstd"."""
  stem, ext = os.path.splitext(path.lower())
  compression = _COMPRESSIONS.get(ext, "")
  if compression:
    stem, ext = os.path.splitext(stem)
  return _EXTENSIONS.get(ext, "text"), compression


def detect_format(path: str, fmt: str = "auto") -> str:
  """The format of `path`: `fmt` unless it is "auto", else from the extension."""
  if fmt != "auto":
    if fmt not in FORMATS:
      raise DataError(f"{path}: unknown format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    return fmt
  return split_extension(path)[0]


def _open_binary(path: str) -> io.BufferedIOBase:
  compression = split_extension(path)[1]
  if compression == "gzip":
    return gzip.open(path, "rb")
  if compression == "zstd":
    import zstandard

    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
  return open(path, "rb")


def _decode(raw: bytes, path: str, line: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_lines(
  path: str,
  start: int = 0,
  offset: int | None = None,
  progress: dict | None = None,
  *,
  file: io.BufferedIOBase | None = None,
) -> Iterator[tuple[int, str]]:
  """`(line index, text)` of every line from line `start` on (newline, CR and BOM dropped).

  Args:
    path: the file (`.gz` / `.zst` are decompressed).
    start: the first line index to yield.
    offset: the byte offset of line `start` in an uncompressed file (from `progress`), to seek
      there instead of scanning the lines before it; ignored for compressed files, which are
      decompressed from their start (the lines before `start` skipped without decoding).
    progress: a dict whose "offset" is kept at the byte offset after the last yielded line
      (None for compressed files).
    file: read this binary file (stdin) instead of opening `path`, which then only names it.

  Raises DataError `file:line:` on invalid UTF-8 and `file:` on corrupt compression.
  """
  compressed = file is None and bool(split_extension(path)[1])
  n, pos = -1, 0
  if progress is not None:
    progress["offset"] = None
  with contextlib.nullcontext(file) if file is not None else _open_binary(path) as f:
    if offset is not None and not compressed and start > 0:
      f.seek(offset)
      n, pos = start - 1, offset
    lines = iter(f)
    while True:
      try:
        raw = next(lines)
      except StopIteration:
        return
      except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated file after line {n + 1} ({e})") from None
      except Exception as e:  # zstandard.ZstdError has no common base with the above
        if type(e).__module__.startswith("zstandard"):
          raise DataError(f"{path}: corrupt zstd data after line {n + 1} ({e})") from None
        raise
      n += 1
      pos += len(raw)
      if n < start:
        continue
      if progress is not None and not compressed:
        progress["offset"] = pos
      raw = raw.rstrip(b"\n").removesuffix(b"\r")
      if n == 0:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
      yield n, _decode(raw, path, n + 1)


# ------------------------------------------------------------------------------------------------
# Parsing one record.


def is_tsv_header(fields: Sequence[str], input_name: str = "", target_name: str = "") -> bool:
  """True when a TSV line's two fields name an input and a target column (`INPUT_COLUMNS`,
  `TARGET_COLUMNS` or the given names): the file's header row, not an example."""
  return (
    len(fields) == 2
    and fields[0].strip() in (*INPUT_COLUMNS, input_name)
    and fields[1].strip() in (*TARGET_COLUMNS, target_name)
  )


def _tsv_pair(line: str, where: str) -> tuple[str, str]:
  fields = line.split("\t")
  if len(fields) != 2:
    raise DataError(f"{where}: expected 2 tab-separated fields (input, target), got {len(fields)}")
  if not fields[0].strip():
    raise DataError(f"{where}: empty input")
  return fields[0], fields[1]


def _field(obj: dict, name: str, where: str) -> str:
  if name not in obj:
    raise DataError(f"{where}: missing field {name!r} (has {sorted(obj)})")
  value = obj[name]
  if not isinstance(value, str):
    raise DataError(f"{where}: field {name!r} is {type(value).__name__}, not a string")
  return value


def json_object(text: str, where: str) -> dict:
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: invalid JSON: {e.msg}") from None
  if not isinstance(obj, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  return obj


def _from_object(obj: dict, kind: str, fields: Fields, where: str) -> Any:
  if kind == "text":
    return _field(obj, fields.text, where)
  return _field(obj, fields.input, where), _field(obj, fields.target, where)


# ------------------------------------------------------------------------------------------------
# Readers: (index, value) from a record index on.


def _read_line_format(
  path: str, fmt: str, kind: str, fields: Fields, start: int, offset, progress
) -> Iterator[tuple[int, Any]]:
  for n, line in iter_lines(path, start, offset, progress):
    if not line.strip():
      continue
    where = f"{path}:{n + 1}"
    if fmt == "tsv":
      if kind == "text":
        raise DataError(f"{path}: a TSV file holds input/target pairs, not documents")
      pair = line.split("\t")
      if n == 0 and is_tsv_header(pair, fields.input, fields.target):
        continue
      yield n, _tsv_pair(line, where)
    elif fmt == "jsonl":
      yield n, _from_object(json_object(line, where), kind, fields, where)
    else:  # text
      if kind != "text":
        raise DataError(f"{path}: plain text holds documents, not input/target pairs")
      yield n, line


def _read_parquet(path: str, kind: str, fields: Fields, start: int) -> Iterator[tuple[int, Any]]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({e})") from None
  columns = [fields.text] if kind == "text" else [fields.input, fields.target]
  names = pf.schema_arrow.names
  for c in columns:
    if c not in names:
      raise DataError(f"{path}: no column {c!r} (has {names})")
  row = 0
  for g in range(pf.num_row_groups):
    n = pf.metadata.row_group(g).num_rows
    if row + n <= start:
      row += n
      continue
    try:
      table = pf.read_row_group(g, columns=columns)
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"{path}: row group {g}: unreadable ({e})") from None
    cols = [table.column(c).to_pylist() for c in columns]
    for k in range(max(start - row, 0), n):
      values = [col[k] for col in cols]
      for c, v in zip(columns, values, strict=True):
        if not isinstance(v, str):
          kind_of = type(v).__name__
          raise DataError(f"{path}: row {row + k}: column {c!r} is {kind_of}, not a string")
      yield row + k, values[0] if kind == "text" else (values[0], values[1])
    row += n


class ArrayRecordFile:
  """Random access to the records of one ArrayRecord file (bytes), with errors naming it."""

  def __init__(self, path: str):
    from array_record.python import array_record_module

    self.path = path
    try:
      self._reader = array_record_module.ArrayRecordReader(path)
      self._num = self._reader.num_records()
    except Exception as e:  # the C++ reader raises RuntimeError / ValueError / OSError
      raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, index: int) -> bytes:
    try:
      return self._reader.read([int(index)])[0]
    except Exception as e:
      raise DataError(f"{self.path}: record {index}: unreadable ({e})") from None

  def read_range(self, begin: int, end: int) -> list[bytes]:
    try:
      return self._reader.read(int(begin), int(end))
    except Exception as e:
      raise DataError(f"{self.path}: records {begin}-{end}: unreadable ({e})") from None

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


def parse_arrayrecord(raw: bytes, kind: str, fields: Fields, where: str) -> Any:
  """A raw ArrayRecord record (a UTF-8 JSON object) as a pair or a document."""
  return _from_object(json_object(_decode(raw, where, 0), where), kind, fields, where)


def _read_arrayrecord(path: str, kind: str, fields: Fields, start: int):
  f = ArrayRecordFile(path)
  for begin in range(start, len(f), 1024):
    for k, raw in enumerate(f.read_range(begin, min(begin + 1024, len(f)))):
      yield begin + k, parse_arrayrecord(raw, kind, fields, f"{path}: record {begin + k}")


def iter_records(
  path: str,
  kind: str,
  fields: Fields = DEFAULT_FIELDS,
  fmt: str = "auto",
  start: int = 0,
  *,
  offset: int | None = None,
  progress: dict | None = None,
) -> Iterator[tuple[int, Any]]:
  """`(index, value)` of the records of one file from record `start` on, read lazily.

  Args:
    path: the file.
    kind: "pairs" ((input, target) values) or "text" (document strings).
    fields: the field / column names (JSONL, Parquet, ArrayRecord; a TSV header may use them).
    fmt: a format of `FORMATS`, or "auto" (from the extension).
    start: first record index (a line index for line formats).
    offset, progress: for uncompressed line formats, the byte offset of record `start` and a dict
      kept at the offset after the last record (see `iter_lines`).
  """
  fmt = detect_format(path, fmt)
  if fmt == "parquet":
    return _read_parquet(path, kind, fields, start)
  if fmt == "arrayrecord":
    return _read_arrayrecord(path, kind, fields, start)
  return _read_line_format(path, fmt, kind, fields, start, offset, progress)


def read_all(
  spec: str | Sequence[str],
  kind: str,
  fields: Fields = DEFAULT_FIELDS,
  fmt: str = "auto",
  *,
  limit: int = 0,
  what: str = "data",
) -> list[Any]:
  """Every record of a spec (evaluation sets, tokenizer training): at most `limit` if > 0.

  Raises DataError for a file without records, naming it.
  """
  out: list[Any] = []
  for path in resolve_files(spec, what):
    count = 0
    for _, value in iter_records(path, kind, fields, fmt):
      out.append(value)
      count += 1
      if limit and len(out) >= limit:
        return out
    if not count:
      raise DataError(f"{path}: no examples (an empty shard, or only a header row)")
  return out


# ------------------------------------------------------------------------------------------------
# Prepared shards (`python -m t5jax.prepare`): token ids in ArrayRecord files, a manifest beside.

MANIFEST = "t5jax_prepared.json"
# 3: token ids may be stored as uint16 (`encode_tokens`); 2: text may be chunk blocks
# (`chunk_length`); 1 (documents). All read as they are.
PREPARED_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
NARROW_IDS = 1 << 31  # set in a record's count: its ids are uint16


def encode_tokens(*arrays: np.ndarray) -> bytes:
  """One record of token arrays: uint32 count, uint32 lengths, then the ids: uint16 when every
  id fits (T5's 32k vocabulary; mT5's 250k mostly not), with `NARROW_IDS` set in the count, else
  int32. Half the bytes to decompress and copy per token (measured in docs/data.md)."""
  ids = [np.asarray(a) for a in arrays]
  narrow = all(a.size == 0 or (a.min() >= 0 and a.max() < 1 << 16) for a in ids)
  lengths = np.array([len(a) for a in ids], "<u4")
  body = [a.astype("<u2" if narrow else "<i4").tobytes() for a in ids]
  count = np.array([len(ids) | (NARROW_IDS if narrow else 0)], "<u4")
  return b"".join([count.tobytes(), lengths.tobytes(), *body])


def record_header(raw: bytes, where: str = "") -> tuple[int, np.ndarray, str]:
  """(number of arrays, their lengths, id dtype) of an `encode_tokens` record, checked against
  its size."""
  try:
    word = int(np.frombuffer(raw, "<u4", 1)[0])
    count = word & ~NARROW_IDS
    lengths = np.frombuffer(raw, "<u4", count, 4).astype(np.int64)
  except ValueError:
    raise DataError(f"{where}: not a prepared token record") from None
  dtype = "<u2" if word & NARROW_IDS else "<i4"
  if len(raw) != 4 + 4 * count + np.dtype(dtype).itemsize * int(lengths.sum()):
    raise DataError(f"{where}: not a prepared token record")
  return count, lengths, dtype


def decode_tokens(raw: bytes, where: str = "") -> list[np.ndarray]:
  """The token arrays of an `encode_tokens` record, int32."""
  count, lengths, dtype = record_header(raw, where)
  ids = np.frombuffer(raw, dtype, int(lengths.sum()), 4 + 4 * count).astype(np.int32)
  if count == 1:  # a document: no split
    return [ids]
  return np.split(ids, np.cumsum(lengths)[:-1])


def prepared_manifest(spec: str | Sequence[str]) -> dict[str, Any] | None:
  """The manifest of a prepared folder named by `spec` (one directory), or None."""
  if not isinstance(spec, str) or "," in spec or not os.path.isdir(spec):
    return None
  path = os.path.join(spec, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: invalid JSON: {e.msg}") from None
  if manifest.get("version") not in READABLE_VERSIONS:
    raise DataError(
      f"{path}: prepared with format version {manifest.get('version')}; this t5jax reads "
      f"versions {', '.join(map(str, READABLE_VERSIONS))}: prepare the corpus again"
    )
  manifest.setdefault("chunk_length", 0)
  manifest["dir"] = spec
  manifest["paths"] = [os.path.join(spec, s["file"]) for s in manifest["shards"]]
  for p in manifest["paths"]:
    if not os.path.isfile(p):
      raise DataError(f"{path}: shard {p} is missing")
  return manifest


def count_records(
  spec: str | Sequence[str], fmt: str = "auto", fields: Fields = DEFAULT_FIELDS
) -> int:
  """Records in a spec without parsing them: manifests, ArrayRecord and Parquet metadata, or the
  non-blank lines of line formats (a decompressing scan)."""
  manifest = prepared_manifest(spec)
  if manifest is not None:  # documents or pairs; chunks for a chunked text folder
    return sum(int(s.get("chunks", s["records"])) for s in manifest["shards"])
  total = 0
  for path in resolve_files(spec):
    f = detect_format(path, fmt)
    if f == "arrayrecord":
      total += len(ArrayRecordFile(path))
    elif f == "parquet":
      import pyarrow.parquet as pq

      total += pq.ParquetFile(path).metadata.num_rows
    else:
      with _open_binary(path) as fh:
        first = fh.readline()
        total += sum(1 for line in fh if line.strip()) + bool(first.strip())
      if f == "tsv" and first:
        names = first.decode("utf-8", "replace").strip("\ufeff\r\n").split("\t")
        total -= is_tsv_header(names, fields.input, fields.target)
  return total
