"""benchmarks/train.py's matmul-only floor times each backward product in the operand layouts its
side's step uses; both sides must compute the same products, or the floor compares unlike work."""

import numpy as np
import pytest
import torch  # a test dependency: missing, this fails (the reference is never skipped)

from benchmarks import train as bench


@pytest.mark.parametrize("form", bench.FORMS)
def test_xla_and_torch_forms_compute_the_same_product(form):
  m, k, n = 12, 8, 20
  p, q = bench.mm_operands("xla", form, m, k, n, np.random.default_rng(0))
  tp, tq = bench.mm_operands("torch", form, m, k, n, np.random.default_rng(0))
  ours = np.asarray(bench.mm_product("xla", form)(p, q))
  theirs = bench.mm_product("torch", form)(torch.from_numpy(tp), torch.from_numpy(tq)).numpy()
  expect_shape = {"fwd": (m, n), "dx": (m, k), "dw": (k, n)}[form]
  assert ours.shape == expect_shape
  theirs = theirs.T if form == "dw" else theirs  # torch's weight gradient is [N, K]
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_every_layer_has_its_three_products():
  import t5jax

  config = t5jax.get_config("t5-v1_1-small")
  shapes = bench.matmul_shapes(config, 8, 128, 32)
  by_layer = {}
  for form, m, k, n, c in shapes:
    by_layer.setdefault((m, k, n, c), set()).add(form)
  assert all(forms == set(bench.FORMS) for forms in by_layer.values())
  # the output layer, once per step: [B*T, D] @ [D, V]
  assert (8 * 32, config.d_model, config.vocab_size, 1) in by_layer
