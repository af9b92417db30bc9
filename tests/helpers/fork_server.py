"""A fork server for `train.py` runs: real processes without each paying the imports.

Starting a Python that imports JAX, orbax, transformers and TensorBoard costs seconds, so the CLI
tests start runs through a fork server: one subprocess imports `train.py` (without parsing flags
or touching a device) and forks a child per run, which parses its own argv and runs `train.py`'s
entry point with stdout/stderr sent to files. Each child is a real process of its own (signals,
exit status, `kill -9`), only its start is cheap. tests/conftest.py holds one server per pytest
process (`fork_server`) and kills what a test leaves running (`server`).

Nothing waits without a limit: each answer of the server and each run has a generous timeout (a
hang fails the test instead of hanging CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from helpers.runs import REPO

_SERVER = textwrap.dedent(
  """
  import importlib.util, json, os, sys, traceback
  sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location("train_cli", os.path.join(REPO, "train.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  import t5jax.data, t5jax.hf, t5jax.train, t5jax.generate, sacrebleu  # warm
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req or "poll" in req:
      pid, status = os.waitpid(req.get("wait", req.get("poll")), 0 if "wait" in req else os.WNOHANG)
      rc = os.waitstatus_to_exitcode(status) if pid else None
      print(json.dumps({"rc": rc}), flush=True)
      continue
    pid = os.fork()
    if pid:
      print(json.dumps({"pid": pid}), flush=True)
      continue
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["train.py", *req["argv"]]
    code = 0
    try:
      exec(req.get("setup", ""), {})  # test hooks (e.g. to hold the run at a chosen point)
      cli.run()
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
      traceback.print_exc()
      code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  """
).replace("REPO", repr(REPO))


# Seconds before a run, an answer of the fork server or an awaited file counts as hung. A tiny
# run takes seconds; these limits only bound how long a broken test can take.
RUN_TIMEOUT = 300
SERVER_TIMEOUT = 300


class Run:
  """A `train.py` child of the fork server."""

  def __init__(self, server, pid, out, err):
    self.server, self.pid, self.out, self.err = server, pid, out, err
    self.rc = None

  def wait(self, timeout: float = RUN_TIMEOUT) -> Run:
    """Waits for the exit status; a run still going after `timeout` s is killed and fails."""
    deadline = time.monotonic() + timeout
    while self.poll() is None:
      if time.monotonic() > deadline:
        self.kill()
        raise AssertionError(f"run {self.pid} did not end within {timeout} s:\n{self.stderr}")
      time.sleep(0.1)
    return self

  def kill(self) -> None:
    """SIGKILL (if still running) and reap."""
    if self.rc is None:
      try:
        os.kill(self.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.rc = self.server._call({"wait": self.pid})["rc"]

  def poll(self) -> int | None:
    if self.rc is None:
      self.rc = self.server._call({"poll": self.pid})["rc"]
    return self.rc

  @property
  def stderr(self) -> str:
    with open(self.err) as fh:
      return fh.read()


class ForkServer:
  def __init__(self, tmp_dir):
    self.tmp_dir, self.n, self.runs = str(tmp_dir), 0, []
    self.proc = subprocess.Popen(
      [sys.executable, "-c", _SERVER],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      cwd=REPO,
    )
    assert self._read() == {"ready": True}

  def _read(self, timeout: float = SERVER_TIMEOUT):
    # A server that does not answer in time is killed, which ends the readline.
    timer = threading.Timer(timeout, self.proc.kill)
    timer.start()
    try:
      line = self.proc.stdout.readline()
    finally:
      timer.cancel()
    if not line:
      raise RuntimeError(
        f"fork server exited with {self.proc.wait()} (killed if silent for {timeout} s)"
      )
    return json.loads(line)

  def _call(self, req):
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def start(self, *argv, setup: str = "") -> Run:
    """Starts `train.py argv`; `setup` is Python run in the child first (test hooks)."""
    self.n += 1
    out, err = (os.path.join(self.tmp_dir, f"run{self.n}.{s}") for s in ("out", "err"))
    req = {"argv": [str(a) for a in argv], "stdout": out, "stderr": err, "setup": setup}
    pid = self._call(req)["pid"]
    self.runs.append(Run(self, pid, out, err))
    return self.runs[-1]

  def run(self, *argv) -> Run:
    return self.start(*argv).wait()

  def kill_running(self):
    """Kills the children a (failed) test left running."""
    for run in self.runs:
      if self.proc.poll() is None:
        if run.poll() is None:
          run.kill()
      elif run.rc is None:  # the server is gone (killed as hung): kill the orphan directly
        try:
          os.kill(run.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    self.runs = []

  def close(self):
    try:
      self.kill_running()
    finally:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
