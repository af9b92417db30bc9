"""A model to decode with, and generation over lists of token ids (decode.py and evaluation).

* `load(path)`: `(T5Config, params, tokenizer)` from a HuggingFace folder or a t5jax training
  workdir (its latest checkpoint, or a given step, else its `export/hf`; `load_workdir`).
* `make_mesh(mesh_cfg, batch_size)`: this process's device mesh, the batch size rounded to it.
* `place(params, config, mesh, quantize=...)`: parameters on a device mesh, optionally converted
  to int8 or bfloat16 (`t5jax.quantize`).
* `encode_texts` / `check_ids`: texts to token lists (truncated or refused past a length) and
  their ids checked against the vocabulary.
* `check_memory` / `check_input_memory`: refuse a decoder cache or an encoder attention that one
  device cannot hold, naming the setting to lower.
* `make_batches` / `bucket_length`: token lists into fixed-shape int32 batches, grouped by
  power-of-two length buckets (decode.py) or all at one length in order (evaluation), so
  `generate` compiles once per bucket.
* `generate_all`: `generate` over every token list, outputs back in input order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from t5jax import checkpoint, hf, model, peft, sharding
from t5jax.config import T5Config, usable_attention_impls
from t5jax.errors import CheckpointError, ConfigError
from t5jax.generate import GenerateConfig, check_token_ids, generate, rank
from t5jax.quantize import quantize as quantize_params
from t5jax.tokenizer import Tokenizer, load_tokenizer
from t5jax.workdir import Paths


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
      config, params, found_tokenizer = load_workdir(path, step, scan_layers=scan_layers)
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


def load_workdir(
  workdir: str, step: int | None = None, *, scan_layers: bool | None = None
) -> tuple[T5Config, Any, str]:
  """`(config, params, tokenizer_path)` of a t5jax training workdir (see `load`).

  Uses checkpoint `step` (default the latest) when there is one, else the exported HuggingFace
  folder. `scan_layers` (None: as trained) returns the parameters per layer or stacked over
  layers whatever the run used (`t5jax.model.convert_params`).
  """
  config, params, tok = _load_workdir(workdir, step)
  if scan_layers is not None and scan_layers != config.scan_layers:
    config = config.replace(scan_layers=scan_layers)
    params = model.convert_params(params, config)
  return config, params, tok


def _load_workdir(workdir: str, step: int | None) -> tuple[T5Config, Any, str]:
  paths = Paths(workdir)
  if not paths.has_tokenizer():
    raise FileNotFoundError(f"{workdir}: no tokenizer/ folder in this t5jax workdir")
  tok = paths.tokenizer
  pointer = peft.read_pointer(workdir)
  if paths.has_checkpoints():
    _, params = checkpoint.restore_params(workdir, step)
    config = checkpoint.load_model_config(workdir)
    if pointer is not None:  # adapters / prompt alone: over the base they were trained on
      params = peft.combine(_peft_base(pointer["base"], config, workdir), params)
    return config, params, tok
  hf_dir = paths.export_hf
  if os.path.isfile(os.path.join(hf_dir, "config.json")):
    # The run's own config (dtype, scan_layers, ...) over the folder's architecture.
    has_config = os.path.isfile(paths.model_config)
    config = checkpoint.load_model_config(workdir) if has_config else None
    if config is not None:
      config = config.without_peft()  # a LoRA run's export holds the merged weights
    config, params = hf.load_hf(hf_dir, config=config)
    return config, params, tok
  raise FileNotFoundError(f"{workdir}: no checkpoints/ and no export/hf/ with weights")


def _peft_base(base: str, config: T5Config, workdir: str):
  """The frozen base of a PEFT workdir's checkpoints (a HuggingFace folder), in `config`'s
  layer layout."""
  if not os.path.isfile(os.path.join(base, "config.json")):
    raise CheckpointError(
      f"{Paths(workdir).peft_pointer}: the base model {base} is gone (its checkpoints hold only "
      "the adapters / prompt); restore that folder"
    )
  return hf.load_hf(base, config=config)[1]


# --- placing, encoding and checking ---------------------------------------------------------


def place(params: Any, config: T5Config, mesh, *, quantize: str = "", output_layer: bool = True):
  """`params` on `mesh` (`t5jax.sharding.param_shardings`), then with `quantize` ("int8" or
  "bfloat16") converted once by `t5jax.quantize` (`output_layer`: the output layer too)."""
  params = jax.device_put(params, sharding.param_shardings(config, mesh))
  if not quantize:
    return params
  return quantize_params(params, config, quantize, output_layer=output_layer)


def make_mesh(
  mesh_cfg: sharding.MeshConfig, batch_size: int, devices: Sequence[Any] | None = None
) -> tuple[jax.sharding.Mesh, int]:
  """The mesh of `mesh_cfg` over `devices` (default: this process's), and `batch_size` rounded up
  to a multiple of the mesh's batch shards (data x fsdp), as `generate_all` and `rank_all` need.

  Raises ConfigError (one line, naming the devices there are) for sizes that do not fit them.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  try:
    mesh = sharding.create_mesh(mesh_cfg, devices)
  except ConfigError as e:
    raise ConfigError(f"{e} ({len(devices)} {devices[0].platform} devices)") from e
  shards = sharding.batch_shards(mesh)
  return mesh, -(-batch_size // shards) * shards


def encode_texts(
  tokenizer: Tokenizer, texts: Sequence[str], max_len: int, *, strict: bool = False
) -> tuple[list[list[int]], int]:
  """`(token lists, number truncated)`: each text's ids, cut to `max_len` keeping the final EOS.

  Raises ConfigError naming the first input (numbered from 1) longer than `max_len` if `strict`.
  """
  out, long_rows = [], []
  for number, text in enumerate(texts, start=1):
    ids = list(tokenizer.encode(text))
    if len(ids) > max_len:
      long_rows.append(number)
      ids = ids[: max_len - 1] + [ids[-1]]
    out.append(ids)
  if long_rows and strict:
    raise ConfigError(
      f"input {long_rows[0]} is longer than max_input_length {max_len} tokens "
      f"({len(long_rows)} inputs in all; drop strict to truncate)"
    )
  return out, len(long_rows)


def check_ids(token_lists: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
  """`t5jax.generate.check_token_ids` on each token list, numbered from 1 in the message
  (`what` names them: "input", "prefix of input")."""
  for number, ids in enumerate(token_lists, start=1):
    try:
      check_token_ids(ids, vocab_size, f"{what} {number}: token")
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{e} (is the tokenizer the model's?)") from e


def drop_eos(ids: Sequence[int], eos: int = 1) -> list[int]:
  """A token list without its final EOS (a decoder prefix continues where the text ends)."""
  ids = list(ids)
  return ids[:-1] if ids and ids[-1] == eos else ids


def generated_length(sequence: Sequence[int], eos: int = 1) -> int:
  """How many tokens a returned sequence generated: up to and including its first EOS."""
  sequence = list(sequence)
  return sequence.index(eos) + 1 if eos in sequence else len(sequence)


def device_bytes() -> int:
  """Memory of one local device (its allocator's limit; a CPU: the machine's RAM)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The defaults of the settings that size the decoder cache: the one raised furthest above its
# default is the one an error names.
_CACHE_DEFAULTS = dict(batch_size=16, num_beams=4, num_return_sequences=1, max_new_tokens=64)


def check_memory(
  config: T5Config,
  gen_cfg: GenerateConfig,
  batch_size: int,
  given: frozenset[str] | set[str] = frozenset(),
  limit: int | None = None,
) -> None:
  """Refuses a decoder cache that cannot fit in one device's memory (`limit`, default
  `device_bytes()`) with a `ConfigError` naming the setting (of those `given` by the user) that
  makes it too large: max_new_tokens, num_beams, num_return_sequences or batch_size."""
  factors = {"batch_size": batch_size}
  if gen_cfg.method == "beam":
    factors["num_beams"] = gen_cfg.num_beams
  elif gen_cfg.method == "sample":
    factors["num_return_sequences"] = gen_cfg.num_return_sequences
  factors["max_new_tokens"] = gen_cfg.max_new_tokens
  # Self-attention keys and values of every decoder layer, float32, per row and position.
  unit = config.num_decoder_layers * 2 * config.num_heads * config.d_kv * 4
  need = unit * math.prod(factors.values())
  limit = device_bytes() if limit is None else limit
  if need <= limit:
    return
  raised = [f for f in factors if f in given and factors[f] > 1] or ["max_new_tokens"]
  lead = max(raised, key=lambda f: factors[f] / _CACHE_DEFAULTS[f])
  most = max(1, limit // (need // factors[lead]))
  sizes = " x ".join(f"{f} {v}" for f, v in factors.items())
  raise ConfigError(
    f"{lead} {factors[lead]} cannot be allocated: the decoder cache of {sizes} would take "
    f"{need / 2**30:.1f} GiB of the device's {limit / 2**30:.1f} GiB (at most {most} with the "
    "other settings as they are)"
  )


def check_input_memory(
  config: T5Config,
  token_ids: Sequence[Sequence[int]],
  batch_size: int,
  max_input_length: int,
  given: frozenset[str] | set[str] = frozenset(),
  limit: int | None = None,
) -> None:
  """Refuses inputs whose encoder attention cannot fit in one device's memory: the scores of one
  layer (float32 [batch, heads, S, S]), the position bias ([heads, S, S]) and the decoder's cross-
  attention keys and values, at S the longest input's bucket (at most `max_input_length`). The
  `ConfigError` names batch_size when only it was `given`, else max_input_length."""
  longest = max(len(ids) for ids in token_ids)
  s = bucket_length(longest, max_input_length)
  cross = batch_size * config.num_decoder_layers * 2 * config.num_heads * config.d_kv * 4

  def need(n: int) -> int:
    return 4 * config.num_heads * (batch_size + 1) * n * n + cross * n

  limit = device_bytes() if limit is None else limit
  if need(s) <= limit:
    return
  most = s
  while most > 1 and need(most) > limit:
    most = int(most * 0.9)
  blame_batch = "batch_size" in given and "max_input_length" not in given
  lead = f"batch_size {batch_size}" if blame_batch else f"max_input_length {max_input_length}"
  raise ConfigError(
    f"{lead} cannot be allocated: the encoder's attention over {s} tokens (the longest input has "
    f"{longest}) at batch_size {batch_size} would take {need(s) / 2**30:.1f} GiB of the "
    f"device's {limit / 2**30:.1f} GiB (about {most} tokens fit; a lower max_input_length "
    "truncates longer inputs)"
  )


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


# --- texts in ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedRequests:
  """What `encode_requests` returns: token lists per input (EOS-terminated, at most `max_len`),
  per input its decoder prefix (no EOS) or candidates' token lists where given, and how many
  inputs were cut to `max_len`."""

  inputs: list[list[int]]
  prefixes: list[list[int]] | None
  candidates: list[list[list[int]]] | None
  truncated: int


def encode_requests(
  tokenizer: Tokenizer,
  config: T5Config,
  texts: Sequence[str],
  *,
  batch_size: int,
  max_len: int,
  generate_config: GenerateConfig | None = None,
  prefixes: Sequence[str] | None = None,
  candidates: Sequence[Sequence[str]] | None = None,
  strict: bool = False,
  given: frozenset[str] | set[str] = frozenset(),
) -> EncodedRequests:
  """Texts to the token lists `generate_all` (with `generate_config`) or `rank_all` (with
  `candidates`) take, every check done first: the decoder cache (`check_memory`) and the
  options' token ids (`GenerateConfig.check_vocab`) when generating; inputs cut to `max_len`
  (refused with `strict`, `encode_texts`), every id in the vocabulary (`check_ids`), the encoder's
  attention within memory (`check_input_memory`). `given` names the settings a user chose, which
  a memory error blames first.

  Raises ConfigError (one line) for a request that cannot be decoded.
  """
  if generate_config is not None:
    check_memory(config, generate_config, batch_size, given)
    try:
      generate_config.check_vocab(config.vocab_size)
    except ValueError as e:
      raise ConfigError(str(e)) from e
  token_ids, cut = encode_texts(tokenizer, texts, max_len, strict=strict)
  check_ids(token_ids, config.vocab_size, "input")
  check_input_memory(config, token_ids, batch_size, max_len, given)
  prefix_ids = cand_ids = None
  if prefixes is not None:
    prefix_ids = [drop_eos(tokenizer.encode(t)) for t in prefixes]
    check_ids(prefix_ids, config.vocab_size, "prefix of input")
  if candidates is not None:
    cand_ids = [[list(tokenizer.encode(c)) for c in group] for group in candidates]
    check_ids(cand_ids, config.vocab_size, "candidates of input")
  return EncodedRequests(token_ids, prefix_ids, cand_ids, cut)
