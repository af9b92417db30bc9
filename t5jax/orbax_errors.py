"""What a failing orbax save prints, held back, and the OS's reason for it in one phrase.

A save that fails in orbax's background threads (a full disk) logs an error with a traceback from
each thread and task that saw it (dozens per save, ~900 lines of stderr), reports leftover
coroutines and TensorStore callbacks into closed event loops through `sys.unraisablehook`, and
finally raises in the main thread at the next save or wait. `t5jax.checkpoint` holds all but that
last exception back (`HoldOrbaxErrors`) and turns it into one `CheckpointError` line
(`save_failure_reason`); what was held is shown if no such error summed it up.

Imports nothing of t5jax.
"""

from __future__ import annotations

import logging
import os
import re
import sys
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
    self._hooks: tuple[Callable, Callable] | None = None

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
    if _in_orbax(tb) or _loop_closed(exc):
      self._hold(self._hooks[0], kind, exc, tb)
    else:
      self._hooks[0](kind, exc, tb)

  def _unraisablehook(self, unraisable) -> None:
    code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine never finished
    orbax_code = code is not None and code.co_filename.startswith(_ORBAX_DIR)
    if orbax_code or _in_orbax(unraisable.exc_traceback) or _loop_closed(unraisable.exc_value):
      self._hold(self._hooks[1], unraisable)
    else:
      self._hooks[1](unraisable)

  def install(self) -> None:
    """Starts holding (again: a no-op)."""
    if self._hooks is not None:
      return
    for name in _QUIETED_LOGGERS:
      logging.getLogger(name).addFilter(self)
    self._hooks = (sys.excepthook, sys.unraisablehook)
    sys.excepthook, sys.unraisablehook = self._excepthook, self._unraisablehook

  def remove(self) -> None:
    """Stops holding and shows what was held (after a failure that was summed up, `drop` is set
    and this is not called: what orbax reports from then on is dropped)."""
    if self._hooks is None:
      return
    for name in _QUIETED_LOGGERS:
      logging.getLogger(name).removeFilter(self)
    if sys.excepthook == self._excepthook:
      sys.excepthook = self._hooks[0]
    if sys.unraisablehook == self._unraisablehook:
      sys.unraisablehook = self._hooks[1]
    self._hooks = None
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
