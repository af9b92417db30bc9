"""Model-agnostic autoregressive decoding: greedy, sampling and beam search as `lax.while_loop`s.

Every loop drives a `tokens_to_logits(tokens[N], cache, step) -> (logits[N, V], cache)` function:
`tokens` are the tokens at position `step` (the start token at step 0), `cache` is any pytree whose
leaves all have leading dimension N (beam search reorders them with `leaf[idx]`). Nothing here knows
about T5; `t5jax.generate` closes the model's parameters and cross-attention cache over
`tokens_to_logits`.

Rows: N = B * r where r is the number of beams or samples per example; rows b*r .. b*r+r-1 belong to
example b. Sequences are [.., L] int32 without the start token; positions after EOS hold `pad_id`.

Beam search follows transformers' (5.x) algorithm step for step so that the same logits give the
same hypotheses and scores: 2*num_beams candidates per step, a candidate that ends in EOS (or
reaches the maximum length) among the top num_beams becomes a finished hypothesis scored
`sum(logprobs) / len**length_penalty`, and the same `early_stopping` heuristics (True, False,
"never"). Differences: finished hypotheses are padded with `pad_id` (transformers pads them with
EOS), and an optional t5x brevity penalty `((5 + len) / 6) ** alpha`.

Sampling warpers are pure functions over logits [..., V] that reproduce transformers'
`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper` (ties included),
`MinPLogitsWarper` and `TypicalLogitsWarper`. `Processors` / `apply_processors` reproduce its
logits processors (repetition penalty, no-repeat n-gram, bad words, min new tokens, suppressed
tokens) on a static history buffer; `Prefix` forces per-row first tokens. Every extra is behind a
Python-level switch, so the default loops are the ones without them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from t5jax.config import on_cpu

Cache = Any
TokensToLogits = Callable[[jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]

NEG_INF = -1.0e9  # transformers' "impossible" score; kept finite so sums and orderings match it.
# early_stopping as an int32 code, so that it can be a traced argument.
EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


# --------------------------------------------------------------------------------------------------
# Selection over the vocabulary. XLA:CPU's argmax (a variadic reduce of values and indices) and
# its TopK run ~4 ns per element, 5-20x slower than a plain max; over 8 rows of 32k logits per
# decoding step that was ~1.1 ms of greedy's ~9 ms and ~1.2 ms of beam-4's. Only the CPU backend
# takes the rewritten forms: accelerators keep XLA's own (measured nowhere else, and the argmax
# rewrite reads its input twice).


def argmax(x: jax.Array, axis: int = -1) -> jax.Array:
  """`jnp.argmax` (the first index of the largest value; of the first NaN if any); on CPU as two
  plain reductions: the max, then the least index holding it (float32 indices, exact below
  2**24)."""
  x = jax.lax.stop_gradient(x)
  axis = axis % x.ndim
  if x.shape[axis] >= 1 << 24 or not on_cpu():
    return jnp.argmax(x, axis=axis)
  top = jnp.max(x, axis=axis, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.float32, x.shape, axis)
  hit = (x == top) | jnp.isnan(x)
  return jnp.min(jnp.where(hit, index, jnp.inf), axis=axis).astype(jnp.int32)


def top_k(x: jax.Array, k: int, chunk: int = 128) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` over the last axis of `x` [R, n]: the same values and indices, ties
  to the lower index, for any input without NaN (a chunk holding a NaN has a NaN max, which TopK
  may rank otherwise).

  On CPU the row is cut into chunks of `chunk`; the k largest elements lie in the k chunks with the
  largest maxima (ties to the lower chunk: every chunk ranked above an element's own holds an
  element ranked above it), so TopK runs over those chunks' k * chunk elements only.
  """
  rows, n = x.shape
  if n < 8 * k * chunk or not on_cpu():
    return jax.lax.top_k(x, k)
  pad = (-n) % chunk
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  chunks = x.reshape(rows, -1, chunk)
  best = jnp.sort(jax.lax.top_k(jnp.max(chunks, axis=-1), k)[1], axis=-1)  # ascending ids
  candidates = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(rows, k * chunk)
  values, where = jax.lax.top_k(candidates, k)
  index = jnp.take_along_axis(best, where // chunk, axis=1) * chunk + where % chunk
  return values, index.astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Logits warpers.


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
  """Divides logits [..., V] by `temperature` (> 0)."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  return logits / temperature


def top_k_filter(logits: jax.Array, top_k: int, min_tokens_to_keep: int = 1) -> jax.Array:
  """Keeps every logit >= the k-th largest (ties at the boundary are all kept); others -> -inf.

  Args:
    logits: [..., V].
    top_k: k > 0 (0 disables the filter).
    min_tokens_to_keep: k is raised to at least this.

  Returns:
    [..., V] filtered logits.
  """
  if top_k == 0:
    return logits
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
  kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth_largest, -jnp.inf, logits)


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`a + b` as `(s, e)` with `s = fl(a + b)` and `s + e` exactly `a + b` (Knuth's TwoSum)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _cumsum_wide(x: jax.Array) -> jax.Array:
  """float32 cumulative sum along the last axis, each prefix rounded once from a wide sum.

  transformers' nucleus filter takes `cumsum` of float32 probabilities on the CPU, which
  accumulates in float64 and rounds every prefix to float32; a float32 scan rounds at every
  addition, and the rounding errors tip prefixes that lie exactly on `1 - top_p` (a flat row of
  40 tokens at top_p = 0.5 kept 21 tokens instead of 20). Each prefix here is a float32 pair
  (sum, error) combined with TwoSum, ~48 significant bits, then rounded to float32.
  """

  def add(a, b):
    s, e = _two_sum(a[0], b[0])
    e = e + a[1] + b[1]
    hi = s + e  # renormalise so that the pair stays (rounded sum, small remainder)
    return hi, e - (hi - s)

  hi, lo = jax.lax.associative_scan(add, (x, jnp.zeros_like(x)), axis=-1)
  return hi + lo


def top_p_filter(logits: jax.Array, top_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
  """Nucleus filter in transformers' order: sort ascending, drop the tokens whose cumulative
  probability is <= 1 - top_p, always keep the `min_tokens_to_keep` largest.

  The sort is stable (among equal logits the lower id counts as smaller, so it is dropped first,
  as in transformers on CPU) and the cumulative sum rounds each prefix once, as transformers'
  float64 accumulation does (`_cumsum_wide`), so kept sets are the same at exact boundaries.

  Args:
    logits: [..., V].
    top_p: in (0, 1]; 1.0 disables the filter.
    min_tokens_to_keep: never drop the largest this many tokens.

  Returns:
    [..., V] filtered logits.
  """
  if not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p must be in [0, 1], got {top_p}")
  if top_p >= 1.0:
    return logits
  order = jnp.argsort(logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cumulative = _cumsum_wide(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1))
  remove_sorted = cumulative <= np.float32(1.0 - top_p)
  vocab = logits.shape[-1]
  keep_tail = jnp.arange(vocab) >= vocab - min_tokens_to_keep
  remove_sorted = remove_sorted & ~keep_tail
  inverse = jnp.argsort(order, axis=-1)
  remove = jnp.take_along_axis(remove_sorted, inverse, axis=-1)
  return jnp.where(remove, -jnp.inf, logits)


def min_p_filter(logits: jax.Array, min_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
  """Drops the tokens whose probability is below `min_p` times the top token's (transformers'
  `MinPLogitsWarper`); the `min_tokens_to_keep` likeliest always stay.

  Args:
    logits: [..., V].
    min_p: in [0, 1]; 0 keeps every token.
    min_tokens_to_keep: never drop the largest this many tokens.
  """
  if not 0.0 <= min_p <= 1.0:
    raise ValueError(f"min_p must be in [0, 1], got {min_p}")
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  remove = probs < min_p * jnp.max(probs, axis=-1, keepdims=True)
  k = min(min_tokens_to_keep, logits.shape[-1])
  kth_largest = jax.lax.top_k(probs, k)[0][..., -1:]
  # transformers keeps the top k by index; for distinct probabilities that is p >= the k-th.
  remove = remove & (probs < kth_largest)
  return jnp.where(remove, -jnp.inf, logits)


def typical_filter(logits: jax.Array, typical_p: float, min_tokens_to_keep: int = 1) -> jax.Array:
  """Locally typical sampling (transformers' `TypicalLogitsWarper`): tokens sorted by how far
  their surprisal is from the entropy; keep the closest ones up to mass `typical_p` (the token
  that crosses it included, and every token as close as it).

  Args:
    logits: [..., V].
    typical_p: in (0, 1]; 1.0 disables the filter.
    min_tokens_to_keep: never drop the closest this many tokens.
  """
  if not 0.0 < typical_p <= 1.0:
    raise ValueError(f"typical_p must be in (0, 1], got {typical_p}")
  if typical_p >= 1.0:
    return logits
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  entropy = -jnp.sum(jnp.where(p > 0, log_p * p, 0.0), axis=-1, keepdims=True)
  shifted = jnp.abs(-log_p - entropy)
  order = jnp.argsort(shifted, axis=-1, stable=True)
  sorted_shifted = jnp.take_along_axis(shifted, order, axis=-1)
  sorted_logits = jnp.take_along_axis(logits.astype(jnp.float32), order, axis=-1)
  cumulative = _cumsum_wide(jax.nn.softmax(sorted_logits, axis=-1))
  vocab = logits.shape[-1]
  last = jnp.minimum(jnp.sum(cumulative < typical_p, axis=-1, keepdims=True), vocab - 1)
  remove_sorted = sorted_shifted > jnp.take_along_axis(sorted_shifted, last, axis=-1)
  remove_sorted = remove_sorted & (jnp.arange(vocab) >= min_tokens_to_keep)
  remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(remove, -jnp.inf, logits)


def process_logits(
  logits: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  min_p: float | None = None,
  typical_p: float = 1.0,
  min_tokens_to_keep: int = 1,
) -> jax.Array:
  """Temperature, top-k, top-p, min-p, then typical-p (each skipped at its neutral value), in
  transformers' order."""
  if temperature != 1.0:
    logits = apply_temperature(logits, temperature)
  if top_k != 0:
    logits = top_k_filter(logits, top_k, min_tokens_to_keep)
  if top_p < 1.0:
    logits = top_p_filter(logits, top_p, min_tokens_to_keep)
  if min_p is not None:
    logits = min_p_filter(logits, min_p, min_tokens_to_keep)
  if typical_p < 1.0:
    logits = typical_filter(logits, typical_p, min_tokens_to_keep)
  return logits


# --------------------------------------------------------------------------------------------------
# Logits processors (every method): transformers' order and rules, on the tokens fed so far.


class Processors(NamedTuple):
  """Static settings of the logits processors; the defaults turn each one off.

  Attributes:
    repetition_penalty: scores of tokens already fed (start token and prefix included, as
      transformers) are divided by it when positive, multiplied when negative; 1.0 disables.
    no_repeat_ngram_size: n > 0 bans every token that would repeat an n-gram of the fed tokens.
    bad_words_ids: token sequences never produced: the last token is banned where the fed
      tokens end with the others (a lone EOS is ignored, as transformers does).
    min_new_tokens: EOS is banned while fewer tokens than this have been generated.
    suppress_tokens: tokens always banned.
  """

  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0
  bad_words_ids: tuple[tuple[int, ...], ...] = ()
  min_new_tokens: int = 0
  suppress_tokens: tuple[int, ...] = ()

  @property
  def active(self) -> bool:
    return self != Processors()


def apply_processors(
  scores: jax.Array,
  history: jax.Array,
  length: jax.Array,
  generated: jax.Array,
  processors: Processors,
  eos_id: int | None,
) -> jax.Array:
  """transformers' processors in its order: repetition penalty, no-repeat n-gram, bad words,
  min new tokens, suppressed tokens.

  Args:
    scores: [N, V] logits (greedy, sampling) or log-probabilities (beam search, as transformers).
    history: int [N, H], the tokens fed so far (start token, prefix, generated) in [:, :length].
    length: int32 scalar, how many tokens of `history` are valid.
    generated: int32 scalar or [N], tokens generated so far (prefix excluded).
    processors: the settings.
    eos_id: EOS (None: min_new_tokens does nothing).

  Returns:
    [N, V] processed scores (banned tokens -inf).
  """
  p = processors
  n_rows, vocab = scores.shape
  width = history.shape[1]
  rows = jnp.arange(n_rows)[:, None]
  banned = jnp.zeros((n_rows, vocab), bool)

  def mark(ids, where):  # ids [N, W] banned where `where`; scattered past the vocab otherwise
    ids = jnp.where(where, jnp.minimum(ids, vocab), vocab)
    return jnp.zeros((n_rows, vocab + 1), bool).at[rows, ids].set(True)[:, :vocab]

  if p.repetition_penalty != 1.0:
    seen = mark(history, jnp.arange(width)[None] < length)
    penalized = jnp.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    scores = jnp.where(seen, penalized, scores)
  n = p.no_repeat_ngram_size
  if n and width >= n:
    count = width - n + 1
    windows = jnp.stack([history[:, k : k + count] for k in range(n)], axis=-1)  # [N, W, n]
    match = (jnp.arange(count) <= length - n)[None]  # the window lies within the fed tokens
    if n > 1:
      suffix = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - n + 1, 0), n - 1, 1)
      match = match & jnp.all(windows[..., :-1] == suffix[:, None], axis=-1)
    banned = banned | mark(windows[..., -1], match)
  for word in p.bad_words_ids:
    if eos_id is not None and tuple(word) == (eos_id,):
      continue
    m = len(word) - 1
    hit = jnp.ones((n_rows,), bool)
    if m:
      tail = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - m, 0), m, 1)
      hit = (length >= m) & jnp.all(tail == jnp.asarray(word[:-1], history.dtype), axis=-1)
    banned = banned.at[:, word[-1]].set(banned[:, word[-1]] | hit)
  if p.min_new_tokens and eos_id is not None:
    early = jnp.broadcast_to(jnp.asarray(generated) < p.min_new_tokens, (n_rows,))
    banned = banned.at[:, eos_id].set(banned[:, eos_id] | early)
  if p.suppress_tokens:
    banned = banned.at[:, jnp.asarray(p.suppress_tokens)].set(True)
  return jnp.where(banned, -jnp.inf, scores)


class Prefix(NamedTuple):
  """Forced first tokens per row: `tokens` int [N, P], row i forces `tokens[i, :lengths[i]]`."""

  tokens: jax.Array
  lengths: jax.Array


# --------------------------------------------------------------------------------------------------
# Greedy and sampling.


def _token_loop(
  select: Callable[[jax.Array, jax.Array], jax.Array],
  tokens_to_logits: TokensToLogits,
  cache: Cache,
  *,
  num_rows: int,
  max_len: int,
  start_id: int,
  eos_id: int | None,
  pad_id: int,
  warp: Callable[[jax.Array], jax.Array] | None = None,
  processors: Processors | None = None,
  prefix: Prefix | None = None,
  return_token_scores: bool = False,
) -> tuple[jax.Array, ...]:
  """One token per row per step until every row has produced EOS or `max_len` tokens.

  `select(scores[N, V], step) -> tokens[N]` picks the next token from the processed (`processors`)
  and warped (`warp`) logits. With a `prefix`, row i is fed its forced tokens first (they are
  neither scored nor returned) and then generates `max_len` tokens; the cache must hold
  `P + max_len` positions. Returns (sequences [N, L] padded with `pad_id` after EOS, scores [N]:
  sum of the model's log-probabilities of the chosen tokens) and, with `return_token_scores`,
  token scores [N, L]: log-softmax of the processed, warped logits at the chosen token (0 after
  EOS), transformers' `compute_transition_scores(..., normalize_logits=True)`.
  """
  eos = -1 if eos_id is None else eos_id
  if processors is not None and not processors.active:
    processors = None
  p_max = 0 if prefix is None else prefix.tokens.shape[1]
  if p_max == 0:
    prefix = None
  total = p_max + max_len

  def cond(state):
    step, done = state[0], state[3]
    return (step < total) & ~jnp.all(done)

  def body(state):
    step, tokens, sequences, done, scores, cache = state[:6]
    token_scores = state[6] if return_token_scores else None
    logits, cache = tokens_to_logits(tokens, cache, step)
    logits = logits.astype(jnp.float32)
    generated = step if prefix is None else step - prefix.lengths
    processed = logits
    if processors is not None:
      history = jnp.concatenate([jnp.full((num_rows, 1), start_id, jnp.int32), sequences], axis=1)
      processed = apply_processors(logits, history, step + 1, generated, processors, eos_id)
    if warp is not None:
      processed = warp(processed)
    next_tokens = select(processed, step).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_log_probs = jnp.take_along_axis(log_probs, next_tokens[:, None], axis=-1)[:, 0]
    counted = ~done if (prefix is not None or return_token_scores) else None
    if prefix is not None:
      forced = generated < 0
      forced_tokens = jax.lax.dynamic_index_in_dim(
        prefix.tokens, jnp.minimum(step, p_max - 1), axis=1, keepdims=False
      )
      next_tokens = jnp.where(forced, forced_tokens, next_tokens)
      counted = counted & ~forced
    if prefix is None:  # (the operations of the loop before prefixes existed)
      scores = scores + jnp.where(done, 0.0, token_log_probs)
    else:
      scores = scores + jnp.where(counted, token_log_probs, 0.0)
    if return_token_scores:
      chosen = jax.nn.log_softmax(processed, axis=-1)
      chosen = jnp.take_along_axis(chosen, next_tokens[:, None], axis=-1)
      chosen = jnp.where(counted[:, None], chosen, 0.0)
      token_scores = jax.lax.dynamic_update_slice(token_scores, chosen, (0, step))
    next_tokens = jnp.where(done, pad_id, next_tokens)
    sequences = jax.lax.dynamic_update_slice(sequences, next_tokens[:, None], (0, step))
    if prefix is None:
      done = done | (next_tokens == eos)
    else:
      done = done | (counted & ((next_tokens == eos) | (generated >= max_len - 1)))
    new = (step + 1, next_tokens, sequences, done, scores, cache)
    return new + (token_scores,) if return_token_scores else new

  init = (
    jnp.array(0, jnp.int32),
    jnp.full((num_rows,), start_id, jnp.int32),
    jnp.full((num_rows, total), pad_id, jnp.int32),
    jnp.zeros((num_rows,), bool),
    jnp.zeros((num_rows,), jnp.float32),
    cache,
  )
  if return_token_scores:  # only then in the loop state: the default loop is unchanged
    init = init + (jnp.zeros((num_rows, total), jnp.float32),)
  final = jax.lax.while_loop(cond, body, init)
  sequences, scores = final[2], final[4]
  token_scores = final[6] if return_token_scores else None
  if prefix is not None:
    window = prefix.lengths[:, None] + jnp.arange(max_len)[None]
    sequences = jnp.take_along_axis(sequences, window, axis=1)
    if return_token_scores:
      token_scores = jnp.take_along_axis(token_scores, window, axis=1)
  if return_token_scores:
    return sequences, scores, token_scores
  return sequences, scores


def greedy_search(
  tokens_to_logits: TokensToLogits,
  cache: Cache,
  *,
  num_rows: int,
  max_len: int,
  start_id: int = 0,
  eos_id: int | None = 1,
  pad_id: int = 0,
  processors: Processors | None = None,
  prefix: Prefix | None = None,
  return_token_scores: bool = False,
) -> tuple[jax.Array, ...]:
  """Argmax decoding (first index on ties, like torch.argmax).

  Args:
    tokens_to_logits: `(tokens[N], cache, step) -> (logits[N, V], cache)`.
    cache: initial cache, leaves with leading dim N.
    num_rows: N.
    max_len: L, the number of new tokens at most (EOS included).
    start_id: token fed at step 0.
    eos_id: ends a row; None never ends one early.
    pad_id: fills positions after EOS.
    processors: logits processors (`Processors`), applied before the argmax.
    prefix: forced first tokens per row (`Prefix`); the cache then holds P + L positions.
    return_token_scores: also return the per-token scores [N, L] (see `_token_loop`).

  Returns:
    sequences int32 [N, L], scores float32 [N] (sum of log-probabilities, EOS included)
    [, token_scores float32 [N, L]].
  """
  select = lambda logits, step: argmax(logits, axis=-1)
  return _token_loop(
    select,
    tokens_to_logits,
    cache,
    num_rows=num_rows,
    max_len=max_len,
    start_id=start_id,
    eos_id=eos_id,
    pad_id=pad_id,
    processors=processors,
    prefix=prefix,
    return_token_scores=return_token_scores,
  )


def sample(
  tokens_to_logits: TokensToLogits,
  cache: Cache,
  rng: jax.Array,
  *,
  num_rows: int,
  max_len: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  min_p: float | None = None,
  typical_p: float = 1.0,
  start_id: int = 0,
  eos_id: int | None = 1,
  pad_id: int = 0,
  processors: Processors | None = None,
  prefix: Prefix | None = None,
  return_token_scores: bool = False,
) -> tuple[jax.Array, ...]:
  """Ancestral sampling from the processed, warped distribution (transformers' order: processors,
  then temperature, top-k, top-p, min-p, typical-p).

  Args:
    tokens_to_logits, cache, num_rows, max_len, start_id, eos_id, pad_id, processors, prefix,
      return_token_scores: as in `greedy_search`.
    rng: PRNG key; the key of step t is `fold_in(rng, t)`, so results are deterministic.
    temperature: > 0; 1.0 leaves logits unchanged.
    top_k: keep the k largest logits (ties kept); 0 disables.
    top_p: nucleus mass; 1.0 disables.
    min_p: keep tokens with probability >= min_p * the top one's; None disables.
    typical_p: locally typical mass; 1.0 disables.

  Returns:
    sequences int32 [N, L], scores float32 [N]: sum of the model's (unwarped) log-probabilities of
    the sampled tokens [, token_scores [N, L] under the warped distribution].
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  warp = functools.partial(
    process_logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
    typical_p=typical_p,
  )  # fmt: skip

  def select(warped, step):
    return jax.random.categorical(jax.random.fold_in(rng, step), warped, axis=-1)

  return _token_loop(
    select,
    tokens_to_logits,
    cache,
    num_rows=num_rows,
    max_len=max_len,
    start_id=start_id,
    eos_id=eos_id,
    pad_id=pad_id,
    warp=warp,
    processors=processors,
    prefix=prefix,
    return_token_scores=return_token_scores,
  )


# --------------------------------------------------------------------------------------------------
# Beam search.


def length_penalty_denominator(
  length: jax.Array, alpha: float | jax.Array, style: str = "hf"
) -> jax.Array:
  """What a finished hypothesis' summed log-probability is divided by.

  Args:
    length: generated tokens, EOS included.
    alpha: the length penalty exponent.
    style: "hf" for `length**alpha` (transformers), "t5x" for `((5 + length) / 6)**alpha`.
  """
  length = jnp.asarray(length, jnp.float32)
  if style == "hf":
    return length**alpha
  if style == "t5x":
    return ((5.0 + length) / 6.0) ** alpha
  raise ValueError(f"length_penalty_style must be 'hf' or 't5x', got {style!r}")


def _gather_beams(x: jax.Array, beam_idx: jax.Array) -> jax.Array:
  """x [B, n, ...] gathered along axis 1 with beam_idx [B, k] -> [B, k, ...]."""
  return jax.vmap(lambda row, idx: row[idx])(x, beam_idx)


def beam_search(
  tokens_to_logits: TokensToLogits,
  cache: Cache,
  *,
  batch_size: int,
  num_beams: int,
  max_len: int,
  length_penalty: float | jax.Array = 1.0,
  early_stopping: bool | str | jax.Array = False,
  length_penalty_style: str = "hf",
  start_id: int = 0,
  eos_id: int | None = 1,
  pad_id: int = 0,
  processors: Processors | None = None,
  prefix: Prefix | None = None,
  return_token_scores: bool = False,
) -> tuple[jax.Array, ...]:
  """Beam search with transformers' candidate selection, scoring and stopping rules.

  Args:
    tokens_to_logits: `(tokens[N], cache, step) -> (logits[N, V], cache)`, N = batch_size*num_beams.
    cache: initial cache, leaves with leading dim N; reordered with `leaf[idx]` after every step.
    batch_size: B.
    num_beams: n.
    max_len: L, new tokens at most (EOS included).
    length_penalty: exponent of the length normalisation of finished hypotheses.
    early_stopping: True (stop an example once n hypotheses are finished), False (stop when the
      best live beam, normalised at the current length, cannot beat the worst finished one), or
      "never" (same, normalised at the maximum length when length_penalty > 0); or its code in
      `EARLY_STOPPING_CODES` as an int32 array (may be traced, like length_penalty).
    length_penalty_style: "hf" (`len**alpha`) or "t5x" (`((5+len)/6)**alpha`; the bound of the
      stopping test then uses the maximum length when alpha > 0, as t5x does).
    start_id: token fed at step 0.
    eos_id: finishes a hypothesis; None never finishes one before max_len.
    pad_id: fills positions after EOS.
    processors: logits processors, applied to the log-softmaxed scores as transformers does (the
      processed log-probabilities are what the beams accumulate).
    prefix: forced first tokens per example (`Prefix`, tokens [B, P], lengths [B]); an example
      generates (and counts lengths) from the end of its prefix; the cache holds P + L positions.
    return_token_scores: also return the processed log-probability of each token [B, n, L]
      (transformers' `compute_transition_scores` with `beam_indices`; 0 after EOS).

  Returns:
    sequences int32 [B, n, L] sorted best first, scores float32 [B, n] (length-normalised)
    [, token_scores float32 [B, n, L]].
  """
  eos = -1 if eos_id is None else eos_id
  # Length penalty and early-stopping mode may be traced: one compilation serves all their values.
  if isinstance(early_stopping, (bool, str)):
    if early_stopping not in EARLY_STOPPING_CODES:
      raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    early_stopping = EARLY_STOPPING_CODES[early_stopping]
  mode = jnp.asarray(early_stopping, jnp.int32)
  alpha = jnp.asarray(length_penalty, jnp.float32)
  bound_at_max_len = ((mode == EARLY_STOPPING_CODES["never"]) | (length_penalty_style == "t5x")) & (
    alpha > 0
  )
  if processors is not None and not processors.active:
    processors = None
  if prefix is not None and prefix.tokens.shape[1] == 0:
    prefix = None
  rules = _BeamRules(
    n=num_beams, batch_size=batch_size, max_len=max_len, eos=eos, alpha=alpha,
    style=length_penalty_style, stop_at_full=mode == EARLY_STOPPING_CODES[True],
    bound_at_max_len=bound_at_max_len, start_id=start_id, eos_id=eos_id, processors=processors,
    prefix=prefix, token_scores=return_token_scores,
  )  # fmt: skip
  total = max_len if prefix is None else prefix.tokens.shape[1] + max_len

  def cond(s: _Beams):
    exists_open_beam = ~(jnp.all(s.fin_mask) & rules.stop_at_full)
    return (s.step < total) & jnp.any(s.heuristic_open) & exists_open_beam & ~s.all_hit

  state = jax.lax.while_loop(
    cond,
    lambda s: _beam_step(s, tokens_to_logits, rules),
    _initial_beams(cache, rules, start_id=start_id, pad_id=pad_id),
  )
  # Hypotheses grow on pad-filled rows, so positions after EOS already hold pad_id. Every slot is
  # filled on exit: the loop ends at max_len (where the top n candidates all finish), or once all
  # slots of every example are finished (early_stopping=True or the bound heuristic).
  seqs, token_scores = state.fin_seqs, state.fin_tok
  if prefix is not None:  # each example's generated window
    window = (prefix.lengths[:, None] + jnp.arange(max_len)[None])[:, None, :]
    seqs = jnp.take_along_axis(seqs, window, axis=2)
    if return_token_scores:
      token_scores = jnp.take_along_axis(token_scores, window, axis=2)
  if return_token_scores:
    return seqs, state.fin_scores, token_scores
  return seqs, state.fin_scores


class _Beams(NamedTuple):
  """The `lax.while_loop` state of `beam_search` (B examples, n beams, L = max_len)."""

  step: jax.Array  # int32 [], tokens generated so far
  tokens: jax.Array  # int32 [B*n], the live beams' last tokens
  run_seqs: jax.Array  # int32 [B, n, L], live beams
  run_scores: jax.Array  # float32 [B, n], their summed log-probabilities
  fin_seqs: jax.Array  # int32 [B, n, L], finished hypotheses
  fin_scores: jax.Array  # float32 [B, n], length-normalised
  fin_mask: jax.Array  # bool [B, n], which finished slots are filled
  heuristic_open: jax.Array  # bool [B], the stopping test still lets the example run
  all_hit: jax.Array  # bool [], every candidate of the last step finished
  cache: Cache
  run_tok: jax.Array | None  # float32 [B, n, L] per-token scores of the live beams (or None)
  fin_tok: jax.Array | None  # float32 [B, n, L] those of the finished hypotheses (or None)


class _BeamRules(NamedTuple):
  """The constants of one search (alpha and the modes may be traced)."""

  n: int
  batch_size: int
  max_len: int
  eos: int
  alpha: jax.Array
  style: str
  stop_at_full: jax.Array
  bound_at_max_len: jax.Array
  start_id: int = 0
  eos_id: int | None = None
  processors: Processors | None = None
  prefix: Prefix | None = None
  token_scores: bool = False

  def penalty(self, length):
    return length_penalty_denominator(length, self.alpha, self.style)


def _initial_beams(cache: Cache, r: _BeamRules, *, start_id: int, pad_id: int) -> _Beams:
  b, n = r.batch_size, r.n
  init_scores = jnp.tile(jnp.where(jnp.arange(n) == 0, 0.0, NEG_INF)[None], (b, 1))
  total = r.max_len if r.prefix is None else r.prefix.tokens.shape[1] + r.max_len
  empty_seqs = jnp.full((b, n, total), pad_id, jnp.int32)
  empty_tok = jnp.zeros((b, n, total), jnp.float32) if r.token_scores else None
  return _Beams(
    step=jnp.array(0, jnp.int32),
    tokens=jnp.full((b * n,), start_id, jnp.int32),
    run_seqs=empty_seqs,
    run_scores=init_scores.astype(jnp.float32),
    fin_seqs=empty_seqs,
    fin_scores=jnp.full((b, n), NEG_INF, jnp.float32),
    fin_mask=jnp.zeros((b, n), bool),
    heuristic_open=jnp.ones((b,), bool),
    all_hit=jnp.array(False),
    cache=cache,
    run_tok=empty_tok,
    fin_tok=empty_tok,
  )


def _beam_step(s: _Beams, tokens_to_logits: TokensToLogits, r: _BeamRules) -> _Beams:
  """One token for every beam: top 2n candidates, the n live ones, the finished merged in."""
  b, n = r.batch_size, r.n
  logits, cache = tokens_to_logits(s.tokens, s.cache, s.step)
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # Tokens generated before this step, per example ([B]; the prefix does not count).
  generated = s.step if r.prefix is None else s.step - r.prefix.lengths
  if r.processors is not None:
    history = jnp.concatenate(
      [jnp.full((b * n, 1), r.start_id, jnp.int32), s.run_seqs.reshape(b * n, -1)], axis=1
    )
    per_row = generated if r.prefix is None else jnp.repeat(generated, n)
    log_probs = apply_processors(log_probs, history, s.step + 1, per_row, r.processors, r.eos_id)
  log_probs = log_probs.reshape(b, n, vocab)
  accumulated = (log_probs + s.run_scores[:, :, None]).reshape(b, n * vocab)

  # Top 2n candidates over all beams of each example.
  cand_scores, cand_idx = top_k(accumulated, 2 * n)
  cand_beams = cand_idx // vocab
  cand_tokens = (cand_idx % vocab).astype(jnp.int32)
  cand_seqs = _gather_beams(s.run_seqs, cand_beams)
  cand_seqs = jax.lax.dynamic_update_slice(
    cand_seqs, cand_tokens[:, :, None], (0, 0, s.step)
  )  # [B, 2n, L]
  if r.prefix is None:
    hits = (cand_tokens == r.eos) | (generated + 1 >= r.max_len)
  else:
    hits = (cand_tokens == r.eos) | (generated + 1 >= r.max_len)[:, None]
  cand_tok = s.run_tok
  if r.token_scores:
    chosen = jnp.take_along_axis(log_probs.reshape(b, n * vocab), cand_idx, axis=1)
    cand_tok = _gather_beams(s.run_tok, cand_beams)
    cand_tok = jax.lax.dynamic_update_slice(cand_tok, chosen[:, :, None], (0, 0, s.step))

  # Live beams: the best n candidates that did not just finish.
  live_cand_scores = cand_scores + hits.astype(jnp.float32) * NEG_INF
  run_scores, keep = jax.lax.top_k(live_cand_scores, n)
  run_seqs = _gather_beams(cand_seqs, keep)
  run_tok = _gather_beams(cand_tok, keep) if r.token_scores else s.run_tok
  parent = jnp.take_along_axis(cand_beams, keep, axis=1)
  new_tokens = jnp.take_along_axis(cand_tokens, keep, axis=1)
  if r.prefix is None:
    new_tokens = new_tokens.reshape(-1)
    cache = _reorder_cache(cache, parent, b, n)

  fin_seqs, fin_scores, fin_mask, fin_tok = _merge_finished(
    s, cand_scores, cand_seqs, cand_tok, hits, generated, r
  )
  step = s.step + 1
  bound_len = jnp.where(r.bound_at_max_len, r.max_len, step if r.prefix is None else generated + 1)
  best_running = run_scores[:, 0] / r.penalty(bound_len)
  worst_finished = jnp.where(fin_mask, jnp.min(fin_scores, axis=1, keepdims=True), NEG_INF)
  heuristic_open = s.heuristic_open & jnp.any(best_running[:, None] > worst_finished, axis=1)
  all_hit = jnp.all(hits)
  if r.prefix is not None:
    # An example still in its prefix keeps its beams (all alike) and scores, and feeds its next
    # forced token; one past its last step is closed.
    forced = generated < 0
    forced_tokens = jax.lax.dynamic_index_in_dim(
      r.prefix.tokens, jnp.minimum(s.step, r.prefix.tokens.shape[1] - 1), 1, keepdims=False
    )
    f1, f2, f3 = forced[:, None], forced[:, None, None], forced
    kept_seqs = jax.lax.dynamic_update_slice(
      s.run_seqs, jnp.broadcast_to(forced_tokens[:, None, None], (b, n, 1)), (0, 0, s.step)
    )
    run_seqs = jnp.where(f2, kept_seqs, run_seqs)
    run_scores = jnp.where(f1, s.run_scores, run_scores)
    if r.token_scores:
      run_tok = jnp.where(f2, s.run_tok, run_tok)
      fin_tok = jnp.where(f2, s.fin_tok, fin_tok)
    parent = jnp.where(f1, jnp.arange(n)[None], parent)
    new_tokens = jnp.where(f1, forced_tokens[:, None], new_tokens)
    fin_seqs = jnp.where(f2, s.fin_seqs, fin_seqs)
    fin_scores = jnp.where(f1, s.fin_scores, fin_scores)
    fin_mask = jnp.where(f1, s.fin_mask, fin_mask)
    heuristic_open = jnp.where(f3, s.heuristic_open, heuristic_open & (generated + 1 < r.max_len))
    all_hit = jnp.array(False)
    new_tokens = new_tokens.reshape(-1)
    cache = _reorder_cache(cache, parent, b, n)
  return _Beams(
    step, new_tokens, run_seqs, run_scores, fin_seqs, fin_scores, fin_mask,
    heuristic_open, all_hit, cache, run_tok, fin_tok,
  )  # fmt: skip


def _reorder_cache(cache: Cache, parent: jax.Array, b: int, n: int) -> Cache:
  flat_parent = (parent + (jnp.arange(b) * n)[:, None]).reshape(-1)
  return jax.tree_util.tree_map(lambda x: x[flat_parent], cache)


def _merge_finished(s: _Beams, cand_scores, cand_seqs, cand_tok, hits, generated, r: _BeamRules):
  """The n best finished hypotheses: the kept ones and the candidates that just finished within
  the top n (none for an example that is already full with early stopping, or closed)."""
  just_finished = hits & (jnp.arange(2 * r.n) < r.n)[None, :]
  length = generated + 1 if r.prefix is None else (generated + 1)[:, None]
  fin_cand = cand_scores / r.penalty(length)
  fin_cand = fin_cand + (jnp.all(s.fin_mask, axis=1, keepdims=True) & r.stop_at_full) * NEG_INF
  fin_cand = fin_cand + (~s.heuristic_open)[:, None] * NEG_INF
  fin_cand = fin_cand + (~just_finished) * NEG_INF
  merged_scores = jnp.concatenate([s.fin_scores, fin_cand], axis=1)
  fin_scores, best = jax.lax.top_k(merged_scores, r.n)
  fin_seqs = _gather_beams(jnp.concatenate([s.fin_seqs, cand_seqs], axis=1), best)
  fin_mask = _gather_beams(jnp.concatenate([s.fin_mask, just_finished], axis=1), best)
  fin_tok = s.fin_tok
  if r.token_scores:
    fin_tok = _gather_beams(jnp.concatenate([s.fin_tok, cand_tok], axis=1), best)
  return fin_seqs, fin_scores, fin_mask, fin_tok


def pad_after_eos(sequences: np.ndarray, eos_id: int = 1, pad_id: int = 0) -> np.ndarray:
  """Replaces every token after the first EOS of each row with `pad_id` (numpy, [..., L])."""
  sequences = np.array(sequences)
  is_eos = sequences == eos_id
  after = np.cumsum(is_eos, axis=-1) - is_eos > 0
  sequences[after] = pad_id
  return sequences
