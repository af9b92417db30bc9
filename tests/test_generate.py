"""t5jax.generate / t5jax.score against transformers generate() on the same random tiny weights."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_utils_decoding import (  # noqa: E402
  hf_generate,
  load_as_t5jax,
  make_hf_model,
  normalise,
  random_inputs,
)

from t5jax import decoding  # noqa: E402
from t5jax.generate import _generate, generate, score  # noqa: E402

VOCAB = 24


@pytest.fixture(scope="module", params=["v1_1", "v1_0"])
def models(request, tmp_path_factory):
  hf = make_hf_model(request.param, seed=1)
  config, params = load_as_t5jax(hf, str(tmp_path_factory.mktemp(request.param)))
  return hf, config, params


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """One variant for the tests that do not depend on the architecture."""
  hf = make_hf_model("v1_1", seed=1)
  config, params = load_as_t5jax(hf, str(tmp_path_factory.mktemp("single")))
  return hf, config, params


@pytest.fixture(scope="module")
def inputs():
  return random_inputs(6, 9, VOCAB, seed=1)


def test_greedy_matches_transformers(models, inputs):
  _check_greedy(models, inputs, 12)


def test_greedy_one_token_matches_transformers(model, inputs):
  _check_greedy(model, inputs, 1)


def _check_greedy(models, inputs, max_new_tokens):
  hf, config, params = models
  theirs, _ = hf_generate(hf, inputs, max_new_tokens=max_new_tokens, do_sample=False)
  out = generate(params, config, inputs, max_new_tokens=max_new_tokens)
  assert out.sequences.shape == (6, max_new_tokens) and out.scores.shape == (6,)
  np.testing.assert_array_equal(np.asarray(out.sequences), normalise(theirs, max_new_tokens))


def test_greedy_has_early_eos_and_full_rows(model, inputs):
  """The test model exercises both EOS handling and the length limit."""
  _, config, params = model
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
  hf, config, params = models
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
  # Within 1e-4, plus 5e-5 relative: the models' float32 logits differ by ~1e-6 relative, which
  # adds up over 10-12 steps of log-probs near -15 (and len**0.5 with a negative penalty).
  np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), their_scores, atol=1e-4, rtol=5e-5)
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
  _, config, params = model
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

  hf, config, params = model
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
  first = np.asarray(out.sequences)[0, :, 0]
  freq = np.bincount(first, minlength=VOCAB) / n
  assert np.all(freq[probs == 0] == 0)
  # Fixed seed: deterministic; 6 sigma of a binomial frequency at n=6000 is <= 0.039.
  np.testing.assert_allclose(freq, probs, atol=6 * np.sqrt(0.25 / n))


def test_sampling_deterministic_shapes_and_scores(model, inputs):
  _, config, params = model
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


def test_score_matches_transformers(model, inputs):
  hf, config, params = model
  targets = random_inputs(6, 7, VOCAB, seed=5)
  out = score(params, config, inputs, targets)
  with torch.no_grad():
    ids = torch.tensor(inputs, dtype=torch.long)
    labels = torch.tensor(targets, dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0].numpy()
  logp = np.where(targets != 0, logp, 0.0)
  # Large random weights give log-probs near -20, where float32 models differ by ~1e-5 relative.
  np.testing.assert_allclose(np.asarray(out.token_scores), logp, atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out.sequence_scores), logp.sum(-1), atol=1e-4, rtol=1e-5)


def test_greedy_scores_equal_score_of_output(model, inputs):
  _, config, params = model
  out = generate(params, config, inputs, max_new_tokens=12)
  rescored = score(params, config, inputs, np.asarray(out.sequences))
  np.testing.assert_allclose(
    np.asarray(rescored.sequence_scores), np.asarray(out.scores), atol=1e-4
  )


def test_ignore_eos_bfloat16(model, inputs):
  _, config, params = model
  bf16 = config.replace(dtype="bfloat16")
  out = generate(params, bf16, inputs, max_new_tokens=12, ignore_eos=True)
  assert out.sequences.shape == (6, 12)
  assert not (np.asarray(out.sequences) == 1).any(axis=-1).all()


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
  _, config, params = model
  with pytest.raises(ValueError):
    generate(params, config, inputs, **kwargs)
