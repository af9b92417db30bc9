"""Training and evaluation data: tasks and mixtures, span corruption, packing and batching.

Pipelines are grain datasets, so a training iterator is deterministic given its seed and can save
and restore its position (`get_state` / `set_state`, JSON-serialisable). Order of operations for
training, per task: this host's records (its files, or its share of the records: t5jax.streams),
shuffled per epoch (a window shuffle for streamed files, a global permutation for random-access
shards), endless -> tokenize (pairs), or tokenize, concatenate, split and corrupt (span
corruption) -> mix the tasks by rate -> pack (first fit, one bin per batch row) or pad -> batch ->
model features, in grain worker processes when `num_workers` > 0. A single span-corruption task
chunks and corrupts a batch at a time (one example per row); from prepared chunks of its raw
length it reads a batch of chunks at a time (`streams.ChunkBatches`). See docs/data.md.

Batches are dicts of numpy arrays (docs/architecture.md): encoder_input_tokens [B,S],
decoder_input_tokens [B,T], decoder_target_tokens [B,T], decoder_loss_weights [B,T] float32, plus
encoder/decoder_segment_ids and _positions [B,S]/[B,T] when packed. Shapes are fixed by
`max_input_length` (S) and `max_target_length` (T) so the train step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags

from t5jax import sources, streams
from t5jax.errors import DataError as DataError  # its home is t5jax.errors
from t5jax.tasks import (  # noqa: F401  (number_to_words re-exported)
  BUILTIN_TASKS,
  Example,
  builtin_task_examples,
  number_to_words,
)
from t5jax.tokenizer import (
  EOS_ID,
  Tokenizer,
  encode_document,
  load_tokenizer,
  train_sentencepiece,
)
from t5jax.train_config import DataConfig, TaskConfig
from t5jax.workdir import Paths

# Background preprocessing: a few threads and a short buffer (grain's default, 16 threads and 500
# elements, makes the first batch and every restore slow on a small CPU host).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


# ------------------------------------------------------------------------------------------------
# Reading whole files (evaluation sets, tests): t5jax.sources does the reading.

is_tsv_header = sources.is_tsv_header


def read_tsv(path: str, input_name: str = "input", target_name: str = "target") -> list[Example]:
  """Reads `input<TAB>target` lines (blank lines skipped) after an optional header row naming the
  columns (`is_tsv_header`); raises DataError `file:line: reason`, or `file: no examples`."""
  return sources.read_all(path, "pairs", sources.Fields(input_name, target_name), "tsv")


def read_jsonl(
  path: str, input_field: str = "input", target_field: str = "target"
) -> list[Example]:
  """Reads one JSON object per line with string fields; raises DataError `file:line: reason`."""
  return sources.read_all(path, "pairs", sources.Fields(input_field, target_field), "jsonl")


# ------------------------------------------------------------------------------------------------
# Span corruption.


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float):
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  return num_noise, min(num_spans, num_noise, length - num_noise)


def uniform_subsets(
  rows: int, n: int, k: int, rng: np.random.Generator, random_bits: int = 0
) -> np.ndarray:
  """`rows` independent uniformly random k-subsets of range(n), each sorted: int64 [rows, k].

  Each position gets a random key and a row keeps its k smallest. A key is one machine word:
  random bits above the position's index, so that a partition of the words (no argsort) ranks
  them and the low bits give the positions back; 32-bit words while n <= 2**16 (half the random
  draws; 41 us against 83 us for float keys and argpartition at 32 rows x 481). A row whose k-th
  and (k+1)-th random parts tie is drawn again, so the choice never depends on the index bits and
  stays exactly uniform. `random_bits` < the word's spare bits makes ties common (tests).
  """
  if not 0 < k < n:
    return np.tile(np.arange(k, dtype=np.int64), (rows, 1))
  index_bits = max((n - 1).bit_length(), 1)
  dtype, word = (np.uint32, 32) if index_bits <= 16 else (np.uint64, 64)
  spare = word - index_bits
  if random_bits:
    spare = min(spare, random_bits)
  out = np.empty((rows, k), np.int64)
  todo = np.arange(rows)
  index = np.arange(n, dtype=dtype)
  low = dtype((1 << index_bits) - 1)
  while len(todo):
    raw = rng.bit_generator.random_raw((len(todo), (n + 1) // 2 if word == 32 else n))
    bits = raw.view(np.uint32)[:, :n] if word == 32 else raw
    keys = ((bits >> dtype(word - spare)) << dtype(index_bits)) | index
    part = np.partition(keys, k, axis=1)  # one kth: numpy's partition at two is ~10x slower
    kth = part[:, :k].max(axis=1)  # the k-th smallest key; the (k+1)-th is part[:, k]
    tied = (kth >> dtype(index_bits)) == (part[:, k] >> dtype(index_bits))
    good = ~tied
    out[todo[good]] = np.sort(part[good, :k] & low, axis=1)
    todo = todo[tied]
  return out


def _noise_spans(
  rows: int,
  length: int,
  noise_density: float,
  mean_noise_span_length: float,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Where each row's noise spans start and end: int [rows, spans] each (`random_spans_noise_masks`
  draws these)."""
  num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)

  def segment(total: int) -> np.ndarray:  # [rows, num_spans] lengths >= 1 summing to total
    if num_spans == 1:
      return np.full((rows, 1), total)
    cuts = uniform_subsets(rows, total - 1, num_spans - 1, rng) + 1
    bounds = np.concatenate([np.zeros((rows, 1), int), cuts, np.full((rows, 1), total)], axis=1)
    return np.diff(bounds, axis=1)

  noise = segment(num_noise)
  keep = segment(length - num_noise)
  # Noise span i starts after keep_0..keep_i and noise_0..noise_{i-1}; all starts and ends of a
  # row are distinct (every kept span has a token).
  starts = np.cumsum(keep, axis=1) + np.cumsum(noise, axis=1) - noise
  return starts, starts + noise


def _flat(positions: np.ndarray, width: int) -> np.ndarray:
  """Per-row positions [rows, k] as indices into the flattened [rows, width] array (numpy's
  assignment through flat indices is ~3x faster than through a pair of broadcast index arrays)."""
  return (positions + (np.arange(len(positions)) * width)[:, None]).ravel()


def _masks_of(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
  rows = len(starts)
  marks = np.zeros((rows, length + 1), np.int8)
  flat = marks.reshape(-1)
  flat[_flat(starts, length + 1)] = 1
  flat[_flat(ends, length + 1)] = -1
  return np.cumsum(marks[:, :length], axis=1, dtype=np.int8) > 0


def random_spans_noise_masks(
  rows: int,
  length: int,
  noise_density: float,
  mean_noise_span_length: float,
  rng: np.random.Generator,
) -> np.ndarray:
  """T5's noise masks for `rows` sequences at once: each has round(length * density) noise tokens
  in round(noise / mean) spans.

  A sequence alternates non-noise and noise spans, starting with non-noise; span lengths are
  uniform random compositions (every span at least one token).

  Returns:
    bool [rows, length], True on noise tokens.
  """
  starts, ends = _noise_spans(rows, length, noise_density, mean_noise_span_length, rng)
  return _masks_of(starts, ends, length)


def random_spans_noise_mask(
  length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
  """One sequence's `random_spans_noise_masks`: bool [length]."""
  return random_spans_noise_masks(1, length, noise_density, mean_noise_span_length, rng)[0]


def span_corrupt_batch(
  tokens: np.ndarray,
  rng: np.random.Generator,
  sentinel_id: Callable[[int], int] | np.ndarray,
  *,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Masks random spans of each row of `tokens` [B, n] (no eos) the T5 way, all rows at once.

  Inputs keep the non-noise tokens with each noise span replaced by one sentinel (`<extra_id_0>`,
  `<extra_id_1>`, ... in order); targets list each sentinel followed by its span. Both end with eos.
  Every row has the same numbers of noise tokens and spans, so the outputs are rectangular.
  `sentinel_id` is the tokenizer's `sentinel_id`, or the array of its first sentinels' ids.

  Returns:
    (inputs [B, n - noise + spans + 1], targets [B, noise + spans + 1], mask [B, n]), int32 ids.
  """
  tokens = np.asarray(tokens, np.int32)
  rows, n = tokens.shape
  starts, ends = _noise_spans(rows, n, noise_density, mean_noise_span_length, rng)
  mask = _masks_of(starts, ends, n)
  num_noise, num_spans = _noise_counts(n, noise_density, mean_noise_span_length)
  if isinstance(sentinel_id, np.ndarray):
    sentinels = sentinel_id[:num_spans]
  else:
    sentinels = np.array([sentinel_id(i) for i in range(num_spans)], np.int32)
  # Inputs: the kept tokens, with the first token of noise span i made sentinel i and the rest of
  # the span dropped. Targets: the noise tokens, with the first token of the kept span before
  # noise span i made sentinel i (every row starts with a kept span: one before each noise span).
  keep_starts = np.concatenate([np.zeros((rows, 1), starts.dtype), ends[:, :-1]], axis=1)
  all_sentinels = np.tile(sentinels, rows)
  out = []
  for firsts, take, width in (
    (starts, ~mask, n - num_noise + num_spans),
    (keep_starts, mask.copy(), num_noise + num_spans),
  ):
    flat = _flat(firsts, n)
    ids = tokens.copy()
    ids.reshape(-1)[flat] = all_sentinels
    take.reshape(-1)[flat] = True
    row = np.empty((rows, width + 1), np.int32)
    row[:, :width] = ids[take].reshape(rows, width)
    row[:, width] = EOS_ID
    out.append(row)
  return out[0], out[1], mask


def span_corrupt(
  tokens: np.ndarray,
  rng: np.random.Generator,
  sentinel_id: Callable[[int], int] | np.ndarray,
  *,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
  """`span_corrupt_batch` of one sequence: (inputs, targets) int32 arrays, each ending in eos."""
  inputs, targets, _ = span_corrupt_batch(
    np.asarray(tokens, np.int32)[None],
    rng,
    sentinel_id,
    noise_density=noise_density,
    mean_noise_span_length=mean_noise_span_length,
  )
  return inputs[0], targets[0]


def _corrupted_lengths(tokens_length: int, density: float, mean_span: float) -> tuple[int, int]:
  num_noise, num_spans = _noise_counts(tokens_length, density, mean_span)
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_raw_length(
  max_input_length: int, max_target_length: int, noise_density: float, mean_span: float
) -> int:
  """Longest raw chunk whose corrupted inputs and targets (with eos) fit both limits."""
  best = 0
  for n in range(2, 4 * max_input_length + 2):
    inp, tgt = _corrupted_lengths(n, noise_density, mean_span)
    if inp <= max_input_length and tgt <= max_target_length:
      best = n
    elif inp > max_input_length:
      break
  if best == 0:
    raise ValueError(
      f"lengths {max_input_length}/{max_target_length} too short for span corruption"
    )
  return best


# ------------------------------------------------------------------------------------------------
# Features, padding and packing.


def truncate(ids: Sequence[int] | np.ndarray, max_length: int) -> np.ndarray:
  """Cuts to `max_length` tokens keeping the final eos (if it had one) as the last token."""
  ids = np.asarray(ids, np.int32)
  if len(ids) <= max_length:
    return ids
  out = ids[:max_length].copy()
  if ids[-1] == EOS_ID:
    out[-1] = EOS_ID
  return out


def shift_right(targets: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
  """Decoder inputs: targets shifted right with 0 first (per segment when positions are given).

  Args:
    targets: int [..., T].
    positions: int [..., T] positions restarting at 0 per packed segment, or None.
  """
  shifted = np.zeros_like(targets)
  shifted[..., 1:] = targets[..., :-1]
  if positions is not None:
    shifted = np.where(positions == 0, 0, shifted)
  return shifted


def _pad_to(ids: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros(length, np.int32)
  out[: len(ids)] = ids
  return out


def pad_batch(
  examples: Sequence[dict[str, np.ndarray]],
  input_length: int,
  target_length: int,
  batch_size: int | None = None,
) -> dict[str, np.ndarray]:
  """Unpacked batch from examples {"inputs", "targets"} (already truncated), padded with 0.

  Rows beyond len(examples) up to `batch_size` are all padding (loss weight 0).
  """
  rows = batch_size or len(examples)
  enc = np.zeros((rows, input_length), np.int32)
  tgt = np.zeros((rows, target_length), np.int32)
  for r, ex in enumerate(examples):
    enc[r] = _pad_to(ex["inputs"], input_length)
    tgt[r] = _pad_to(ex["targets"], target_length)
  return {
    "encoder_input_tokens": enc,
    "decoder_input_tokens": shift_right(tgt),
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": (tgt > 0).astype(np.float32),
  }


def _packed_features(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames grain's packed fields to the model's and adds per-segment decoder inputs/weights."""
  tgt = row["targets"].astype(np.int32)
  dec_pos = row["targets_positions"].astype(np.int32)
  dec_seg = row["targets_segment_ids"].astype(np.int32)
  return {
    "encoder_input_tokens": row["inputs"].astype(np.int32),
    "encoder_segment_ids": row["inputs_segment_ids"].astype(np.int32),
    "encoder_positions": row["inputs_positions"].astype(np.int32),
    "decoder_input_tokens": np.where(dec_seg > 0, shift_right(tgt, dec_pos), 0).astype(np.int32),
    "decoder_target_tokens": tgt,
    "decoder_segment_ids": dec_seg,
    "decoder_positions": dec_pos,
    "decoder_loss_weights": (dec_seg > 0).astype(np.float32),
  }


class PackedPlacement(NamedTuple):
  """Where an example went in `pack_examples`: its row and the start of each of its segments."""

  row: int
  segment_id: int
  input_start: int
  target_start: int


def pack_examples(
  examples: Sequence[dict[str, np.ndarray]], num_rows: int, input_length: int, target_length: int
) -> tuple[dict[str, np.ndarray], list[PackedPlacement]]:
  """First-fit packs examples {"inputs", "targets"} into `num_rows` rows (a test helper).

  For checking "packed equals unpacked" through the model: the logits of example k in
  `pad_batch(examples, ...)` row k, positions [0, len(targets_k)), must equal the packed logits at
  row placement[k].row, positions [target_start, target_start + len(targets_k)).

  Returns:
    (packed batch with segment ids and positions, placement of each example).
  """
  enc = np.zeros((num_rows, input_length), np.int32)
  tgt = np.zeros((num_rows, target_length), np.int32)
  enc_seg, enc_pos, dec_seg, dec_pos = (np.zeros_like(a) for a in (enc, enc, tgt, tgt))
  used = [[0, 0, 0] for _ in range(num_rows)]  # input fill, target fill, segments
  placement = []
  for k, ex in enumerate(examples):
    n_in, n_tg = len(ex["inputs"]), len(ex["targets"])
    for r in range(num_rows):
      if used[r][0] + n_in <= input_length and used[r][1] + n_tg <= target_length:
        break
    else:
      raise ValueError(f"example {k} does not fit in {num_rows} rows")
    i0, t0, seg = used[r][0], used[r][1], used[r][2] + 1
    enc[r, i0 : i0 + n_in] = ex["inputs"]
    enc_seg[r, i0 : i0 + n_in] = seg
    enc_pos[r, i0 : i0 + n_in] = np.arange(n_in)
    tgt[r, t0 : t0 + n_tg] = ex["targets"]
    dec_seg[r, t0 : t0 + n_tg] = seg
    dec_pos[r, t0 : t0 + n_tg] = np.arange(n_tg)
    used[r] = [i0 + n_in, t0 + n_tg, seg]
    placement.append(PackedPlacement(r, seg, i0, t0))
  row = {
    "inputs": enc,
    "inputs_segment_ids": enc_seg,
    "inputs_positions": enc_pos,
    "targets": tgt,
    "targets_segment_ids": dec_seg,
    "targets_positions": dec_pos,
  }
  return _packed_features(row), placement


# ------------------------------------------------------------------------------------------------
# Iterators.


def _json_safe(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_json_safe(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


class BatchIterator:
  """Infinite iterator of training batches with a saveable position.

  `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator built from the
  same data, config, seed and host makes the next batch the one that followed when it was saved.
  """

  def __init__(self, dataset: grain.IterDataset):
    self._dataset = dataset
    self._iterator = iter(dataset)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return _json_safe(self._iterator.get_state())

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)


class EvalData:
  """A finite evaluation set: text pairs for generation metrics and padded batches for the loss.

  Attributes:
    examples: this host's (input text, target text) pairs (for span corruption, the decoded
      corrupted inputs and targets with their sentinels).
    tokenized: the matching {"inputs", "targets"} id arrays, truncated.
  """

  def __init__(
    self,
    examples: list[Example],
    tokenized: list[dict[str, np.ndarray]],
    *,
    batch_size: int,
    input_length: int,
    target_length: int,
    num_batches: int,
  ):
    self.examples = examples
    self.tokenized = tokenized
    self.batch_size = batch_size
    self.input_length = input_length
    self.target_length = target_length
    self.num_batches = num_batches

  def __len__(self) -> int:
    return len(self.examples)

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """A single pass of unpacked batches; the last is filled with padding rows (weight 0).

    Every host yields the same number of batches (`num_batches`), as a multi-host step needs.
    """
    for b in range(self.num_batches):
      chunk = self.tokenized[b * self.batch_size : (b + 1) * self.batch_size]
      yield pad_batch(chunk, self.input_length, self.target_length, self.batch_size)


class Datasets(NamedTuple):
  """This host's training iterator and evaluation sets.

  Attributes:
    train: the infinite training iterator.
    eval: the evaluation set of a single-task run (None without one, and for mixtures).
    tasks: a mixture's evaluation sets by task name (those with an eval_file); empty otherwise.
  """

  train: BatchIterator
  eval: EvalData | None
  tasks: dict[str, EvalData] = {}

  def eval_sets(self) -> dict[str, EvalData]:
    """Every evaluation set by metrics split name: "eval", or "eval/<task>" per mixture task."""
    if self.eval is not None:
      return {"eval": self.eval}
    return {f"eval/{name}": ev for name, ev in self.tasks.items()}


# ------------------------------------------------------------------------------------------------
# Tasks: one per run, or a mixture's.


class _Task(NamedTuple):
  name: str
  cfg: TaskConfig
  kind: str  # "builtin", "pairs" or "text"
  fmt: str  # a sources format or "auto"
  manifest: dict[str, Any] | None  # a prepared folder's


def _tasks(data_cfg: DataConfig) -> list[_Task]:
  """The run's tasks: `data_cfg.tasks` by name, or the one task of the top-level fields."""
  if data_cfg.tasks:
    items = sorted(data_cfg.tasks.items())
  else:
    fields = {f.name for f in dataclasses.fields(TaskConfig)} - {"rate", "num_examples"}
    items = [("", TaskConfig(**{k: getattr(data_cfg, k) for k in fields}))]
  out = []
  for name, t in items:
    kind = {"tsv": "pairs", "jsonl": "pairs", "span_corruption": "text"}.get(t.kind, t.kind)
    fmt = t.kind if t.kind in ("tsv", "jsonl") else t.format
    manifest = sources.prepared_manifest(t.train_file) if t.train_file else None
    if manifest is not None and manifest["kind"] != kind:
      raise DataError(
        f"{t.train_file}: prepared as {manifest['kind']} records, but the task reads {kind}"
      )
    out.append(_Task(name, t, kind, fmt, manifest))
  return out


def _fields(t: TaskConfig) -> sources.Fields:
  return sources.Fields(t.input_field, t.target_field, t.text_field)


def _what(task: _Task, field: str) -> str:
  return f"--config.data.{'tasks.' + task.name + '.' if task.name else ''}{field}"


def _builtin_pairs(task: _Task, data_cfg: DataConfig, split: str, seed: int) -> list[Example]:
  n = data_cfg.builtin_train_size if split == "train" else data_cfg.builtin_eval_size
  names = [t.strip() for t in task.cfg.builtin_tasks.split(",") if t.strip()]
  return builtin_task_examples(split, n, seed, names)


def _training_texts(data_cfg: DataConfig, seed: int) -> list[str]:
  """The raw text a tokenizer is trained on: inputs and targets, or documents (a bounded read)."""
  tasks = _tasks(data_cfg)
  budget = max(data_cfg.spm_training_records // len(tasks), 1)
  texts: list[str] = []
  for task in tasks:
    if task.manifest is not None:
      raise DataError(f"{task.cfg.train_file}: prepared shards need their own tokenizer")
    if task.kind == "builtin":
      records = _builtin_pairs(task, data_cfg, "train", seed)
    else:
      records = sources.read_all(
        task.cfg.train_file,
        task.kind,
        _fields(task.cfg),
        task.fmt,
        limit=budget,
        what=_what(task, "train_file"),
      )
    for r in records:
      texts += [r] if isinstance(r, str) else [task.cfg.prefix + r[0], r[1]]
  return [t for t in texts if t]


def build_tokenizer(data_cfg: DataConfig, workdir: str | None = None, seed: int = 0) -> Tokenizer:
  """Loads `data_cfg.tokenizer`, or a prepared folder's, or trains one on the training text and
  saves it in workdir.

  A tokenizer already saved in `<workdir>/tokenizer` is reused, so a resumed run keeps its ids.
  """
  try:
    if data_cfg.tokenizer:
      extra_ids = None if data_cfg.tokenizer == "byt5" else data_cfg.extra_ids
      return load_tokenizer(data_cfg.tokenizer, extra_ids=extra_ids)
    out_dir = Paths(workdir).tokenizer if workdir else None
    if out_dir and os.path.isdir(out_dir) and os.listdir(out_dir):
      return load_tokenizer(out_dir)
    prepared = [t.manifest for t in _tasks(data_cfg) if t.manifest is not None]
    if prepared:
      return load_tokenizer(os.path.join(prepared[0]["dir"], "tokenizer"))
    if data_cfg.spm_vocab_size <= 0:
      raise DataError(
        "no tokenizer: set --config.data.tokenizer (a SentencePiece .model, a folder or byt5) or "
        "train from a prepared folder (python -m t5jax.prepare); this config trains none "
        "(spm_vocab_size=0)"
      )
    texts, size = _training_texts(data_cfg, seed), data_cfg.spm_vocab_size
    return train_sentencepiece(texts, size, out_dir, extra_ids=data_cfg.extra_ids)
  except DataError:
    raise
  except ValueError as e:  # a SentencePiece model or training text that cannot make a tokenizer
    raise DataError(str(e)) from e


def _check_prepared(task: _Task, tokenizer: Tokenizer) -> None:
  m = task.manifest
  if m is not None and m["tokenizer_sha256"] != tokenizer.fingerprint():
    raise DataError(
      f"{task.cfg.train_file}: prepared with another tokenizer than this run's "
      f"({m['tokenizer']}); prepare again or set --config.data.tokenizer={m['dir']}/tokenizer"
    )


# ------------------------------------------------------------------------------------------------
# Training streams.


class _EncodePair:
  """(input, target) text -> {"inputs", "targets"} ids (prefix added, truncated; picklable)."""

  def __init__(self, tokenizer: Tokenizer, prefix: str, input_length: int, target_length: int):
    self.tokenizer, self.prefix = tokenizer, prefix
    self.input_length, self.target_length = input_length, target_length

  def __call__(self, pair, rng=None) -> dict[str, np.ndarray]:
    del rng
    return {
      "inputs": truncate(self.tokenizer.encode(self.prefix + pair[0]), self.input_length),
      "targets": truncate(self.tokenizer.encode(pair[1]), self.target_length),
    }


class _DecodePrepared:
  """A prepared record `(file, index, bytes)` -> ids (pairs: truncated {"inputs", "targets"})."""

  def __init__(self, kind: str, input_length: int, target_length: int):
    self.kind, self.input_length, self.target_length = kind, input_length, target_length

  def __call__(self, record):
    path, index, raw = record
    arrays = sources.decode_tokens(raw, f"{path}: record {index}")
    if self.kind == "text":
      return arrays[0]
    return {
      "inputs": truncate(arrays[0], self.input_length),
      "targets": truncate(arrays[1], self.target_length),
    }


class _ParseRaw:
  """A raw ArrayRecord record `(file, index, bytes)` -> a pair or a document."""

  def __init__(self, kind: str, fields: sources.Fields):
    self.kind, self.fields = kind, fields

  def __call__(self, record):
    path, index, raw = record
    return sources.parse_arrayrecord(raw, self.kind, self.fields, f"{path}: record {index}")


class _Tokenize:
  """A document -> its ids without eos (picklable for grain's workers)."""

  def __init__(self, tokenizer: Tokenizer | None):
    self.tokenizer = tokenizer

  def __call__(self, doc) -> np.ndarray:
    if self.tokenizer is None:  # already ids (prepared shards)
      return doc
    return encode_document(self.tokenizer, doc)


class _Corrupt:
  """Span corruption of one chunk, of a `ChunkTokens` element, or of a batch of them at once."""

  def __init__(self, tokenizer: Tokenizer, data_cfg: DataConfig, seed: int = 0):
    n = getattr(tokenizer, "extra_ids", 0)
    self.sentinel_id = np.array([tokenizer.sentinel_id(i) for i in range(n)], np.int32)
    self.noise_density = data_cfg.noise_density
    self.mean_noise_span_length = data_cfg.mean_noise_span_length
    self.seed = seed

  def batch(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    inputs, targets, _ = span_corrupt_batch(
      tokens,
      rng,
      self.sentinel_id,
      noise_density=self.noise_density,
      mean_noise_span_length=self.mean_noise_span_length,
    )
    return inputs, targets

  def __call__(self, chunk: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    inputs, targets = self.batch(np.asarray(chunk, np.int32)[None], rng)
    return {"inputs": inputs[0], "targets": targets[0]}

  def element(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A `ChunkTokens` element, corrupted with the rng its key names (a mixture's path)."""
    return self(element["tokens"], np.random.default_rng([self.seed, *element["key"].tolist()]))


class _CorruptBatch:
  """A batch of `ChunkTokens` elements (or one {"tokens" [B, n], "key" [B, 4]} dict of them
  stacked) -> span-corrupted model features, all rows at once (one example per row: packed-format
  features when packing, else padded). The rng is seeded from a digest of the batch's keys."""

  def __init__(self, corrupt: _Corrupt, data_cfg: DataConfig):
    self.corrupt, self.pack = corrupt, data_cfg.pack
    self.input_length, self.target_length = data_cfg.max_input_length, data_cfg.max_target_length

  def __call__(self, elements):
    if isinstance(elements, dict):
      tokens, keys = elements["tokens"], elements["key"]
    else:
      tokens = np.stack([e["tokens"] for e in elements])
      keys = np.stack([e["key"] for e in elements])
    digest = hashlib.blake2b(np.ascontiguousarray(keys, "<i8").tobytes(), digest_size=16).digest()
    rng = np.random.default_rng([self.corrupt.seed, *np.frombuffer(digest, "<u4").tolist()])
    inputs, targets = self.corrupt.batch(tokens, rng)
    rows = len(tokens)
    enc = np.zeros((rows, self.input_length), np.int32)
    enc[:, : inputs.shape[1]] = inputs
    tgt = np.zeros((rows, self.target_length), np.int32)
    tgt[:, : targets.shape[1]] = targets
    dec_in = shift_right(tgt)
    if not self.pack:
      return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": (tgt > 0).astype(np.float32),
      }
    # One segment per row, from position 0: what grain's packing gives a row holding one example.
    enc_seg = (enc > 0).astype(np.int32)
    dec_seg = (tgt > 0).astype(np.int32)
    dec_in[dec_seg == 0] = 0
    return {
      "encoder_input_tokens": enc,
      "encoder_segment_ids": enc_seg,
      "encoder_positions": enc_seg * np.arange(self.input_length, dtype=np.int32),
      "decoder_input_tokens": dec_in,
      "decoder_target_tokens": tgt,
      "decoder_segment_ids": dec_seg,
      "decoder_positions": dec_seg * np.arange(self.target_length, dtype=np.int32),
      "decoder_loss_weights": dec_seg.astype(np.float32),
    }


def _raw_chunk_length(data_cfg: DataConfig, tokenizer: Tokenizer) -> int:
  """The raw chunk length of span corruption at these lengths; checks the sentinels suffice."""
  raw = span_corruption_raw_length(
    data_cfg.max_input_length,
    data_cfg.max_target_length,
    data_cfg.noise_density,
    data_cfg.mean_noise_span_length,
  )
  _, num_spans = _noise_counts(raw, data_cfg.noise_density, data_cfg.mean_noise_span_length)
  if num_spans > getattr(tokenizer, "extra_ids", 0):
    raise DataError(f"span corruption needs {num_spans} sentinels; the tokenizer has fewer")
  return raw


def _check_prepared_task(task: _Task, tokenizer: Tokenizer) -> None:
  _check_prepared(task, tokenizer)
  if task.cfg.prefix:
    raise DataError(
      f"{_what(task, 'prefix')}: a prepared folder holds its inputs with the prefix given to "
      "python -m t5jax.prepare (--prefix); leave this empty"
    )


def _chunk_batches(
  task: _Task,
  batch_size: int,
  data_cfg: DataConfig,
  tokenizer: Tokenizer,
  seed: int,
  host: int,
  hosts: int,
) -> grain.IterDataset | None:
  """Batches of raw chunks from a prepared folder of chunks this run's span corruption takes
  (`streams.ChunkBatches`), or None when the task is anything else (a prepared folder of other
  chunks is read as documents: concatenated and split again)."""
  m = task.manifest
  if task.kind != "text" or m is None or not m["chunk_length"]:
    return None
  if m["chunk_length"] != _raw_chunk_length(data_cfg, tokenizer):
    return None
  _check_prepared_task(task, tokenizer)
  return streams.ChunkBatches(
    m["paths"],
    m["chunk_length"],
    batch_size,
    chunks_per_record=int(m["chunks_per_record"]),
    seed=seed,
    shuffle=data_cfg.shuffle,
    window=data_cfg.shuffle_buffer,
    shard_index=host,
    shard_count=hosts,
  )


def _task_stream(
  task: _Task,
  data_cfg: DataConfig,
  tokenizer: Tokenizer,
  seed: int,
  host: int,
  hosts: int,
  batch_size: int = 0,
) -> grain.IterDataset:
  """One task's training examples on this host, endless: {"inputs", "targets"} of pairs, the
  `ChunkTokens` chunks of span corruption (`batch_size` > 0: a batch of them at a time)."""
  s_len, t_len = data_cfg.max_input_length, data_cfg.max_target_length
  shuffle = data_cfg.shuffle
  encode = _EncodePair(tokenizer, task.cfg.prefix, s_len, t_len)
  if task.kind == "builtin":
    shard = _builtin_pairs(task, data_cfg, "train", seed)[host::hosts]
    ds = grain.MapDataset.source(streams.ShuffledEpochs(shard, seed, shuffle))
    return ds.random_map(encode, seed=seed + 1).to_iter_dataset(_READ_OPTIONS)
  what = _what(task, "train_file")
  if task.manifest is not None:
    _check_prepared_task(task, tokenizer)
    ds = streams.RandomAccessStream(
      task.manifest["paths"],
      _DecodePrepared(task.kind, s_len, t_len),
      seed=seed,
      shuffle=shuffle,
      shard_index=host,
      shard_count=hosts,
    )
    tokenize = _Tokenize(None)
  else:
    files = sources.resolve_files(task.cfg.train_file, what)
    fields = _fields(task.cfg)
    if all(sources.detect_format(f, task.fmt) == "arrayrecord" for f in files):
      ds = streams.RandomAccessStream(
        files,
        _ParseRaw(task.kind, fields),
        seed=seed,
        shuffle=shuffle,
        shard_index=host,
        shard_count=hosts,
      )
    else:
      ds = streams.RecordStream(
        files,
        task.kind,
        fields,
        task.fmt,
        seed=seed,
        shuffle=shuffle,
        window=data_cfg.shuffle_buffer,
        shard_index=host,
        shard_count=hosts,
      )
    if task.kind == "pairs":
      return ds.map(encode)
    tokenize = _Tokenize(tokenizer)
  if task.kind == "pairs":
    return ds
  raw = _raw_chunk_length(data_cfg, tokenizer)
  return streams.ChunkTokens(ds, tokenize, raw, shard=host, batch_size=batch_size)


@functools.lru_cache(maxsize=64)
def _count_records(spec: str, fmt: str, fields: sources.Fields) -> int:
  """`sources.count_records`, once per spec: a line scan of every file (make_datasets builds its
  stream twice: the in-process first batch, then the run's)."""
  return sources.count_records(spec, fmt, fields)


def _rates(tasks: list[_Task], data_cfg: DataConfig) -> list[float]:
  """Each task's sampling weight: its rate, or min(examples, mixture_cap)."""
  out = []
  for task in tasks:
    if task.cfg.rate > 0:
      out.append(task.cfg.rate)
      continue
    if task.cfg.num_examples:
      n = task.cfg.num_examples
    elif task.kind == "builtin":
      n = data_cfg.builtin_train_size
    else:
      n = _count_records(task.cfg.train_file, task.fmt, _fields(task.cfg))
    out.append(float(min(n, data_cfg.mixture_cap) if data_cfg.mixture_cap else n))
  if not any(out):
    raise DataError("every task of the mixture has no training records")
  return out


def _batches(
  examples: grain.IterDataset, data_cfg: DataConfig, batch_size: int
) -> grain.IterDataset:
  """Examples -> packed or padded batches of model features."""
  s_len, t_len = data_cfg.max_input_length, data_cfg.max_target_length
  if data_cfg.pack:
    it = grain.experimental.FirstFitPackIterDataset(
      examples,
      length_struct={"inputs": s_len, "targets": t_len},
      num_packing_bins=batch_size,
      shuffle_bins=False,
    )
    return it.batch(batch_size, drop_remainder=True).map(_packed_features)
  return examples.batch(batch_size, drop_remainder=True, batch_fn=_PadBatch(s_len, t_len))


class _PadBatch:
  def __init__(self, input_length: int, target_length: int):
    self.input_length, self.target_length = input_length, target_length

  def __call__(self, examples):
    return pad_batch(examples, self.input_length, self.target_length)


def train_stream(
  data_cfg: DataConfig,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> BatchIterator:
  """This host's endless training batches: each task's stream (its own shards or records) ->
  tokenize / corrupt -> mix by rate -> pack or pad -> batch, in `data_cfg.num_workers` worker
  processes (grain's `mp_prefetch`) when > 0."""
  tasks = _tasks(data_cfg)
  corrupt = _Corrupt(tokenizer, data_cfg, seed + 1)
  args = (data_cfg, tokenizer, seed, process_index, process_count)
  one = tasks[0] if len(tasks) == 1 else None
  if one is not None and (blocks := _chunk_batches(one, batch_size, *args)) is not None:
    # Prepared chunks of this run's raw length: whole blocks, a batch of chunks at a time.
    batches = blocks.map(_CorruptBatch(corrupt, data_cfg))
  elif one is not None and one.kind == "text":  # chunked and corrupted a batch at a time
    batches = _task_stream(one, *args, batch_size=batch_size).map(_CorruptBatch(corrupt, data_cfg))
  elif all(t.kind == "text" for t in tasks):  # a mixture of span corruption: batch, then corrupt
    chunks = grain.IterDataset.mix([_task_stream(t, *args) for t in tasks], _rates(tasks, data_cfg))
    batches = chunks.batch(
      batch_size, drop_remainder=True, batch_fn=_CorruptBatch(corrupt, data_cfg)
    )
  else:
    parts = [_task_stream(t, *args) for t in tasks]
    parts = [
      p.map(corrupt.element) if t.kind == "text" else p for t, p in zip(tasks, parts, strict=True)
    ]
    examples = (
      parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, _rates(tasks, data_cfg))
    )
    batches = _batches(examples, data_cfg, batch_size)
  if data_cfg.num_workers:
    # grain's workers read absl flags of their own; a library caller (not train.py) has parsed
    # none, and grain then fails in every worker.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return BatchIterator(batches)


# ------------------------------------------------------------------------------------------------
# Evaluation sets.


def _eval_data(tokenized, examples, batch_size, data_cfg, process_index, process_count) -> EvalData:
  if data_cfg.max_eval_examples:
    tokenized, examples = (
      tokenized[: data_cfg.max_eval_examples],
      examples[: data_cfg.max_eval_examples],
    )
  per_host = math.ceil(len(examples) / process_count)
  return EvalData(
    examples[process_index::process_count],
    tokenized[process_index::process_count],
    batch_size=batch_size,
    input_length=data_cfg.max_input_length,
    target_length=data_cfg.max_target_length,
    num_batches=math.ceil(per_host / batch_size),
  )


def _eval_documents(task: _Task, tokenizer: Tokenizer, raw: int, limit: int):
  """Token chunks of a task's evaluation documents, read until `limit` chunks (0 = all)."""
  manifest = sources.prepared_manifest(task.cfg.eval_file)
  if manifest is not None:
    docs = (
      sources.decode_tokens(r, p)[0]
      for p in manifest["paths"]
      for _, _, r in streams.ConcatRecords([p])
    )
  else:
    files = sources.resolve_files(task.cfg.eval_file, _what(task, "eval_file"))
    docs = (
      encode_document(tokenizer, doc)
      for f in files
      for _, doc in sources.iter_records(f, "text", _fields(task.cfg), task.fmt)
    )
  chunks, buf = [], np.zeros(0, np.int32)
  for ids in docs:
    buf = np.concatenate([buf, ids])
    while len(buf) >= raw:
      chunks.append(buf[:raw])
      buf = buf[raw:]
      if limit and len(chunks) >= limit:
        return chunks
  if len(buf) >= 2:
    chunks.append(buf)
  return chunks


def _task_eval(
  task: _Task, data_cfg: DataConfig, tokenizer: Tokenizer, batch_size, host, hosts
) -> EvalData | None:
  limit = data_cfg.max_eval_examples
  s_len, t_len = data_cfg.max_input_length, data_cfg.max_target_length
  if task.kind == "builtin":
    # The evaluation set does not depend on the training seed, so runs stay comparable.
    examples = _builtin_pairs(task, data_cfg, "validation", 0)
  elif not task.cfg.eval_file:
    return None
  elif task.kind == "pairs":
    encode = _EncodePair(tokenizer, task.cfg.prefix, s_len, t_len)
    manifest = sources.prepared_manifest(task.cfg.eval_file)
    if manifest is not None:
      records = streams.ConcatRecords(manifest["paths"])
      n = min(len(records), limit) if limit else len(records)
      decode = _DecodePrepared("pairs", s_len, t_len)
      tokenized = [decode(records[k]) for k in range(n)]
      examples = [
        (tokenizer.decode(t["inputs"]), tokenizer.decode(t["targets"])) for t in tokenized
      ]
      return _eval_data(tokenized, examples, batch_size, data_cfg, host, hosts)
    examples = sources.read_all(
      task.cfg.eval_file,
      "pairs",
      _fields(task.cfg),
      task.fmt,
      limit=limit,
      what=_what(task, "eval_file"),
    )
    examples = [(task.cfg.prefix + i, t) for i, t in examples]
  else:
    raw = _raw_chunk_length(data_cfg, tokenizer)
    corrupt = _Corrupt(tokenizer, data_cfg)
    chunks = _eval_documents(task, tokenizer, raw, limit)
    tokenized = [corrupt(c, np.random.default_rng([0, k])) for k, c in enumerate(chunks)]
    examples = [
      (
        tokenizer.decode(t["inputs"], keep_sentinels=True),
        tokenizer.decode(t["targets"], keep_sentinels=True),
      )
      for t in tokenized
    ]
    return _eval_data(tokenized, examples, batch_size, data_cfg, host, hosts)
  encode = _EncodePair(tokenizer, "", s_len, t_len)
  tokenized = [encode(p) for p in examples]
  return _eval_data(tokenized, examples, batch_size, data_cfg, host, hosts)


def make_datasets(
  data_cfg: DataConfig,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Datasets:
  """Builds this host's training iterator and evaluation sets from its `DataConfig`.

  Args:
    data_cfg: the data settings.
    tokenizer: from `build_tokenizer` / `load_tokenizer`.
    batch_size: rows per batch on this host.
    seed: shuffle / corruption seed; the same seed gives the same batches.
    process_index, process_count: this host and the number of hosts; each host reads its own
      shards (whole files, or a disjoint 1/process_count of the records when there are fewer
      files than hosts).

  Returns:
    Datasets(train=BatchIterator (infinite), eval=EvalData or None, tasks={name: EvalData}).
  """
  kwargs = dict(
    batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count
  )
  # One batch read now, in this process: bad data at the start of a shard, a missing column or an
  # empty file is reported before a run writes anything, not at its first step.
  next(train_stream(data_cfg.replace(num_workers=0), tokenizer, **kwargs))
  train = train_stream(data_cfg, tokenizer, **kwargs)
  evals = {
    t.name: _task_eval(t, data_cfg, tokenizer, batch_size, process_index, process_count)
    for t in _tasks(data_cfg)
  }
  evals = {k: v for k, v in evals.items() if v is not None}
  if not data_cfg.tasks:
    return Datasets(train, evals.get(""))
  return Datasets(train, None, evals)
