"""Generation controls (issue 11) against transformers generate() on the same random tiny weights:
logits processors, min-p / typical-p sampling, decoder prefixes, per-token scores and rank.

Compilations are the cost here: each case combines options so that one compilation checks several
(the individual options are checked against transformers' processors in test_decoding.py)."""

import jax
import numpy as np
import pytest
import torch
from helpers.hf_models import (
  PER_TOKEN_ERROR,
  decoding_model,
  exact_token_log_probs,
  normalise,
  random_inputs,
)
from helpers.stats import assert_samples_follow
from transformers.generation import logits_process as lp

from t5jax.generate import GenerateConfig, generate, rank, score

VOCAB = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return decoding_model("v1_1", str(tmp_path_factory.mktemp("controls")))


@pytest.fixture(scope="module")
def inputs():
  return random_inputs(6, 9, VOCAB, seed=1)


def hf_run(hf, tokens, prefix=None, **kwargs):
  """transformers generate() -> (generated tokens without start and prefix, transition scores
  (log-softmaxed for greedy/sampling, as compute_transition_scores(normalize_logits=True)),
  sequences_scores or None)."""
  ids = torch.tensor(tokens, dtype=torch.long)
  extra = {}
  if prefix is not None:
    extra["decoder_input_ids"] = torch.tensor([[0] + list(prefix)] * len(tokens))
  torch.set_num_threads(1)
  with torch.no_grad():
    out = hf.generate(
      input_ids=ids, attention_mask=(ids != 0).long(), return_dict_in_generate=True,
      output_scores=True, output_logits=True, do_sample=False, **extra, **kwargs,
    )  # fmt: skip
    beam = kwargs.get("num_beams", 1) > 1
    beam_indices = out.beam_indices if beam else None
    ts = hf.compute_transition_scores(out.sequences, out.scores, beam_indices, not beam).numpy()
  start = 1 + (len(prefix) if prefix is not None else 0)
  seqs_scores = getattr(out, "sequences_scores", None)
  return out.sequences[:, start:].numpy(), ts, None if seqs_scores is None else seqs_scores.numpy()


def after_eos(seqs):
  is_eos = seqs == 1
  return (np.cumsum(is_eos, axis=-1) - is_eos) > 0


def check_token_scores(ours_seqs, ours_ts, theirs_ts, atol):
  """Ours (0 after EOS, max_new_tokens long) against transformers' transition scores (cropped to
  the longest row; finished rows hold pad scores, which do not count)."""
  length = ours_seqs.shape[-1]
  want = np.zeros((len(theirs_ts), length))
  want[:, : theirs_ts.shape[1]] = theirs_ts
  want[after_eos(ours_seqs)] = 0.0
  np.testing.assert_allclose(ours_ts, want, atol=atol)


# Float32 log-probs of this model are within 2e-5 of float64 per token (the measured
# PER_TOKEN_ERROR of helpers.hf_models); both sides are float32, so two of them bound a per-token
# difference. Measured here: token scores <= 1.6e-5 from transformers' (greedy, beam, prefix),
# 7.4e-6 (sampling); rank sums of up to 7 tokens <= 3.8e-5 (bound: TOKEN_ATOL per token).
TOKEN_ATOL = 2 * PER_TOKEN_ERROR

GREEDY_CASES = [
  dict(repetition_penalty=1.5, bad_words_ids=[[5], [7, 8]], suppress_tokens=[3], min_new_tokens=5),
  dict(no_repeat_ngram_size=2, min_new_tokens=3),
]
SLOW_GREEDY_CASES = [
  dict(repetition_penalty=1.5),
  dict(repetition_penalty=0.7),
  dict(no_repeat_ngram_size=1),
  dict(bad_words_ids=[[2, 3], [9]]),
  dict(min_new_tokens=12),
  dict(suppress_tokens=[0, 6]),
]


def _check_greedy(model, inputs, kwargs):
  hf, config, params, _ = model
  theirs, ts, _ = hf_run(hf, inputs, max_new_tokens=12, **kwargs)
  out = generate(params, config, inputs, max_new_tokens=12, return_token_scores=True, **kwargs)
  seqs = np.asarray(out.sequences)
  np.testing.assert_array_equal(seqs, normalise(theirs, 12))
  check_token_scores(seqs, np.asarray(out.token_scores), ts, TOKEN_ATOL)
  plain = np.asarray(generate(params, config, inputs, max_new_tokens=12).sequences)
  assert not np.array_equal(plain, seqs)  # the options changed the output
  ends = {list(r).index(1) for r in seqs if 1 in r}
  assert len(ends) >= 2 or any(1 not in r for r in seqs)  # rows end at different steps


@pytest.mark.parametrize("kwargs", GREEDY_CASES)
def test_greedy_processors_match_transformers(model, inputs, kwargs):
  _check_greedy(model, inputs, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", SLOW_GREEDY_CASES)
def test_greedy_each_processor_matches_transformers(model, inputs, kwargs):
  _check_greedy(model, inputs, kwargs)


def test_greedy_token_scores_are_model_log_probs(model, inputs):
  """No processor: per-token scores are the model's log-probs, summing to `scores`."""
  _, config, params, _ = model
  out = generate(params, config, inputs, max_new_tokens=12, return_token_scores=True)
  ts = np.asarray(out.token_scores)
  np.testing.assert_allclose(ts.sum(-1), np.asarray(out.scores), atol=1e-5)
  rescored = score(params, config, inputs, np.asarray(out.sequences)).token_scores
  np.testing.assert_allclose(ts, np.asarray(rescored), atol=TOKEN_ATOL)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(no_repeat_ngram_size=2, min_new_tokens=4, length_penalty=1.0, early_stopping=False),
    dict(repetition_penalty=1.4, bad_words_ids=[[4, 5]], length_penalty=2.0, early_stopping=True),
  ],
)
def test_beam_processors_match_transformers(model, inputs, kwargs):
  """Beam + no_repeat_ngram_size + min_new_tokens (and a penalty case): sequences equal, token
  scores equal compute_transition_scores, sequence scores the exact (float64) ones."""
  hf, config, params, hf64 = model
  kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, **kwargs)
  theirs, ts, their_scores = hf_run(hf, inputs, **kw)
  out = generate(params, config, inputs, method="beam", return_token_scores=True, **kw)
  seqs = np.asarray(out.sequences).reshape(-1, 10)
  np.testing.assert_array_equal(seqs, normalise(theirs, 10))
  tok = np.asarray(out.token_scores).reshape(-1, 10)
  check_token_scores(seqs, tok, ts, TOKEN_ATOL)
  length = (~after_eos(seqs) & (np.arange(10) < 10)).sum(-1).astype(np.float64)
  penalty = length ** kwargs["length_penalty"]
  np.testing.assert_allclose(tok.sum(-1) / penalty, np.asarray(out.scores).reshape(-1), atol=1e-5)
  if "repetition_penalty" not in kwargs:
    # Bans alone leave the chosen tokens' log-probs unchanged: the exact model's apply.
    log_probs, _ = exact_token_log_probs(hf64, np.repeat(inputs, 2, axis=0), seqs)
    exact = log_probs.sum(-1) / penalty
    for got in (np.asarray(out.scores).reshape(-1), their_scores):
      assert np.all(np.abs(got - exact) <= PER_TOKEN_ERROR * length / penalty)
  else:
    # Both float32 sums of up to 10 processed log-probs (measured 1.2e-7 apart).
    np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), their_scores, atol=1e-4)


PREFIXES = [[5, 6], [7], [], [8, 1, 10], [3], [1, 4]]  # lengths 0-3, EOS inside a prefix


@pytest.mark.parametrize(
  "method,kwargs", [("greedy", {}), ("beam", dict(num_beams=3, length_penalty=1.5))]
)
def test_prefix_matches_transformers_row_by_row(model, inputs, method, kwargs):
  """Per-row prefixes in one batch; transformers needs equal lengths, so each row alone."""
  hf, config, params, _ = model
  out = generate(
    params, config, inputs, method=method, max_new_tokens=8, decoder_prefix=PREFIXES,
    return_token_scores=True, **kwargs,
  )  # fmt: skip
  seqs, tok = np.asarray(out.sequences), np.asarray(out.token_scores)
  for i, prefix in enumerate(PREFIXES):
    hf_kw = dict(num_beams=kwargs["num_beams"], length_penalty=1.5) if kwargs else {}
    theirs, ts, their_score = hf_run(
      hf, inputs[i : i + 1], prefix or None, max_new_tokens=8, **hf_kw
    )
    np.testing.assert_array_equal(seqs[i], normalise(theirs, 8)[0], err_msg=f"row {i}")
    check_token_scores(seqs[i : i + 1], tok[i : i + 1], ts, TOKEN_ATOL)
    if their_score is not None:  # length counts the generated tokens only
      np.testing.assert_allclose(float(out.scores[i]), their_score[0], atol=1e-4)
  # The array form with lengths is the same thing.
  width = max(map(len, PREFIXES))
  arr = np.zeros((6, width), np.int32)
  for i, p in enumerate(PREFIXES):
    arr[i, : len(p)] = p
  again = generate(
    params, config, inputs, method=method, max_new_tokens=8, decoder_prefix=arr,
    decoder_prefix_lengths=[len(p) for p in PREFIXES], return_token_scores=True, **kwargs,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(again.sequences), seqs)


def test_sampling_processors_and_min_p_first_token(model):
  """Sampling + repetition_penalty + min_p (+ temperature, top-k): first-token frequencies follow
  transformers' processed distribution (chi-square), and each token score equals the log-softmax
  of transformers' processors and warpers applied to the logits along the sampled sequence."""
  hf, config, params, _ = model
  tokens = random_inputs(1, 7, VOCAB, seed=3)
  kw = dict(temperature=1.5, top_k=12, repetition_penalty=1.8, min_p=0.05)
  procs = lp.LogitsProcessorList(
    [
      lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]),
      lp.TemperatureLogitsWarper(kw["temperature"]),
      lp.TopKLogitsWarper(kw["top_k"]),
      lp.MinPLogitsWarper(kw["min_p"]),
    ]
  )
  n = 4000
  out = generate(
    params, config, tokens, method="sample", max_new_tokens=6, num_return_sequences=n,
    return_token_scores=True, rng=jax.random.key(3), **kw,
  )  # fmt: skip
  seqs = np.asarray(out.sequences)[0]
  ids = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    start = torch.zeros((1, 1), dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=start).logits
    probs = torch.softmax(procs(start, logits[:, 0]), -1)[0].double().numpy()
  assert 0 < (probs > 0).sum() < 12  # min-p removed some of the top 12
  assert_samples_follow(seqs[:, 0], probs)
  # Token scores along 8 sampled sequences, teacher-forced through transformers.
  rows = seqs[:8]
  dec = torch.tensor(np.concatenate([np.zeros((8, 1), int), rows], 1), dtype=torch.long)
  with torch.no_grad():
    enc = ids.repeat(8, 1)
    logits = hf(input_ids=enc, attention_mask=(enc != 0).long(), decoder_input_ids=dec).logits
    want = np.zeros((8, 6))
    for t in range(6):
      scores = torch.log_softmax(procs(dec[:, : t + 1], logits[:, t]), -1)
      want[:, t] = scores.gather(-1, dec[:, t + 1 : t + 2])[:, 0].numpy()
  want[after_eos(rows)] = 0.0
  np.testing.assert_allclose(np.asarray(out.token_scores)[0, :8], want, atol=TOKEN_ATOL * 2)


def test_rank_matches_transformers(model, inputs):
  """rank(): each candidate's summed log-likelihood (transformers' labels, -100 after EOS) and
  the same best candidate; ragged candidate lists are padded with -inf candidates."""
  hf, config, params, _ = model
  rng = np.random.default_rng(4)
  candidates = [
    [list(rng.integers(2, VOCAB, size=rng.integers(1, 6))) + [1] for _ in range(3 if i % 2 else 2)]
    for i in range(len(inputs))
  ]
  out = rank(params, config, inputs, candidates)
  scores = np.asarray(out.scores)
  assert scores.shape == (6, 3) and np.all(np.isneginf(scores[::2, 2]))
  for i, group in enumerate(candidates):
    width = max(map(len, group))
    labels = torch.full((len(group), width), -100, dtype=torch.long)
    for j, c in enumerate(group):
      labels[j, : len(c)] = torch.tensor(c)
    enc = torch.tensor(inputs[i : i + 1], dtype=torch.long).repeat(len(group), 1)
    with torch.no_grad():
      logits = hf(input_ids=enc, attention_mask=(enc != 0).long(), labels=labels).logits
    logp = torch.log_softmax(logits, -1)
    safe = labels.clamp(min=0)
    ll = torch.where(labels >= 0, logp.gather(-1, safe[..., None])[..., 0], 0.0).sum(-1).numpy()
    np.testing.assert_allclose(scores[i, : len(group)], ll, atol=TOKEN_ATOL * width)
    assert int(out.best[i]) == int(np.argmax(ll))
  assert len(set(np.asarray(out.best).tolist())) > 1
  # The array form gives the same scores.
  arr = np.zeros((6, 2, 7), np.int32)
  for i, group in enumerate(candidates):
    for j in range(2):
      arr[i, j, : len(group[j])] = group[j]
  again = rank(params, config, inputs, arr)
  # Another padded length reorders float32 sums: measured 1.1e-5 apart.
  np.testing.assert_allclose(np.asarray(again.scores), scores[:, :2], atol=TOKEN_ATOL * 7)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(min_new_tokens=21),
    dict(min_new_tokens=-1),
    dict(repetition_penalty=0.0),
    dict(repetition_penalty=-1.0),
    dict(no_repeat_ngram_size=-2),
    dict(bad_words_ids=[]),
    dict(bad_words_ids=[[]]),
    dict(bad_words_ids=[[-3]]),
    dict(bad_words_ids="5"),
    dict(suppress_tokens=[]),
    dict(method="sample", min_p=1.5),
    dict(method="sample", typical_p=0.0),
  ],
)
def test_invalid_controls(kwargs):
  with pytest.raises(ValueError):
    GenerateConfig(**kwargs)


def test_invalid_against_the_model(model, inputs):
  _, config, params, _ = model
  with pytest.raises(ValueError, match="vocabulary"):
    generate(params, config, inputs, suppress_tokens=[VOCAB])
  with pytest.raises(ValueError, match="one row per input"):
    generate(params, config, inputs, decoder_prefix=[[1]])
  with pytest.raises(ValueError, match="non-empty list"):
    rank(params, config, inputs, [[[1]]] * 5 + [[]])


def test_sampling_typical_p_first_token(model):
  """typical_p (with top-p before it) through generate(): first-token frequencies follow
  transformers' TopP then Typical warpers."""
  hf, config, params, _ = model
  tokens = random_inputs(1, 7, VOCAB, seed=3)
  kw = dict(top_p=0.95, typical_p=0.6)
  ids = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    start = torch.zeros((1, 1), dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=start).logits
    warped = lp.TypicalLogitsWarper(kw["typical_p"])(
      None, lp.TopPLogitsWarper(kw["top_p"])(None, logits[:, 0])
    )
    probs = torch.softmax(warped, -1)[0].double().numpy()
  full = torch.softmax(lp.TopPLogitsWarper(kw["top_p"])(None, logits[:, 0]), -1)[0].numpy()
  assert (probs > 0).sum() < (full > 0).sum()  # typical-p removed tokens top-p kept
  out = generate(
    params, config, tokens, method="sample", max_new_tokens=1, num_return_sequences=3000,
    rng=jax.random.key(5), **kw,
  )  # fmt: skip
  assert_samples_follow(np.asarray(out.sequences)[0, :, 0], probs)
