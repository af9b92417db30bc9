"""Training metrics: `metrics.jsonl` rows and TensorBoard event files, from process 0 only.

Event files are written with TensorBoard's own `EventFileWriter` and protos (the `tensorboard`
package, which imports in well under a second without TensorFlow); tensorboardX imports torch
when it is installed, which cost several seconds at every start of train.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from t5jax.errors import TrainingError
from t5jax.workdir import Paths, atomic_write


class MetricWriter:
  """Appends `{"step", "split", **metrics}` rows to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool, resume_step: int = 0):
    self.enabled, self._workdir, self._failed = enabled, workdir, False
    if enabled:
      path = Paths(workdir).metrics
      _drop_rows_after(path, resume_step)
      self._tb = EventFileWriter(workdir)  # a new file per start: one never appended to again
      # "Restarted here": TensorBoard drops the points past `resume_step` that earlier files hold
      # (logged by a killed run after its last checkpoint, redone by this one).
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._tb.add_event(
        event_pb2.Event(wall_time=time.time(), step=resume_step + 1, session_log=start)
      )
      self._fh = open(path, "a")

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
    summary = summary_pb2.Summary(
      value=[
        summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=float(v))
        for k, v in metrics.items()
      ]
    )
    with self._one_line_errors():
      self._fh.write(json.dumps(row) + "\n")
      self._fh.flush()
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and not self._failed:
      with self._one_line_errors():
        self._fh.close()
        self._tb.close()

  @contextlib.contextmanager
  def _one_line_errors(self):
    """A failed write (a full disk) is one TrainingError line; the checkpoints are not touched
    (a torn metrics line is skipped at resume)."""
    try:
      yield
    except OSError as e:
      self._failed = True  # close() then leaves the files alone instead of raising again
      raise TrainingError(
        f"cannot write metrics in {self._workdir}: {e.strerror or e}; the checkpoints are "
        "intact: free space and rerun the same command to resume"
      ) from e


def _drop_rows_after(path: str, step: int) -> None:
  """Forgets rows a killed run logged past the checkpoint it resumes from (they are redone), and a
  torn last line (a kill mid-write) with a warning; a bad line elsewhere is an error naming it."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8", errors="replace") as fh:
    lines = fh.read().splitlines()
  keep = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      row_step = int(row["step"])
    except (ValueError, KeyError, TypeError) as e:
      if number == len(lines):
        print(
          f"warning: {path}:{number}: skipped a torn last line ({line[:60]!r})", file=sys.stderr
        )
        continue
      raise TrainingError(
        f"{path}:{number}: unreadable metrics row ({e}); fix or remove that line to resume"
      ) from e
    if row_step <= step:
      keep.append(line)
  if len(keep) != len(lines):
    atomic_write(path, "".join(line + "\n" for line in keep))


class MetricsWindow:
  """The train metrics of the steps since the last log row, averaged, with throughput."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self._rows: list[dict[str, float]] = []
    self._start = time.perf_counter()

  def add(self, metrics: dict[str, float]) -> None:
    self._rows.append(metrics)

  def average(self) -> dict[str, float]:
    """Means of the window's rows plus tokens/s and steps/s since the last call; then empties."""
    dt = max(time.perf_counter() - self._start, 1e-9)
    avg = {k: float(np.mean([r[k] for r in self._rows])) for k in self._rows[0]}
    avg["tokens_per_sec"] = self.tokens_per_step * len(self._rows) / dt
    avg["steps_per_sec"] = len(self._rows) / dt
    self._rows.clear()
    self._start = time.perf_counter()
    return avg
