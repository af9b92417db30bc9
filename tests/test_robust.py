"""What survives what (issue 9), below the CLIs: atomic workdir writes under a failure mid-write,
torn metrics rows, and checkpoint files that lie about themselves.

The CLI cases (the workdir lock, damaged checkpoints, one-line errors) are in test_train_cli.py
and test_decode_cli.py.
"""

import errno
import json
import os
import struct
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from t5jax import checkpoint, config, hf, metrics, model, workdir
from t5jax.errors import CheckpointError, TrainingError
from t5jax.tokenizer import (
  ByteTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
  train_sentencepiece,
)

TINY = config.T5Config(
  vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1, num_decoder_layers=1
)


@pytest.fixture
def disk_full(monkeypatch):
  """Makes a write of more than 16 bytes through `open` write half, then fail with ENOSPC, as a
  full disk does (the file is left partially written)."""
  real_open = open

  class Full:
    def __init__(self, fh):
      self.fh = fh

    def write(self, data):
      if len(data) > 16:
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
      return self.fh.write(data)

    def __getattr__(self, name):
      return getattr(self.fh, name)

    def __enter__(self):
      self.fh.__enter__()
      return self

    def __exit__(self, *exc):
      return self.fh.__exit__(*exc)

  def full_open(path, mode="r", *args, **kwargs):
    fh = real_open(path, mode, *args, **kwargs)
    return Full(fh) if ("w" in mode or "a" in mode) else fh

  monkeypatch.setattr("builtins.open", full_open)


def _files(folder):
  return sorted(os.listdir(folder))


def test_a_failed_write_leaves_the_old_file(tmp_path, disk_full):
  path = tmp_path / "f.json"
  path.write_bytes(b"old content that must survive")
  with pytest.raises(OSError, match="No space"):
    workdir.atomic_write(str(path), "new content, much longer than sixteen bytes")
  assert path.read_bytes() == b"old content that must survive"
  assert _files(tmp_path) == ["f.json"]  # no temporary file left behind


def _sentencepiece(tmp_path):
  texts = [f"{a} plus {b} is {a + b}" for a in range(30) for b in range(30)]
  return train_sentencepiece(texts, 300, None)


def test_workdir_files_survive_a_full_disk(tmp_path, monkeypatch):
  """Tokenizer, JSON configs, exports: each is either the old file or the new, never torn."""
  spm = _sentencepiece(tmp_path)
  tok_dir, cfg, export_dir = tmp_path / "tokenizer", tmp_path / "model_config.json", tmp_path
  spm.save(str(tok_dir))
  checkpoint.save_json(str(cfg), TINY.to_dict())
  params = model.init_params(TINY, jax.random.PRNGKey(0))
  checkpoint.export(str(export_dir), TINY, params)
  before = {
    p: open(p, "rb").read()
    for p in [tok_dir / "spiece.model", cfg, *(export_dir / "export").rglob("*.*")]
    if os.path.isfile(p)
  }
  assert len(before) >= 6, sorted(before)
  monkeypatch.setattr(os, "fsync", _raise_enospc)  # the data never reaches the disk
  other = SentencePieceTokenizer(spm._proto, extra_ids=7)
  with pytest.raises(OSError):
    other.save(str(tok_dir))
  with pytest.raises(OSError):
    checkpoint.save_json(str(cfg), {**TINY.to_dict(), "d_model": 16})
  with pytest.raises(OSError):
    checkpoint.export(str(export_dir), TINY, params)
  with pytest.raises(OSError):
    hf.save_hf(TINY, params, str(export_dir / "export" / "hf"))
  with pytest.raises(OSError):
    ByteTokenizer().save(str(tmp_path / "byt5"))
  monkeypatch.undo()
  for p, content in before.items():
    assert open(p, "rb").read() == content, p
  assert load_tokenizer(str(tok_dir)).vocab_size == spm.vocab_size
  leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
  assert not leftovers, leftovers


def _raise_enospc(fd):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_an_unreadable_tokenizer_is_named(tmp_path):
  bad = tmp_path / "spiece.model"
  bad.write_bytes(os.urandom(200))
  for where in (str(bad), str(tmp_path)):
    with pytest.raises(ValueError, match=f"{bad}: not a SentencePiece model"):
      load_tokenizer(where)


def test_a_torn_last_metrics_row_is_skipped_and_a_bad_middle_row_named(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in (1, 2, 3)]
  path.write_text("\n".join(rows) + '\n{"step": 4, "spl')
  metrics.MetricWriter(str(tmp_path), True, resume_step=2).close()
  assert path.read_text() == "".join(r + "\n" for r in rows[:2])
  assert f"{path}:4: skipped a torn last line" in capsys.readouterr().err
  path.write_text(rows[0] + "\n{garbage\n" + rows[1] + "\n")
  with pytest.raises(TrainingError, match=f"{path}:2: unreadable metrics row"):
    metrics.MetricWriter(str(tmp_path), True, resume_step=2)
  assert path.read_text() == rows[0] + "\n{garbage\n" + rows[1] + "\n"  # nothing dropped


class _FullDisk:
  """A file object whose writes fail as on a full disk."""

  def write(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")

  flush = close = write


def test_a_full_disk_while_logging_is_one_line_and_keeps_earlier_rows(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), True)
  writer.write(1, "train", {"loss": 2.0})
  writer._fh.close()
  writer._fh = _FullDisk()
  with pytest.raises(TrainingError) as e:
    writer.write(2, "train", {"loss": 1.0})
  assert str(e.value) == (
    f"cannot write metrics in {tmp_path}: No space left on device; the checkpoints are intact: "
    "free space and rerun the same command to resume"
  )
  writer.close()  # a failed writer closes without raising again (the first error is the one)
  assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
    1
  ]
  writer = metrics.MetricWriter(str(tmp_path), True)  # the event file fails the same way
  writer._tb.close()
  writer._tb = type(
    "FullDiskEvents", (), {"add_event": _FullDisk.write, "flush": _FullDisk.write}
  )()
  with pytest.raises(TrainingError, match="No space left on device"):
    writer.write(3, "train", {"loss": 1.0})
  writer.close()


def _write_safetensors(path, header, data=b""):
  raw = json.dumps(header).encode()
  with open(path, "wb") as fh:
    fh.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
  "header, data, message",
  ids=["no_data_offsets", "offsets_past_the_end", "negative_shape", "not_an_object"],
  argvalues=[
    ({"shared.weight": {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16, "lacks dtype, shape or"),
    (
      {"shared.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 64]}},
      b"\0" * 16,
      "do not fit shape",
    ),
    (
      {"shared.weight": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 16]}},
      b"\0" * 16,
      "bad shape",
    ),
    (["not", "an", "object"], b"", "header is not an object"),
  ],
)
def test_a_safetensors_header_that_lies_is_named(tmp_path, header, data, message):
  path = tmp_path / "model.safetensors"
  _write_safetensors(path, header, data)
  with pytest.raises(CheckpointError, match=message):
    hf.read_safetensors(str(path))
  path.write_bytes(struct.pack("<Q", 2**62) + b"{}")  # a header longer than the file
  with pytest.raises(CheckpointError, match="exceeds the file"):
    hf.read_safetensors(str(path))


def test_absurd_sizes_in_config_json_are_refused_with_the_limit(tmp_path):
  params = model.init_params(TINY, jax.random.PRNGKey(0))
  hf.save_hf(TINY, params, str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  for key, value, message in [
    ("vocab_size", 10**12, "vocab_size 1000000000000 exceeds the limit 2147483647"),
    ("vocab_size", 1e12, "vocab_size 1000000000000 exceeds the limit"),
    ("d_model", -3, "d_model must be a positive integer"),
    ("num_heads", "two", "num_heads must be a positive integer"),
  ]:
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=message):
      hf.load_hf(str(tmp_path))
  # Within the limit but not what the weights hold: named as a shape mismatch, nothing allocated.
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 2**31 - 1}))
  with pytest.raises(CheckpointError, match="mis-shaped tensors shared.weight"):
    hf.load_hf(str(tmp_path))
  np.testing.assert_array_equal(
    hf.load_hf(str(tmp_path), config=TINY)[1]["shared"], np.asarray(params["shared"])
  )


def test_a_failed_save_is_named_by_the_os_reason():
  from t5jax.orbax_errors import save_failure_reason

  tensorstore = ValueError(
    'OUT_OF_RANGE: Error writing local file "/w/checkpoints/4.orbax-checkpoint-tmp/_sharding": '
    'Failed writing: "/w/x.__lock": Failed to write 10983 bytes to file 9: No space left on '
    "device [os_error_code='28'] [source locations='tensorstore/util/file.cc:123']"
  )
  assert save_failure_reason(tensorstore) == "No space left on device"
  python = OSError(122, "Disk quota exceeded")
  assert save_failure_reason(ValueError(str(python))) == "Disk quota exceeded"
  assert save_failure_reason(RuntimeError("odd\nmore")) == "RuntimeError: odd"


# A second start, caught between opening train.lock and locking it.
_OPEN_THEN_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
print("opened", flush=True)
sys.stdin.readline()
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_failed_start_never_deletes_the_lock_file(tmp_path):
  """Starts at the same instant: B opens train.lock while A holds it, A's start fails (undo), B
  locks the file it opened. A third start must find that file locked; had A deleted it, the
  third would create and lock a new one and run beside B."""
  path = tmp_path / workdir.LOCK_NAME
  a = workdir.WorkdirLock(str(tmp_path)).acquire()  # creates the file
  b = subprocess.Popen(
    [sys.executable, "-c", _OPEN_THEN_LOCK, str(path)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  timer = threading.Timer(60, b.kill)  # a hung child fails the test instead of hanging it
  timer.start()
  try:
    assert b.stdout.readline() == "opened\n"
    a.release(undo=True)
    b.stdin.write("go\n")
    b.stdin.flush()
    assert b.stdout.readline() == "locked\n"
    with pytest.raises(TrainingError, match=f"{tmp_path} is in use by another train.py"):
      workdir.WorkdirLock(str(tmp_path)).acquire()
    assert path.read_bytes() == b""  # as A found it: A created it empty
  finally:
    b.kill()
    b.wait()
    timer.cancel()
