"""Test-wide settings.

XLA's CPU backend spends most of a tiny model's compile time optimising code that then runs for
microseconds; the suite compiles hundreds of such programs, so it asks for -O0 code generation
(about 3x faster to compile) and for XLA:CPU's older elemental emitters instead of its fusion
emitters (`TEST_XLA_FLAGS`; test_attention + test_model from a cold compilation cache: 69-87 s
-> 39-47 s on 2 cores). tests/test_optimized_build.py reruns the parity core (logits, cached
decoding, greedy, beam) with XLA's defaults, which is what users get; set T5JAX_TEST_XLA_OPT=1
to run everything with them.

Many tests (and the CLI subprocesses they start) compile the same small programs; JAX's
persistent compilation cache, keyed by the program and the compiler flags, lets the second
compile load the first one's result instead.

The fixtures below are those more than one test module uses; what else the tests share is in
tests/helpers/ (see its __init__).
"""

import os
import subprocess
import sys

# Compile-time settings of the suite only (a flag the caller set already is left as it is).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _xla_accepts(flags: str) -> bool:
  """Whether this jaxlib starts with `flags` (XLA aborts on a flag it does not know, and a newer
  XLA may drop one of ours): one child process, once per pytest run (workers and the CLI
  subprocesses inherit the result through XLA_FLAGS)."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  code = "import jax; jax.devices()"
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
  return proc.returncode == 0


if os.environ.get("T5JAX_TEST_XLA_OPT") != "1":
  flags = os.environ.get("XLA_FLAGS", "")
  added = [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in flags]

  def _with(extra):
    return " ".join([flags, *extra]).strip()

  if added:
    if not _xla_accepts(_with(added)):  # slower to compile, never wrong: keep what XLA knows
      known = [f for f in added if _xla_accepts(_with([f]))]
      rejected = sorted(set(added) - set(known))
      print(f"tests/conftest.py: this XLA rejects {rejected}; testing without", file=sys.stderr)
      added = known
    os.environ["XLA_FLAGS"] = _with(added)

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
