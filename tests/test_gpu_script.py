"""benchmarks/gpu.py runs unattended, once, on a lent GPU whose image lacks grain, ml-collections
and tensorboardX: its `--smoke` mode runs here end to end with those three made unimportable,
and every phase must leave its results in $OUT/gpu.json (no entry failed, none skipped)."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two grid entries that between them take every value of every field of the default grid
# (attention einsum / dot_product, scan 0 / 1, remat none / full, loss block 0 / 32): the GPU run's
# five entries parse and run the same code, at ~8 s of CPU compile each.
GRID = "einsum,0,none,0;dot_product,1,full,32"

# Runs the script as __main__ with the modules the device image lacks made unimportable; the
# grid comes as the one argument (`python -c _LAUNCH GRID`).
_LAUNCH = """
import runpy, sys
class Missing:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("grain", "ml_collections", "tensorboardX"):
      raise ImportError(f"{name} is not installed on the device image")
sys.meta_path.insert(0, Missing())
sys.argv = ["benchmarks.gpu", "--smoke", "--grid", sys.argv[1]]
runpy.run_module("benchmarks.gpu", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_gpu_script_smoke_without_device_only_packages(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", _LAUNCH, GRID],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "gpu.json").read_text())
  assert "errors" not in res, res["errors"]
  assert res["attention_check"]["ok"], res["attention_check"]
  train = {r["entry"]: r for r in res["train"]}
  assert set(train) == {*GRID.split(";"), "transformers eager"}, train  # the grid + reference
  assert all("step_s" in r for r in train.values()), train
  methods = {r["method"]: r for r in res["decode"]}
  assert set(methods) == {"greedy", "beam", "sample"}
  assert all("t5jax_s" in r and "transformers_s" in r for r in methods.values()), methods


def test_peak_by_device_name():
  # jax's device_kind names; the NVL and PCIe boards must not get the SXM peak.
  assert gpu.peak_tflops("NVIDIA H200") == 989.0
  assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert gpu.peak_tflops("NVIDIA H200 NVL") == 835.0
  assert gpu.peak_tflops("NVIDIA H100 NVL") == 835.0
  assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
  assert gpu.peak_tflops("cpu") == 0.0


def test_smoke_grid_takes_every_value_of_the_default_grid():
  def values(grid):
    return [set(col) for col in zip(*(e.split(",") for e in grid.split(";")), strict=True)]

  assert values(GRID) == values(gpu.DEFAULT_GRID)
