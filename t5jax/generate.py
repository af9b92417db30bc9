"""Jitted generation and scoring entry points for T5: encode once, then a `t5jax.decoding` loop.

`generate` compiles one function per (batch, input length, method settings): the encoder runs
once, cross-attention keys/values are computed once per example (batch B) and shared by the r beams
or samples of that example (the model's `decode_step` maps row `b*r + j` to example b), the
self-attention cache (B*r rows) is preallocated, and the loop is a `lax.while_loop` that
stops as soon as every row is finished. Parameters are cast to `config.dtype` once before the loop
(`compute_dtype_params`) and the caches are in that dtype, so no step converts a weight.

Conventions (see also `t5jax.decoding`):
- `sequences` exclude the decoder start token and hold `config.pad_token_id` (0) after EOS, for
  every method (transformers pads finished beams with EOS and greedy/sampled rows with 0), and are
  always `max_new_tokens` long (transformers crops to the longest generated row).
- `scores`: beam search, transformers' `sequences_scores` (sum of log-probs / len**length_penalty);
  greedy and sampling, the sum of the model's log-probabilities of the generated tokens (EOS
  included, padding excluded), under the unwarped distribution.
- Sampling defaults to pure ancestral sampling (top_k=0, top_p=1.0); transformers defaults to
  top_k=50 whenever do_sample=True.

Input checks: `generate`, `score` and `rank` check what costs nothing when they are traced (token
arrays of an integer dtype and the right rank, floating-point parameters, matching batch sizes)
and raise `TypeError` / `ValueError` naming the argument. They do not read token values (that
would copy them from the device and cannot happen under `jax.jit`): an id outside
`[0, vocab_size)` gives NaN scores or garbage, so call `check_token_ids` on untrusted ids first
(decode.py always does). A batch of 0 rows gives empty outputs of the usual shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5jax import decoding, model
from t5jax.config import T5Config
from t5jax.quantize import QuantizedWeight

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Generated tokens and their scores.

  Attributes:
    sequences: int32 [B, L], or [B, n, L] when num_return_sequences n > 1; no start token, padded
      with pad_token_id after EOS.
    scores: float32 [B] or [B, n] (see the module docstring for their meaning per method).
    token_scores: float32 [B, L] or [B, n, L] with `return_token_scores=True` (else None): each
      generated token's log-probability under the processed (and, sampling, warped) distribution,
      0 after EOS; transformers' `compute_transition_scores` (greedy and sampling with
      `normalize_logits=True`; beams: summed, they give `scores * len**length_penalty`).
  """

  sequences: jax.Array
  scores: jax.Array
  token_scores: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
  """Log-likelihood of given targets.

  Attributes:
    sequence_scores: float32 [B], sum of token_scores.
    token_scores: float32 [B, T], log p(target_t | inputs, targets_<t), 0 where not scored.
  """

  sequence_scores: jax.Array
  token_scores: jax.Array


def _option(default: Any, help: str, method: str | None = None, **extra: Any) -> Any:
  """A GenerateConfig field: its help text, and the method it belongs to (None: every method).

  `decode.py` builds its flags from these (`flag=False`: library only)."""
  return dataclasses.field(default=default, metadata={"help": help, "method": method, **extra})


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """How `generate` decodes: the one owner of the decoding options, their defaults and checks.

  Frozen and hashable (one compilation per distinct value); validated when built, with messages
  that name the fields (`decode.py` turns the names into its flags). `generate` also takes the
  fields as keyword arguments; `config.replace(**changes)` makes a validated copy.
  """

  method: str = _option("greedy", "greedy, beam search or sampling", choices=METHODS)
  max_new_tokens: int = _option(20, "generated tokens at most, EOS included")
  num_return_sequences: int = _option(1, "the n best beams, or n samples, per input")
  num_beams: int = _option(4, "beams per example", "beam")
  length_penalty: float = _option(
    1.0, "exponent of the length normalisation of finished beams", "beam"
  )
  early_stopping: bool | str = _option(
    False, "stop a beam search as transformers does", "beam",
    choices={"true": True, "false": False, "never": "never"},
  )  # fmt: skip
  length_penalty_style: str = _option(
    "hf", "'hf' (len**length_penalty) or 't5x' (((5+len)/6)**length_penalty)", "beam", flag=False
  )
  temperature: float = _option(1.0, "divides the logits before sampling", "sample")
  top_k: int = _option(0, "sample among the k likeliest tokens (0 disables)", "sample")
  top_p: float = _option(1.0, "sample within this probability mass (1 disables)", "sample")
  ignore_eos: bool = _option(
    False, "never stop at EOS (always generate max_new_tokens; for benchmarks)", flag=False
  )
  # Logits processors (every method, transformers' order and rules) and more sampling warpers.
  min_new_tokens: int = _option(0, "EOS is impossible before this many generated tokens")
  repetition_penalty: float = _option(
    1.0, "divide (multiply if negative) the scores of tokens already fed; 1 disables"
  )
  no_repeat_ngram_size: int = _option(0, "never repeat an n-gram of this size (0 disables)")
  bad_words_ids: tuple[tuple[int, ...], ...] | None = _option(
    None, "token sequences never produced, e.g. '5 7;9' (';' between sequences)", parse="seqs"
  )
  suppress_tokens: tuple[int, ...] | None = _option(
    None, "tokens never produced, e.g. '5 7'", parse="ids"
  )
  min_p: float | None = _option(
    None, "keep tokens with probability >= min_p x the top one's", "sample"
  )
  typical_p: float = _option(1.0, "locally typical sampling mass (1 disables)", "sample")
  return_token_scores: bool = _option(False, "also return each generated token's log-prob")

  def __post_init__(self):
    # Token lists become tuples (hashable: the config is a static argument of the jitted loop).
    if self.bad_words_ids is not None:
      words = self.bad_words_ids
      if isinstance(words, (str, bytes)) or not all(isinstance(w, (list, tuple)) for w in words):
        raise ValueError(f"bad_words_ids must be a list of token lists, got {words!r}")
      object.__setattr__(self, "bad_words_ids", tuple(tuple(int(t) for t in w) for w in words))
      if not self.bad_words_ids or not all(self.bad_words_ids):
        raise ValueError("bad_words_ids must be a non-empty list of non-empty token lists")
      if any(t < 0 for w in self.bad_words_ids for t in w):
        raise ValueError(f"bad_words_ids must hold token ids >= 0, got {self.bad_words_ids}")
    if self.suppress_tokens is not None:
      if isinstance(self.suppress_tokens, (str, bytes)):
        raise ValueError(
          f"suppress_tokens must be a list of token ids, got {self.suppress_tokens!r}"
        )
      object.__setattr__(self, "suppress_tokens", tuple(int(t) for t in self.suppress_tokens))
      if not self.suppress_tokens or any(t < 0 for t in self.suppress_tokens):
        raise ValueError(
          f"suppress_tokens must be a non-empty list of token ids >= 0, got {self.suppress_tokens}"
        )
    # First: a bad max_new_tokens is reported as itself, not as min_new_tokens' bound.
    for name in ("max_new_tokens", "num_return_sequences"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise ValueError(
        f"min_new_tokens must be in [0, max_new_tokens ({self.max_new_tokens})], got "
        f"{self.min_new_tokens}"
      )
    if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
      raise ValueError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
    if self.no_repeat_ngram_size < 0:
      raise ValueError(
        f"no_repeat_ngram_size must be >= 0 (0 disables), got {self.no_repeat_ngram_size}"
      )
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.method == "greedy" and self.num_return_sequences != 1:
      raise ValueError("num_return_sequences > 1 requires method beam or sample")
    if self.method == "beam":
      if self.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
      if not math.isfinite(self.length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
      if self.num_return_sequences > self.num_beams:
        raise ValueError(
          f"num_return_sequences must be <= num_beams ({self.num_beams}), got "
          f"{self.num_return_sequences}"
        )
      if self.early_stopping not in (True, False, "never"):
        raise ValueError(
          f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
        )
      if self.length_penalty_style not in ("hf", "t5x"):
        raise ValueError(
          f"length_penalty_style must be 'hf' or 't5x', got {self.length_penalty_style!r}"
        )
    if self.method == "sample":
      if not (self.temperature > 0 and math.isfinite(self.temperature)):  # inf: uniform noise
        raise ValueError(f"temperature must be > 0 and finite, got {self.temperature}")
      if self.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
      if not 0.0 < self.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {self.top_p}")
      if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
      if not 0.0 < self.typical_p <= 1.0:
        raise ValueError(f"typical_p must be in (0, 1] (1 disables), got {self.typical_p}")

  def replace(self, **changes: Any) -> GenerateConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_strings(cls, values: dict[str, Any]) -> GenerateConfig:
    """The config of command-line spellings: None keeps a field's default; a field with a
    choices table takes its key (early_stopping "true"); a token-list field its text
    (bad_words_ids "5 7;9", suppress_tokens "5 7"; commas allowed). Raises ValueError naming
    the field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
      if value is None:
        continue
      meta = fields[name].metadata
      if isinstance(meta.get("choices"), dict):
        value = meta["choices"][value]
      if meta.get("parse"):
        try:
          seqs = [
            tuple(int(t) for t in part.replace(",", " ").split()) for part in value.split(";")
          ]
        except ValueError as e:
          raise ValueError(f"{name}: token ids must be integers, got {value!r}") from e
        if meta["parse"] == "ids":
          value = tuple(t for seq in seqs for t in seq)
        else:
          value = tuple(seqs) if any(seqs) else ()
      kwargs[name] = value
    return cls(**kwargs)

  def check_vocab(self, vocab_size: int) -> None:
    """Raises ValueError when bad_words_ids or suppress_tokens name an id the model does not
    have (`generate` checks this; a caller can before loading anything more)."""
    ids = [t for w in self.bad_words_ids or () for t in w] + list(self.suppress_tokens or ())
    if any(t >= vocab_size for t in ids):
      raise ValueError(
        f"bad_words_ids/suppress_tokens: ids must be < the vocabulary size {vocab_size}"
      )

  def processors(self) -> decoding.Processors:
    """The logits processors' settings (`decoding.Processors`; all off by default)."""
    return decoding.Processors(
      repetition_penalty=self.repetition_penalty,
      no_repeat_ngram_size=self.no_repeat_ngram_size,
      bad_words_ids=self.bad_words_ids or (),
      min_new_tokens=self.min_new_tokens,
      suppress_tokens=self.suppress_tokens or (),
    )

  def _static(self) -> GenerateConfig:
    """The part that shapes the compiled loop: length penalty and early stopping are traced, and
    the number of returned beams and other methods' settings are applied outside, so they do not
    cause recompilation."""
    beam = self.method == "beam"
    return self.replace(
      length_penalty=0.0,
      early_stopping=False,
      num_beams=self.num_beams if beam else 1,
      num_return_sequences=1 if beam else self.num_return_sequences,
    )


# Parameters the model reads in float32 whatever the compute dtype (norm statistics, the
# relative-position bias); every other floating parameter is a matrix used in `config.dtype`.
_FLOAT32_PARAMS = ("scale", "rel_embedding")


def compute_dtype_params(params: Any, config: T5Config) -> Any:
  """`params` with every matrix cast to `config.dtype` (norm scales and relative-position tables
  kept as they are), so a decoding loop converts no weight per step. The model casts each weight
  to `config.dtype` where it uses it, so the results are the same values (tested).

  An untied embedding table is kept too: only the lookup reads it, and the lookup converts the
  rows it takes. Cast whole, it cost two conversions of the `[V, D]` table per call on XLA:CPU
  (to bfloat16 here, and back to float32 where XLA moved the lookup's conversion before the
  gather): 30 ms of a 0.46 s bfloat16 greedy call at t5-v1_1-small."""
  dtype = jnp.dtype(config.dtype)

  def cast(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if isinstance(x, QuantizedWeight):  # int8 with float32 scales (t5jax.quantize)
      return x
    if name in _FLOAT32_PARAMS or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if name == "shared" and not config.tie_word_embeddings:
      return x
    return x.astype(dtype)

  return jax.tree_util.tree_map_with_path(
    cast, params, is_leaf=lambda x: isinstance(x, QuantizedWeight)
  )


def check_token_ids(tokens: Any, vocab_size: int, name: str = "tokens") -> None:
  """Raises `ValueError` naming the first id outside `[0, vocab_size)`, with its index.

  `generate`, `score` and `rank` check dtypes and shapes but not values, which they cannot read
  under `jax.jit`; an out-of-range id silently gives NaN scores or garbage. Call this outside jit
  on ids you did not make with the model's tokenizer (it reads the values: a device-to-host copy
  for a `jax.Array`). Padding (0) is a valid id.

  Args:
    tokens: an integer array of any shape, or a (nested) list of token lists of any lengths.
    vocab_size: the model's `config.vocab_size`.
    name: what to call `tokens` in the message.

  Raises:
    TypeError: non-integer values, or called on a tracer (inside `jax.jit`).
    ValueError: an id < 0 or >= vocab_size, e.g. "tokens[1, 4] = 600 is outside the model's
      vocabulary [0, 512)".
  """
  if isinstance(tokens, jax.core.Tracer):
    raise TypeError(f"check_token_ids reads the values of {name}: call it outside jax.jit")
  if isinstance(tokens, (list, tuple)):
    try:
      array = np.asarray(tokens)
    except ValueError:  # ragged: one list at a time
      array = None
    if array is None or array.dtype == object:
      for i, row in enumerate(tokens):
        check_token_ids(row, vocab_size, f"{name}[{i}]")
      return
  else:
    array = np.asarray(tokens)
  if array.size == 0:
    return
  if not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"{name} must hold integer token ids, got dtype {array.dtype}")
  bad = (array < 0) | (array >= vocab_size)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"[{', '.join(map(str, index))}]" if index else ""
    raise ValueError(
      f"{name}{where} = {array[index]} is outside the model's vocabulary [0, {vocab_size})"
    )


def _tokens(x: Any, name: str, ndim: int, shape: str, xp: Any = jnp) -> Any:
  """`x` as an int32 array of `xp` (jnp or np) after checking, without reading its values, that
  it is an integer array of rank `ndim` (`shape` names its dimensions in the message)."""
  if not hasattr(x, "dtype"):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be integer token ids {shape}, got dtype {x.dtype}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must be {shape}, got shape {x.shape}")
  return xp.asarray(x, xp.int32)


def _check_params(params: Any) -> None:
  """Every parameter is a floating-point array (integer weights decode nothing sensible), or a
  `QuantizedWeight` of `t5jax.quantize` (int8 values with their float scales)."""
  leaves = jax.tree_util.tree_leaves_with_path(
    params, is_leaf=lambda x: isinstance(x, QuantizedWeight)
  )
  if not leaves:
    raise TypeError("params is empty: pass the model parameters (t5jax.init_params, load_hf)")
  for path, leaf in leaves:
    if isinstance(leaf, QuantizedWeight):
      continue
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"params{jax.tree_util.keystr(path)} must be a floating-point array, got "
        f"{dtype or type(leaf).__name__}"
      )


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def _generate(
  params, encoder_input_tokens, rng, length_penalty, early_stopping, prefix=None, *, config,
  settings,
):  # fmt: skip
  """Returns sequences [B, r, L], scores [B, r] (r = num_beams or samples per input), and token
  scores [B, r, L] or None. `prefix`: `decoding.Prefix` per example ([B, P], [B]) or None."""
  s = settings
  eos_id = None if s.ignore_eos else config.eos_token_id
  batch = encoder_input_tokens.shape[0]
  rows_per_example = s.num_beams if s.method == "beam" else s.num_return_sequences
  num_rows = batch * rows_per_example
  params = compute_dtype_params(params, config)  # once, outside the loop
  encoded = model.encode(params, config, encoder_input_tokens)
  cross = model.init_cross_cache(params, config, encoded, encoder_input_tokens)
  prefix_len = 0 if prefix is None else prefix.tokens.shape[1]
  cache = model.init_self_cache(config, num_rows, prefix_len + s.max_new_tokens)

  def tokens_to_logits(tokens, cache, step):
    return model.decode_step(params, config, tokens, cache, cross, step)

  common = dict(
    max_len=s.max_new_tokens,
    start_id=config.decoder_start_token_id,
    eos_id=eos_id,
    pad_id=config.pad_token_id,
  )
  extra = dict(processors=s.processors(), return_token_scores=s.return_token_scores)
  token_scores = None
  if s.method == "beam":
    out = decoding.beam_search(
      tokens_to_logits,
      cache,
      batch_size=batch,
      num_beams=s.num_beams,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      length_penalty_style=s.length_penalty_style,
      prefix=prefix,
      **common,
      **extra,
    )
    seqs, scores = out[:2]
    if s.return_token_scores:
      token_scores = out[2]
  else:
    if prefix is not None:  # one copy per sample
      prefix = decoding.Prefix(
        jnp.repeat(prefix.tokens, rows_per_example, axis=0),
        jnp.repeat(prefix.lengths, rows_per_example, axis=0),
      )
    if s.method == "greedy":
      out = decoding.greedy_search(
        tokens_to_logits, cache, num_rows=num_rows, prefix=prefix, **common, **extra
      )
    else:
      out = decoding.sample(
        tokens_to_logits,
        cache,
        rng,
        num_rows=num_rows,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        min_p=s.min_p,
        typical_p=s.typical_p,
        prefix=prefix,
        **common,
        **extra,
      )
    seqs = out[0].reshape(batch, rows_per_example, s.max_new_tokens)
    scores = out[1].reshape(batch, rows_per_example)
    if s.return_token_scores:
      token_scores = out[2].reshape(batch, rows_per_example, s.max_new_tokens)
  return seqs, scores, token_scores


def _prefix(decoder_prefix, lengths, batch: int) -> decoding.Prefix | None:
  """`decoding.Prefix` from a ragged list of token lists or an int array [B, P] (+ lengths)."""
  if decoder_prefix is None:
    if lengths is not None:
      raise ValueError("decoder_prefix_lengths needs decoder_prefix")
    return None
  if isinstance(decoder_prefix, (list, tuple)) and lengths is None:
    rows = [list(r) for r in decoder_prefix]
    width = max((len(r) for r in rows), default=0)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      tokens[i, : len(r)] = r
    lengths = np.array([len(r) for r in rows], np.int32)
  else:
    tokens = np.asarray(decoder_prefix)
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
      raise TypeError(f"decoder_prefix must be integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
      raise ValueError(f"decoder_prefix must be [B, P], got shape {tokens.shape}")
    lengths = (
      np.full((tokens.shape[0],), tokens.shape[1]) if lengths is None else np.asarray(lengths)
    )
  if tokens.shape[0] != batch or lengths.shape != (batch,):
    raise ValueError(
      f"decoder_prefix must have one row per input ({batch}), got {tokens.shape[0]} rows and "
      f"lengths of shape {lengths.shape}"
    )
  if np.any(lengths < 0) or np.any(lengths > tokens.shape[1]):
    raise ValueError(f"decoder_prefix_lengths must be in [0, {tokens.shape[1]}], got {lengths}")
  if tokens.shape[1] == 0 or not np.any(lengths):
    return None
  return decoding.Prefix(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32))


def _empty_output(g: GenerateConfig) -> GenerateOutput:
  """`generate`'s outputs for a batch of 0 rows."""
  n, length = g.num_return_sequences, g.max_new_tokens
  rows = (0,) if n == 1 else (0, n)
  return GenerateOutput(
    sequences=jnp.zeros(rows + (length,), jnp.int32),
    scores=jnp.zeros(rows, jnp.float32),
    token_scores=jnp.zeros(rows + (length,), jnp.float32) if g.return_token_scores else None,
  )


def generate(
  params: Any,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  generate_config: GenerateConfig | None = None,
  *,
  rng: jax.Array | None = None,
  decoder_prefix: Any = None,
  decoder_prefix_lengths: Any = None,
  **options: Any,
) -> GenerateOutput:
  """Generates continuations of a batch of encoder inputs.

  Args:
    params: model parameters (`t5jax.init_params`, `t5jax.load_hf`).
    config: the architecture; `config.dtype` sets the computation dtype.
    encoder_input_tokens: int [B, S], padded with 0 (ending with EOS, as the tokenizer writes);
      ids are not range-checked (see `check_token_ids`). B may be 0 (empty outputs).
    generate_config: the decoding options (default `GenerateConfig()`).
    rng: PRNG key for sampling (default `jax.random.key(0)`); same key, same samples.
    decoder_prefix: forced first output tokens per input (after the start token, which it must
      not include): a list of B token lists of any lengths, or an int array [B, P] with
      `decoder_prefix_lengths` [B] (default: every row P long). Outputs, scores and lengths
      count only the generated tokens after it, as transformers' `decoder_input_ids` do.
    **options: `GenerateConfig` fields by name, overriding `generate_config`'s:
      method ("greedy", "beam" or "sample"); max_new_tokens (L, EOS included);
      num_return_sequences (n best beams or n samples per input); beam search: num_beams,
      length_penalty, early_stopping (True, False or "never", transformers' meaning),
      length_penalty_style ("hf": `len**p`, "t5x": `((5+len)/6)**p`); sampling: temperature,
      top_k, top_p, min_p, typical_p, applied in that order (top_k=0, top_p=1.0, min_p=None and
      typical_p=1.0 disable their filter); every method: min_new_tokens, repetition_penalty,
      no_repeat_ngram_size, bad_words_ids, suppress_tokens (transformers' logits processors);
      return_token_scores; ignore_eos (never stop at EOS; for benchmarks).

  Returns:
    `GenerateOutput(sequences [B, L] or [B, n, L], scores [B] or [B, n], token_scores)`.

  Raises:
    TypeError: token arrays that are not of an integer dtype, parameters that are not floating.
    ValueError: arrays of the wrong rank or batch size, invalid options (`GenerateConfig`).
  """
  g = (generate_config or GenerateConfig()).replace(**options)
  if rng is None:
    rng = jax.random.key(0)
  tokens = _tokens(encoder_input_tokens, "encoder_input_tokens", 2, "[B, S]")
  _check_params(params)
  g.check_vocab(config.vocab_size)
  prefix = _prefix(decoder_prefix, decoder_prefix_lengths, tokens.shape[0])
  if tokens.shape[0] == 0:  # nothing to decode: empty outputs of the usual shapes
    return _empty_output(g)
  code = decoding.EARLY_STOPPING_CODES.get(g.early_stopping, 0) if g.method == "beam" else 0
  seqs, scores, token_scores = _generate(
    params,
    tokens,
    rng,
    jnp.float32(g.length_penalty),
    jnp.int32(code),
    prefix,
    config=config,
    settings=g._static(),
  )
  n = g.num_return_sequences
  seqs, scores = seqs[:, :n], scores[:, :n]
  if token_scores is not None:
    token_scores = token_scores[:, :n]
  if n == 1:
    seqs, scores = seqs[:, 0], scores[:, 0]
    if token_scores is not None:
      token_scores = token_scores[:, 0]
  return GenerateOutput(sequences=seqs, scores=scores, token_scores=token_scores)


def _target_mask(target_tokens: jax.Array, config: T5Config) -> jax.Array:
  """Tokens up to and including the first EOS; every token of a row without EOS.

  Token 0 can be a generated token before EOS (or in a row cut at the length limit), so padding
  is what follows EOS, not every 0.
  """
  is_eos = target_tokens == config.eos_token_id
  return (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, encoder_input_tokens, target_tokens, target_mask, *, config: T5Config):
  decoder_inputs = model.shift_right(target_tokens, config.decoder_start_token_id)
  logits = model.forward(params, config, encoder_input_tokens, decoder_inputs)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_scores = jnp.take_along_axis(log_probs, target_tokens[..., None], axis=-1)[..., 0]
  token_scores = jnp.where(target_mask, token_scores, 0.0)
  return token_scores.sum(axis=-1), token_scores


def score(
  params: Any,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  target_tokens: jax.Array,
  target_mask: jax.Array | None = None,
) -> ScoreOutput:
  """Log-likelihood of given targets under the model (teacher forcing, one forward pass).

  Args:
    params: model parameters.
    config: the architecture.
    encoder_input_tokens: int [B, S], padded with 0 (ids not range-checked: `check_token_ids`).
    target_tokens: int [B, T], normally ending with EOS and padded after it (as `generate`
      returns them).
    target_mask: bool [B, T], the tokens to score; default: up to and including the first EOS,
      the whole row where there is none.

  Returns:
    `ScoreOutput(sequence_scores [B], token_scores [B, T])`, natural-log probabilities.
  """
  enc = _tokens(encoder_input_tokens, "encoder_input_tokens", 2, "[B, S]")
  tgt = _tokens(target_tokens, "target_tokens", 2, "[B, T]")
  _check_params(params)
  if tgt.shape[0] != enc.shape[0]:
    raise ValueError(
      f"target_tokens must have one row per input ({enc.shape[0]}), got {tgt.shape[0]} rows"
    )
  mask = _target_mask(tgt, config) if target_mask is None else jnp.asarray(target_mask, bool)
  if mask.shape != tgt.shape:
    raise ValueError(f"target_mask must be shaped as target_tokens {tgt.shape}, got {mask.shape}")
  if enc.shape[0] == 0:
    return ScoreOutput(jnp.zeros((0,), jnp.float32), jnp.zeros(tgt.shape, jnp.float32))
  seq, tok = _score(params, enc, tgt, mask, config=config)
  return ScoreOutput(sequence_scores=seq, token_scores=tok)


@dataclasses.dataclass(frozen=True)
class RankOutput:
  """Log-likelihoods of candidate outputs.

  Attributes:
    scores: float32 [B, C], the summed log-probability of each candidate (its tokens up to and
      including its first EOS); -inf for padding candidates.
    best: int32 [B], the index of each input's likeliest candidate (the first on ties).
  """

  scores: jax.Array
  best: jax.Array


@functools.partial(jax.jit, static_argnames=("config",))
def _rank(params, encoder_input_tokens, candidates, mask, valid, *, config: T5Config):
  b, c, t = candidates.shape
  flat = candidates.reshape(b * c, t)
  logits = model.candidate_logits(params, config, encoder_input_tokens, flat)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_scores = jnp.take_along_axis(log_probs, flat[..., None], axis=-1)[..., 0]
  scores = jnp.where(mask.reshape(b * c, t), token_scores, 0.0).sum(-1).reshape(b, c)
  scores = jnp.where(valid, scores, -jnp.inf)
  return scores, jnp.argmax(scores, axis=-1).astype(jnp.int32)


def rank(
  params: Any,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  candidates: Any,
  candidate_mask: Any = None,
) -> RankOutput:
  """Rank classification: the log-likelihood of each input's candidate outputs, and the best one.

  The encoder runs once per input and its cross-attention keys/values are shared by that input's
  candidates (Flan/T0-style multiple choice; t5x's `score_batch`). A candidate's score is the sum
  of log p(token | input, previous tokens) over its tokens up to and including its first EOS
  (`score`'s rule), transformers' summed log-likelihood with the same labels.

  Args:
    params, config: the model.
    encoder_input_tokens: int [B, S], 0-padded (ids not range-checked: `check_token_ids`).
    candidates: int [B, C, T] (each candidate ending with EOS, padded after it), or per input a
      list of token lists (any number per input and any lengths; shorter lists are padded with
      candidates scored -inf).
    candidate_mask: bool [B, C, T], the tokens to score (array form only; default: up to and
      including the first EOS).

  Returns:
    `RankOutput(scores [B, C], best [B])`.
  """
  enc = _tokens(encoder_input_tokens, "encoder_input_tokens", 2, "[B, S]")
  _check_params(params)
  b = enc.shape[0]
  if isinstance(candidates, (list, tuple)):
    if candidate_mask is not None:
      raise ValueError("candidate_mask needs candidates as an int array [B, C, T]")
    if len(candidates) != b or not all(candidates):
      raise ValueError(f"candidates must hold a non-empty list for each of the {b} inputs")
    if b == 0:
      return RankOutput(jnp.zeros((0, 0), jnp.float32), jnp.zeros((0,), jnp.int32))
    c = max(len(group) for group in candidates)
    t = max(len(cand) for group in candidates for cand in group)
    if t == 0:
      raise ValueError("candidates must not all be empty")
    tokens = np.zeros((len(candidates), c, t), np.int32)
    mask = np.zeros((len(candidates), c, t), bool)
    valid = np.zeros((len(candidates), c), bool)
    for i, group in enumerate(candidates):
      for j, cand in enumerate(group):
        cand = np.asarray(cand)
        if cand.size and not np.issubdtype(cand.dtype, np.integer):
          raise TypeError(f"candidates[{i}][{j}] must be integer token ids, got dtype {cand.dtype}")
        tokens[i, j, : len(cand)] = cand
        mask[i, j, : len(cand)] = True
        valid[i, j] = True
  else:
    tokens = _tokens(candidates, "candidates", 3, f"[B={b}, C, T]", np)
    if tokens.shape[0] != b:
      raise ValueError(f"candidates must be [B={b}, C, T], got shape {tokens.shape}")
    mask = (
      np.asarray(_target_mask(jnp.asarray(tokens), config))
      if candidate_mask is None
      else np.asarray(candidate_mask, bool)
    )
    if mask.shape != tokens.shape:
      raise ValueError(
        f"candidate_mask must be shaped as candidates {tokens.shape}, got {mask.shape}"
      )
    valid = np.ones(tokens.shape[:2], bool)
    if b == 0:
      return RankOutput(jnp.zeros(tokens.shape[:2], jnp.float32), jnp.zeros((0,), jnp.int32))
  scores, best = _rank(params, enc, tokens, mask, valid, config=config)
  return RankOutput(scores=scores, best=best)
