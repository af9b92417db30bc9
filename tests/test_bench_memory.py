"""benchmarks/memory.py's device targets: the CPU, or a GPU compiled for without one."""

import importlib.util

import pytest

from benchmarks import memory


def test_gpu_target_without_the_cuda_plugin_is_one_line(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if "cuda" in name else real(name, *a)
  )
  with pytest.raises(SystemExit, match=r"--target h100 .*make setup-gpu-aot.*jax-cuda12-plugin=="):
    memory.target_devices("h100", 1)


def test_targets_name_their_devices():
  assert memory.target_devices("cpu", 1) == memory.jax.devices()[:1]
  assert memory.compile_options("cpu") == {}
  assert memory.compile_options("h200") == {"xla_gpu_enable_triton_gemm": False}
  assert "one H200 (compiled without one)" in memory.where("h200")
  for target, config in memory.GPU_TARGETS.items():
    # The device description XLA parses (text format): a Hopper part, named as the target.
    assert "cuda_compute_capability { major: 9 minor: 0 }" in config
    assert f'device_description_str: "NVIDIA {target.upper()}"' in config
