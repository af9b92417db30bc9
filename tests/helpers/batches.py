"""Batches drawn from the data pipelines, compared."""

import numpy as np


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  """Two lists of batches hold the same keys and the same arrays, bit for bit."""
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def rebuild_corrupted(inputs, targets, tok):
  """Original tokens from corrupted inputs and targets (both ending with eos)."""
  spans, current = {}, None
  for t in targets[:-1].tolist():
    if tok.is_sentinel(t):
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs[:-1].tolist():
    out.extend(spans[t] if tok.is_sentinel(t) else [t])
  return out
