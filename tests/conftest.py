"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's compile time optimising code that then runs for
microseconds; the suite compiles hundreds of such programs, so it asks for -O0 code generation
(about 3x faster to compile). Results agree with optimised builds well within the parity
tolerances. Set T5JAX_TEST_XLA_OPT=1 to test with the default optimisation level.
"""

import os
import sys

if os.environ.get("T5JAX_TEST_XLA_OPT") != "1":
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()

sys.path.insert(0, os.path.dirname(__file__))
