"""Tests of reading at scale: t5jax.sources (formats, compression, file specs, errors) and
t5jax.streams through data.make_datasets (sharding, shuffling, resume, mixtures, workers)."""

import gzip
import json
import os
import subprocess
import sys
import textwrap

import pytest
from array_record.python import array_record_module
from helpers.batches import assert_batches_equal, take

from t5jax import data, sources, streams
from t5jax.tokenizer import ByteTokenizer
from t5jax.train_config import DataConfig, TaskConfig, from_config_dict

TOK = ByteTokenizer()
PAIRS = [(f"in {i:03d}", f"out {i:03d}") for i in range(40)]


def _write(path, fmt, pairs=PAIRS, compression=""):
  """Writes pairs in a format (documents: the inputs alone) and returns the path."""
  path = str(path)
  if fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"input": [p[0] for p in pairs], "target": [p[1] for p in pairs]})
    pq.write_table(table, path, row_group_size=7)
    return path
  if fmt == "arrayrecord":
    w = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for a, b in pairs:
      w.write(json.dumps({"input": a, "target": b, "text": a}).encode())
    w.close()
    return path
  if fmt == "tsv":
    text = "input\ttarget\n" + "".join(f"{a}\t{b}\n" for a, b in pairs)
  elif fmt == "jsonl":
    text = "".join(json.dumps({"input": a, "target": b, "text": a}) + "\n" for a, b in pairs)
  else:
    text = "".join(f"{a}\n\n" for a, _ in pairs)  # blank lines between documents
  raw = text.encode()
  if compression == "gzip":
    raw = gzip.compress(raw)
  elif compression == "zstd":
    import zstandard

    raw = zstandard.ZstdCompressor().compress(raw)
  with open(path, "wb") as f:
    f.write(raw)
  return path


def _inputs_of(batches):
  """The decoded inputs of every non-padding row (unpacked batches)."""
  out = []
  for b in batches:
    for row, w in zip(b["encoder_input_tokens"], b["decoder_loss_weights"].sum(1), strict=True):
      if w > 0:
        out.append(TOK.decode(row))
  return out


# ------------------------------------------------------------------------------------------------
# Formats, compression, specs.


@pytest.mark.parametrize(
  "name,fmt,compression",
  [
    ("a.tsv", "tsv", ""),
    ("a.tsv.gz", "tsv", "gzip"),
    ("a.jsonl.zst", "jsonl", "zstd"),
    ("a.jsonl", "jsonl", ""),
    ("a.parquet", "parquet", ""),
    ("a.arrayrecord", "arrayrecord", ""),
  ],
)
def test_every_pair_format_reads_the_same_records(tmp_path, name, fmt, compression):
  path = _write(tmp_path / name, fmt, compression=compression)
  assert sources.split_extension(path) == (fmt, compression)
  got = [v for _, v in sources.iter_records(path, "pairs")]
  assert got == PAIRS
  # A start index resumes at that record (line formats count the header line).
  k = 10 + (fmt == "tsv")
  assert [v for _, v in sources.iter_records(path, "pairs", start=k)] == PAIRS[10:]


@pytest.mark.parametrize(
  "name,compression", [("d.txt", ""), ("d.txt.gz", "gzip"), ("d.zst", "zstd")]
)
def test_documents_from_text_files(tmp_path, name, compression):
  path = _write(tmp_path / name, "text", compression=compression)
  assert sources.split_extension(path) == ("text", compression)
  docs = [v for _, v in sources.iter_records(path, "text")]
  assert docs == [a for a, _ in PAIRS]  # blank lines skipped


def test_specs_lists_globs_and_directories(tmp_path):
  for k in range(3):
    _write(tmp_path / f"part-{k}.jsonl", "jsonl", PAIRS[k::3])
  (tmp_path / ".hidden").write_text("not data")
  names = [str(tmp_path / f"part-{k}.jsonl") for k in range(3)]
  assert sources.resolve_files(str(tmp_path)) == names
  assert sources.resolve_files(str(tmp_path / "part-*.jsonl")) == names
  assert sources.resolve_files(f"{names[2]},{names[0]}") == [names[2], names[0]]
  assert sorted(sources.read_all(str(tmp_path / "*.jsonl"), "pairs")) == PAIRS
  assert sources.count_records(str(tmp_path)) == len(PAIRS)
  with pytest.raises(data.DataError, match=r"^--config.data.train_file: .*nope-\*: the pattern"):
    sources.resolve_files(str(tmp_path / "nope-*"), "--config.data.train_file")
  with pytest.raises(data.DataError, match="no such data file"):
    sources.resolve_files(str(tmp_path / "missing.tsv"))


# ------------------------------------------------------------------------------------------------
# Bad data: one line naming the shard and record.


def test_bad_data_names_the_shard_and_record(tmp_path):
  good = gzip.compress(b"one\ntwo\n")
  (tmp_path / "corrupt.txt.gz").write_bytes(good[:-12] + b"\x00" * 12)  # damaged member trailer
  with pytest.raises(data.DataError, match=r"corrupt.txt.gz: corrupt or truncated file after"):
    list(sources.iter_records(str(tmp_path / "corrupt.txt.gz"), "text"))
  (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:40])
  with pytest.raises(data.DataError, match=r"trunc.jsonl.gz: corrupt or truncated file after"):
    list(sources.iter_records(str(tmp_path / "trunc.jsonl.gz"), "text"))
  import zstandard

  (tmp_path / "bad.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"ok\nbad \xff\n"))
  with pytest.raises(data.DataError, match=r"bad.txt.zst:2: invalid UTF-8"):
    list(sources.iter_records(str(tmp_path / "bad.txt.zst"), "text"))
  path = _write(tmp_path / "p.parquet", "parquet")
  with pytest.raises(data.DataError, match=r"p.parquet: no column 'text' \(has \['input'"):
    list(sources.iter_records(path, "text"))
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(data.DataError, match="broken.parquet: not a readable Parquet file"):
    list(sources.iter_records(str(tmp_path / "broken.parquet"), "pairs"))
  w = array_record_module.ArrayRecordWriter(str(tmp_path / "r.arrayrecord"), "group_size:1")
  w.write(b'{"input": "a", "target": "b"}')
  w.write(b'{"input": "a"}')
  w.close()
  with pytest.raises(data.DataError, match=r"r.arrayrecord: record 1: missing field 'target'"):
    list(sources.iter_records(str(tmp_path / "r.arrayrecord"), "pairs"))
  # An empty shard among good ones stops the run instead of being skipped.
  _write(tmp_path / "s-0.tsv", "tsv")
  (tmp_path / "s-1.tsv").write_text("\n")
  cfg = DataConfig(kind="tsv", train_file=str(tmp_path / "s-*.tsv"), shuffle=False)
  with pytest.raises(data.DataError, match=r"s-1.tsv: no examples \(an empty shard"):
    take(data.make_datasets(cfg.replace(shuffle_buffer=4), TOK, batch_size=8, seed=0).train, 10)


# ------------------------------------------------------------------------------------------------
# Streaming, shuffling and sharding.


def test_stream_equals_the_in_memory_path(tmp_path):
  """Unshuffled, streaming gives the file order the in-memory builtin-style path gives; shuffled,
  each epoch is a permutation of the records (a different one from the in-memory permutation:
  documented in docs/data.md), and windows bound how far a record moves."""
  path = _write(tmp_path / "a.tsv.gz", "tsv", compression="gzip")
  plain = DataConfig(kind="tsv", train_file=path, shuffle=False, max_input_length=16)
  got = _inputs_of(take(data.make_datasets(plain, TOK, batch_size=8, seed=0).train, 10))
  assert got == [a for a, _ in PAIRS] * 2
  for window in (8, 1000):
    cfg = plain.replace(shuffle=True, shuffle_buffer=window)
    got = _inputs_of(take(data.make_datasets(cfg, TOK, batch_size=8, seed=3).train, 10))
    epochs = [got[:40], got[40:]]
    for e in epochs:
      assert sorted(e) == [a for a, _ in PAIRS]
    assert epochs[0] != epochs[1]  # a new order each epoch
    if window == 8:  # a record stays inside its window of 8
      assert all(abs(int(t[3:]) - k) < 8 for k, t in enumerate(epochs[0]))
    again = _inputs_of(take(data.make_datasets(cfg, TOK, batch_size=8, seed=3).train, 10))
    assert again == got  # deterministic for a seed


@pytest.mark.parametrize("layout", ["files", "records", "arrayrecord"])
def test_shards_over_hosts_are_disjoint_and_complete(tmp_path, layout):
  if layout == "files":  # 6 files: hosts take whole files
    for k in range(6):
      _write(tmp_path / f"p{k}.jsonl.gz", "jsonl", PAIRS[k::6], "gzip")
    spec = str(tmp_path / "*.jsonl.gz")
  elif layout == "records":  # one file: hosts take every n-th record
    spec = _write(tmp_path / "one.tsv", "tsv")
  else:
    for k in range(2):
      _write(tmp_path / f"r{k}.arrayrecord", "arrayrecord", PAIRS[k::2])
    spec = str(tmp_path)
  cfg = DataConfig(kind="pairs", train_file=spec, max_input_length=16, shuffle=True)
  for hosts in (1, 2, 3):
    per_host = []
    for h in range(hosts):
      ds = data.make_datasets(cfg, TOK, batch_size=2, seed=1, process_index=h, process_count=hosts)
      # One epoch of this host: its records appear once each before any repeats.
      seen = []
      for text in _inputs_of(take(ds.train, 40)):
        if text in seen:
          break
        seen.append(text)
      per_host.append(set(seen))
    union = set().union(*per_host)
    assert union == {a for a, _ in PAIRS}, hosts
    assert sum(len(s) for s in per_host) == len(PAIRS), hosts  # disjoint


def test_reads_only_its_own_files(tmp_path, monkeypatch):
  for k in range(4):
    _write(tmp_path / f"p{k}.tsv", "tsv", PAIRS[k::4])
  opened = []
  real = sources.iter_records

  def spy(path, *args, **kwargs):
    opened.append(os.path.basename(path))
    return real(path, *args, **kwargs)

  monkeypatch.setattr(sources, "iter_records", spy)
  cfg = DataConfig(kind="tsv", train_file=str(tmp_path / "*.tsv"), max_input_length=16)
  ds = data.make_datasets(cfg, TOK, batch_size=2, seed=0, process_index=1, process_count=2)
  take(ds.train, 20)
  assert set(opened) == {"p1.tsv", "p3.tsv"}


# ------------------------------------------------------------------------------------------------
# Resume.


def _corpus(tmp_path, n_files=3):
  for k in range(n_files):
    docs = [f"doc {k}-{i} " + "x y z " * (i % 9) for i in range(60)]
    _write(tmp_path / f"c{k}.txt.gz", "text", [(d, "") for d in docs], "gzip")
  return str(tmp_path / "c*.txt.gz")


def test_uncompressed_files_resume_by_byte_offset(tmp_path):
  path = _write(tmp_path / "a.tsv", "tsv")
  progress = {}
  it = sources.iter_records(path, "pairs", progress=progress)
  for _ in range(13):
    index, _ = next(it)
  offset = progress["offset"]
  with open(path, "rb") as f:
    assert f.read()[offset:].startswith(b"in 013\t")  # the offset points at the next record
  seeked = sources.iter_records(path, "pairs", start=index + 1, offset=offset)
  assert [v for _, v in seeked] == PAIRS[13:]
  gz = _write(tmp_path / "a.tsv.gz", "tsv", compression="gzip")
  list(sources.iter_records(gz, "pairs", progress=progress))
  assert progress["offset"] is None  # compressed: no offset, a restore decompresses up to it


@pytest.mark.parametrize(
  "kind,pack,window",
  [
    ("span_corruption", True, 16),
    ("pairs", False, 5),
    ("pairs", True, 64),
    ("plain", False, 7),
    ("arrayrecord", False, 0),
  ],
)
def test_resume_is_bit_identical(tmp_path, kind, pack, window):
  if kind == "span_corruption":
    spec = _corpus(tmp_path)
  elif kind == "arrayrecord":  # random access, read a block at a time
    kind = "pairs"
    for k in range(2):
      _write(tmp_path / f"r{k}.arrayrecord", "arrayrecord", PAIRS[k::2])
    spec = str(tmp_path / "*.arrayrecord")
    window = 1
  elif kind == "plain":  # uncompressed: restored by byte offset
    kind = "pairs"
    for k in range(2):
      _write(tmp_path / f"p{k}.tsv", "tsv", PAIRS[k::2])
    spec = str(tmp_path / "*.tsv")
  else:
    for k in range(2):
      _write(tmp_path / f"p{k}.jsonl.zst", "jsonl", PAIRS[k::2], "zstd")
    spec = str(tmp_path / "*.jsonl.zst")
  cfg = DataConfig(
    kind=kind,
    train_file=spec,
    max_input_length=32,
    max_target_length=12,
    pack=pack,
    shuffle_buffer=window,
  )
  for hosts in (1, 2):
    for h in range(hosts):

      def make(h=h, hosts=hosts):
        return data.make_datasets(
          cfg, TOK, batch_size=4, seed=5, process_index=h, process_count=hosts
        ).train

      it = make()
      reference = take(it, 60)  # several windows and epochs
      for stop in (1, 7, 23, 41):
        it = make()
        take(it, stop)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
        resumed = make()
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 60 - stop), reference[stop:])


def test_restore_rereads_at_most_one_window(tmp_path, monkeypatch):
  spec = _corpus(tmp_path, n_files=1)
  cfg = DataConfig(kind="span_corruption", train_file=spec, shuffle_buffer=10, max_input_length=32)
  it = data.make_datasets(cfg, TOK, batch_size=4, seed=0).train
  take(it, 25)
  state = it.get_state()
  resumed = data.make_datasets(cfg, TOK, batch_size=4, seed=0).train
  decoded = []
  real = sources._decode
  monkeypatch.setattr(
    sources, "_decode", lambda raw, path, line: decoded.append(line) or real(raw, path, line)
  )
  resumed.set_state(state)
  next(resumed)

  def window_start(st):
    return st["record"] if "record" in st else window_start(st["parent"])

  start = window_start(state)
  assert start >= 40  # deep enough that re-reading from the top would show
  # Reading resumed at the saved window's first line (line numbers are 1-based), not at the top.
  assert min(decoded) == start + 1, (start, decoded[:3])


# ------------------------------------------------------------------------------------------------
# Mixtures.


def test_mixture_rates_chi_square_and_per_task_eval(tmp_path):
  a = _write(tmp_path / "a.tsv", "tsv", [(f"a {i}", "x") for i in range(30)])
  b = _write(tmp_path / "b.jsonl", "jsonl", [(f"b {i}", "y") for i in range(60)])
  c = _corpus(tmp_path, n_files=1)
  cfg = from_config_dict(
    {
      "data": {
        "max_input_length": 32,
        "max_target_length": 12,
        "max_eval_examples": 5,
        "tasks": {
          "a": {"kind": "tsv", "train_file": a, "eval_file": a, "rate": 1.0, "prefix": "A: "},
          "b": {"kind": "jsonl", "train_file": b, "eval_file": b, "rate": 2.0},
          "c": {"kind": "span_corruption", "train_file": c, "rate": 1.0},
        },
      }
    }
  ).data
  assert isinstance(cfg.tasks["a"], TaskConfig)
  ds = data.make_datasets(cfg, TOK, batch_size=50, seed=0)
  counts = {"a": 0, "b": 0, "c": 0}
  for b_ in take(ds.train, 24):
    for row in b_["encoder_input_tokens"]:
      text = TOK.decode(row)
      counts["a" if text.startswith("A: a") else "b" if text.startswith("b ") else "c"] += 1
  n = sum(counts.values())
  expected = {"a": n / 4, "b": n / 2, "c": n / 4}
  chi2 = sum((counts[k] - expected[k]) ** 2 / expected[k] for k in counts)
  assert chi2 < 9.21, (counts, chi2)  # 2 degrees of freedom, p = 0.01
  assert set(ds.eval_sets()) == {"eval/a", "eval/b"}
  assert ds.tasks["a"].examples[0] == ("A: a 0", "x")
  # Examples-proportional rates (capped) come from the record counts.
  tasks = {k: t.replace(rate=0.0) for k, t in cfg.tasks.items()}
  capped = cfg.replace(tasks=tasks, mixture_cap=50)
  props = data._rates(data._tasks(capped), capped)
  assert props == [30.0, 50.0, 50.0]


# ------------------------------------------------------------------------------------------------
# Worker processes.


@pytest.mark.slow
def test_worker_processes_resume_exactly(tmp_path):
  spec = _corpus(tmp_path)
  script = textwrap.dedent(
    f"""
    import json, sys
    import numpy as np
    from t5jax import data
    from t5jax.tokenizer import ByteTokenizer
    from t5jax.train_config import DataConfig

    def main():
      cfg = DataConfig(kind="span_corruption", train_file={spec!r}, max_input_length=32,
                       max_target_length=12, pack=True, shuffle_buffer=8, num_workers=2)
      make = lambda: data.make_datasets(cfg, ByteTokenizer(), batch_size=4, seed=2).train
      it = make()
      ref = [next(it) for _ in range(12)]
      it = make()
      [next(it) for _ in range(5)]
      state = json.loads(json.dumps(it.get_state()))
      again = make()
      again.set_state(state)
      got = [next(again) for _ in range(7)]
      ok = all(np.array_equal(a[k], b[k]) for a, b in zip(got, ref[5:]) for k in a)
      print("EQUAL" if ok else "DIFFERENT")

    if __name__ == "__main__":
      main()
    """
  )
  (tmp_path / "run.py").write_text(script)
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  out = subprocess.run(
    [sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, env=env, timeout=300
  )
  assert "EQUAL" in out.stdout, out.stderr[-2000:]


def test_concat_records_locates_across_files(tmp_path):
  for k in range(3):
    _write(tmp_path / f"r{k}.arrayrecord", "arrayrecord", PAIRS[k * 10 : k * 10 + 10])
  files = sources.resolve_files(str(tmp_path))
  recs = streams.ConcatRecords(files, 5, 25)
  assert len(recs) == 20
  path, index, raw = recs[7]
  assert os.path.basename(path) == "r1.arrayrecord" and index == 2
  assert json.loads(raw)["input"] == PAIRS[12][0]
