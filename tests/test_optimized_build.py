"""The parity core at XLA's default optimisation level, which is what users run.

The suite compiles at -O0 with XLA:CPU's elemental emitters (tests/conftest.py) to save compile
time; this runs one model's logits, greedy and beam parity tests again in a child pytest with
XLA's defaults.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

CORE = [
  "test_model.py::test_logits_encoder_and_loss_match_transformers[t5_untied_gated]",
  "test_model.py::test_cached_decoding_equals_teacher_forcing[t5_untied_gated]",
  "test_generate.py::test_greedy_matches_transformers[v1_1]",
  "test_generate.py::test_beam_matches_transformers[v1_1-case2]",
  "test_generate.py::test_beam_matches_transformers[v1_0-case1]",
]


@pytest.mark.slow
def test_parity_core_at_default_optimisation_level():
  env = dict(os.environ, T5JAX_TEST_XLA_OPT="1")
  # conftest added its compile-time flags to this process's XLA_FLAGS; the child must not
  # inherit them.
  from conftest import TEST_XLA_FLAGS

  ours = {f.split("=")[0] for f in TEST_XLA_FLAGS}
  flags = env.get("XLA_FLAGS", "").split()
  env["XLA_FLAGS"] = " ".join(f for f in flags if f.split("=")[0] not in ours)
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
  cmd += [os.path.join(HERE, t) for t in CORE]
  proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=400)
  tail = proc.stdout[-3000:] + proc.stderr[-2000:]
  assert proc.returncode == 0, tail
  assert f"{len(CORE)} passed" in proc.stdout, tail
