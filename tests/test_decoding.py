"""t5jax.decoding on toy Markov chains (no T5 model); warpers against transformers'."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.stats import assert_samples_follow
from transformers.generation import logits_process

from t5jax import decoding

EOS = 1


def second_order_chain(table):
  """tokens_to_logits of a 2nd-order Markov chain; the previous token lives in the cache.

  table: [V, V, V] log-probs of next given (previous, current), or [C, V, V, V] for C chains, row
  n following chain `cache["chain"][n]`. The cache is {"prev": [N]} (so a wrong beam reorder of
  the cache changes the logits), {"chain": [N]} and {"hist": [N, L]} recording fed tokens.
  """
  table = jnp.asarray(table, jnp.float32)
  if table.ndim == 3:
    table = table[None]

  def tokens_to_logits(tokens, cache, step):
    logits = table[cache["chain"], cache["prev"], tokens]
    hist = jax.lax.dynamic_update_slice(cache["hist"], tokens[:, None], (0, step))
    return logits, {"prev": tokens, "chain": cache["chain"], "hist": hist}

  return tokens_to_logits


def init_cache(num_rows, max_len, chains=None):
  return {
    "prev": jnp.zeros((num_rows,), jnp.int32),
    "chain": jnp.zeros((num_rows,), jnp.int32) if chains is None else jnp.asarray(chains),
    "hist": jnp.zeros((num_rows, max_len), jnp.int32),
  }


def random_table(seed, vocab, sharpness=2.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(vocab, vocab, vocab)) * sharpness
  return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def enumerate_hypotheses(table, max_len, length_penalty, style="hf"):
  """Every finished hypothesis (ends with EOS, or reaches max_len) with its normalised score."""
  vocab = table.shape[0]
  results = {}
  for length in range(1, max_len + 1):
    for seq in itertools.product(range(vocab), repeat=length):
      if EOS in seq[:-1]:
        continue
      if length < max_len and seq[-1] != EOS:
        continue
      prev, cur, total = 0, 0, 0.0
      for tok in seq:
        total += table[prev, cur, tok]
        prev, cur = cur, tok
      # Written out here, not taken from the code under test.
      denom = length**length_penalty if style == "hf" else ((5 + length) / 6) ** length_penalty
      results[seq] = total / denom
  return sorted(results.items(), key=lambda kv: -kv[1])


def run_beam(table, batch_size, num_beams, max_len, chains=None, **kw):
  fn = jax.jit(
    lambda cache: decoding.beam_search(
      second_order_chain(table),
      cache,
      batch_size=batch_size,
      num_beams=num_beams,
      max_len=max_len,
      **kw,
    )
  )
  seqs, scores = fn(init_cache(batch_size * num_beams, max_len, chains))
  return np.asarray(seqs), np.asarray(scores)


def strip(seq):
  seq = list(seq)
  return tuple(seq[: seq.index(EOS) + 1]) if EOS in seq else tuple(seq)


def test_greedy_follows_argmax_and_pads_after_eos():
  table = random_table(0, 5)
  max_len = 6
  seqs, scores = jax.jit(
    lambda c: decoding.greedy_search(second_order_chain(table), c, num_rows=2, max_len=max_len)
  )(init_cache(2, max_len))
  prev, cur, expected, total = 0, 0, [], 0.0
  for _ in range(max_len):
    tok = int(np.argmax(table[prev, cur]))
    expected.append(tok)
    total += table[prev, cur, tok]
    if tok == EOS:
      break
    prev, cur = cur, tok
  expected += [0] * (max_len - len(expected))
  np.testing.assert_array_equal(np.asarray(seqs), [expected, expected])
  np.testing.assert_allclose(np.asarray(scores), [total, total], rtol=1e-5)


def test_greedy_max_len_one_and_immediate_eos():
  table = np.full((3, 3, 3), -5.0)
  table[:, :, EOS] = 0.0  # EOS always wins
  seqs, _ = decoding.greedy_search(
    second_order_chain(table), init_cache(1, 4), num_rows=1, max_len=4
  )
  np.testing.assert_array_equal(np.asarray(seqs), [[EOS, 0, 0, 0]])
  seqs, _ = decoding.greedy_search(
    second_order_chain(table), init_cache(1, 1), num_rows=1, max_len=1, eos_id=None
  )
  np.testing.assert_array_equal(np.asarray(seqs), [[EOS]])


def test_beam_finds_path_greedy_misses():
  # From the start, token 2 looks best (p=.6) but every continuation of it is poor; token 3 (p=.4)
  # is followed by EOS with certainty. Best sequence: [3, EOS] (log .4) vs greedy [2, x, ..].
  vocab = 4
  table = np.full((vocab, vocab, vocab), np.log(1e-6))
  table[0, 0, 2], table[0, 0, 3] = np.log(0.6), np.log(0.4)
  for prev in range(vocab):
    table[prev, 2, :] = np.log(0.25)  # uniform after 2
    table[prev, 3, EOS] = 0.0
  max_len = 3
  greedy, _ = decoding.greedy_search(
    second_order_chain(table), init_cache(1, max_len), num_rows=1, max_len=max_len
  )
  assert int(greedy[0, 0]) == 2
  seqs, scores = run_beam(table, 1, 2, max_len, length_penalty=0.0)
  assert strip(seqs[0, 0]) == (3, EOS)
  np.testing.assert_allclose(scores[0, 0], np.log(0.4), rtol=1e-5)


@pytest.mark.parametrize(
  "length_penalty,early_stopping,style",
  [(0.0, "never", "hf"), (1.0, "never", "hf"), (2.0, "never", "hf"), (0.6, "never", "t5x")],
)
def test_wide_beam_is_exact(length_penalty, early_stopping, style):
  """With more beams than live prefixes and an admissible stopping bound, beam search is exact."""
  vocab, max_len, num_beams = 4, 3, 16
  table = random_table(1, vocab, sharpness=1.5)
  ranked = enumerate_hypotheses(table, max_len, length_penalty, style)
  seqs, scores = run_beam(
    table,
    1,
    num_beams,
    max_len,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    length_penalty_style=style,
  )
  k = 6
  got = [strip(s) for s in seqs[0, :k]]
  assert got == [seq for seq, _ in ranked[:k]]
  np.testing.assert_allclose(scores[0, :k], [s for _, s in ranked[:k]], rtol=1e-5, atol=1e-6)
  # Padding after EOS is pad (0).
  for s in seqs[0, :k]:
    np.testing.assert_array_equal(decoding.pad_after_eos(s), s)


def _chain_log_prob(table, seq):
  prev, cur, total = 0, 0, 0.0
  for tok in seq:
    total += table[prev, cur, tok]
    prev, cur = cur, tok
  return total


def test_beam_batch_rows_independent_and_cache_reordered():
  vocab, max_len, num_beams = 6, 5, 3
  tables = np.stack([random_table(s, vocab) for s in (2, 3)])
  # Example 0 follows chain 0, example 1 chain 1 (the chain id lives in the cache, so a reorder
  # that mixed examples would switch chains). Together they must equal each decoded alone.
  chains = np.repeat(np.arange(2), num_beams)
  seqs, scores = run_beam(tables, 2, num_beams, max_len, chains=chains)
  for b in range(2):
    single, single_scores = run_beam(tables[b], 1, num_beams, max_len)
    np.testing.assert_array_equal(seqs[b], single[0])
    np.testing.assert_allclose(scores[b], single_scores[0], rtol=1e-6)
    # Scores are the normalised sums of the chain's log-probs along the returned sequence, which
    # only holds if the cache ("prev") was reordered with the beams.
    for seq, score in zip(seqs[b], scores[b], strict=True):
      seq = strip(seq)
      np.testing.assert_allclose(score, _chain_log_prob(tables[b], seq) / len(seq), rtol=1e-5)
    assert np.all(np.diff(scores[b]) <= 0)
  assert not np.array_equal(seqs[0], seqs[1])


def _stopping_table():
  """Two finished hypotheses exist after step 2, but a longer one has a better mean log-prob.

  From the start EOS has p=.4 and token 2 p=.6; after [2], EOS .3 and 2 .7; after [2, 2], EOS .99.
  With 2 beams and length_penalty 1: (EOS) scores log .4, (2, EOS) (log .6 + log .3) / 2, and
  (2, 2, EOS) (log .6 + log .7 + log .99) / 3, the best; the running [2, 2] could still beat the
  worst finished one when the second finishes, so only early_stopping=True stops there.
  """
  table = np.full((3, 3, 3), np.log(1e-6))
  table[0, 0, EOS], table[0, 0, 2] = np.log(0.4), np.log(0.6)
  table[0, 2, EOS], table[0, 2, 2] = np.log(0.3), np.log(0.7)
  table[2, 2, EOS], table[2, 2, 2] = np.log(0.99), np.log(0.01)
  return table


@pytest.mark.parametrize(
  "early_stopping,expected",
  [
    (True, [((2, EOS), np.log([0.6, 0.3])), ((EOS,), np.log([0.4]))]),
    (False, [((2, 2, EOS), np.log([0.6, 0.7, 0.99])), ((2, EOS), np.log([0.6, 0.3]))]),
    ("never", [((2, 2, EOS), np.log([0.6, 0.7, 0.99])), ((2, EOS), np.log([0.6, 0.3]))]),
  ],
)
def test_beam_early_stopping(early_stopping, expected):
  seqs, scores = run_beam(_stopping_table(), 1, 2, 5, early_stopping=early_stopping)
  assert [strip(s) for s in seqs[0]] == [seq for seq, _ in expected]
  np.testing.assert_allclose(scores[0], [lp.sum() / len(lp) for _, lp in expected], rtol=1e-5)


def test_beam_without_eos_returns_the_best_full_length_sequences():
  """eos_id=None: EOS is an ordinary token; with a beam as wide as every prefix it is exact."""
  vocab, max_len, num_beams = 3, 3, 9
  table = random_table(4, vocab)
  seqs, scores = run_beam(table, 1, num_beams, max_len, eos_id=None, length_penalty=1.0)
  ranked = sorted(
    itertools.product(range(vocab), repeat=max_len), key=lambda q: -_chain_log_prob(table, q)
  )
  assert EOS in [t for q in ranked[:num_beams] for t in q[:-1]]  # EOS mid-sequence does not stop
  assert [tuple(s) for s in seqs[0]] == ranked[:num_beams]
  np.testing.assert_allclose(
    scores[0], [_chain_log_prob(table, q) / max_len for q in ranked[:num_beams]], rtol=1e-5
  )


# --------------------------------------------------------------------------------------------------
# Warpers against transformers.


def hf_warp(scores, temperature, top_k, top_p, min_tokens_to_keep=1):
  x = torch.tensor(np.asarray(scores))
  if temperature != 1.0:
    x = logits_process.TemperatureLogitsWarper(temperature)(None, x)
  if top_k != 0:
    x = logits_process.TopKLogitsWarper(top_k, min_tokens_to_keep=min_tokens_to_keep)(None, x)
  if top_p < 1.0:
    x = logits_process.TopPLogitsWarper(top_p, min_tokens_to_keep=min_tokens_to_keep)(None, x)
  return x.numpy()


def tied_logits(seed, rows=8, vocab=12):
  rng = np.random.default_rng(seed)
  # Few distinct values -> many ties at every boundary.
  return rng.integers(-3, 3, size=(rows, vocab)).astype(np.float32) * 0.5


@pytest.mark.parametrize(
  "temperature,top_k,top_p,min_keep",
  [
    (1.0, 3, 1.0, 1),
    (1.0, 0, 0.5, 1),
    (0.7, 4, 0.8, 1),
    (1.3, 1, 0.9, 1),
    (1.0, 5, 0.3, 2),
    (1.0, 0, 0.05, 3),
    (2.0, 50, 0.95, 1),
    (1.0, 0, 1.0, 1),
  ],
)
def test_warpers_match_transformers(temperature, top_k, top_p, min_keep):
  for seed in range(3):
    logits = np.concatenate([tied_logits(seed), np.random.default_rng(seed).normal(size=(4, 12))])
    logits = logits.astype(np.float32)
    ours = decoding.process_logits(
      jnp.asarray(logits),
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      min_tokens_to_keep=min_keep,
    )
    theirs = hf_warp(logits, temperature, top_k, top_p, min_keep)
    # The kept set must be identical (ties included); kept values equal up to division rounding.
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6)


@pytest.mark.parametrize("top_p", [0.5, 0.25, 0.4, 0.6, 0.75, 0.525])
def test_top_p_flat_row_at_exact_boundary_matches_transformers(top_p):
  # 40 equal logits: every probability is float32(1/40) and the cumulative sums cross
  # 1 - top_p exactly at a token. transformers sums in float64 and rounds each prefix, so
  # 20 * 0.025f rounds to 0.5 <= 0.5 and 20 tokens go at top_p = 0.5; summed in float32
  # the prefix came out above 0.5 and 21 tokens were kept. Which of the equal tokens stay is
  # the order of torch's sort, which is not stable beyond 16 elements (it keeps ids 20-39 and
  # others at other widths; t5jax's stable sort keeps the highest ids), so the sizes are compared.
  logits = np.zeros((1, 40), np.float32)
  theirs = hf_warp(logits, 1.0, 0, top_p)
  ours = np.asarray(decoding.top_p_filter(jnp.asarray(logits), top_p))
  if top_p == 0.5:
    assert np.isfinite(theirs).sum() == 20
  assert np.isfinite(ours).sum() == np.isfinite(theirs).sum()


def test_sampling_frequencies_match_filtered_distribution():
  logits = np.array([2.0, 1.5, 1.5, 1.0, 0.2, -1.0, 0.0, 3.0], np.float32)
  temperature, top_k, top_p = 1.5, 6, 0.8
  warped = hf_warp(logits[None], temperature, top_k, top_p)[0]
  probs = np.exp(warped - warped.max())
  probs /= probs.sum()
  n = 20000

  def tokens_to_logits(tokens, cache, step):
    return jnp.broadcast_to(jnp.asarray(logits), (tokens.shape[0], logits.size)), cache

  seqs, _ = jax.jit(
    lambda rng: decoding.sample(
      tokens_to_logits,
      jnp.zeros((n,)),
      rng,
      num_rows=n,
      max_len=1,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      eos_id=None,
    )
  )(jax.random.key(0))
  assert_samples_follow(np.asarray(seqs[:, 0]), probs.astype(np.float64))


def test_sampling_deterministic_given_rng_and_pads_after_eos():
  table = random_table(5, 6, sharpness=0.5)

  sampler = jax.jit(
    lambda rng: decoding.sample(
      second_order_chain(table), init_cache(64, 6), rng, num_rows=64, max_len=6
    )
  )
  run = lambda seed: sampler(jax.random.key(seed))

  a, sa = run(0)
  b, sb = run(0)
  c, _ = run(1)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  np.testing.assert_array_equal(decoding.pad_after_eos(np.asarray(a)), np.asarray(a))
  assert (np.asarray(a) == EOS).any()


def test_invalid_arguments():
  with pytest.raises(ValueError):
    decoding.apply_temperature(jnp.zeros(3), 0.0)
  with pytest.raises(ValueError):
    decoding.top_p_filter(jnp.zeros(3), 1.5)
  with pytest.raises(ValueError):
    decoding.beam_search(
      lambda t, c, s: (None, c),
      {},
      batch_size=1,
      num_beams=2,
      max_len=2,
      early_stopping="sometimes",
    )


# --------------------------------------------------------------------------------------------------
# min-p / typical-p warpers and the logits processors against transformers'.


@pytest.mark.parametrize(
  "min_p,typical_p,min_keep", [(0.1, 1.0, 1), (0.5, 1.0, 2), (None, 0.5, 1), (None, 0.9, 3)]
)
def test_min_p_typical_match_transformers(min_p, typical_p, min_keep):
  for seed in range(3):
    logits = np.random.default_rng(seed).normal(size=(8, 12)).astype(np.float32) * 2
    ours = decoding.process_logits(
      jnp.asarray(logits), min_p=min_p, typical_p=typical_p, min_tokens_to_keep=min_keep
    )
    x = torch.tensor(logits)
    if min_p is not None:
      x = logits_process.MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep)(None, x)
    if typical_p < 1.0:
      x = logits_process.TypicalLogitsWarper(typical_p, min_tokens_to_keep=min_keep)(None, x)
    theirs = x.numpy()
    assert np.isinf(theirs).any()  # the filter removes something
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_array_equal(
      np.asarray(ours)[np.isfinite(theirs)], theirs[np.isfinite(theirs)]
    )


def _hf_processors(p: decoding.Processors, prompt_len: int):
  procs = []
  if p.repetition_penalty != 1.0:
    procs.append(logits_process.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
  if p.no_repeat_ngram_size:
    procs.append(logits_process.NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
  if p.bad_words_ids:
    words = [list(w) for w in p.bad_words_ids]
    procs.append(logits_process.NoBadWordsLogitsProcessor(words, eos_token_id=EOS))
  if p.min_new_tokens:
    procs.append(
      logits_process.MinNewTokensLengthLogitsProcessor(prompt_len, p.min_new_tokens, EOS)
    )
  if p.suppress_tokens:
    procs.append(logits_process.SuppressTokensLogitsProcessor(list(p.suppress_tokens)))
  return logits_process.LogitsProcessorList(procs)


@pytest.mark.parametrize(
  "processors",
  [
    decoding.Processors(repetition_penalty=1.7),
    decoding.Processors(repetition_penalty=0.6),
    decoding.Processors(no_repeat_ngram_size=1),
    decoding.Processors(no_repeat_ngram_size=2),
    decoding.Processors(no_repeat_ngram_size=3),
    decoding.Processors(bad_words_ids=((0,), (EOS,), (2, 4), (5, 2, 3))),
    decoding.Processors(min_new_tokens=4),
    decoding.Processors(suppress_tokens=(0, 5)),
    decoding.Processors(
      repetition_penalty=1.3,
      no_repeat_ngram_size=2,
      bad_words_ids=((2, 2),),
      min_new_tokens=3,
      suppress_tokens=(4,),
    ),  # fmt: skip
  ],
)
def test_processors_match_transformers(processors):
  """apply_processors on a static [N, H] history with `length` valid tokens equals transformers'
  processors on the same tokens, for every length (prompt of 2: start token and one forced)."""
  rng = np.random.default_rng(0)
  vocab, width, rows = 6, 9, 16
  history = rng.integers(0, vocab, size=(rows, width)).astype(np.int32)
  history[:4, 1::2] = 2  # repeated n-grams
  history[4, :3] = 5, 2, 3  # a bad word's prefix that fits only once enough tokens are fed
  history[5, :2] = 2, 4
  scores = rng.normal(size=(rows, vocab)).astype(np.float32)
  fn = jax.jit(
    lambda s, h, n: decoding.apply_processors(s, h, n, n - 2, processors, EOS), static_argnums=()
  )
  for length in range(1, width + 1):
    ours = np.asarray(fn(scores, history, jnp.int32(length)))
    theirs = _hf_processors(processors, 2)(
      torch.tensor(history[:, :length], dtype=torch.long), torch.tensor(scores)
    ).numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs), err_msg=f"len {length}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert processors.active and not decoding.Processors().active


# ------------------------------------------------------------------------------------------------
# argmax and top_k: the fast forms equal jnp.argmax and lax.top_k, ties and all.


def test_argmax_equals_jnp_argmax_with_ties_infinities_and_nans():
  rng = np.random.default_rng(0)
  cases = [rng.standard_normal((8, 32128)), rng.standard_normal((3, 5, 700))]
  tied = np.zeros((4, 300))
  tied[1, ::7] = 2.0  # the first of many maxima
  tied[2] = -np.inf  # all -inf: index 0
  tied[3, [5, 250]] = np.nan  # the first NaN wins, as in numpy
  cases.append(tied)
  coarse = rng.integers(0, 3, (16, 1000)).astype(np.float32)  # ties everywhere
  cases.append(coarse)
  for x in cases:
    x = jnp.asarray(x, jnp.float32)
    for axis in range(x.ndim):
      got = decoding.argmax(x, axis=axis)
      assert got.dtype == jnp.int32
      np.testing.assert_array_equal(got, jnp.argmax(x, axis=axis))
  # Traced and under grad (accuracy inside a differentiated loss).
  x = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(x) + 0.0 * decoding.argmax(x).sum())(x)
  np.testing.assert_array_equal(g, jnp.ones_like(x))


@pytest.mark.parametrize("n,k", [(4 * 32128, 8), (4 * 32100, 8), (32128, 2), (2000, 3)])
def test_top_k_equals_lax_top_k(n, k):
  rng = np.random.default_rng(n + k)
  x = rng.standard_normal((6, n)).astype(np.float32)
  x[1] = np.round(x[1])  # ties everywhere: lower index first
  x[2, : n // 2] = -np.inf
  x[3, :] = -1e9
  x[3, [n - 1, 7, n // 3]] = 0.0  # the maxima in different chunks, the last one padded
  x[4] = rng.integers(0, 2, n) * 5.0 - 1e9 * (np.arange(n) % 3 == 0)
  x[5, :] = -1e9
  x[5, n - 1] = 0.0  # the last chunk ranks first; the tied rest come from the first chunk
  x = jnp.asarray(x)
  values, index = jax.jit(lambda x: decoding.top_k(x, k))(x)
  want_values, want_index = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(values, want_values)
  np.testing.assert_array_equal(index, want_index)
  assert index.dtype == jnp.int32
