"""End-to-end tests of `train.py`: signals, kill -9 and resume, NaN stop, one-line errors, demo.

Starting a Python that imports JAX, orbax, transformers and TensorBoard costs seconds, so most
runs go through the fork server of tests/helpers/fork_server.py (the `server` fixture): each run
is a real process of its own (signals, exit status, `kill -9`), only its start is cheap. The demo
test starts genuine `python train.py` and `python decode.py` processes, the way a user does.

Nothing waits without a limit: each answer of the fork server, each run and each wait for a file
has a generous timeout (a hang fails the test instead of hanging CI), and a test's children still
running when it ends are killed with SIGKILL. No test sleeps for a guessed duration: signals are
sent once a file shows that the run has reached the state the test needs.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers.runs import (
  REPO,
  TINY_FLAGS,
  assert_quiet,
  snapshot,
  steps,
  train_rows,
  write_tsv,
)


def tsv_args(tmp_path, workdir, *extra):
  train = write_tsv(tmp_path / "train.tsv", 40)
  return [
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--config.data.kind=tsv",
    "--config.data.tokenizer=byt5",
    f"--config.data.train_file={train}",
    "--config.data.max_input_length=12",
    "--config.data.max_target_length=12",
    *TINY_FLAGS,
    *extra,
  ]


def wait_for_checkpoint(run, workdir, timeout=240):
  t0 = time.time()
  while not steps(workdir):
    assert run.poll() is None and time.time() - t0 < timeout, run.stderr
    time.sleep(0.2)
  return steps(workdir)[0]


def wait_for_file(run, path, timeout=240):
  """Waits until `path` exists while `run` is alive (a run that ends or hangs first fails)."""
  t0 = time.time()
  while not os.path.exists(path):
    assert run.poll() is None, f"run ended with {run.rc} before {path} appeared:\n{run.stderr}"
    assert time.time() - t0 < timeout, f"no {path} after {timeout} s:\n{run.stderr}"
    time.sleep(0.1)


def assert_one_line_error(run, *fragments):
  assert run.rc not in (0, None), run.stderr
  lines = run.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("train.py: error: "), run.stderr
  for f in fragments:
    assert f in lines[0], lines[0]


@pytest.mark.slow
def test_bad_input_is_one_line_error_and_changes_nothing(server, tmp_path):
  empty, bad_tsv, bad_jsonl = tmp_path / "empty.tsv", tmp_path / "bad.tsv", tmp_path / "bad.jsonl"
  empty.write_text("\n \n")
  bad_tsv.write_text("a b\tb a\nc\tc\nno tab here\n")
  bad_jsonl.write_text('{"input": "a", "target": "b"}\n{"input": "a", \n')
  missing = tmp_path / "missing.tsv"
  latin1, header_only = tmp_path / "latin1.tsv", tmp_path / "header.tsv"
  latin1.write_bytes("a\tb\ncaf\u00e9\tb\n".encode("latin-1"))
  header_only.write_text("inputs\ttargets\n")
  fresh = tmp_path / "fresh"
  cases = [
    ([f"--config.data.train_file={missing}"], [f"{missing}: no such data file"]),
    ([f"--config.data.train_file={empty}"], [f"{empty}: no examples (an empty shard"]),
    ([f"--config.data.train_file={latin1}"], [f"{latin1}:2: invalid UTF-8"]),
    ([f"--config.data.train_file={header_only}"], [f"{header_only}: no examples"]),
    ([f"--config.data.train_file={bad_tsv}"], [f"{bad_tsv}:3: expected 2 tab-separated"]),
    (
      ["--config.data.kind=jsonl", f"--config.data.train_file={bad_jsonl}"],
      [f"{bad_jsonl}:2: invalid JSON"],
    ),
    (["--config.model.vocab_size=128"], ["tokenizer has 384 ids", "vocab_size is 128"]),
    (["--config.model.d_modle=3"], ["unknown config field 'd_modle'", 'Did you mean "d_model"']),
    (["--config.batch_size=abc"], ["--config.batch_size=abc"]),
    (["--config=configs/no_such.py"], ["configs/no_such.py", "No such file"]),
  ]
  runs = [server.start(*tsv_args(tmp_path, fresh, *extra)) for extra, _ in cases]
  for run, (_, fragments) in zip(runs, cases, strict=True):
    assert_one_line_error(run.wait(), *fragments)
  assert snapshot(fresh) == {}

  # A good run writes nothing to stderr (no orbax/absl INFO lines)...
  workdir = tmp_path / "wd"
  ok = server.run(*tsv_args(tmp_path, workdir, "--config.num_train_steps=2"))
  assert ok.rc == 0, ok.stderr
  assert_quiet(ok.stderr)
  assert steps(workdir) == [2]
  # ...and resuming it with another architecture or bad data leaves it exactly as it was.
  before = snapshot(workdir)
  for extra, fragments in [
    (["--config.model.d_model=64"], ["cannot resume", "d_model: saved 32, now 64"]),
    ([f"--config.data.train_file={bad_tsv}"], [f"{bad_tsv}:3:"]),
  ]:
    run = server.run(*tsv_args(tmp_path, workdir, "--config.num_train_steps=4", *extra))
    assert_one_line_error(run, *fragments)
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(server, tmp_path):
  workdir = tmp_path / "wd"
  run = server.start(
    *tsv_args(tmp_path, workdir, "--config.num_train_steps=100000", "--config.checkpoint_every=3")
  )
  first = wait_for_checkpoint(run, workdir)
  os.kill(run.pid, signal.SIGTERM)
  assert run.wait().rc == 0, run.stderr
  assert_quiet(run.stderr)
  last = steps(workdir)[-1]
  assert last > first  # the save on SIGTERM, not only the periodic one
  assert train_rows(workdir)[-1]["step"] == last
  assert not os.path.exists(workdir / "export")


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_exits_0_and_the_run_resumes(server, tmp_path):
  workdir = tmp_path / "wd"
  args = tsv_args(tmp_path, workdir, "--config.checkpoint_every=3")
  run = server.start(*args, "--config.num_train_steps=100000")
  first = wait_for_checkpoint(run, workdir)  # the handler is installed before the first step
  os.kill(run.pid, signal.SIGINT)
  assert run.wait().rc == 0, run.stderr
  assert_quiet(run.stderr)
  last = steps(workdir)[-1]
  # The save on SIGINT: step `first` was saved before the signal was sent, so a later one.
  assert last > first
  assert train_rows(workdir)[-1]["step"] == last
  assert not os.path.exists(workdir / "export")
  total = last + 2
  resumed = server.run(*args, f"--config.num_train_steps={total}")
  assert resumed.rc == 0, resumed.stderr
  assert_quiet(resumed.stderr)
  assert steps(workdir)[-1] == total
  assert [r["step"] for r in train_rows(workdir)] == list(range(1, total + 1))
  assert os.path.isfile(workdir / "export" / "params.safetensors")


# Run in the child before train.py: the first checkpoint save that returns after a stop signal was
# handled (the one the signal asked for, or a periodic one in progress) is dispatched, then the
# child writes HELD (the step) and holds in the loop, as a slow save would, for at most 60 s.
_HOLD_AFTER_SIGNALLED_SAVE = textwrap.dedent(
  """
  import time
  import t5jax.train as train_lib
  from t5jax import checkpoint as checkpoint_lib

  signalled = []
  handle = train_lib._StopFlag.__call__

  def record_then_handle(self, signum, frame):
    signalled.append(signum)
    handle(self, signum, frame)

  save = checkpoint_lib.CheckpointManager.save

  def save_then_hold(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if signalled and not os.path.exists(HELD):
      with open(HELD + ".tmp", "w") as fh:
        fh.write(str(step))
      os.rename(HELD + ".tmp", HELD)
      t0 = time.monotonic()
      while time.monotonic() - t0 < 60:
        time.sleep(0.05)

  train_lib._StopFlag.__call__ = record_then_handle
  checkpoint_lib.CheckpointManager.save = save_then_hold
  """
)


@pytest.mark.slow
def test_a_second_signal_during_the_save_kills_at_once_and_the_run_resumes(server, tmp_path):
  workdir, held = tmp_path / "wd", tmp_path / "held"
  args = tsv_args(tmp_path, workdir, "--config.checkpoint_every=3")
  setup = "import os\nHELD = " + repr(str(held)) + "\n" + _HOLD_AFTER_SIGNALLED_SAVE
  run = server.start(*args, "--config.num_train_steps=100000", setup=setup)
  first = wait_for_checkpoint(run, workdir)
  os.kill(run.pid, signal.SIGINT)
  wait_for_file(run, held)  # the first signal is being handled: its save was dispatched
  saving = int(held.read_text())
  os.kill(run.pid, signal.SIGINT)  # Ctrl-C again: out now, without finishing
  # Killed by the signal itself (not a clean exit after the 60 s hold, not a traceback).
  assert run.wait().rc == -signal.SIGINT, run.stderr
  assert "Traceback" not in run.stderr, run.stderr
  assert not os.path.exists(workdir / "export")
  # What is listed is committed: the save in progress (`saving`), if it finished, else an earlier
  # one; never less than the checkpoint seen before the first signal.
  kept = steps(workdir)
  assert kept and first <= kept[-1] <= saving, (first, kept, saving)
  # ...and the run resumes from the last of them and finishes, each step logged once.
  total = kept[-1] + 2
  resumed = server.run(*args, f"--config.num_train_steps={total}")
  assert resumed.rc == 0, resumed.stderr
  assert_quiet(resumed.stderr)
  assert steps(workdir)[-1] == total
  assert [r["step"] for r in train_rows(workdir)] == list(range(1, total + 1))
  assert os.path.isfile(workdir / "export" / "params.safetensors")


@pytest.mark.slow
def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(server, tmp_path):
  workdir = tmp_path / "wd"
  run = server.run(
    *tsv_args(
      tmp_path,
      workdir,
      "--config.num_train_steps=6",
      "--config.checkpoint_every=1",
      "--config.optimizer.schedule=constant",
      "--config.optimizer.learning_rate=1e30",
      "--config.optimizer.warmup_steps=1000",
    )
  )
  assert_one_line_error(run, "at step 2", "last good checkpoint (step 1)")
  assert steps(workdir) == [1]


@pytest.mark.slow
def test_demo_config_trains_then_decode_answers(tmp_path):
  workdir = tmp_path / "demo"
  train = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config=configs/demo.py",
      f"--workdir={workdir}",
      *TINY_FLAGS,
      "--config.batch_size=8",
      "--config.num_train_steps=3",
      "--config.checkpoint_every=3",
      "--config.eval_every=3",
      "--config.data.builtin_train_size=300",
      "--config.data.builtin_eval_size=8",
      "--config.data.spm_vocab_size=300",
      "--config.eval_generate_examples=4",
      "--config.eval_batch_size=4",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert train.returncode == 0, train.stderr
  assert_quiet(train.stderr)
  evals = [json.loads(x) for x in open(workdir / "metrics.jsonl") if '"eval"' in x]
  assert evals and {"loss", "accuracy", "exact_match", "bleu", "chrf"} <= set(evals[-1])
  prompts = "add: 17 + 25\nreverse: a b c d\nsort: 9 3 7 1\n"
  # JSONL output: an untrained model emits arbitrary bytes, newlines and control characters
  # included, which JSON escapes, so each input's answer is exactly one line.
  decode = subprocess.run(
    [
      sys.executable,
      "decode.py",
      f"--checkpoint={workdir}",
      "--max_new_tokens=8",
      "--no_progress",
      "--output_format=jsonl",
    ],
    cwd=REPO,
    input=prompts,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert decode.returncode == 0, decode.stderr
  assert_quiet(decode.stderr)
  lines = decode.stdout.split("\n")
  assert lines[-1] == "" and len(lines) == 4, decode.stdout
  assert all(isinstance(json.loads(line), dict) for line in lines[:-1])


# --- what survives what (issue 9): the lock, damaged checkpoints, torn metrics, setup checks ----


@pytest.mark.slow
def test_kill_9_then_resume_finishes_and_a_busy_workdir_refuses_a_second_run(server, tmp_path):
  workdir = tmp_path / "wd"
  args = tsv_args(tmp_path, workdir, "--config.checkpoint_every=2")
  first = server.start(*args, "--config.num_train_steps=100000")
  wait_for_checkpoint(first, workdir)
  time.sleep(0.5)
  # A second run on the busy workdir refuses, naming the first (the workdir lock).
  second = server.run(*args, "--config.num_train_steps=3")
  assert_one_line_error(second, f"{workdir} is in use by another train.py", f"pid {first.pid}")
  assert first.poll() is None  # the first run goes on
  os.kill(first.pid, signal.SIGKILL)
  assert first.wait().rc == -signal.SIGKILL
  # A kill mid-write leaves a torn last metrics row: skipped with a warning on resume.
  with open(workdir / "metrics.jsonl", "a") as fh:
    fh.write('{"step": 99999, "split": "tr')
  total = steps(workdir)[-1] + 3
  resumed = server.run(*args, f"--config.num_train_steps={total}")  # the lock died with the run
  assert resumed.rc == 0, resumed.stderr
  assert "metrics.jsonl" in resumed.stderr and "skipped a torn last line" in resumed.stderr
  assert steps(workdir)[-1] == total
  # Steps the killed run logged past its checkpoint were redone: each step is logged once.
  assert [r["step"] for r in train_rows(workdir)] == list(range(1, total + 1))
  assert os.path.isfile(workdir / "export" / "params.safetensors")
  assert os.path.isfile(workdir / "export" / "hf" / "config.json")


@pytest.mark.slow
def test_damaged_newest_checkpoints_fall_back_to_the_newest_readable(server, tmp_path, capsys):
  from t5jax import checkpoint, inference

  workdir = tmp_path / "wd"
  args = tsv_args(tmp_path, workdir, "--config.checkpoint_every=2")
  assert server.run(*args, "--config.num_train_steps=6").rc == 0
  assert steps(workdir) == [2, 4, 6]
  _, want = checkpoint.restore_params(str(workdir), 2)
  data_dir = workdir / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
  for f in data_dir.iterdir():  # checkpoint 6: truncated array files
    with open(f, "r+b") as fh:
      fh.truncate(10)
  (workdir / "checkpoints" / "4" / "state" / "_METADATA").unlink()  # checkpoint 4: no metadata

  _, params, _ = inference.load(str(workdir))  # what decode.py --checkpoint WORKDIR loads
  err = capsys.readouterr().err
  assert "skipped unreadable checkpoint 6" in err and "4 (" in err and "using checkpoint 2" in err
  # One line, not the abandoned reads' tracebacks (0 to ~300 lines before, by timing).
  assert_no_orbax_noise(err)
  for a, b in zip(jax_leaves(params), jax_leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)

  resumed = server.run(*args, "--config.num_train_steps=8")
  assert resumed.rc == 0, resumed.stderr
  assert "checkpoint 6, 4" in resumed.stderr and "resuming from checkpoint 2" in resumed.stderr
  assert_no_orbax_noise(resumed.stderr)  # was 3,800-12,000 lines in three runs
  assert steps(workdir) == [4, 6, 8]
  assert steps(workdir, "checkpoints_damaged") == [4, 6]  # moved aside, not deleted
  assert [r["step"] for r in train_rows(workdir)] == list(range(1, 9))


def assert_no_orbax_noise(err: str) -> None:
  noise = ("Traceback", "never retrieved", "Exception ignored", "never awaited", "WARNING:absl")
  found = [n for n in noise if n in err]
  assert not found, f"{found} in stderr:\n{err[:3000]}"


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_bad_workdirs_and_unreadable_inputs_are_one_line_and_write_nothing(
  server, tmp_path, checkpoint
):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  garbage_spm = tmp_path / "garbage.model"
  garbage_spm.write_bytes(os.urandom(300))
  good_hf = pathlib.Path(checkpoint)  # a readable HF folder (tests/conftest.py)
  bad_weights = tmp_path / "bad_weights"
  bad_weights.mkdir()
  (bad_weights / "config.json").write_text((good_hf / "config.json").read_text())
  (bad_weights / "model.safetensors").write_bytes(os.urandom(4096))
  list_config = tmp_path / "list_config"
  list_config.mkdir()
  (list_config / "config.json").write_text("[1, 2]")
  (list_config / "model.safetensors").write_bytes((good_hf / "model.safetensors").read_bytes())
  fresh = tmp_path / "fresh"
  cases = [
    ([f"--workdir={a_file}"], [f"--workdir {a_file} is a file"]),
    ([f"--workdir={a_file}/sub"], [f"is under {a_file}, which is a file"]),
    (["--workdir="], ["--workdir is empty"]),
    (["--config.checkpoint_every=0"], ["--config.checkpoint_every=0 must be >= 1"]),
    (["--config.log_every=0"], ["--config.log_every=0 must be >= 1"]),
    (["--config.num_train_steps=-5"], ["--config.num_train_steps=-5 must be >= 1"]),
    ([f"--config.data.tokenizer={garbage_spm}"], [f"{garbage_spm}: not a SentencePiece model"]),
    ([f"--config.init_from={bad_weights}"], [f"{bad_weights}/model.safetensors", "not a readable"]),
    ([f"--config.init_from={list_config}"], [f"{list_config}/config.json", "JSON object"]),
    ([f"--config.init_from={garbage_spm}"], [f"{garbage_spm}: no config.json"]),
  ]
  runs = [server.start(*tsv_args(tmp_path, fresh, *extra)) for extra, _ in cases]
  for run, (_, fragments) in zip(runs, cases, strict=True):
    assert_one_line_error(run.wait(), *fragments)
  assert not fresh.exists()  # init_from is read before anything is written (no empty checkpoints/)
  assert a_file.read_text() == "x"

  # A workdir whose saved tokenizer or model config is unreadable: one line naming the file.
  workdir = tmp_path / "wd"
  assert server.run(*tsv_args(tmp_path, workdir, "--config.num_train_steps=1")).rc == 0
  (workdir / "model_config.json").write_text('{"d_model": 3')
  run = server.run(*tsv_args(tmp_path, workdir, "--config.num_train_steps=2"))
  assert_one_line_error(run, f"{workdir}/model_config.json: unreadable model config")


# Run in the child before train.py: once checkpoint 2 is committed, no file may grow past 8 KB
# (RLIMIT_FSIZE; with SIGXFSZ ignored a longer write fails with EFBIG, as a full disk fails with
# ENOSPC), so the save of checkpoint 4 fails in orbax's background threads. The checkpoint files
# are 30-200 KB, metrics.jsonl and stderr stay far below the limit.
_FULL_DISK_FROM_CHECKPOINT_4 = textwrap.dedent(
  """
  import resource, signal
  from t5jax import checkpoint as checkpoint_lib

  save = checkpoint_lib.CheckpointManager.save

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 4:
      self.wait()
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
      resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
    save(self, step, *args, **kwargs)

  checkpoint_lib.CheckpointManager.save = save_on_a_full_disk
  """
)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(server, tmp_path):
  workdir = tmp_path / "wd"
  args = tsv_args(tmp_path, workdir, "--config.checkpoint_every=2")
  run = server.start(*args, "--config.num_train_steps=6", setup=_FULL_DISK_FROM_CHECKPOINT_4)
  # Orbax's threads log each failed write with a traceback (~900 lines before): none of it shows.
  assert_one_line_error(
    run.wait(),
    f"cannot save checkpoint 4 in {workdir}/checkpoints: File too large",
    "the older checkpoints are intact",
    "resume from checkpoint 2",
  )
  assert steps(workdir) == [2]
  resumed = server.run(*args, "--config.num_train_steps=6")
  assert resumed.rc == 0, resumed.stderr
  assert_quiet(resumed.stderr)
  assert steps(workdir) == [2, 4, 6]
  assert [r["step"] for r in train_rows(workdir)] == list(range(1, 7))


@pytest.mark.slow
def test_progress_off_a_terminal_is_one_plain_line_per_log_row(server, tmp_path):
  """stderr is a file here, as in CI logs or under nohup: no bar, a flushed line per log row."""
  args = tsv_args(tmp_path, tmp_path / "wd", "--config.num_train_steps=4")
  run = server.run(*args, "--config.progress_bar=True", "--config.log_every=2")
  assert run.rc == 0, run.stderr
  assert_quiet(run.stderr)
  lines = run.stderr.splitlines()
  pattern = r"train step (\d)/4: loss \d+\.\d{4}, \d+\.\d\d steps/s, ETA (\d+s|\d+m\d\ds)"
  assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["2", "4"], lines
  assert lines[-1].endswith("ETA 0s")


@pytest.mark.slow
def test_rerunning_a_finished_workdir_says_so_and_changes_nothing(server, tmp_path):
  workdir = tmp_path / "wd"
  args = tsv_args(tmp_path, workdir, "--config.num_train_steps=2", "--config.progress_bar=True")
  assert server.run(*args).rc == 0
  before = snapshot(workdir)
  again = server.run(*args)
  assert again.rc == 0, again.stderr
  assert again.stderr.splitlines() == [
    f"{workdir} is already trained to step 2 (--config.num_train_steps=2); nothing to do. To "
    "train further raise --config.num_train_steps; to retrain use a new --workdir."
  ]
  after = snapshot(workdir)
  # No new event file or metrics row, the checkpoints and the export untouched; only the files
  # every start rewrites (the lock's holder, the recorded configs) differ.
  rewritten = {"train.lock", "train_config.json", "model_config.json"}
  assert set(after) == set(before)
  assert {f: v for f, v in after.items() if f not in rewritten} == {
    f: v for f, v in before.items() if f not in rewritten
  }
  # An export the first run did not get to write (killed after its last save) is written.
  (workdir / "export" / "hf" / "config.json").unlink()
  assert server.run(*args).rc == 0
  assert (workdir / "export" / "hf" / "config.json").is_file()


def _records(path):
  """(offset, length) of each TFRecord of an event file (length u64, its crc, data, data crc)."""
  data, pos, out = path.read_bytes(), 0, []
  while pos < len(data):
    n = int.from_bytes(data[pos : pos + 8], "little")
    out.append((pos, 16 + n))
    pos += 16 + n
  return out


@pytest.mark.slow
def test_a_torn_event_record_and_redone_steps_read_back_in_tensorboard(server, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  workdir = tmp_path / "wd"
  args = tsv_args(tmp_path, workdir, "--config.checkpoint_every=2")
  assert server.run(*args, "--config.num_train_steps=4").rc == 0
  (first,) = workdir.glob("events.out.tfevents.*")
  # Killed while writing step 5's row (half a record at the end of the file) and before step 4's
  # save was committed: the resumed run redoes steps 3 and 4, into a new event file.
  offset, length = _records(first)[-1]
  with open(first, "ab") as fh:
    fh.write(first.read_bytes()[offset : offset + length // 2])
  torn = first.read_bytes()
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = server.run(*args, "--config.num_train_steps=6")
  assert resumed.rc == 0, resumed.stderr
  assert first.read_bytes() == torn  # never appended to again
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 2
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"scalars": 0})
  acc.Reload()
  got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
  want = [(r["step"], r["loss"]) for r in train_rows(workdir)]  # the redone rows replaced theirs
  assert [s for s, _ in got] == list(range(1, 7))
  np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)


@pytest.mark.slow
def test_mixture_of_sharded_compressed_files_trains_evaluates_per_task_and_resumes(
  server, tmp_path
):
  import gzip

  import zstandard

  for k in range(2):
    rows = "".join(f"t {i}\ts {i}\n" for i in range(k, 30, 2))
    (tmp_path / f"tr-{k}.tsv.gz").write_bytes(gzip.compress(rows.encode()))
  (tmp_path / "tr-dev.tsv").write_text("t 1\ts 1\nt 2\ts 2\n")
  qa = "".join(json.dumps({"input": f"q {i}", "target": f"a {i}"}) + "\n" for i in range(20))
  (tmp_path / "qa.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(qa.encode()))
  (tmp_path / "qa-dev.jsonl").write_text(qa)
  (tmp_path / "lm").mkdir()
  (tmp_path / "lm" / "docs.txt").write_text("".join(f"doc {i} a b c d e\n" for i in range(50)))
  workdir = tmp_path / "wd"
  args = [
    "--config=configs/mixture.py",
    f"--workdir={workdir}",
    "--config.data.tokenizer=byt5",
    f"--config.data.tasks.translate.train_file={tmp_path}/tr-*.tsv.gz",
    f"--config.data.tasks.translate.eval_file={tmp_path}/tr-dev.tsv",
    f"--config.data.tasks.qa.train_file={tmp_path}/qa.jsonl.zst",
    f"--config.data.tasks.qa.eval_file={tmp_path}/qa-dev.jsonl",
    f"--config.data.tasks.lm.train_file={tmp_path}/lm",
    "--config.data.max_input_length=32",
    "--config.data.max_target_length=16",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.eval_generate_examples=2",
    *TINY_FLAGS,
  ]
  whole = server.run(*args, f"--workdir={tmp_path / 'whole'}", "--config.num_train_steps=4")
  assert whole.rc == 0, whole.stderr
  first = server.run(*args, "--config.num_train_steps=2")
  assert first.rc == 0, first.stderr
  resumed = server.run(*args, "--config.num_train_steps=4")
  assert resumed.rc == 0, resumed.stderr
  rows = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  splits = {r["split"] for r in rows}
  assert {"eval/translate", "eval/qa", "eval", "train"} <= splits
  # Resuming gives the losses of the uninterrupted run (the data position was restored).
  ref = [json.loads(x) for x in open(tmp_path / "whole" / "metrics.jsonl")]
  loss = lambda rs: [(r["step"], r["loss"]) for r in rs if r["split"] == "train"]  # noqa: E731
  np.testing.assert_allclose([v for _, v in loss(rows)], [v for _, v in loss(ref)], rtol=1e-5)


@pytest.mark.slow
def test_device_and_backend_mismatches_are_one_line_before_the_workdir(server, tmp_path):
  """Issue 24: a batch that does not split over the devices' batch shards, and cuDNN attention
  without an NVIDIA GPU, are one line naming the flag, and the workdir is never created."""
  two_devices = (
    "import os; os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + "
    "' --xla_force_host_platform_device_count=2'"
  )
  workdir = tmp_path / "wd"
  run = server.start(*tsv_args(tmp_path, workdir, "--config.batch_size=7"), setup=two_devices)
  assert_one_line_error(run.wait(), "--config.batch_size=7", "2 batch shards", "e.g. 8")
  assert not workdir.exists()
  # The same run on one device and a bad impl: the flag and the implementations that run here.
  run = server.run(*tsv_args(tmp_path, workdir, "--config.model.attention_impl=cudnn"))
  assert_one_line_error(
    run, "--config.model.attention_impl=cudnn", "cpu backend", "einsum, dot_product, xla"
  )
  assert not workdir.exists()
  # On two devices an even batch is fine (the check refuses only what cannot split).
  ok = server.start(
    *tsv_args(tmp_path, workdir, "--config.batch_size=6", "--config.num_train_steps=1"),
    setup=two_devices,
  )
  assert ok.wait().rc == 0, ok.stderr
  assert steps(workdir) == [1]
