"""Training and evaluation data: text-to-text files, span corruption, packing and batching.

Pipelines are grain datasets, so a training iterator is deterministic given its seed and can save
and restore its position (`get_state` / `set_state`, JSON-serialisable). Order of operations for
training: records -> this host's shard (`[process_index::process_count]`) -> shuffle (reseeded every
epoch) -> infinite repeat -> tokenize / corrupt (per-element rng from the seed and the element's
index) -> pack (first fit, one bin per batch row) or pad -> batch -> model features.

Batches are dicts of numpy arrays (docs/architecture.md): encoder_input_tokens [B,S],
decoder_input_tokens [B,T], decoder_target_tokens [B,T], decoder_loss_weights [B,T] float32, plus
encoder/decoder_segment_ids and _positions [B,S]/[B,T] when packed. Shapes are fixed by
`max_input_length` (S) and `max_target_length` (T) so the train step compiles once.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from t5jax.errors import DataError as DataError  # its home is t5jax.errors
from t5jax.tasks import (  # noqa: F401  (number_to_words re-exported)
  BUILTIN_TASKS,
  Example,
  builtin_task_examples,
  number_to_words,
)
from t5jax.tokenizer import EOS_ID, Tokenizer, load_tokenizer, train_sentencepiece
from t5jax.train_config import INPUT_COLUMNS, TARGET_COLUMNS, DataConfig

# Background preprocessing: a few threads and a short buffer (grain's default, 16 threads and 500
# elements, makes the first batch and every restore slow on a small CPU host).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


# ------------------------------------------------------------------------------------------------
# Reading files.


def _open_lines(path: str) -> list[str]:
  """The lines of a UTF-8 file (a CR before the newline and a byte order mark dropped); raises
  DataError `file:line:` on invalid UTF-8, `file:` when there is no non-blank line."""
  if not path:
    raise DataError("no data file given")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such data file")
  with open(path, "rb") as f:
    raw_lines = f.read().split(b"\n")
  lines = []
  for n, raw in enumerate(raw_lines, 1):
    try:
      lines.append(raw.removesuffix(b"\r").decode("utf-8"))
    except UnicodeDecodeError as e:
      raise DataError(f"{path}:{n}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
  lines[0] = lines[0].removeprefix("\ufeff")
  if not any(line.strip() for line in lines):
    raise DataError(f"{path}: file is empty (no examples)")
  return lines


def is_tsv_header(fields: Sequence[str], input_name: str = "", target_name: str = "") -> bool:
  """True when a TSV line's two fields name an input and a target column (`INPUT_COLUMNS`,
  `TARGET_COLUMNS` or the given names): the file's header row, not an example."""
  return (
    len(fields) == 2
    and fields[0].strip() in (*INPUT_COLUMNS, input_name)
    and fields[1].strip() in (*TARGET_COLUMNS, target_name)
  )


def read_tsv(path: str, input_name: str = "input", target_name: str = "target") -> list[Example]:
  """Reads `input<TAB>target` lines (blank lines skipped) after an optional header row naming the
  columns (`is_tsv_header`); raises DataError `file:line: reason`, or `file: no examples`."""
  out, header = [], None
  for n, line in enumerate(_open_lines(path), 1):
    if not line.strip():
      continue
    fields = line.split("\t")
    if header is None:
      header = is_tsv_header(fields, input_name, target_name)
      if header:
        continue
    if len(fields) != 2:
      raise DataError(
        f"{path}:{n}: expected 2 tab-separated fields (input, target), got {len(fields)}"
      )
    if not fields[0].strip():
      raise DataError(f"{path}:{n}: empty input")
    out.append((fields[0], fields[1]))
  if not out:
    raise DataError(f"{path}: no examples (only a header row)")
  return out


def read_jsonl(
  path: str, input_field: str = "input", target_field: str = "target"
) -> list[Example]:
  """Reads one JSON object per line with string fields; raises DataError `file:line: reason`."""
  out = []
  for n, line in enumerate(_open_lines(path), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    if not isinstance(obj, dict):
      raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    pair = []
    for field in (input_field, target_field):
      if field not in obj:
        raise DataError(f"{path}:{n}: missing field {field!r} (has {sorted(obj)})")
      if not isinstance(obj[field], str):
        raise DataError(f"{path}:{n}: field {field!r} is {type(obj[field]).__name__}, not a string")
      pair.append(obj[field])
    out.append((pair[0], pair[1]))
  return out


def read_corpus(path: str, text_field: str = "text") -> list[str]:
  """Reads documents: one per non-blank line, or from `text_field` of a `.jsonl` file."""
  if path.endswith(".jsonl"):
    return [inp for inp, _ in read_jsonl(path, text_field, text_field)]
  return [line for line in _open_lines(path) if line.strip()]


# ------------------------------------------------------------------------------------------------
# Span corruption.


def random_spans_noise_mask(
  length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
  """T5's noise mask: round(length * density) noise tokens in round(noise / mean) spans.

  The sequence alternates non-noise and noise spans, starting with non-noise; span lengths are
  uniform random compositions (every span at least one token).

  Returns:
    bool [length], True on noise tokens.
  """
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  num_spans = min(num_spans, num_noise, length - num_noise)

  def segment(total: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, total), size=num_spans - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))

  noise_lengths = segment(num_noise)
  keep_lengths = segment(length - num_noise)
  mask = np.zeros(length, bool)
  pos = 0
  for keep, noise in zip(keep_lengths, noise_lengths, strict=True):
    pos += keep
    mask[pos : pos + noise] = True
    pos += noise
  return mask


def span_corrupt(
  tokens: np.ndarray,
  rng: np.random.Generator,
  sentinel_id: Callable[[int], int],
  *,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Masks random spans of `tokens` (no eos) the T5 way.

  Inputs keep the non-noise tokens with each noise span replaced by one sentinel (`<extra_id_0>`,
  `<extra_id_1>`, ... in order); targets list each sentinel followed by its span. Both end with eos.

  Returns:
    (inputs, targets) int32 arrays.
  """
  tokens = np.asarray(tokens, np.int32)
  mask = random_spans_noise_mask(len(tokens), noise_density, mean_noise_span_length, rng)
  inputs, targets = [], []
  span = -1
  for k, (tok, noise) in enumerate(zip(tokens.tolist(), mask.tolist(), strict=True)):
    if noise:
      if k == 0 or not mask[k - 1]:
        span += 1
        inputs.append(sentinel_id(span))
        targets.append(sentinel_id(span))
      targets.append(tok)
    else:
      inputs.append(tok)
  return np.array(inputs + [EOS_ID], np.int32), np.array(targets + [EOS_ID], np.int32)


def _corrupted_lengths(tokens_length: int, density: float, mean_span: float) -> tuple[int, int]:
  num_noise = min(max(int(round(tokens_length * density)), 1), tokens_length - 1)
  num_spans = min(max(int(round(num_noise / mean_span)), 1), num_noise, tokens_length - num_noise)
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


def corpus_chunks(
  documents: Sequence[str], tokenizer: Tokenizer, chunk_length: int
) -> list[np.ndarray]:
  """Tokenizes documents (without eos), concatenates them and cuts chunks of `chunk_length`."""
  stream = np.array([t for d in documents for t in tokenizer.encode(d)[:-1]], np.int32)
  chunks = [stream[i : i + chunk_length] for i in range(0, len(stream), chunk_length)]
  return [c for c in chunks if len(c) >= 2]


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
  train: BatchIterator
  eval: EvalData | None


class _ShuffledEpochs(Sequence):
  """Endless record stream: flat index e * n + i is record perm_e[i] of epoch e.

  grain's `MapDataset.shuffle` computes every index with a per-element Feistel permutation that
  cost ~2.5 ms per element on our 2-core CPU box (measured), which starves a small training step;
  a numpy permutation per epoch (seeded by (seed, epoch)) is microseconds per element and keeps
  random access, so grain's iterator state (the next flat index) still pins the position exactly.
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


def _batch_stream(
  records: Sequence[Any],
  preprocess: Callable[[Any, np.random.Generator], dict[str, np.ndarray]],
  *,
  batch_size: int,
  input_length: int,
  target_length: int,
  pack: bool,
  shuffle: bool,
  seed: int,
  process_index: int,
  process_count: int,
) -> BatchIterator:
  """records -> host shard -> shuffle per epoch, repeat -> preprocess -> pack/pad -> batch."""
  shard = list(records)[process_index::process_count]
  if not shard:
    raise DataError(f"host {process_index} of {process_count} has no training records")
  ds = grain.MapDataset.source(_ShuffledEpochs(shard, seed, shuffle))
  ds = ds.random_map(preprocess, seed=seed + 1)
  it = ds.to_iter_dataset(_READ_OPTIONS)
  if pack:
    it = grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct={"inputs": input_length, "targets": target_length},
      num_packing_bins=batch_size,
      shuffle_bins=False,
    )
    it = it.batch(batch_size, drop_remainder=True).map(_packed_features)
  else:
    it = it.batch(
      batch_size,
      drop_remainder=True,
      batch_fn=lambda exs: pad_batch(exs, input_length, target_length),
    )
  return BatchIterator(it)


def _training_texts(data_cfg: DataConfig, seed: int) -> list[str]:
  """The raw text a tokenizer is trained on: inputs and targets, or corpus documents."""
  kind = data_cfg.kind
  if kind == "span_corruption":
    return read_corpus(data_cfg.train_file, data_cfg.text_field)
  pairs = _read_pairs(data_cfg, data_cfg.train_file, "train", seed)
  return [t for pair in pairs for t in pair if t]


def _read_pairs(data_cfg: DataConfig, path: str, split: str, seed: int) -> list[Example]:
  kind = data_cfg.kind
  if kind == "builtin":
    n = data_cfg.builtin_train_size if split == "train" else data_cfg.builtin_eval_size
    tasks = [t.strip() for t in data_cfg.builtin_tasks.split(",") if t.strip()]
    return builtin_task_examples(split, n, seed, tasks)
  if kind == "tsv":
    return read_tsv(path, data_cfg.input_field, data_cfg.target_field)
  if kind == "jsonl":
    return read_jsonl(path, data_cfg.input_field, data_cfg.target_field)
  raise ValueError(f"no example pairs in data kind {kind!r}")  # span_corruption: a corpus


def build_tokenizer(data_cfg: DataConfig, workdir: str | None = None, seed: int = 0) -> Tokenizer:
  """Loads `data_cfg.tokenizer`, or trains one on the training text and saves it in workdir.

  A tokenizer already saved in `<workdir>/tokenizer` is reused, so a resumed run keeps its ids.
  """
  try:
    if data_cfg.tokenizer:
      extra_ids = None if data_cfg.tokenizer == "byt5" else data_cfg.extra_ids
      return load_tokenizer(data_cfg.tokenizer, extra_ids=extra_ids)
    out_dir = os.path.join(workdir, "tokenizer") if workdir else None
    if out_dir and os.path.isdir(out_dir) and os.listdir(out_dir):
      return load_tokenizer(out_dir)
    texts, size = _training_texts(data_cfg, seed), data_cfg.spm_vocab_size
    return train_sentencepiece(texts, size, out_dir, extra_ids=data_cfg.extra_ids)
  except DataError:
    raise
  except ValueError as e:  # a SentencePiece model or training text that cannot make a tokenizer
    raise DataError(str(e)) from e


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


def _span_corruption_datasets(
  data_cfg: DataConfig, tokenizer: Tokenizer, common: dict[str, Any], process_index, process_count
) -> Datasets:
  """`make_datasets` for kind="span_corruption": corpus chunks, corrupted per element."""
  s_len, t_len, batch_size = common["input_length"], common["target_length"], common["batch_size"]
  raw = span_corruption_raw_length(
    s_len, t_len, data_cfg.noise_density, data_cfg.mean_noise_span_length
  )
  # Targets hold one sentinel per span: length = noise + spans + eos.
  num_noise = min(max(int(round(raw * data_cfg.noise_density)), 1), raw - 1)
  num_spans = _corrupted_lengths(raw, data_cfg.noise_density, data_cfg.mean_noise_span_length)[1]
  num_spans -= num_noise + 1
  if num_spans > getattr(tokenizer, "extra_ids", 0):
    raise DataError(f"span corruption needs {num_spans} sentinels; the tokenizer has fewer")
  corrupt = dict(
    sentinel_id=tokenizer.sentinel_id,
    noise_density=data_cfg.noise_density,
    mean_noise_span_length=data_cfg.mean_noise_span_length,
  )

  def preprocess(chunk, rng):
    inputs, targets = span_corrupt(chunk, rng, **corrupt)
    return {"inputs": inputs, "targets": targets}

  chunks = corpus_chunks(read_corpus(data_cfg.train_file, data_cfg.text_field), tokenizer, raw)
  if not chunks:
    raise DataError(f"{data_cfg.train_file}: corpus has fewer than 2 tokens")
  train = _batch_stream(chunks, preprocess, **common)
  if not data_cfg.eval_file:
    return Datasets(train, None)
  eval_chunks = corpus_chunks(read_corpus(data_cfg.eval_file, data_cfg.text_field), tokenizer, raw)
  tokenized = [preprocess(c, np.random.default_rng([0, k])) for k, c in enumerate(eval_chunks)]
  examples = [
    (
      tokenizer.decode(t["inputs"], keep_sentinels=True),
      tokenizer.decode(t["targets"], keep_sentinels=True),
    )
    for t in tokenized
  ]
  return Datasets(
    train, _eval_data(tokenized, examples, batch_size, data_cfg, process_index, process_count)
  )


def make_datasets(
  data_cfg: DataConfig,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Datasets:
  """Builds this host's training iterator and evaluation set from its `DataConfig`.

  Args:
    data_cfg: the data settings.
    tokenizer: from `build_tokenizer` / `load_tokenizer`.
    batch_size: rows per batch on this host.
    seed: shuffle / corruption seed; the same seed gives the same batches.
    process_index, process_count: this host and the number of hosts; each host reads a disjoint
      1/process_count of the records.

  Returns:
    Datasets(train=BatchIterator (infinite), eval=EvalData or None).
  """
  s_len, t_len = data_cfg.max_input_length, data_cfg.max_target_length
  common = dict(
    batch_size=batch_size,
    input_length=s_len,
    target_length=t_len,
    pack=data_cfg.pack,
    shuffle=data_cfg.shuffle,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )
  if data_cfg.kind == "span_corruption":
    return _span_corruption_datasets(data_cfg, tokenizer, common, process_index, process_count)

  def encode_pair(pair, rng=None):
    del rng
    return {
      "inputs": truncate(tokenizer.encode(pair[0]), s_len),
      "targets": truncate(tokenizer.encode(pair[1]), t_len),
    }

  train = _batch_stream(
    _read_pairs(data_cfg, data_cfg.train_file, "train", seed), encode_pair, **common
  )
  if data_cfg.kind != "builtin" and not data_cfg.eval_file:
    return Datasets(train, None)
  # The evaluation set does not depend on the training seed, so runs stay comparable.
  examples = _read_pairs(data_cfg, data_cfg.eval_file, "validation", 0)
  tokenized = [encode_pair(p) for p in examples]
  return Datasets(
    train, _eval_data(tokenized, examples, batch_size, data_cfg, process_index, process_count)
  )
