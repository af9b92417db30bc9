"""Prepare once: tokenize a raw corpus into ArrayRecord shards that training reads as token ids.

  python -m t5jax.prepare --input='corpus/*.txt.gz' --output=prepared/corpus --kind=text \\
      --tokenizer=spiece.model
  python train.py --config configs/pretrain_t5_v1_1_base.py --workdir workdir/pretrain \\
      --config.data.train_file=prepared/corpus

`--input` takes every spec `t5jax.sources.resolve_files` does (a file, a comma-separated list, a
glob, a directory) in every format `t5jax.sources` reads (TSV, JSONL, text, each optionally gzip or
zstd; Parquet; ArrayRecord of JSON records). The output folder holds

  shard-FFFFF-PPPPP.arrayrecord   piece P of input file F: at most --records_per_shard records,
                                  each `sources.encode_tokens(...)` (ArrayRecord, group_size 1 for
                                  random access, as grain's ArrayRecord reader expects)
  tokenizer/                      the tokenizer (`Tokenizer.save`), which training loads from here
  t5jax_prepared.json             the manifest (`sources.MANIFEST`), written last and atomically

Records: kind "text" holds one array, a document's ids without eos (training concatenates and
splits them for span corruption), or with `--chunk_length=L` a block of up to
`--chunks_per_record` chunks of L tokens (the file's documents concatenated and split, its last
partial chunk dropped), which span corruption whose raw chunk is L tokens reads as whole blocks;
kind "pairs" holds two, `encode(prefix + input)` and
`encode(target)`, each ending with eos and untruncated (training truncates to its lengths).

Input files are tokenized in `--num_workers` processes, one file per task; each file's pieces come
from that file alone, so the shards are byte-identical whatever the number of workers. A folder
without the manifest is not a prepared folder: a failed run removes what it wrote, a killed one
leaves shards without a manifest, which training does not take for a prepared corpus and this
command only replaces with `--overwrite`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from t5jax import sources
from t5jax.errors import DataError
from t5jax.tokenizer import encode_document
from t5jax.workdir import atomic_write

KINDS = {
  "pairs": "pairs",
  "text": "text",
  "tsv": "pairs",
  "jsonl": "pairs",
  "span_corruption": "text",
}
DEFAULT_RECORDS_PER_SHARD = 100_000
DEFAULT_CHUNKS_PER_RECORD = 64  # 64 x 568 int32 ids: a 145 kB record
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads one record
TOKENIZER_DIR = "tokenizer"
_SHARD_RE = re.compile(r"^\.?shard-\d{5}-\d{5}\.arrayrecord(\.tmp)?$")


class _FileTask(NamedTuple):
  index: int  # the input file's position in the spec's file list
  path: str
  kind: str
  fields: sources.Fields
  fmt: str
  prefix: str
  output: str
  records_per_shard: int
  chunk_length: int = 0  # > 0: kind text as blocks of chunks of this many tokens
  chunks_per_record: int = 64


def shard_name(file_index: int, piece: int) -> str:
  return f"shard-{file_index:05d}-{piece:05d}.arrayrecord"


def _encode(tokenizer, kind: str, prefix: str, value: Any) -> bytes:
  if kind == "text":
    return sources.encode_tokens(encode_document(tokenizer, value))
  inp, tgt = value
  return sources.encode_tokens(
    np.asarray(tokenizer.encode(prefix + inp), np.int32),
    np.asarray(tokenizer.encode(tgt), np.int32),
  )


class _ShardWriter:
  """Writes `.name.tmp`, renamed to `name` once closed (a finished shard is never torn)."""

  def __init__(self, output: str, name: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    self.name, self.count, self.chunks = name, 0, 0
    self.path = os.path.join(output, name)
    self.tmp = os.path.join(output, f".{name}.tmp")
    self._writer = ArrayRecordWriter(self.tmp, WRITER_OPTIONS)

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.count += 1

  def close(self) -> tuple[str, int]:
    self._writer.close()
    os.replace(self.tmp, self.path)
    return self.name, self.count

  def entry(self) -> dict[str, int | str]:
    """Closes the shard; its manifest entry."""
    name, count = self.close()
    entry: dict[str, int | str] = {"file": name, "records": count}
    if self.chunks:
      entry["chunks"] = self.chunks
    return entry


def _prepare_file(task: _FileTask, tokenizer) -> tuple[list[dict[str, int | str]], int]:
  """Tokenizes one input file into its shards; returns their manifest entries and the tokens
  dropped (chunked text: the last partial chunk of the file)."""
  shards: list[dict[str, int | str]] = []
  writer: _ShardWriter | None = None
  chunked = task.kind == "text" and task.chunk_length > 0
  block = task.chunk_length * task.chunks_per_record  # tokens per record when chunked
  pending: list[np.ndarray] = []  # ids not yet written (chunked)
  pending_len, seen, dropped = 0, False, 0

  def write(record: bytes, chunks: int = 0) -> None:
    nonlocal writer
    if writer is None:
      writer = _ShardWriter(task.output, shard_name(task.index, len(shards)))
    writer.write(record)
    writer.chunks += chunks
    if (writer.chunks if chunked else writer.count) >= task.records_per_shard:
      shards.append(writer.entry())
      writer = None

  def flush(final: bool) -> None:  # whole blocks; at the end, the whole chunks left
    nonlocal pending, pending_len, dropped
    ids = np.concatenate(pending) if len(pending) > 1 else pending[0]
    unit = task.chunk_length if final else block
    cut = len(ids) // unit * unit
    for start in range(0, cut, block):
      piece = ids[start : min(start + block, cut)]
      write(sources.encode_tokens(piece), len(piece) // task.chunk_length)
    if final:
      pending, pending_len, dropped = [], 0, len(ids) - cut
    else:
      pending, pending_len = [ids[cut:]], len(ids) - cut

  try:
    for _, value in sources.iter_records(task.path, task.kind, task.fields, task.fmt):
      seen = True
      if not chunked:
        write(_encode(tokenizer, task.kind, task.prefix, value))
        continue
      ids = encode_document(tokenizer, value)
      pending.append(ids)
      pending_len += len(ids)
      if pending_len >= block:
        flush(final=False)
    if chunked and pending:
      flush(final=True)
    if writer is not None:
      shards.append(writer.entry())
      writer = None
  finally:
    if writer is not None:  # an error mid-shard: drop the torn temporary
      with contextlib.suppress(Exception):
        writer._writer.close()
      with contextlib.suppress(OSError):
        os.remove(writer.tmp)
  if not seen:
    raise DataError(f"{task.path}: no records (an empty shard)")
  return shards, dropped


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizer


def _run_in_worker(task: _FileTask) -> tuple[list[dict[str, int | str]], int]:
  return _prepare_file(task, _WORKER_TOKENIZER)


def _ours(name: str) -> bool:
  """A name this module writes in an output folder."""
  return (
    name in (sources.MANIFEST, TOKENIZER_DIR)
    or _SHARD_RE.match(name) is not None
    or name.startswith(f".{sources.MANIFEST}.tmp")
  )


def _clear_output(output: str, overwrite: bool) -> None:
  """Makes `output` an empty folder: refuses one with files unless `overwrite`, and then removes
  only what a previous prepare wrote (the manifest first, so it stops looking complete)."""
  if not os.path.exists(output):
    os.makedirs(output)
    return
  if not os.path.isdir(output):
    raise DataError(f"--output={output}: exists and is not a folder")
  names = sorted(os.listdir(output))
  if not names:
    return
  if not overwrite:
    what = "a prepared corpus" if sources.MANIFEST in names else "files"
    raise DataError(f"--output={output}: already holds {what}; pass --overwrite to replace it")
  foreign = [n for n in names if not _ours(n)]
  if foreign:
    raise DataError(
      f"--output={output}: holds {foreign[0]!r}, which prepare did not write; "
      "give an empty or new folder"
    )
  if sources.MANIFEST in names:
    os.remove(os.path.join(output, sources.MANIFEST))
  for n in names:
    path = os.path.join(output, n)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def _remove_partial(output: str, created: bool) -> None:
  """Removes what a failed prepare wrote (the folder too if it made it)."""
  with contextlib.suppress(OSError):
    for n in os.listdir(output):
      if _ours(n) and n != sources.MANIFEST:
        path = os.path.join(output, n)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if created and not os.listdir(output):
      os.rmdir(output)


def default_num_workers(num_files: int) -> int:
  return max(1, min(os.cpu_count() or 1, num_files))


def prepare(
  input_spec: str,
  output: str,
  tokenizer,
  *,
  kind: str,
  tokenizer_name: str,
  fmt: str = "auto",
  fields: sources.Fields = sources.DEFAULT_FIELDS,
  prefix: str = "",
  num_workers: int = 0,
  records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
  chunk_length: int = 0,
  chunks_per_record: int = DEFAULT_CHUNKS_PER_RECORD,
  overwrite: bool = False,
  log=None,
) -> dict[str, Any]:
  """Tokenizes the corpus `input_spec` names into prepared shards in `output`.

  Args:
    input_spec: a file, comma-separated list, glob or directory (`sources.resolve_files`).
    output: the folder to write (created; must be empty or new unless `overwrite`).
    tokenizer: a `t5jax.tokenizer` tokenizer; saved into `output/tokenizer`.
    kind: "pairs" or "text" (or the data kinds "tsv", "jsonl" -> pairs, "span_corruption" -> text).
    tokenizer_name: what the user gave for the tokenizer (recorded in the manifest).
    fmt: a `sources.FORMATS` format, or "auto" (by extension; kinds tsv / jsonl imply theirs).
    fields: field / column names (JSONL, Parquet, ArrayRecord; a TSV header may use them).
    prefix: prepended to every input of a pairs corpus (T5's task prefix).
    num_workers: processes tokenizing files; 0 = min(CPU count, files).
    records_per_shard: records per output shard (a larger input file gives several); chunked
      text: chunks per shard (whole records).
    chunk_length: text only; > 0: each input file's documents are concatenated (without eos) and
      split into chunks of this many tokens, stored `chunks_per_record` to a record (one flat id
      array); the file's last partial chunk is dropped. Training at the span-corruption lengths
      whose raw chunk is this long reads whole blocks, with no per-document work. 0: one record
      per document.
    chunks_per_record: chunks per record when chunked.
    overwrite: replace a folder a previous prepare wrote.
    log: called with a progress line per input file (None: quiet).

  Returns:
    The manifest written (a dict).

  Raises:
    DataError naming the input file and record, or the output folder.
  """
  if kind not in KINDS:
    raise DataError(f"--kind={kind!r}: use one of {', '.join(KINDS)}")
  if fmt == "auto" and kind in ("tsv", "jsonl"):
    fmt = kind
  if fmt != "auto" and fmt not in sources.FORMATS:
    raise DataError(f"--format={fmt!r}: use auto or one of {', '.join(sources.FORMATS)}")
  kind = KINDS[kind]
  if records_per_shard < 1:
    raise DataError(f"--records_per_shard={records_per_shard} must be >= 1")
  if num_workers < 0:
    raise DataError(f"--num_workers={num_workers} must be >= 0 (0 = one per CPU, at most a file)")
  if chunk_length < 0 or (chunk_length and kind != "text"):
    raise DataError(f"--chunk_length={chunk_length}: >= 1 for --kind=text corpora only (0: off)")
  if chunks_per_record < 1:
    raise DataError(f"--chunks_per_record={chunks_per_record} must be >= 1")
  if sources.prepared_manifest(input_spec) is not None:
    raise DataError(f"--input={input_spec}: is already a prepared corpus")
  files = sources.resolve_files(input_spec, "--input")
  out_abs = os.path.abspath(output)
  for f in files:
    if os.path.dirname(os.path.abspath(f)) == out_abs:
      raise DataError(f"--input file {f} is inside --output={output}")
  created = not os.path.exists(output)
  _clear_output(output, overwrite)
  tasks = [
    _FileTask(
      k, f, kind, fields, fmt, prefix, output, records_per_shard, chunk_length, chunks_per_record
    )
    for k, f in enumerate(files)
  ]
  workers = num_workers or default_num_workers(len(files))
  t0 = time.time()
  shards: list[dict[str, Any]] = []
  dropped: list[int] = []
  try:
    if workers == 1:
      results = (_prepare_file(t, tokenizer) for t in tasks)
      _collect(results, tasks, shards, dropped, log, t0)
    else:
      # spawn, not fork: the caller may have started threads (JAX, grain) that fork would copy.
      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(min(workers, len(tasks)), _init_worker, (tokenizer,)) as pool:
        try:
          _collect(pool.imap(_run_in_worker, tasks), tasks, shards, dropped, log, t0)
        except BaseException:
          pool.terminate()
          raise
    if not shards:
      raise DataError(
        f"--input={input_spec}: {sum(dropped)} tokens in all, not one chunk of "
        f"--chunk_length={chunk_length}"
      )
    tokenizer.save(os.path.join(output, TOKENIZER_DIR))
    manifest = {
      "version": sources.PREPARED_VERSION,
      "kind": kind,
      "tokenizer": tokenizer_name,
      "tokenizer_sha256": tokenizer.fingerprint(),
      "vocab_size": int(tokenizer.vocab_size),
      "source": input_spec,
      "format": fmt,
      "fields": fields._asdict(),
      "prefix": prefix,
      "chunk_length": chunk_length,
      "shards": shards,
    }
    if chunk_length:
      manifest["chunks_per_record"] = chunks_per_record
      manifest["dropped_tokens"] = sum(dropped)
    atomic_write(os.path.join(output, sources.MANIFEST), json.dumps(manifest, indent=1) + "\n")
  except BaseException:
    _remove_partial(output, created)
    raise
  return manifest


def _collect(results, tasks: Sequence[_FileTask], shards: list, dropped: list, log, t0) -> None:
  total = 0
  for task, (file_shards, file_dropped) in zip(tasks, results, strict=True):
    shards += file_shards
    dropped.append(file_dropped)
    n = sum(int(s["records"]) for s in file_shards)
    total += n
    if log is not None:
      chunks = sum(int(s.get("chunks", 0)) for s in file_shards)
      what = f"{chunks} chunks in {n} records" if task.chunk_length else f"{n} records"
      log(
        f"[{task.index + 1}/{len(tasks)}] {task.path}: {what}, {len(file_shards)} shard(s) "
        f"({total} records in {time.time() - t0:.1f} s)"
      )


# ------------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):  # one line, not a usage dump
    print(f"prepare: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m t5jax.prepare",
    description="Tokenize a raw corpus into ArrayRecord shards that train.py reads as token ids.",
  )
  p.add_argument("--input", required=True, help="a file, comma list, glob or directory")
  p.add_argument("--output", required=True, help="the folder to write (new or empty)")
  p.add_argument(
    "--kind",
    required=True,
    choices=sorted(KINDS),
    help="pairs (tsv, jsonl): input/target examples; text (span_corruption): documents",
  )
  p.add_argument("--tokenizer", required=True, help="'byt5', a SentencePiece .model or a folder")
  p.add_argument("--extra_ids", type=int, default=None, help="sentinels (default: the tokenizer's)")
  p.add_argument("--format", default="auto", choices=["auto", *sources.FORMATS])
  p.add_argument("--input_field", default="input")
  p.add_argument("--target_field", default="target")
  p.add_argument("--text_field", default="text")
  p.add_argument("--prefix", default="", help="prepended to every input of a pairs corpus")
  p.add_argument("--num_workers", type=int, default=0, help="0 = min(CPU count, input files)")
  p.add_argument(
    "--records_per_shard",
    type=int,
    default=DEFAULT_RECORDS_PER_SHARD,
    help="records per shard (chunks, with --chunk_length)",
  )
  p.add_argument(
    "--chunk_length",
    type=int,
    default=0,
    help="text: chunks of this many tokens (568: span corruption at 512/114); 0: documents",
  )
  p.add_argument("--chunks_per_record", type=int, default=DEFAULT_CHUNKS_PER_RECORD)
  p.add_argument("--overwrite", action="store_true", help="replace a previous prepare's output")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from t5jax.tokenizer import load_tokenizer

  def fail(message: str, status: int = 1) -> int:
    print(f"prepare: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status

  if args.extra_ids is not None and args.extra_ids < 0:
    return fail(f"--extra_ids={args.extra_ids} must be >= 0", 2)
  try:
    tokenizer = load_tokenizer(args.tokenizer, extra_ids=args.extra_ids)
  except (ValueError, FileNotFoundError) as e:
    return fail(f"--tokenizer={args.tokenizer}: {e}")
  log = (
    None if args.quiet else (lambda line: print(f"prepare: {line}", file=sys.stderr, flush=True))
  )
  t0 = time.time()
  try:
    manifest = prepare(
      args.input,
      args.output,
      tokenizer,
      kind=args.kind,
      tokenizer_name=args.tokenizer,
      fmt=args.format,
      fields=sources.Fields(args.input_field, args.target_field, args.text_field),
      prefix=args.prefix,
      num_workers=args.num_workers,
      records_per_shard=args.records_per_shard,
      chunk_length=args.chunk_length,
      chunks_per_record=args.chunks_per_record,
      overwrite=args.overwrite,
      log=log,
    )
  except (DataError, FileNotFoundError) as e:
    return fail(e)
  n = sum(s["records"] for s in manifest["shards"])
  what = f"{n} {manifest['kind']} records"
  if manifest["chunk_length"]:
    chunks = sum(s["chunks"] for s in manifest["shards"])
    what = f"{chunks} chunks of {manifest['chunk_length']} tokens ({n} records)"
  print(
    f"prepared {what} in {len(manifest['shards'])} shard(s) at "
    f"{args.output} ({time.time() - t0:.1f} s); train with "
    f"--config.data.train_file={args.output}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
