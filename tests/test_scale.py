"""Scale-out tests: sharded training equals one device, checkpoints move between meshes and
device counts, a real two-process run matches one process, sharded decoding equals unsharded.

Multi-device checks run scripts from `tests/scale_scripts/` in subprocesses, since the CPU
device count (`--xla_force_host_platform_device_count`) must be set before jax is imported.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
import pytest

from t5jax import checkpoint, distributed, sharding

SCRIPTS = os.path.join(os.path.dirname(__file__), "scale_scripts")
sys.path.insert(0, SCRIPTS)

import common  # noqa: E402
from helpers.runs import TINY_FLAGS, steps, train_rows, write_tsv  # noqa: E402


def _env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--_unused")
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
  return env


def _free_port() -> int:
  """A port free now; another process may take it before ours binds it (see `_launch_two`)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


_FREE = _free_port

# What gRPC writes when the coordinator (process 0) cannot bind its port: someone took it.
PORT_TAKEN = "Failed to add port to server"
HANG_S = 600  # a hang guard only: a run that passes takes a small fraction of it


def _listens(pid: int, port: int) -> bool | None:
  """Whether process `pid` holds a TCP socket listening on `port`; None where /proc cannot say."""
  inodes = set()
  for name in ("tcp", "tcp6"):
    try:
      with open(f"/proc/net/{name}") as fh:
        rows = [line.split() for line in fh.read().splitlines()[1:]]
    except OSError:
      if name == "tcp":
        return None
      continue
    inodes |= {r[9] for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port}
  try:
    fds = os.listdir(f"/proc/{pid}/fd")
  except OSError:
    return False  # exited meanwhile
  for fd in fds:
    try:
      link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
      continue
    if link.startswith("socket:[") and link[8:-1] in inodes:
      return True
  return False


def _kill(proc) -> None:
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
    while proc.poll() is None:
      time.sleep(0.05)


def _launch_two(start):
  """Starts processes 0 and 1 of a two-process run: `start(i, port)` returns a process handle
  (`pid`, `poll()`, `stderr`). Process 1 starts only once process 0 (the coordinator) listens on
  the port, so it never talks to whoever else might hold it; when someone took the port between
  `_free_port` and process 0's bind, process 0 fails with `PORT_TAKEN` and both start again on
  another port. No timing decides anything (the deadline is a hang guard)."""
  for _ in range(5):
    port = _free_port()
    p0 = start(0, port)
    deadline = time.monotonic() + HANG_S
    while (listening := _listens(p0.pid, port)) is False and p0.poll() is None:
      if time.monotonic() > deadline:
        _kill(p0)
        pytest.fail(f"process 0 never listened on {port}:\n{p0.stderr[-5000:]}")
      time.sleep(0.1)
    if listening is False and PORT_TAKEN in p0.stderr:
      continue  # a port taken under us: another one
    return [p0, start(1, port)]
  pytest.fail(f"5 ports in a row were taken:\n{p0.stderr[-5000:]}")


def _wait_all(procs, until=None) -> None:
  """Waits until every process exited 0, or `until()` holds; a failed process kills the others
  (a peer left waiting on a dead one would hang), and so does the hang guard."""
  deadline = time.monotonic() + HANG_S
  while not (until and until()):
    rcs = [p.poll() for p in procs]
    if None not in rcs or any(rc not in (None, 0) for rc in rcs) or time.monotonic() > deadline:
      break
    time.sleep(0.2)
  else:
    return
  failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
  hung = [i for i, p in enumerate(procs) if p.poll() is None]
  for p in procs:
    _kill(p)
  for i in failed or hung:
    why = f"exited with {procs[i].poll()}" if failed else "hung (killed)"
    pytest.fail(f"process {i} {why}:\n{procs[i].stderr[-5000:]}")


class _Proc:
  """A `subprocess.Popen` with stdout / stderr in files (read while it runs)."""

  def __init__(self, argv, env, out_dir, name):
    self.out, self.err = (os.path.join(out_dir, f"{name}.{s}") for s in ("out", "err"))
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
    self.pid = self.proc.pid

  def poll(self):
    return self.proc.poll()

  @property
  def stdout(self) -> str:
    with open(self.out) as fh:
      return fh.read()

  @property
  def stderr(self) -> str:
    with open(self.err) as fh:
      return fh.read()


def test_maybe_initialize_single_process_and_errors():
  assert not distributed.maybe_initialize(env={})
  assert not distributed.maybe_initialize(env={"SLURM_NTASKS": "4"})  # sbatch script, no srun
  assert not distributed.maybe_initialize(None, 1, 0, env={})
  with pytest.raises(ValueError, match="coordinator"):
    distributed.maybe_initialize(None, 2, 0, env={})
  with pytest.raises(ValueError, match="process id"):
    distributed.maybe_initialize(env={"T5JAX_COORDINATOR": "h:1", "T5JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="not in"):
    distributed.maybe_initialize("h:1", 2, 2, env={})
  assert distributed.is_main_process()
  distributed.barrier("single process: a no-op")
  assert distributed.describe().startswith("process 0/1")


_FAKE_PROCESS = """
import socket, sys, time
port, i = int(sys.argv[1]), int(sys.argv[2])
if i == 0:  # the coordinator: binds all interfaces (gRPC: [::]) and says what gRPC says
  s = socket.socket()
  try:
    s.bind(("", port))
  except OSError:
    sys.exit(print(PORT_TAKEN, file=sys.stderr) or 1)
  s.listen()
  s.accept()
else:
  socket.create_connection(("127.0.0.1", port)).close()
"""


def test_launch_two_retries_a_taken_port(monkeypatch, tmp_path):
  """A port taken between `_free_port` and the coordinator's bind: process 1 is never started
  against it, and both start again on another port."""
  squatter = socket.socket()
  squatter.bind(("127.0.0.1", 0))
  squatter.listen()
  taken = squatter.getsockname()[1]
  ports = iter([taken])
  monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: next(ports, 0) or _FREE())
  started = []

  def start(i, port):
    started.append((i, port))
    script = _FAKE_PROCESS.replace("PORT_TAKEN", repr(PORT_TAKEN))
    return _Proc([sys.executable, "-c", script, str(port), str(i)], None, tmp_path, f"{i}.{port}")

  try:
    procs = _launch_two(start)
    _wait_all(procs)
  finally:
    squatter.close()
  assert started[0] == (0, taken) and [i for i, _ in started[1:]] == [0, 1], started
  assert started[1][1] == started[2][1] != taken


@pytest.mark.slow
def test_meshes_train_checkpoint_decode():
  """(8,1,1), (2,4,1), (2,2,2), (1,1,8): steps, restore across meshes, decoding; one process."""
  res = subprocess.run(
    [sys.executable, os.path.join(SCRIPTS, "meshes.py")],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stdout + res.stderr[-5000:]
  assert "meshes ok" in res.stdout, res.stdout


def _reference(steps: int):
  """Single-device losses and final train state of the two-process run's schedule."""
  config = common.tiny_config(dropout_rate=0.1)
  mesh = sharding.create_mesh(common.mesh_cfg(1, 1, 1), jax.devices()[:1])
  setup = common.build(config, mesh)
  state = setup.init_state(jax.random.key(0))
  train_step = setup.train_step
  losses = []
  for i in range(steps):
    state, metrics = train_step(
      state, sharding.shard_batch(common.batch(i), mesh), jax.random.key(7)
    )
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """jax.distributed on localhost, 2 processes x 2 CPU devices: same losses as one device; the
  checkpoint both processes wrote restores in this (single-device) process to the same params."""
  steps = 3
  script = os.path.join(SCRIPTS, "multiprocess.py")
  logs = tmp_path / "logs"
  logs.mkdir()
  ckpt_dir = tmp_path / "ckpt"
  procs = _launch_two(
    lambda i, port: _Proc(
      [sys.executable, script, str(port), str(i), str(ckpt_dir), str(steps)],
      _env(2),
      logs,
      f"p{i}.{port}",
    )
  )
  try:
    want_losses, want_state = _reference(steps)  # runs while the two processes work
    _wait_all(procs)
  finally:
    for p in procs:
      _kill(p)
  outs = [(p.stdout, p.stderr) for p in procs]
  for i, (out, _) in enumerate(outs):
    assert f"process {i} ok" in out
  assert "losses" not in outs[1][0]  # only process 0 reports
  losses = json.loads(outs[0][0].split("losses ", 1)[1].splitlines()[0])
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)  # noqa: E731
  # The checkpoint both processes wrote, restored onto this process's single device.
  mgr = checkpoint.CheckpointManager(str(ckpt_dir), async_save=False)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), want_state
  )
  state, data_state = mgr.restore(abstract, steps)
  mgr.close()
  assert data_state == {"0": {"pos": steps}, "1": {"pos": steps}}
  jax.tree.map(close, jax.device_get(state), want_state)
  # Parameters alone, as decode.py loads them.
  step, params = checkpoint.restore_params(str(ckpt_dir))
  assert step == steps
  jax.tree.map(close, params, want_state.params)


# --- train.py as two processes ---------------------------------------------------------------


def _train_files(tmp_path) -> tuple[str, str]:
  """The same 40 rows for two processes (each reads rows `[i::2]`) and for one, ordered so that the
  one process's batch k (4 rows) is the two processes' global batch k: rows 4k, 4k+2 (process
  0's two), then 4k+1, 4k+3 (process 1's)."""
  two = write_tsv(tmp_path / "two.tsv", 40)
  with open(two) as fh:
    lines = fh.read().splitlines(keepends=True)
  one = tmp_path / "one.tsv"
  one.write_text("".join(lines[4 * k + j] for k in range(10) for j in (0, 2, 1, 3)))
  return two, str(one)


def _cli(workdir, train_file, *extra):
  """A tiny run, batch 4; unpacked and unshuffled so both layouts see the same global batches."""
  return [
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--config.data.kind=tsv",
    "--config.data.tokenizer=byt5",
    f"--config.data.train_file={train_file}",
    "--config.data.max_input_length=12",
    "--config.data.max_target_length=12",
    "--config.data.pack=False",
    "--config.data.shuffle=False",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.learning_rate=1e-3",
    "--config.checkpoint_every=1000",
    *TINY_FLAGS,  # batch 4, log (and agree on a signal) every step
    *extra,
  ]


def _two_processes(server, argv):
  return _launch_two(
    lambda i, port: server.start(
      *argv, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"
    )
  )


def _files(workdir) -> dict[str, Any]:
  """Every file outside checkpoints/ (orbax's layout depends on the process count), with its
  bytes where they must not depend on the run (events files and safetensors are compared apart)."""
  out = {}
  for root, _, names in os.walk(workdir):
    rel_root = os.path.relpath(root, workdir)
    if rel_root.split(os.sep)[0] == "checkpoints":
      continue
    for name in names:
      rel = os.path.normpath(os.path.join(rel_root, name))
      raw = name.startswith("events.out") or name.endswith(".safetensors") or rel == "metrics.jsonl"
      raw = raw or rel == "train.lock"  # present in both; it names its holder (pid, host, time)
      with open(os.path.join(root, name), "rb") as fh:
        out[rel] = None if raw else fh.read()
      if rel == "train_config.json":  # the one field the two runs set apart
        cfg = json.loads(out[rel])
        cfg["data"].pop("train_file")
        out[rel] = cfg
  return out


@pytest.mark.slow
def test_train_cli_two_processes_signal_resume_match_one(server, tmp_path):
  """train.py as 2 processes (1 CPU device each, data-parallel): SIGTERM to process 1 alone makes
  both save the same step and exit 0; resuming finishes; the workdir holds what one process
  writes (process 0 alone writes it), and losses and final parameters equal a one-process run."""
  from safetensors.numpy import load_file

  two_file, one_file = _train_files(tmp_path)
  two_dir, one_dir = tmp_path / "two", tmp_path / "one"
  procs = _two_processes(server, _cli(two_dir, two_file, "--config.num_train_steps=100000"))
  logged = lambda: os.path.exists(two_dir / "metrics.jsonl") and bool(train_rows(two_dir))  # noqa: E731
  _wait_all(procs, until=logged)  # training: process 1 is in the loop (its handler is set)
  os.kill(procs[1].pid, signal.SIGTERM)
  _wait_all(procs)
  for p in procs:
    assert "Traceback" not in p.stderr, p.stderr
  (stop,) = steps(two_dir)  # one checkpoint, written by both processes together
  assert [r["step"] for r in train_rows(two_dir)] == list(range(1, stop + 1))
  assert not os.path.exists(two_dir / "export")

  total = stop + 2
  procs = _two_processes(server, _cli(two_dir, two_file, f"--config.num_train_steps={total}"))
  one = server.start(*_cli(one_dir, one_file, f"--config.num_train_steps={total}"))
  _wait_all([*procs, one])
  assert steps(two_dir) == [stop, total]
  # Process 0 alone wrote the workdir: one metrics row per step, one events file per run, and the
  # same files (same bytes) as the one-process run's.
  rows_two, rows_one = train_rows(two_dir), train_rows(one_dir)
  assert [r["step"] for r in rows_two] == list(range(1, total + 1))
  assert [r["step"] for r in rows_one] == list(range(1, total + 1))
  files_two, files_one = _files(two_dir), _files(one_dir)
  events = [f for f in files_two if f.startswith("events.out")]
  assert len(events) == 2, events  # the signalled run's and the resumed run's
  assert {k: v for k, v in files_two.items() if k not in events} == {
    k: v for k, v in files_one.items() if not k.startswith("events.out")
  }
  # The same global batches give the same training, up to float32 reassociation (two halves of
  # the batch reduced apart, then all-reduced). Measured: losses within 1.5e-7 relative, parameters
  # within 1e-7 absolute after 9 steps; each AdamW step at 1e-3 moves a parameter by ~1e-3, so the
  # tolerances (those of the other scale tests) leave ~100x margin and still see any lost update.
  for a, b in zip(rows_two, rows_one, strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-5, err_msg=f"step {a['step']}")
  p_two = load_file(two_dir / "export" / "params.safetensors")
  p_one = load_file(one_dir / "export" / "params.safetensors")
  assert p_two.keys() == p_one.keys()
  for k in p_one:
    np.testing.assert_allclose(p_two[k], p_one[k], rtol=2e-5, atol=2e-6, err_msg=k)
