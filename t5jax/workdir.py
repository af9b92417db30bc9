"""Safe writes to a workdir: atomic file replacement and the lock a training run holds.

* `atomic_write(path, data)` / `atomic_open(path)`: the new content goes to a temporary file in
  the same folder, is flushed and fsync'ed, then renamed over `path` (and the folder fsync'ed). A
  crash, a full disk or an exception mid-write leaves the old file (or none) and never a torn one.
* `WorkdirLock(workdir)`: an exclusive POSIX record lock (`fcntl.lockf`) on `<workdir>/train.lock`,
  held for the process lifetime. The kernel (or, on NFS, the server's lock manager) releases it
  when the process dies, so a killed run leaves no stale lock; the file records who holds it
  (pid, host, start time) for the refusal message. The file is never deleted: a run that opened
  it a moment before would otherwise lock a file no longer in the folder while a third run
  creates and locks a new one, and both would go ahead. POSIX locks rather than `flock`: on Linux
  NFS clients `flock` is emulated with them anyway, and they are what NFSv3 (NLM) and NFSv4
  honour across hosts. A filesystem without locks gets a warning and no protection.

Imports nothing of t5jax but `errors`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from typing import IO

from t5jax.errors import TrainingError

LOCK_NAME = "train.lock"


def _fsync_dir(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
  """A file handle whose content replaces `path` only when the block ends without an exception."""
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
  try:
    with open(tmp, mode, **kwargs) as fh:
      yield fh
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(folder)


def atomic_write(path: str, data: bytes | str) -> None:
  """Replaces `path` with `data` (bytes, or str as UTF-8) atomically."""
  with atomic_open(path, "wb") as fh:
    fh.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_copy(src: str, dst: str) -> None:
  with open(src, "rb") as fh:
    atomic_write(dst, fh.read())


class WorkdirLock:
  """The exclusive lock of a training run on its workdir (see the module docstring)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None
    self._before: tuple[bytes, os.stat_result] | None = None  # the file as it was (for `undo`)

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises `TrainingError` naming the process that holds it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
      os.close(fd)
      if e.errno in (errno.EACCES, errno.EAGAIN):
        raise TrainingError(
          f"{os.path.dirname(self.path)} is in use by another train.py "
          f"({holder or 'holder unknown'}); wait for it to end or stop it, or use another "
          "--workdir"
        ) from e
      print(  # ENOLCK / EOPNOTSUPP: a filesystem without locks
        f"warning: cannot lock {self.path} ({e.strerror}); a second train.py on this workdir "
        "would not be stopped",
        file=sys.stderr,
      )
      return self
    self._before = (os.pread(fd, 4096, 0), os.fstat(fd))  # empty if this run created it
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    os.ftruncate(fd, 0)
    os.pwrite(
      fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n".encode(), 0
    )
    self._fd = fd
    return self

  def release(self, *, undo: bool = False) -> None:
    """Drops the lock; with `undo` (a start that failed), first puts the lock file's content and
    modification time back as they were (empty, if this run created it; never deleted)."""
    if self._fd is None:
      return
    if undo and self._before is not None:
      content, st = self._before
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, content, 0)
      os.utime(self._fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.close(self._fd)  # closing the descriptor drops the lock
    self._fd = None
