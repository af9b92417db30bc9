"""The CLIs (train.py, decode.py) run in the test's own process, as `python X.py ARGS` would.

In-process runs share the parent's imports and compiled programs, so they cost a fraction of a
subprocess; the tests that need a fresh interpreter (signals, devices, environment) start one.
No test imports a script as a module: the scripts are their command lines.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(name: str, argv: Sequence[str]) -> int:
  """Runs `ROOT/name` as `__main__` with `argv`; returns its exit status (0 when it returns)."""
  path = os.path.join(ROOT, name)
  with mock.patch.object(sys, "argv", [path, *map(str, argv)]):
    try:
      runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
      return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0
