"""What a failing orbax save prints, held back, and the OS's reason for it in one phrase.

A save that fails in orbax's background threads (a full disk) logs an error with a traceback from
each thread and task that saw it (dozens per save, ~900 lines of stderr), reports leftover
coroutines and TensorStore callbacks into closed event loops through `sys.unraisablehook`, and
finally raises in the main thread at the next save or wait. `t5jax.checkpoint` holds all but that
last exception back (`HoldOrbaxErrors`) and turns it into one `CheckpointError` line
(`save_failure_reason`); what was held is shown if no such error summed it up.

A restore that fails on a damaged checkpoint is as loud: its abandoned reads report from a few to
thousands of lines. `dropping_failed_reads` drops them while the callers (`t5jax.checkpoint`,
`t5jax.train`) try checkpoints newest first and name each one they skip in a line.

Imports nothing of t5jax.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

import orbax.checkpoint as ocp

_ORBAX_DIR = os.path.dirname(os.path.abspath(ocp.__file__)) + os.sep
# Loggers orbax's failures reach: its own (absl) and asyncio's "exception was never retrieved".
_QUIETED_LOGGERS = ("absl", "asyncio")


def _in_orbax(tb) -> bool:
  while tb is not None:
    if tb.tb_frame.f_code.co_filename.startswith(_ORBAX_DIR):
      return True
    tb = tb.tb_next
  return False


def _loop_closed(exc: BaseException | None) -> bool:
  """TensorStore finishing a write for an orbax event loop that a failed save already closed."""
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class HoldOrbaxErrors(logging.Filter):
  """Holds back what a failing orbax save prints (see the module docstring): error records of
  orbax code or carrying an exception raised in it (loggers `absl`, `asyncio`), and the
  exceptions its background threads and leftover coroutines report through `sys.excepthook`
  and `sys.unraisablehook`."""

  def __init__(self):
    super().__init__()
    self.held: list[tuple[Callable, tuple]] = []  # (how to show it, its arguments)
    self.drop = False  # once a failure is summed up, what orbax reports after it is dropped
    self._hooks: tuple[Callable, Callable] | None = None  # the hooks this one passes on to
    self._installed = False

  def _hold(self, show: Callable, *args) -> None:
    if not self.drop:
      self.held.append((show, args))

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    tb = record.exc_info[2] if record.exc_info else None
    if record.pathname.startswith(_ORBAX_DIR) or _in_orbax(tb) or _loop_closed(exc):
      self._hold(logging.getLogger(record.name).handle, record)
      return False
    return True

  def _excepthook(self, kind, exc, tb) -> None:
    if self._installed and (_in_orbax(tb) or _loop_closed(exc)):
      self._hold(self._hooks[0], kind, exc, tb)
    else:
      self._hooks[0](kind, exc, tb)

  def _unraisablehook(self, unraisable) -> None:
    code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine never finished
    orbax_code = code is not None and code.co_filename.startswith(_ORBAX_DIR)
    ours = orbax_code or _in_orbax(unraisable.exc_traceback) or _loop_closed(unraisable.exc_value)
    if self._installed and ours:
      self._hold(self._hooks[1], unraisable)
    else:
      self._hooks[1](unraisable)

  def install(self) -> None:
    """Starts holding (again: a no-op)."""
    if self._installed:
      return
    for name in _QUIETED_LOGGERS:
      logging.getLogger(name).addFilter(self)
    self._hooks = (sys.excepthook, sys.unraisablehook)
    sys.excepthook, sys.unraisablehook = self._excepthook, self._unraisablehook
    self._installed = True

  def remove(self) -> None:
    """Stops holding and shows what was held (after a failure that was summed up, `drop` is set
    and this is not called: what orbax reports from then on is dropped). A hook installed over
    this one since keeps calling it; it then passes everything on."""
    if not self._installed:
      return
    self._installed = False
    for name in _QUIETED_LOGGERS:
      logging.getLogger(name).removeFilter(self)
    if sys.excepthook == self._excepthook:
      sys.excepthook = self._hooks[0]
    if sys.unraisablehook == self._unraisablehook:
      sys.unraisablehook = self._hooks[1]
    held, self.held = self.held, []
    for show, args in held:
      show(*args)


def save_failure_reason(e: BaseException) -> str:
  """The OS's reason for a failed write in an orbax/TensorStore error, else its first line."""
  text = str(e)
  found = re.search(r"Failed to write \d+ bytes to file \d+: ([^\[\]\n]+?)\s*\[", text)
  if found is None:
    found = re.search(r"\[Errno \d+\] ([^:\n]+)", text)
  return found.group(1) if found else _first_line(e)


def _first_line(e: BaseException) -> str:
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text[:200]}"


class _AbandonedReads(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records of orbax's checkpoint reads:
  futures abandoned by a restore that failed (`dropping_failed_reads`). TensorStore sets their
  exceptions from C++, so they carry no orbax frame; their text names the read. Once a read has
  failed it stays on the asyncio logger (reads in flight finish at any later time)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "never retrieved" not in str(record.msg):
      return True
    exc = record.exc_info if record.exc_info else (None, None, None)
    text = str(exc[1]) if exc[1] is not None else record.getMessage()
    from_read = "OCDBT database" in text or "while reading array index" in text
    return not (from_read or _in_orbax(exc[2]) or _loop_closed(exc[1]))


# The warning Python gives for an orbax read coroutine collected unawaited.
_NEVER_AWAITED = r"coroutine '_read\w*' was never awaited"
_ABANDONED_READS = _AbandonedReads()


class _OrbaxWarnings(logging.Filter):
  """Drops orbax's own warnings (e.g. that a checkpoint without metadata "could not be
  restored") while damaged checkpoints are tried: the caller names each one it skips."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.pathname.startswith(_ORBAX_DIR)


def release(e: BaseException) -> BaseException:
  """`e` without its tracebacks (and its causes'), so that the frames of a failed restore, and
  the unfinished reads they hold, can be collected while `dropping_failed_reads` is active."""
  seen = set()
  x: BaseException | None = e
  while x is not None and id(x) not in seen:
    seen.add(id(x))
    x.__traceback__ = None
    x = x.__cause__ or x.__context__
  return e


class FailedReads:
  """What `dropping_failed_reads` yields: `failure(e)` for each restore the caller catches."""

  def __init__(self):
    self.failed = False

  def failure(self, e: BaseException) -> BaseException:
    """Notes a failed restore and returns `e` without its tracebacks (`release`)."""
    self.failed = True
    return release(e)


@contextlib.contextmanager
def dropping_failed_reads():
  """While damaged checkpoints are tried, drops what orbax reports of a failed read.

  A restore that hits an unreadable array raises one exception, which the caller sums up in a
  line; its other reads, abandoned, report too: asyncio's "exception was never retrieved",
  unfinished coroutines, TensorStore callbacks into a closed event loop: from none to thousands of
  lines of tracebacks on stderr, depending on timing. Within the context all of it is dropped. The
  caller passes each exception it catches through the yielded `FailedReads.failure`, which keeps
  no traceback, so that on exit a garbage collection makes the abandoned reads report while they
  are dropped; once a read has failed, asyncio's records of those reads stay dropped for the rest
  of the process (`_AbandonedReads`), as does Python's warning for an orbax read coroutine never
  awaited.
  """
  reads = FailedReads()
  hold = HoldOrbaxErrors()
  hold.drop = True
  hold.install()
  orbax_warnings = _OrbaxWarnings()
  logging.getLogger("absl").addFilter(orbax_warnings)
  asyncio_log = logging.getLogger("asyncio")
  had_filter = _ABANDONED_READS in asyncio_log.filters
  asyncio_log.addFilter(_ABANDONED_READS)  # (asyncio's records carry no orbax frame)
  # Python's warning for an orbax read coroutine never awaited (stays: never actionable here).
  warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)
  try:
    yield reads
  except Exception:
    reads.failed = True
    raise
  finally:
    gc.collect()
    logging.getLogger("absl").removeFilter(orbax_warnings)
    hold.remove()
    if not reads.failed and not had_filter:
      asyncio_log.removeFilter(_ABANDONED_READS)
