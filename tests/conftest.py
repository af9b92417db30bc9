"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's compile time optimising code that then runs for
microseconds; the suite compiles hundreds of such programs, so it asks for -O0 code generation
(about 3x faster to compile). tests/test_optimized_build.py reruns the parity core (logits,
cached decoding, greedy, beam) at the default level in CI; set T5JAX_TEST_XLA_OPT=1 to run
everything at the default level.

Many tests (and the CLI subprocesses they start) compile the same small programs; JAX's
persistent compilation cache, keyed by the program and the compiler flags, lets the second
compile load the first one's result instead.

The fixtures below are those more than one test module uses; what else the tests share is in
tests/helpers/ (see its __init__).
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
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
  """One train.py fork server per pytest process (helpers/fork_server.py)."""
  from helpers.fork_server import ForkServer

  s = ForkServer(tmp_path_factory.mktemp("fork_server"))
  yield s
  s.close()


@pytest.fixture
def server(fork_server):
  """The fork server; what a test leaves running is killed when it ends."""
  yield fork_server
  fork_server.kill_running()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
  """The HF folder decode.py's tests decode with (helpers.decode_cli.save_byte_checkpoint); tests
  read it and never write to it."""
  from helpers.decode_cli import save_byte_checkpoint

  return save_byte_checkpoint(str(tmp_path_factory.mktemp("ckpt")))
