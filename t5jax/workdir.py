"""A training workdir: where its files live, safe writes to them, and the lock a run holds.

* `Paths(workdir)`: the one place the workdir's file names are written. A workdir holds:

    train_config.json      the run's full configuration (ml_collections, as JSON)
    model_config.json      the `T5Config` of the model
    tokenizer/             the tokenizer (SentencePiece model or the ByT5 marker)
    checkpoints/<step>/    orbax: `state` (step, params, optimizer state, sharded) and `data`
                           (the input pipeline's position, per process); `t5jax.checkpoint`
    checkpoints_best/      optionally, the best checkpoint by an eval metric
    checkpoints_damaged/   unreadable checkpoints moved out of orbax's sight on resume
    export/                `params.safetensors` (the parameters alone), `hf/` (a HuggingFace
                           folder), `peft/` (LoRA adapters in PEFT's format)
    peft.json              parameter-efficient runs: the base the checkpoints' adapters / prompt
                           belong to (the checkpoints hold only those and their optimizer state)
    metrics.jsonl, events.out.tfevents.*   training and eval metrics
    train.lock             the running train.py's lock (below)

* `atomic_write(path, data)` / `atomic_open(path)` / `AtomicFile(path)`: the new content goes to
  a temporary file in the same folder, is flushed and fsync'ed, then renamed over `path` (and the
  folder fsync'ed). A crash, a full disk or an exception mid-write leaves the old file (or none)
  and never a torn one. decode.py writes its --output_file this way too.
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
import dataclasses
import datetime
import errno
import fcntl
import os
import socket
import sys
from typing import IO

from t5jax.errors import TrainingError

LOCK_NAME = "train.lock"


def _under_root(*names: str) -> property:
  return property(lambda self: os.path.join(self.root, *names), doc="/".join(names))


@dataclasses.dataclass(frozen=True)
class Paths:
  """The files of workdir `root` (see the module docstring); nothing is created."""

  root: str

  # Not "config.json": decode.py takes a folder holding one for a HuggingFace model.
  train_config = _under_root("train_config.json")
  model_config = _under_root("model_config.json")
  tokenizer = _under_root("tokenizer")
  checkpoints = _under_root("checkpoints")
  checkpoints_best = _under_root("checkpoints_best")
  checkpoints_damaged = _under_root("checkpoints_damaged")
  export = _under_root("export")
  export_params = _under_root("export", "params.safetensors")
  export_hf = _under_root("export", "hf")
  export_peft = _under_root("export", "peft")
  peft_pointer = _under_root("peft.json")
  metrics = _under_root("metrics.jsonl")
  lock = _under_root(LOCK_NAME)

  def has_tokenizer(self) -> bool:
    return os.path.isdir(self.tokenizer) and bool(os.listdir(self.tokenizer))

  def has_checkpoints(self) -> bool:
    """True when `checkpoints/` lists a step (committed or not)."""
    d = self.checkpoints
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


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


class AtomicFile:
  """A file whose content replaces `path` only on `commit()`.

  It is written to a temporary file in `path`'s folder, created at once (so a path that cannot be
  written fails before any work is done); `commit` flushes, fsyncs and renames it over `path`
  (and fsyncs the folder); `discard` removes it, leaving `path` as it was. As a context manager
  it commits when the block ends without an exception and discards otherwise.

  Raises OSError on open: the folder does not exist, `path` is a folder, or no permission.
  """

  def __init__(self, path: str, mode: str = "w", **kwargs):
    self.path = path
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
      raise FileNotFoundError(errno.ENOENT, f"folder {folder} does not exist")
    if os.path.isdir(path):
      raise IsADirectoryError(errno.EISDIR, "it is a folder")
    self._folder = folder
    self._tmp: str | None = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    self.file: IO = open(self._tmp, mode, **kwargs)

  def commit(self) -> None:
    try:
      self.file.flush()
      os.fsync(self.file.fileno())
      self.file.close()
      os.replace(self._tmp, self.path)
    except BaseException:
      self.discard()
      raise
    self._tmp = None
    _fsync_dir(self._folder)

  def discard(self) -> None:
    if not self.file.closed:
      self.file.close()
    if self._tmp is not None:
      with contextlib.suppress(OSError):
        os.remove(self._tmp)
      self._tmp = None

  def __enter__(self) -> IO:
    return self.file

  def __exit__(self, kind, value, tb) -> None:
    if kind is None:
      self.commit()
    else:
      self.discard()


def atomic_open(path: str, mode: str = "w", **kwargs) -> AtomicFile:
  """A context manager whose file handle's content replaces `path` only when the block ends
  without an exception (`AtomicFile`)."""
  return AtomicFile(path, mode, **kwargs)


def same_file(a: str, b: str) -> bool:
  """True when both paths exist and are one file (a write to `a` would destroy `b`)."""
  return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


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
    self.path = Paths(workdir).lock
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
