"""Goodness of fit for the sampling tests: Pearson chi-square against the expected distribution."""

import numpy as np


def chi_square_critical(df: int, z: float = 4.753) -> float:
  """Upper critical value of chi-square(df) at the normal quantile z (4.753: tail 1e-6).

  Wilson-Hilferty: (X/df)^(1/3) is close to normal with mean 1 - 2/(9 df) and variance 2/(9 df).
  """
  v = 2.0 / (9.0 * df)
  return df * (1.0 - v + z * np.sqrt(v)) ** 3


def assert_samples_follow(samples: np.ndarray, probs: np.ndarray) -> None:
  """Draws `samples` (token ids) are consistent with `probs` [V]: none where p = 0, and Pearson's
  chi-square over the tokens with p > 0 below its 1e-6 critical value.

  The tests sample at a fixed seed, so the outcome is deterministic; a wrong warper moves the
  statistic by orders of magnitude beyond the critical value at these sample sizes.
  """
  counts = np.bincount(samples, minlength=probs.size)
  assert np.all(counts[probs == 0] == 0), f"sampled tokens of probability 0: {counts[probs == 0]}"
  kept = probs > 0
  expected = samples.size * probs[kept]
  stat = float(((counts[kept] - expected) ** 2 / expected).sum())
  critical = chi_square_critical(int(kept.sum()) - 1)
  assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}: counts {counts}, p {probs}"
