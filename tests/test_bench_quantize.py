"""benchmarks/quantize_quality.py: its row comparison, and the command on a tiny checkpoint."""

import re

import numpy as np
import pytest
from helpers.decode_cli import save_byte_checkpoint
from helpers.runs import write_tsv

from benchmarks import quantize_quality


def test_rows_compare_equal_up_to_padding():
  a = [np.array([[5, 6, 1, 0]]), np.array([[5, 1, 0, 0], [7, 7, 7, 1]])]
  b = [np.array([[5, 6, 1]]), np.array([[5, 1, 0, 0, 0], [7, 7, 7, 2, 0]])]
  np.testing.assert_array_equal(quantize_quality.same_rows(a[:1], b[:1]), [[True]])
  np.testing.assert_array_equal(quantize_quality.same_rows(a[1:], b[1:]), [[True, False]])
  # A longer row is not equal to its prefix.
  longer = [np.array([[5, 6, 1, 9]])]
  np.testing.assert_array_equal(quantize_quality.same_rows(longer, b[:1]), [[False]])


def test_command_reports_every_mode(tmp_path, capsys):
  folder = save_byte_checkpoint(str(tmp_path / "hf"))
  tsv = write_tsv(tmp_path / "dev.tsv", 6)
  quantize_quality.main([
    "--checkpoint", folder, "--tsv", tsv, "--modes", "int8,bf16", "--max_new_tokens", "4",
    "--batch_size", "4", "--num_beams", "2",
  ])  # fmt: skip
  out = capsys.readouterr().out
  assert "6 inputs, greedy and beam-2" in out
  for mode in ("int8", "bf16"):
    row = re.search(rf"^{mode} +(.*)$", out, re.M)
    assert row, out
    cols = [float(x) for x in row.group(1).split()]
    rows, beams, top, same_gap, top_gap, exact = cols  # fractions, then score gaps
    assert all(0.0 <= f <= 1.0 for f in (rows, beams, top, exact)), row.group(0)
    assert top_gap >= 0.0 and (same_gap >= 0.0 or np.isnan(same_gap)), row.group(0)


def test_missing_checkpoint_is_one_line(tmp_path):
  with pytest.raises(SystemExit, match=r"quantize_quality: error: .*not found: .*nowhere"):
    quantize_quality.main(["--checkpoint", str(tmp_path / "nowhere")])
