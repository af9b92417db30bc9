"""A model to decode with, and generation over lists of token ids (decode.py and evaluation).

* `load(path)`: `(T5Config, params, tokenizer)` from a HuggingFace folder or a t5jax training
  workdir (its latest checkpoint, or a given step, else its `export/hf`).
* `make_batches` / `bucket_length`: token lists into fixed-shape int32 batches, grouped by
  power-of-two length buckets (decode.py) or all at one length in order (evaluation), so
  `generate` compiles once per bucket.
* `generate_all`: `generate` over every token list, outputs back in input order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from t5jax import checkpoint, hf, sharding
from t5jax.config import T5Config, usable_attention_impls
from t5jax.errors import CheckpointError
from t5jax.generate import GenerateConfig, generate, rank
from t5jax.tokenizer import Tokenizer, load_tokenizer


class TokenizerNotFound(CheckpointError):
  """No tokenizer beside the weights, or one that cannot be read (pass one explicitly)."""


def load(
  path: str,
  tokenizer: str | None = None,
  *,
  step: int | None = None,
  scan_layers: bool | None = None,
) -> tuple[T5Config, Any, Tokenizer]:
  """The architecture, parameters and tokenizer of a checkpoint, ready for `generate`.

  Args:
    path: a HuggingFace folder (config.json + weights; tokenizer spiece.model / a .model / the
      ByT5 marker) or a t5jax training workdir (`t5jax.checkpoint`).
    tokenizer: "byt5", a SentencePiece .model or a folder holding one; default: the checkpoint's.
    step: a workdir's checkpoint step; default its latest (or its export when it has none).
    scan_layers: run the layers as one scan over stacked parameters (True) or unrolled
      (False), converting the parameters as needed; None keeps the checkpoint's setting (a
      HuggingFace folder: unrolled; a workdir: as trained).

  A workdir trained with `attention_impl="cudnn"` loads as "dot_product" where the backend has
  no cuDNN (the same attention, through XLA).

  Raises:
    CheckpointError: the folder is missing, has no weights, or cannot be read (one line);
      `TokenizerNotFound` when the tokenizer is the problem.
  """
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint folder not found: {path}")
  if os.path.exists(os.path.join(path, "config.json")):
    if not hf.has_weights(path):
      raise CheckpointError(f"{path}: config.json but no weights (model.safetensors)")
    try:
      config, params = hf.load_hf(path, scan_layers=scan_layers)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot load {path}: {e}") from e
    found_tokenizer = path
  else:
    try:
      config, params, found_tokenizer = checkpoint.load_for_inference(
        path, step, scan_layers=scan_layers
      )
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointError(f"cannot load t5jax workdir: {e}") from e
  source = tokenizer or found_tokenizer
  try:
    tok = load_tokenizer(source)
  except (OSError, ValueError) as e:
    raise TokenizerNotFound(f"no tokenizer in {source}: {e}") from e
  if tok.vocab_size > config.vocab_size:
    raise CheckpointError(
      f"tokenizer vocabulary ({tok.vocab_size}) exceeds the model's ({config.vocab_size})"
    )
  if config.attention_impl not in usable_attention_impls():
    # A run trained with cuDNN attention, decoded where there is none: the same attention through
    # XLA (the impl is how attention is computed, not what; it is no part of the parameters).
    config = config.replace(attention_impl="dot_product")
  return config, params, tok


# --- batching ------------------------------------------------------------------------------------


def bucket_length(n: int, max_len: int, minimum: int = 8) -> int:
  """Smallest power of two >= n (at least `minimum`), capped at `max_len`."""
  b = minimum
  while b < n:
    b *= 2
  return min(b, max_len)


def make_batches(
  token_ids: Sequence[Sequence[int]], batch_size: int, max_len: int, *, buckets: bool = True
) -> Iterator[tuple[list[int], np.ndarray]]:
  """Yields (row indices, int32 [batch_size, length]) batches; padding rows have index -1.

  With `buckets`, inputs are sorted by length so each batch has one power-of-two bucket length;
  without, batches follow the input order at length `max_len`. The last batch of a bucket is
  filled with copies of a one-token input (a lone EOS), so shapes repeat and compile once per
  bucket. Inputs must be at most `max_len` tokens.
  """
  groups: dict[int, list[int]] = {}
  if buckets:
    for i in sorted(range(len(token_ids)), key=lambda i: len(token_ids[i])):
      groups.setdefault(bucket_length(len(token_ids[i]), max_len), []).append(i)
  else:
    groups[max_len] = list(range(len(token_ids)))
  for length, rows in sorted(groups.items()):
    for start in range(0, len(rows), batch_size):
      idx = rows[start : start + batch_size]
      batch = np.zeros((batch_size, length), np.int32)
      batch[:, 0] = 1  # padding rows: a lone EOS
      for r, i in enumerate(idx):
        batch[r, : len(token_ids[i])] = token_ids[i]
      yield idx + [-1] * (batch_size - len(idx)), batch


def generate_all(
  params: Any,
  config: T5Config,
  token_ids: Sequence[Sequence[int]],
  generate_config: GenerateConfig,
  *,
  batch_size: int,
  max_len: int,
  buckets: bool = True,
  rng: jax.Array | None = None,
  mesh: jax.sharding.Mesh | None = None,
  on_batch: Callable[[int], Any] | None = None,
  prefixes: Sequence[Sequence[int]] | None = None,
  token_scores: list | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """`generate` for every token list (`make_batches`), outputs in input order.

  Args:
    params, config: the model (`load`); with `mesh`, params already placed on it.
    token_ids: encoder inputs, each ending with EOS and at most `max_len` long.
    generate_config: the decoding options.
    batch_size: rows per batch (a multiple of the mesh's batch shards).
    max_len: the longest bucket.
    buckets: power-of-two length buckets (else one length, in order).
    rng: batch k samples with `fold_in(rng, k)` (default `jax.random.key(0)`).
    mesh: place each batch split over the mesh's batch axes and decode under it.
    on_batch: called with the number of real inputs of each finished batch (progress).
    prefixes: a decoder prefix per input (`generate`'s `decoder_prefix`); each batch's prefixes
      are padded to a power-of-two width, so that it compiles once per width.
    token_scores: with `return_token_scores`, filled with each input's [n, L] token scores.

  Returns:
    `(sequences, scores)`: per input, int [n, L] and float [n] numpy arrays (n returned
    sequences per input).
  """
  n = generate_config.num_return_sequences
  rng = jax.random.key(0) if rng is None else rng
  sequences: list[Any] = [None] * len(token_ids)
  scores: list[Any] = [None] * len(token_ids)
  if token_scores is not None:
    token_scores[:] = [None] * len(token_ids)
  for k, (idx, batch) in enumerate(make_batches(token_ids, batch_size, max_len, buckets=buckets)):
    kw: dict[str, Any] = dict(rng=jax.random.fold_in(rng, k))
    if prefixes is not None:
      rows = [list(prefixes[i]) if i >= 0 else [] for i in idx]
      longest = max(map(len, rows))
      width = bucket_length(longest, max(longest, 1), minimum=4) if longest else 0
      kw["decoder_prefix"] = np.zeros((len(rows), width), np.int32)
      for r, row in enumerate(rows):
        kw["decoder_prefix"][r, : len(row)] = row
      kw["decoder_prefix_lengths"] = np.array([len(row) for row in rows], np.int32)
    if mesh is None:
      out = generate(params, config, batch, generate_config, **kw)
    else:
      with jax.set_mesh(mesh):
        placed = jax.device_put(batch, sharding.batch_sharding(mesh))
        out = generate(params, config, placed, generate_config, **kw)
    seqs = np.asarray(out.sequences).reshape(len(idx), n, -1)
    batch_scores = np.asarray(out.scores).reshape(len(idx), n)
    batch_tok = None if out.token_scores is None else np.asarray(out.token_scores)
    for r, i in enumerate(idx):
      if i >= 0:
        sequences[i], scores[i] = seqs[r], batch_scores[r]
        if token_scores is not None and batch_tok is not None:
          token_scores[i] = batch_tok[r].reshape(n, -1)
    if on_batch is not None:
      on_batch(sum(i >= 0 for i in idx))
  return sequences, scores


def rank_all(
  params: Any,
  config: T5Config,
  token_ids: Sequence[Sequence[int]],
  candidates: Sequence[Sequence[Sequence[int]]],
  *,
  batch_size: int,
  max_len: int,
  on_batch: Callable[[int], Any] | None = None,
) -> tuple[list[np.ndarray], list[int]]:
  """`rank` for every input and its candidate token lists, in input order.

  Candidate lists are padded to the most candidates of any input and to a power-of-two length, so
  that each (input bucket, candidate length) compiles once. Returns per input its candidates'
  scores (float [C_i]) and the index of the best one.
  """
  most = max(len(c) for c in candidates)
  scores: list[Any] = [None] * len(token_ids)
  best: list[Any] = [None] * len(token_ids)
  for idx, batch in make_batches(token_ids, batch_size, max_len):
    groups = [list(candidates[i]) if i >= 0 else [[1]] for i in idx]
    longest = max(len(c) for g in groups for c in g)
    width = bucket_length(longest, max(longest, 8))
    tokens = np.zeros((len(idx), most, width), np.int32)
    mask = np.zeros((len(idx), most, width), bool)
    for r, g in enumerate(groups):
      for j, c in enumerate(g):
        tokens[r, j, : len(c)] = c
        mask[r, j, : len(c)] = True
    out = rank(params, config, batch, tokens, mask)
    batch_scores = np.asarray(out.scores)
    for r, i in enumerate(idx):
      if i >= 0:
        scores[i] = batch_scores[r, : len(candidates[i])]
        best[i] = int(np.argmax(scores[i]))
    if on_batch is not None:
      on_batch(sum(i >= 0 for i in idx))
  return scores, best
