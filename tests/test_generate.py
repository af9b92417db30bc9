"""t5jax.generate / t5jax.score against transformers generate() on the same random tiny weights."""

import jax
import numpy as np
import pytest
import torch
from helpers.hf_models import (
  PER_TOKEN_ERROR,
  decoding_model,
  exact_token_log_probs,
  hf_generate,
  normalise,
  random_inputs,
)
from helpers.stats import assert_samples_follow

from t5jax import decoding
from t5jax.generate import _generate, generate, score

VOCAB = 24


@pytest.fixture(scope="module", params=["v1_1", "v1_0"])
def models(request, tmp_path_factory):
  return decoding_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """One variant for the tests that do not depend on the architecture."""
  return decoding_model("v1_1", str(tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def inputs():
  return random_inputs(6, 9, VOCAB, seed=1)


def test_greedy_matches_transformers(models, inputs):
  _check_greedy(models, inputs, 12)


def test_greedy_one_token_matches_transformers(model, inputs):
  _check_greedy(model, inputs, 1)


def _check_greedy(models, inputs, max_new_tokens):
  hf, config, params, _ = models
  theirs, _ = hf_generate(hf, inputs, max_new_tokens=max_new_tokens, do_sample=False)
  out = generate(params, config, inputs, max_new_tokens=max_new_tokens)
  assert out.sequences.shape == (6, max_new_tokens) and out.scores.shape == (6,)
  np.testing.assert_array_equal(np.asarray(out.sequences), normalise(theirs, max_new_tokens))


def test_greedy_has_early_eos_and_full_rows(models, inputs):
  """Both test models exercise EOS at different steps and the length limit."""
  _, config, params, _ = models
  seqs = np.asarray(generate(params, config, inputs, max_new_tokens=12).sequences)
  eos_at = [list(row).index(1) for row in seqs if 1 in row]
  assert len(eos_at) < len(seqs) and len(set(eos_at) - {0}) >= 2


# Length penalty, early stopping and num_return_sequences do not recompile; num_beams and
# max_new_tokens do, so the fast cases share them.
BEAM_CASES = [
  # num_beams, length_penalty, early_stopping, num_return_sequences, max_new_tokens
  (3, 1.0, False, 1, 10),
  (3, 2.0, True, 2, 10),
  (3, -0.5, "never", 3, 10),
  (3, 1.5, "never", 1, 10),
  (3, 0.0, False, 2, 10),
]
SLOW_BEAM_CASES = [
  (3, lp, es, nrs, 10) for lp in (0.5, -1.0) for es in (True, False, "never") for nrs in (1, 3)
] + [(5, 1.0, False, 5, 10), (5, 2.0, "never", 2, 10)]


def _check_beam(models, inputs, num_beams, length_penalty, early_stopping, nrs, max_new_tokens):
  hf, config, params, hf64 = models
  theirs, their_scores = hf_generate(
    hf,
    inputs,
    max_new_tokens=max_new_tokens,
    do_sample=False,
    num_beams=num_beams,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    num_return_sequences=nrs,
  )
  out = generate(
    params,
    config,
    inputs,
    method="beam",
    num_beams=num_beams,
    max_new_tokens=max_new_tokens,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    num_return_sequences=nrs,
  )
  ours = np.asarray(out.sequences).reshape(-1, max_new_tokens)
  np.testing.assert_array_equal(ours, normalise(theirs, max_new_tokens))
  # Both float32 scores against the exact one: the float64 model's log-likelihood of the returned
  # hypothesis over len**length_penalty, within PER_TOKEN_ERROR per summed token.
  log_probs, scored = exact_token_log_probs(hf64, np.repeat(inputs, nrs, axis=0), ours)
  length = scored.sum(-1).astype(np.float64)
  exact = log_probs.sum(-1) / length**length_penalty
  bound = PER_TOKEN_ERROR * length / length**length_penalty
  for name, got in (("t5jax", np.asarray(out.scores).reshape(-1)), ("transformers", their_scores)):
    err = np.abs(got - exact)
    assert np.all(err <= bound), f"{name}: score error {err} exceeds {bound}"
  expected_shape = (len(inputs), nrs, max_new_tokens) if nrs > 1 else (len(inputs), max_new_tokens)
  assert out.sequences.shape == expected_shape


@pytest.mark.parametrize("case", BEAM_CASES)
def test_beam_matches_transformers(models, inputs, case):
  _check_beam(models, inputs, *case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_BEAM_CASES)
def test_beam_matches_transformers_grid(model, inputs, case):
  _check_beam(model, inputs, *case)


def test_one_compilation_per_setting(model, inputs):
  _, config, params, _ = model
  generate(params, config, inputs, max_new_tokens=12)
  before = _generate._cache_size()
  generate(params, config, inputs + 0, max_new_tokens=12)
  generate(params, config, np.flip(inputs, 0).copy(), max_new_tokens=12)
  assert _generate._cache_size() == before
  kw = dict(method="beam", num_beams=3, max_new_tokens=10)
  generate(params, config, inputs, **kw)
  before = _generate._cache_size()
  generate(params, config, inputs, length_penalty=0.3, early_stopping="never", **kw)
  generate(params, config, inputs, length_penalty=2.0, num_return_sequences=2, **kw)
  assert _generate._cache_size() == before


def test_sampling_first_token_distribution(model):
  """Frequencies of the first sampled token converge to transformers' warped distribution."""
  from transformers.generation import logits_process as lp

  hf, config, params, _ = model
  tokens = random_inputs(1, 7, VOCAB, seed=3)
  n, temperature, top_k, top_p = 6000, 1.7, 8, 0.9
  with torch.no_grad():
    ids = torch.tensor(tokens, dtype=torch.long)
    start = torch.zeros((1, 1), dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=(ids != 0).long(), decoder_input_ids=start).logits
    logits = logits[:, 0]
    warped = lp.TemperatureLogitsWarper(temperature)(None, logits)
    warped = lp.TopKLogitsWarper(top_k)(None, warped)
    warped = lp.TopPLogitsWarper(top_p)(None, warped)
    probs = torch.softmax(warped, -1)[0].numpy()
  out = generate(
    params,
    config,
    tokens,
    method="sample",
    max_new_tokens=1,
    num_return_sequences=n,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=jax.random.key(7),
  )
  assert_samples_follow(np.asarray(out.sequences)[0, :, 0], probs.astype(np.float64))


def test_sampling_deterministic_shapes_and_scores(model, inputs):
  _, config, params, _ = model
  kw = dict(method="sample", max_new_tokens=8, num_return_sequences=3, top_k=5, top_p=0.9)
  a = generate(params, config, inputs, rng=jax.random.key(1), **kw)
  b = generate(params, config, inputs, rng=jax.random.key(1), **kw)
  c = generate(params, config, inputs, rng=jax.random.key(2), **kw)
  assert a.sequences.shape == (6, 3, 8) and a.scores.shape == (6, 3)
  np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))
  assert not np.array_equal(np.asarray(a.sequences), np.asarray(c.sequences))
  seqs = np.asarray(a.sequences)
  np.testing.assert_array_equal(decoding.pad_after_eos(seqs), seqs)
  # Scores are the model's log-likelihood of the sampled tokens: score() agrees.
  flat = seqs.reshape(-1, 8)
  rescored = score(params, config, np.repeat(inputs, 3, axis=0), flat).sequence_scores
  np.testing.assert_allclose(np.asarray(rescored), np.asarray(a.scores).reshape(-1), atol=1e-4)


def _score_targets():
  """Targets [6, 8] with tokens after EOS: EOS mid-row, at the start, absent, and 0s before EOS."""
  rng = np.random.default_rng(5)
  targets = rng.integers(2, VOCAB, size=(6, 8)).astype(np.int32)
  targets[0, 3] = 1  # EOS mid-row, tokens after it
  targets[1, 0] = 1  # EOS first
  targets[2, [1, 4]] = 0, 1  # a generated 0 before EOS
  targets[3, [2, 5]] = 1  # two EOS: only the first ends the row
  targets[4, 7] = 1  # EOS last
  return targets  # row 5: no EOS, every token counts


def test_score_matches_transformers(model, inputs):
  """score() counts each row up to and including its first EOS, like transformers' log-probs."""
  hf, config, params, _ = model
  targets = _score_targets()
  out = score(params, config, inputs, targets)
  with torch.no_grad():
    ids = torch.tensor(inputs, dtype=torch.long)
    labels = torch.tensor(targets, dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].numpy()
  first_eos = [list(row).index(1) if 1 in row else 8 for row in targets]
  counted = np.arange(8)[None] <= np.array(first_eos)[:, None]
  logp = np.where(counted, logp, 0.0)
  # Float32 log-probs of these models differ from float64 by <= 1.9e-5 per token (measured).
  np.testing.assert_allclose(np.asarray(out.token_scores), logp, atol=4e-5)
  np.testing.assert_allclose(np.asarray(out.sequence_scores), logp.sum(-1), atol=4e-5 * 8)
  # What follows the first EOS does not change a row's score.
  changed = targets.copy()
  changed[~counted] = (changed[~counted] + 3) % VOCAB
  again = score(params, config, inputs, changed)
  np.testing.assert_array_equal(np.asarray(again.sequence_scores), np.asarray(out.sequence_scores))


def test_t5x_length_penalty_style(model, inputs):
  """length_penalty_style="t5x": finished scores are sum(log p) / ((5 + len) / 6) ** alpha."""
  hf, config, params, hf64 = model
  alpha = 0.8
  kw = dict(method="beam", num_beams=3, max_new_tokens=10, num_return_sequences=3)
  out = generate(params, config, inputs, length_penalty=alpha, length_penalty_style="t5x", **kw)
  seqs = np.asarray(out.sequences).reshape(-1, 10)
  log_probs, scored = exact_token_log_probs(hf64, np.repeat(inputs, 3, axis=0), seqs)
  length = scored.sum(-1).astype(np.float64)
  denominator = ((5.0 + length) / 6.0) ** alpha
  exact = log_probs.sum(-1) / denominator
  np.testing.assert_array_less(
    np.abs(np.asarray(out.scores).reshape(-1) - exact), PER_TOKEN_ERROR * length / denominator
  )
  assert np.all(np.diff(np.asarray(out.scores), axis=1) <= 0)  # best first
  hf_style = generate(params, config, inputs, length_penalty=alpha, **kw)
  assert not np.allclose(np.asarray(hf_style.scores), np.asarray(out.scores))


def test_greedy_scores_equal_score_of_output(model, inputs):
  _, config, params, _ = model
  out = generate(params, config, inputs, max_new_tokens=12)
  rescored = score(params, config, inputs, np.asarray(out.sequences))
  np.testing.assert_allclose(
    np.asarray(rescored.sequence_scores), np.asarray(out.scores), atol=1e-4
  )


def test_ignore_eos_generates_past_eos(model, inputs):
  """ignore_eos: rows that end with EOS under greedy go on past it, otherwise unchanged."""
  _, config, params, _ = model
  stopped = np.asarray(generate(params, config, inputs, max_new_tokens=12).sequences)
  out = generate(params, config, inputs, max_new_tokens=12, ignore_eos=True)
  seqs = np.asarray(out.sequences)
  ended = [b for b, row in enumerate(stopped) if 1 in row]
  assert ended and len(ended) < len(seqs)
  for b, row in enumerate(stopped):
    n = list(row).index(1) + 1 if 1 in row else 12
    np.testing.assert_array_equal(seqs[b, :n], row[:n])
    if n < 12:  # went on after EOS: tokens there are generated, not padding
      assert not np.all(seqs[b, n:] == 0)
  # Scores cover every generated token, EOS and what follows it.
  full = score(params, config, inputs, seqs, target_mask=np.ones_like(seqs, bool))
  np.testing.assert_allclose(np.asarray(full.sequence_scores), np.asarray(out.scores), atol=1e-4)


def test_bfloat16_greedy_runs_in_bfloat16_and_mostly_agrees(model, inputs):
  """bf16 compute: same shapes, its scores are its own model's (bf16 teacher forcing)."""
  _, config, params, _ = model
  bf16 = config.replace(dtype="bfloat16")
  out = generate(params, bf16, inputs, max_new_tokens=12)
  seqs = np.asarray(out.sequences)
  assert seqs.shape == (6, 12) and out.scores.dtype == np.float32
  np.testing.assert_array_equal(decoding.pad_after_eos(seqs), seqs)
  rescored = score(params, bf16, inputs, seqs).sequence_scores
  # bf16 rounds each of up to 12 log-probs near -2 to ~8 bits: within 0.05 per token.
  np.testing.assert_allclose(np.asarray(rescored), np.asarray(out.scores), atol=0.05 * 12)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(method="nucleus"),
    dict(method="greedy", num_return_sequences=2),
    dict(method="beam", num_beams=2, num_return_sequences=3),
    dict(method="beam", early_stopping="sometimes"),
    dict(method="sample", temperature=0.0),
    dict(method="sample", top_p=0.0),
    dict(method="sample", top_k=-1),
    dict(max_new_tokens=0),
  ],
)
def test_invalid_settings(model, inputs, kwargs):
  _, config, params, _ = model
  with pytest.raises(ValueError):
    generate(params, config, inputs, **kwargs)
