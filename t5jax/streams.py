"""grain datasets over corpora larger than memory, each with an exact, cheap saved position.

Two sources of records, both infinite (epoch after epoch) and sliceable over hosts and grain's
worker processes (`mp_prefetch` calls `set_slice`):

- `RecordStream`: streamed files (text, TSV, JSONL, each optionally gzip/zstd; Parquet). Each epoch
  visits this shard's files in a seeded order; records are shuffled within windows of
  `window` records (a bounded shuffle buffer whose contents are a function of its start, so the
  position is `(epoch, file, record, window, taken)` and a restore re-reads at most one window,
  never what came before it, and tokenizes nothing twice).
- `RandomAccessStream`: ArrayRecord files (raw JSON records or `t5jax.prepare` token shards),
  a global permutation of this shard's record range per epoch, read a block of records at a time,
  positioned by `(epoch, position)`.

Sharding: with at least as many files as shards (hosts x workers), shard i of n reads files
i, i+n, ...; with fewer, every shard reads every file and keeps records whose index is i mod n.
Random-access sources split their records into contiguous ranges instead.

`ChunkTokens` turns a stream of documents into fixed-length token chunks (T5's concatenate and
split), one or a batch at a time, saving `(position before the current document, offset in it)`
so a restore tokenizes one document again. `ChunkBatches` reads batches of chunks from prepared
chunk blocks (`python -m t5jax.prepare --chunk_length`): no per-document work at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from t5jax import sources
from t5jax.errors import DataError


def _shard_of(index: int, count: int, sl: tuple[int, int]) -> tuple[int, int]:
  """(index, count) of a host shard further split over `sl = (worker, workers)`."""
  worker, workers = sl
  return index * workers + worker, count * workers


class RecordStream(grain.IterDataset):
  """Records of streamed files for one shard: seeded file order per epoch, windowed shuffle."""

  def __init__(
    self,
    files: Sequence[str],
    kind: str,
    fields: sources.Fields = sources.DEFAULT_FIELDS,
    fmt: str = "auto",
    *,
    seed: int = 0,
    shuffle: bool = True,
    window: int = 10_000,
    shard_index: int = 0,
    shard_count: int = 1,
  ):
    super().__init__()
    if not files:
      raise DataError("no data files")
    self.files = list(files)
    self.kind, self.fields, self.fmt = kind, fields, fmt
    self.seed, self.shuffle, self.window = seed, shuffle, max(int(window), 1)
    self.shard_index, self.shard_count = shard_index, shard_count
    self._slice = (0, 1)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # a worker always reads whole files or every n-th record
    self._slice = (sl.start or 0, sl.step or 1)

  def shard(self) -> tuple[list[str], int, int]:
    """(this shard's files, record modulus, record remainder); modulus 1 = whole files."""
    index, count = _shard_of(self.shard_index, self.shard_count, self._slice)
    if len(self.files) >= count:
      return self.files[index::count], 1, 0
    return list(self.files), count, index

  def __iter__(self) -> _RecordStreamIterator:
    return _RecordStreamIterator(self)

  def __str__(self) -> str:
    return f"RecordStream({len(self.files)} files, window={self.window})"


class _RecordStreamIterator(grain.DatasetIterator):
  def __init__(self, ds: RecordStream):
    super().__init__()
    self._ds = ds
    self._files, self._mod, self._rem = ds.shard()
    self._set(0, 0, 0, 0, 0)

  # -- position -----------------------------------------------------------------------------

  def _order(self, epoch: int) -> list[str]:
    if not self._ds.shuffle:
      return self._files
    perm = np.random.default_rng([self._ds.seed, epoch, 7]).permutation(len(self._files))
    return [self._files[i] for i in perm]

  def _set(
    self, epoch: int, file: int, record: int, window: int, taken: int, offset: int | None = None
  ) -> None:
    self._epoch, self._window_index = epoch, window
    # Where the current window begins and the next record to read: (file, record, byte offset of
    # that record in an uncompressed line file, else None).
    self._start = (file, record, offset)
    self._order_e = self._order(epoch)
    self._cursor = (file, record, offset)
    self._progress: dict[str, Any] = {}
    self._reader, self._reader_file = None, -1
    self._file_seen = False
    self._epoch_count = 0 if (file, record, window) == (0, 0, 0) else 1  # records this epoch
    self._items: list[Any] = []
    self._taken = 0
    if taken:
      self._fill()
      if taken > len(self._items):
        raise DataError("the saved data position is past its window: were the files changed?")
      self._taken = taken

  def get_state(self) -> dict[str, Any]:
    file, record, offset = self._start
    return {
      "epoch": self._epoch,
      "file": file,
      "record": record,
      "offset": -1 if offset is None else offset,
      "window": self._window_index,
      "taken": self._taken,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    offset = int(state.get("offset", -1))
    self._set(
      *(int(state[k]) for k in ("epoch", "file", "record", "window", "taken")),
      offset=None if offset < 0 else offset,
    )

  # -- reading ------------------------------------------------------------------------------

  def _next_record(self) -> Any | None:
    """The next record of this shard in this epoch, or None at the epoch's end."""
    while True:
      file, record, offset = self._cursor
      if file >= len(self._order_e):
        return None
      if self._reader_file != file:
        path, ds = self._order_e[file], self._ds
        self._reader = sources.iter_records(
          path, ds.kind, ds.fields, ds.fmt, record, offset=offset, progress=self._progress
        )
        self._reader_file, self._file_seen = file, record > 0
      for index, value in self._reader:
        self._file_seen = True
        self._cursor = (file, index + 1, self._progress.get("offset"))
        if index % self._mod == self._rem:
          return value
      if not self._file_seen:
        raise DataError(
          f"{self._order_e[file]}: no examples (an empty shard, or only a header row)"
        )
      self._cursor, self._reader, self._reader_file = (file + 1, 0, None), None, -1

  def _fill(self) -> None:
    """Reads the window starting at `self._start` and orders it."""
    items = []
    while len(items) < self._ds.window:
      value = self._next_record()
      if value is None:
        break
      items.append(value)
    if items and self._ds.shuffle:
      rng = np.random.default_rng([self._ds.seed, self._epoch, self._window_index])
      items = [items[i] for i in rng.permutation(len(items))]
    self._items = items
    self._epoch_count += len(items)

  def __next__(self) -> Any:
    if self._taken >= len(self._items):
      if self._items:  # the window is used up: the next one starts at the read cursor
        self._start, self._window_index = self._cursor, self._window_index + 1
      self._items, self._taken = [], 0
      self._fill()
      if not self._items:  # the epoch is over
        if not self._epoch_count:
          raise DataError(
            f"shard {self._rem} of {self._mod} gets no records from {len(self._files)} file(s)"
          )
        self._set(self._epoch + 1, 0, 0, 0, 0)
        self._fill()
    value = self._items[self._taken]
    self._taken += 1
    return value


# ------------------------------------------------------------------------------------------------
# Random access.


class ConcatRecords(Sequence):
  """The records of several ArrayRecord files as one random-access sequence (raw bytes)."""

  def __init__(self, files: Sequence[str], begin: int = 0, end: int | None = None):
    self.files = list(files)
    self._readers = [sources.ArrayRecordFile(f) for f in self.files]
    sizes = [len(r) for r in self._readers]
    for f, n in zip(self.files, sizes, strict=True):
      if n == 0:
        raise DataError(f"{f}: no examples (an empty shard, or only a header row)")
    self._offsets = np.cumsum([0, *sizes])
    self.begin, self.end = begin, int(self._offsets[-1]) if end is None else end

  @property
  def total(self) -> int:
    return int(self._offsets[-1])

  def __len__(self) -> int:
    return self.end - self.begin

  def locate(self, index: int) -> tuple[str, int]:
    g = self.begin + int(index)
    f = int(np.searchsorted(self._offsets, g, side="right")) - 1
    return self.files[f], g - int(self._offsets[f])

  def __getitem__(self, index: int) -> tuple[str, int, bytes]:
    if not 0 <= int(index) < len(self):
      raise IndexError(index)
    g = self.begin + int(index)
    f = int(np.searchsorted(self._offsets, g, side="right")) - 1
    k = g - int(self._offsets[f])
    return self.files[f], k, self._readers[f][k]

  def read_many(self, indices: np.ndarray) -> list[tuple[str, int, bytes]]:
    """`self[i]` for each of `indices` (in range), one ArrayRecord read per file touched."""
    g = self.begin + np.asarray(indices, np.int64)
    f = np.searchsorted(self._offsets, g, side="right") - 1
    out: list[Any] = [None] * len(g)
    for file in np.unique(f):
      where = np.flatnonzero(f == file)
      ks = (g[where] - self._offsets[file]).tolist()
      try:
        raws = self._readers[file]._reader.read(ks)
      except Exception as e:
        raise DataError(f"{self.files[file]}: records {ks[:3]}...: unreadable ({e})") from None
      for w, k, raw in zip(where.tolist(), ks, raws, strict=True):
        out[w] = (self.files[file], k, raw)
    return out

  def __getstate__(self):
    return {"files": self.files, "begin": self.begin, "end": self.end}

  def __setstate__(self, state):
    self.__init__(state["files"], state["begin"], state["end"])


class ShuffledEpochs(Sequence):
  """Endless record stream: flat index e * n + i is record perm_e[i] of epoch e.

  grain's `MapDataset.shuffle` computes every index with a per-element Feistel permutation that
  cost ~2.5 ms per element on our 2-core CPU box (measured), which starves a small training step;
  a numpy permutation per epoch (seeded by (seed, epoch)) is microseconds per element and keeps
  random access, so grain's iterator state (the next flat index) still pins the position exactly.
  A permutation of n records holds 8n bytes (80 MB for 10M records).
  """

  def __init__(self, records: Sequence[Any], seed: int, shuffle: bool, num_epochs: int = 1 << 32):
    self._records = records
    self._seed = seed
    self._shuffle = shuffle
    self._num_epochs = num_epochs
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._records) * self._num_epochs

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= 2:  # prefetch threads straddle at most one epoch boundary
          del self._perms[min(self._perms)]
        rng = np.random.default_rng([self._seed, epoch])
        self._perms[epoch] = rng.permutation(len(self._records))
      return self._perms[epoch]

  def __getitem__(self, index: int) -> Any:
    epoch, i = divmod(int(index), len(self._records))
    return self._records[int(self._perm(epoch)[i]) if self._shuffle else i]

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_perms")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._perms, self._lock = {}, threading.Lock()


class RandomAccessStream(grain.IterDataset):
  """ArrayRecord records of this host's contiguous range, endless, in a new seeded permutation
  each epoch (the permutation `ShuffledEpochs` uses), read `block` at a time (one read per file
  per block: a record read alone costs ~28 µs) and passed through `transform`.

  Worker slice (w, W) takes positions w, w + W, ... of each epoch's permutation. The position is
  `(epoch, position)`: a restore reads nothing before it.
  """

  def __init__(
    self,
    files: Sequence[str],
    transform: Callable[[tuple[str, int, bytes]], Any],
    *,
    seed: int,
    shuffle: bool,
    shard_index: int,
    shard_count: int,
    block: int = 256,
  ):
    super().__init__()
    whole = ConcatRecords(files)
    self.begin = whole.total * shard_index // shard_count
    self.end = whole.total * (shard_index + 1) // shard_count
    if self.end <= self.begin:
      raise DataError(f"host {shard_index} of {shard_count} has no records in {len(files)} file(s)")
    self.files, self.transform = list(files), transform
    self.seed, self.shuffle, self.block = seed, shuffle, block
    self._slice = (0, 1)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._slice = (sl.start or 0, sl.step or 1)

  def __iter__(self) -> _RandomAccessIterator:
    return _RandomAccessIterator(self)


class _RandomAccessIterator(grain.DatasetIterator):
  def __init__(self, ds: RandomAccessStream):
    super().__init__()
    self._ds = ds
    self._records = ConcatRecords(ds.files, ds.begin, ds.end)
    self._set(0, 0)

  def _set(self, epoch: int, position: int) -> None:
    n, (w, workers) = len(self._records), self._ds._slice
    if self._ds.shuffle:
      perm = np.random.default_rng([self._ds.seed, epoch]).permutation(n)
    else:
      perm = np.arange(n)
    self._epoch, self._order = epoch, perm[w::workers]
    if not len(self._order):
      raise DataError(f"worker {w} of {workers} gets no records of {n}")
    self._position, self._buffer, self._taken = position, [], 0

  def __next__(self) -> Any:
    if self._taken >= len(self._buffer):
      if self._position >= len(self._order):
        self._set(self._epoch + 1, 0)
      ids = self._order[self._position : self._position + self._ds.block]
      self._buffer = [self._ds.transform(r) for r in self._records.read_many(ids)]
      self._taken = 0
    self._taken += 1
    self._position += 1
    return self._buffer[self._taken - 1]

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "position": self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    self._set(int(state["epoch"]), int(state["position"]))


# ------------------------------------------------------------------------------------------------
# Concatenate, split and corrupt.


class ChunkTokens(grain.IterDataset):
  """Documents -> token chunks of `length` (documents concatenated without eos, as T5 does).

  Yields {"tokens": int32 [length], "key": int64 [4]}: the key `(shard, worker, workers, k)`
  names chunk k of this worker of host shard `shard`, so whatever corrupts the chunk can seed its
  randomness from it and stay the same across a restore. With `batch_size` > 0, yields the next
  `batch_size` of those stacked ([batch_size, length] and [batch_size, 4]) as one element.
  """

  def __init__(
    self,
    parent: grain.IterDataset,
    tokenize: Callable[[Any], np.ndarray],
    length: int,
    shard: int = 0,
    batch_size: int = 0,
  ):
    super().__init__(parent)
    self.tokenize, self.length, self.shard = tokenize, length, shard
    self.batch_size = batch_size
    self._slice = (0, 1)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    self._slice = (sl.start or 0, sl.step or 1)
    from grain._src.python.dataset.transformations import prefetch

    prefetch._set_slice_iter_dataset(self._parent, sl, sequential_slice)

  def __iter__(self) -> _ChunkIterator:
    return _ChunkIterator(self, self._parent.__iter__())


class _ChunkIterator(grain.DatasetIterator):
  def __init__(self, ds: ChunkTokens, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._ds = ds
    self._doc_state = parent.get_state()  # the parent's position before the current document
    self._doc = np.zeros(0, np.int32)
    self._offset = 0
    self._count = 0

  def _pull(self) -> None:
    self._doc_state = self._parent.get_state()
    self._doc = np.asarray(self._ds.tokenize(next(self._parent)), np.int32)
    self._offset = 0

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self._ds.batch_size or 1
    parts, need = [], self._ds.length * rows
    while need:
      if self._offset >= len(self._doc):
        self._pull()
        continue
      take = self._doc[self._offset : self._offset + need]
      parts.append(take)
      self._offset += len(take)
      need -= len(take)
    tokens = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
    key = np.empty((rows, 4), np.int64)
    key[:, :3] = (self._ds.shard, *self._ds._slice)
    key[:, 3] = np.arange(self._count, self._count + rows)
    self._count += rows
    if not self._ds.batch_size:
      return {"tokens": tokens, "key": key[0]}
    return {"tokens": tokens.reshape(rows, self._ds.length), "key": key}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._doc_state, "offset": self._offset, "count": self._count}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc_state, self._doc, self._offset = state["parent"], np.zeros(0, np.int32), 0
    if int(state["offset"]):
      self._pull()
      self._offset = int(state["offset"])
    self._count = int(state["count"])


# ------------------------------------------------------------------------------------------------
# Prepared chunk blocks, a batch at a time.


def _chunk_block(raw: bytes, length: int, where: str) -> np.ndarray:
  """The ids of a chunk-block record (`sources.encode_tokens` of one array of whole chunks),
  without a copy (uint16 or int32, as stored)."""
  count, lengths, dtype = sources.record_header(raw, where)
  if count != 1:
    raise DataError(f"{where}: not a prepared token record")
  n = int(lengths[0])
  if n % length or not n:
    raise DataError(f"{where}: {n} ids, not whole chunks of {length}")
  return np.frombuffer(raw, dtype, n, 8)


class ChunkBatches(grain.IterDataset):
  """Batches of token chunks from prepared chunk-block shards (`python -m t5jax.prepare
  --chunk_length=length`): each record is one flat array of whole chunks.

  Yields {"tokens": int32 [batch_size, length], "key": int64 [batch_size, 6]}; key row
  `(shard, worker, workers, epoch, window, k)` names chunk k of that window, so whatever corrupts
  the batch can seed its randomness from it.

  This host reads a contiguous range of the records; worker slice (w, W) takes records
  w, w + W, ... of each epoch's permutation of them (file order without shuffling), read
  `ceil(window / chunks per record)` records at a time (one ArrayRecord read per file); the chunks
  of such a window are shuffled together. The position is `(epoch, window, taken)`: a restore
  reads the one window again and nothing before it.
  """

  def __init__(
    self,
    files: Sequence[str],
    length: int,
    batch_size: int,
    *,
    chunks_per_record: int,
    seed: int,
    shuffle: bool,
    window: int,
    shard_index: int,
    shard_count: int,
  ):
    super().__init__()
    whole = ConcatRecords(files)
    self.begin = whole.total * shard_index // shard_count
    self.end = whole.total * (shard_index + 1) // shard_count
    if self.end <= self.begin:
      raise DataError(f"host {shard_index} of {shard_count} has no records in {len(files)} file(s)")
    self.files, self.length, self.batch_size = list(files), length, batch_size
    self.seed, self.shuffle, self.shard = seed, shuffle, shard_index
    self.records_per_window = max(1, -(-int(window) // chunks_per_record))
    self._slice = (0, 1)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    self._slice = (sl.start or 0, sl.step or 1)

  def __iter__(self) -> _ChunkBatchIterator:
    return _ChunkBatchIterator(self)

  def __str__(self) -> str:
    return f"ChunkBatches({len(self.files)} files, length={self.length})"


class _ChunkBatchIterator(grain.DatasetIterator):
  def __init__(self, ds: ChunkBatches):
    super().__init__()
    self._ds = ds
    self._records = ConcatRecords(ds.files, ds.begin, ds.end)
    self._set(0, 0, 0)

  def _set(self, epoch: int, window: int, taken: int) -> None:
    n, (w, workers) = len(self._records), self._ds._slice
    if epoch != getattr(self, "_epoch", None):
      if self._ds.shuffle:
        perm = np.random.default_rng([self._ds.seed, epoch]).permutation(n)
      else:
        perm = np.arange(n)
      self._order = perm[w::workers]
      if not len(self._order):
        raise DataError(f"worker {w} of {workers} gets no records of {n}")
    # The window is read by the first `__next__` (a restore reads it once, not twice).
    self._epoch, self._window, self._taken = epoch, window, taken
    self._tokens: np.ndarray | None = None
    self._perm: np.ndarray | None = None

  def _load(self) -> None:
    """Reads the current window's records and orders their chunks."""
    per, (w, workers) = self._ds.records_per_window, self._ds._slice
    ids = self._order[self._window * per : (self._window + 1) * per]
    chunks = []
    for path, k, raw in self._records.read_many(ids):
      flat = _chunk_block(raw, self._ds.length, f"{path}: record {k}")
      chunks.append(flat.reshape(-1, self._ds.length))
    tokens = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    if self._taken > len(tokens):
      raise DataError("the saved data position is past its window: were the files changed?")
    self._tokens = tokens
    if self._ds.shuffle:  # else file order; the permutation is gathered a batch at a time
      rng = np.random.default_rng([self._ds.seed, self._epoch, self._window, w, workers])
      self._perm = rng.permutation(len(tokens))

  def _advance(self) -> None:
    """Moves to the next window (of the next epoch after the last)."""
    if (self._window + 1) * self._ds.records_per_window < len(self._order):
      self._set(self._epoch, self._window + 1, 0)
    else:
      self._set(self._epoch + 1, 0, 0)

  def __next__(self) -> dict[str, np.ndarray]:
    parts, keys, need = [], [], self._ds.batch_size
    w, workers = self._ds._slice
    while need:
      if self._tokens is None:
        self._load()
      if self._taken >= len(self._tokens):
        self._advance()
        continue
      take = min(need, len(self._tokens) - self._taken)
      if self._perm is None:
        parts.append(self._tokens[self._taken : self._taken + take].copy())
      else:
        parts.append(self._tokens[self._perm[self._taken : self._taken + take]])
      key = np.empty((take, 6), np.int64)
      key[:, :5] = (self._ds.shard, w, workers, self._epoch, self._window)
      key[:, 5] = np.arange(self._taken, self._taken + take)
      keys.append(key)
      self._taken += take
      need -= take
    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return {
      "tokens": tokens.astype(np.int32, copy=False),
      "key": keys[0] if len(keys) == 1 else np.concatenate(keys),
    }

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "window": self._window, "taken": self._taken}

  def set_state(self, state: dict[str, Any]) -> None:
    self._set(int(state["epoch"]), int(state["window"]), int(state["taken"]))
