"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's compile time optimising code that then runs for
microseconds; the suite compiles hundreds of such programs, so it asks for -O0 code generation
(about 3x faster to compile). tests/test_optimized_build.py reruns the parity core (logits,
cached decoding, greedy, beam) at the default level in CI; set T5JAX_TEST_XLA_OPT=1 to run
everything at the default level.

Many tests (and the CLI subprocesses they start) compile the same small programs; JAX's
persistent compilation cache, keyed by the program and the compiler flags, lets the second
compile load the first one's result instead.
"""

import os
import sys

if os.environ.get("T5JAX_TEST_XLA_OPT") != "1":
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()

os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

sys.path.insert(0, os.path.dirname(__file__))
