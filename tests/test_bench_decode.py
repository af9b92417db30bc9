"""benchmarks/decode.py end to end: t5jax and CTranslate2 (its --peer) decode the same exported
model and agree token for token (float32, greedy and beam), so the peer comparison of
docs/quantization.md compares like with like."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ctranslate2_peer_decodes_the_same_tokens():
  args = ["--tiny", "--no_hf", "--peer", "ctranslate2", "--quantize", "none", "--threads", "1"]
  args += ["--repeats", "1", "--calls", "1", "--matmul", "0", "--methods", "greedy,beam"]
  args += ["--batch", "2", "--input_len", "8", "--new_tokens", "4", "--num_beams", "2"]
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.decode", *args],
    cwd=ROOT, capture_output=True, text=True, timeout=400,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in proc.stdout.splitlines() if "speed-up" in line and "ct2" in line]
  assert {line.split()[0] for line in rows} == {"greedy", "beam"}, proc.stdout
  for line in rows:  # t5jax float32 against CTranslate2 float32 on the same weights
    assert re.search(r"same tokens: 100% of rows", line), line
