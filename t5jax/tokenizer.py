"""SentencePiece and byte (ByT5) tokenizers with T5's special-token and sentinel conventions.

Ids follow T5: pad 0 (also the decoder start token), eos 1, unk 2. Sentinels `<extra_id_i>` sit
above the base vocabulary in reverse order, `sentinel_id(i) = base_size + extra_ids - 1 - i`, so
`<extra_id_0>` is the highest id (32099 for T5's 32000 pieces and 100 extra ids).

`encode` appends eos and adds no BOS. Special tokens written in the text (`<extra_id_i>`, `</s>`,
`<pad>`, `<unk>`) are split out and the text between them is encoded piece by piece, each with its
own leading `▁`; on a SentencePiece model this gives the ids of transformers' `T5Tokenizer` (whose
Unigram backend has no byte fallback: where a model has byte fallback and the text holds characters
outside the vocabulary, we emit the byte pieces and transformers emits unk).

`decode` stops at the first eos and drops pad, unk and sentinels (`keep_sentinels=True` renders the
sentinels as `<extra_id_i>` instead, for looking at span-corruption examples).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

from t5jax.workdir import atomic_write

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
SPM_FILENAME = "spiece.model"
BYT5_MARKER = "byt5.txt"

_SPECIAL_RE = re.compile(r"<extra_id_(\d+)>|</s>|<pad>|<unk>")
_SPECIAL_IDS = {"</s>": EOS_ID, "<pad>": PAD_ID, "<unk>": UNK_ID}


class Tokenizer(Protocol):
  """What the data pipeline, training and decoding need from a tokenizer."""

  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int], *, keep_sentinels: bool = False) -> str: ...

  def sentinel_id(self, i: int) -> int: ...

  def save(self, directory: str) -> str: ...


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """A document's ids without eos, int32: `tokenizer.encode(text)[:-1]` (by the tokenizer's
  `encode_document` where it has one)."""
  fast = getattr(tokenizer, "encode_document", None)
  if fast is not None:
    return fast(text)
  return np.asarray(tokenizer.encode(text)[:-1], np.int32)


class _SentinelMixin:
  """Sentinel arithmetic and special-token splitting shared by both tokenizers."""

  base_size: int
  extra_ids: int
  eos_id = EOS_ID
  pad_id = PAD_ID
  unk_id = UNK_ID

  @property
  def vocab_size(self) -> int:
    """Base vocabulary plus sentinels (the model's embedding may be padded beyond this)."""
    return self.base_size + self.extra_ids

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`; the first sentinel is the highest id."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel {i} out of range: this tokenizer has {self.extra_ids} extra ids")
    return self.base_size + self.extra_ids - 1 - i

  def is_sentinel(self, token_id: int) -> bool:
    return self.base_size <= token_id < self.base_size + self.extra_ids

  def _sentinel_index(self, token_id: int) -> int:
    return self.base_size + self.extra_ids - 1 - token_id

  def _split_specials(self, text: str) -> list[str | int]:
    """Splits text into plain-text chunks (str) and special-token ids (int), in order."""
    parts: list[str | int] = []
    pos = 0
    for m in _SPECIAL_RE.finditer(text):
      if m.group(1) is not None:
        index = int(m.group(1))
        if index >= self.extra_ids:  # Not a sentinel of this vocabulary: plain text.
          continue
        token_id = self.sentinel_id(index)
      else:
        token_id = _SPECIAL_IDS[m.group(0)]
      parts.append(text[pos : m.start()])
      parts.append(token_id)
      pos = m.end()
    parts.append(text[pos:])
    return parts

  def encode(self, text: str) -> list[int]:
    """Encodes text to ids ending with eos; special tokens in the text become their ids."""
    ids: list[int] = []
    for part in self._split_specials(text):
      if isinstance(part, int):
        ids.append(part)
      elif part:
        ids.extend(self._encode_plain(part))
    ids.append(EOS_ID)
    return ids

  def encode_document(self, text: str) -> np.ndarray:
    """`encode(text)` without its eos, as int32 (a document for span corruption)."""
    if "<" not in text:  # no special token (each starts with "<"): one call, no list copies
      return np.array(self._encode_plain(text) if text else [], np.int32)
    return np.array(self.encode(text)[:-1], np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def _runs(self, ids: Iterable[int], keep_sentinels: bool) -> list[list[int] | str]:
    """Cuts ids at eos, drops pad/unk/out-of-range ids, separates sentinels from text runs."""
    runs: list[list[int] | str] = [[]]
    for token_id in ids:
      token_id = int(token_id)
      if token_id == EOS_ID:
        break
      if self.is_sentinel(token_id):
        if keep_sentinels:
          runs.append(f"<extra_id_{self._sentinel_index(token_id)}>")
          runs.append([])
        continue
      if token_id in (PAD_ID, UNK_ID) or not 0 <= token_id < self.base_size:
        continue
      runs[-1].append(token_id)
    return runs


class SentencePieceTokenizer(_SentinelMixin):
  """A SentencePiece model plus `extra_ids` sentinels, T5 style."""

  def __init__(self, model_proto: bytes, *, extra_ids: int = 100):
    """Builds the tokenizer from a serialized SentencePiece model.

    Args:
      model_proto: bytes of a `.model` file. Its ids 0, 1, 2 must be pad, eos, unk.
      extra_ids: number of sentinels appended above the SentencePiece vocabulary.
    """
    self._proto = bytes(model_proto)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except (RuntimeError, TypeError) as e:  # sentencepiece's parse failure
      raise ValueError(f"not a SentencePiece model ({str(e).splitlines()[0]})") from e
    got = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if got != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"SentencePiece model must have pad=0 eos=1 unk=2 (T5 layout), got {got}")
    self.base_size = self._sp.get_piece_size()
    self.extra_ids = int(extra_ids)

  def fingerprint(self) -> str:
    """A digest of the ids this tokenizer gives (its model and extra ids)."""
    return hashlib.sha256(self._proto + f"|{self.extra_ids}".encode()).hexdigest()

  def __getstate__(self):  # grain's worker processes receive the model bytes, not the processor
    return {"proto": self._proto, "extra_ids": self.extra_ids}

  def __setstate__(self, state):
    self.__init__(state["proto"], extra_ids=state["extra_ids"])

  @classmethod
  def from_file(cls, path: str, *, extra_ids: int = 100) -> SentencePieceTokenizer:
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto, extra_ids=extra_ids)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e

  @property
  def sp(self) -> spm.SentencePieceProcessor:
    return self._sp

  def _encode_plain(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int], *, keep_sentinels: bool = False) -> str:
    """Decodes ids up to the first eos, skipping pad, unk and (by default) sentinels."""
    out = []
    for run in self._runs(ids, keep_sentinels):
      out.append(run if isinstance(run, str) else self._sp.decode(run))
    return (" " if keep_sentinels else "").join(s for s in out if s)

  def save(self, directory: str) -> str:
    """Writes `spiece.model` (and the number of extra ids) into `directory`; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, SPM_FILENAME)
    if self.extra_ids != 100:  # before the model: a folder with a model is taken as complete
      atomic_write(os.path.join(directory, "extra_ids.txt"), f"{self.extra_ids}\n")
    atomic_write(path, self._proto)
    return path


class ByteTokenizer(_SentinelMixin):
  """ByT5's tokenizer: UTF-8 bytes shifted by 3 (pad 0, eos 1, unk 2), 125 sentinels on top.

  Vocabulary 256 + 3 + 125 = 384. `<extra_id_0>` is 383, `<extra_id_i>` is 383 - i (the T5 rule
  and the behaviour of transformers 4.x; transformers 5.x's ByT5Tokenizer numbers them upwards
  from 259). As in transformers, whitespace next to a `</s>`, `<pad>` or `<unk>` written in the
  text is dropped.
  """

  offset = 3

  def __init__(self, *, extra_ids: int = 125):
    self.base_size = 256 + self.offset
    self.extra_ids = int(extra_ids)

  def fingerprint(self) -> str:
    return hashlib.sha256(f"byt5|{self.extra_ids}".encode()).hexdigest()

  def _encode_plain(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode("utf-8")]

  def _split_specials(self, text: str) -> list[str | int]:
    parts = super()._split_specials(text)
    for k, part in enumerate(parts):
      if isinstance(part, int) and not self.is_sentinel(part):
        parts[k - 1] = parts[k - 1].rstrip()
        parts[k + 1] = parts[k + 1].lstrip()
    return parts

  def decode(self, ids: Iterable[int], *, keep_sentinels: bool = False) -> str:
    """Decodes ids up to the first eos, skipping specials; invalid UTF-8 is dropped."""
    out = []
    for run in self._runs(ids, keep_sentinels):
      if isinstance(run, str):
        out.append(run)
      else:
        out.append(bytes(i - self.offset for i in run).decode("utf-8", errors="ignore"))
    return "".join(out)

  def save(self, directory: str) -> str:
    """Writes a small marker file so `load_tokenizer(directory)` returns a ByteTokenizer."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, BYT5_MARKER)
    atomic_write(path, f"byt5 extra_ids={self.extra_ids}\n")
    return path


def load_tokenizer(
  path: str, *, extra_ids: int | None = None
) -> SentencePieceTokenizer | ByteTokenizer:
  """Loads a tokenizer.

  Args:
    path: "byt5"; a SentencePiece `.model` file; or a folder holding `spiece.model` (else the only
      `*.model`) or the ByT5 marker written by `ByteTokenizer.save`.
    extra_ids: number of sentinels; default 100 for SentencePiece (or what `save` recorded in the
      folder), 125 for ByT5.
  """
  if path.lower() == "byt5":
    return ByteTokenizer(extra_ids=125 if extra_ids is None else extra_ids)
  if os.path.isdir(path):
    marker = os.path.join(path, BYT5_MARKER)
    if os.path.exists(marker):
      with open(marker) as f:
        m = re.search(r"extra_ids=(\d+)", f.read())
      saved = int(m.group(1)) if m else 125
      return ByteTokenizer(extra_ids=saved if extra_ids is None else extra_ids)
    if extra_ids is None and os.path.exists(os.path.join(path, "extra_ids.txt")):
      with open(os.path.join(path, "extra_ids.txt")) as f:
        text = f.read().strip()
      if not text.isdigit():
        raise ValueError(f"{os.path.join(path, 'extra_ids.txt')}: not a number: {text[:40]!r}")
      extra_ids = int(text)
    model = os.path.join(path, SPM_FILENAME)
    if not os.path.exists(model):
      models = sorted(n for n in os.listdir(path) if n.endswith(".model"))
      if len(models) != 1:
        raise FileNotFoundError(
          f"{path}: expected {SPM_FILENAME}, exactly one *.model or {BYT5_MARKER}; found {models}"
        )
      model = os.path.join(path, models[0])
    path = model
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer not found: {path!r} (want 'byt5', a .model or a folder)")
  return SentencePieceTokenizer.from_file(path, extra_ids=100 if extra_ids is None else extra_ids)


def train_sentencepiece(
  texts: Iterable[str],
  vocab_size: int,
  out_path: str | None = None,
  *,
  extra_ids: int = 100,
  byte_fallback: bool = True,
  character_coverage: float = 1.0,
  max_sentences: int = 1_000_000,
) -> SentencePieceTokenizer:
  """Learns a T5-layout unigram SentencePiece model (pad 0, eos 1, unk 2, no bos) from text.

  Training is single-threaded and deterministic. With `byte_fallback` the 256 byte pieces are part
  of `vocab_size`, so it must exceed 259 plus the distinct characters of the text. `vocab_size` is
  an upper bound (`hard_vocab_limit=False`): a corpus too small for it gives a smaller vocabulary
  rather than an error.

  Args:
    texts: training sentences (one example each; newlines inside are fine).
    vocab_size: SentencePiece pieces wanted, without sentinels.
    out_path: where to write the `.model` file (a folder gets `spiece.model`); None: memory only.
    extra_ids: sentinels of the returned tokenizer.
    byte_fallback: encode characters missing from the vocabulary as byte pieces instead of unk.
    character_coverage: fraction of characters covered by single-character pieces.
    max_sentences: cap on the sentences read.

  Returns:
    The trained tokenizer.
  """
  sentences = [t for t in texts if t and t.strip()]
  if not sentences:
    raise ValueError("train_sentencepiece: no non-empty training text")
  chars = {c for t in sentences for c in t if not c.isspace()}
  minimum = 3 + (256 if byte_fallback else 0) + len(chars) + 1
  if vocab_size < minimum:
    raise ValueError(
      f"train_sentencepiece: vocab_size {vocab_size} is below the minimum {minimum} for this text "
      f"(3 specials{' + 256 byte pieces' if byte_fallback else ''} + {len(chars)} characters + ▁)"
    )
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=model,
    vocab_size=vocab_size,
    model_type="unigram",
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    byte_fallback=byte_fallback,
    character_coverage=character_coverage,
    hard_vocab_limit=False,
    input_sentence_size=max_sentences,
    shuffle_input_sentence=False,
    num_threads=1,
    max_sentence_length=1 << 16,
    minloglevel=2,
  )
  tok = SentencePieceTokenizer(model.getvalue(), extra_ids=extra_ids)
  if out_path is not None:
    if os.path.isdir(out_path) or not out_path.endswith(".model"):
      tok.save(out_path)
    else:
      os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
      atomic_write(out_path, tok._proto)
  return tok
