"""`python -m t5jax.prepare`: raw corpora -> tokenized ArrayRecord shards that training reads.

Prepared shards must give the same training data as the raw files they came from: without
shuffling, the same batches bit for bit (both paths read records in file order and corrupt chunk k
with the same rng); with shuffling, the same examples over an epoch in another order (a global
permutation against windowed shuffles). Shards are byte-identical whatever the number of workers,
the manifest is the last thing written (a failure leaves none, and removes what it wrote), bad
records are one line naming the file and line, and train.py trains from a prepared folder.
"""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module
from helpers.batches import assert_batches_equal, rebuild_corrupted, take
from helpers.runs import REPO, TINY_FLAGS, assert_quiet

from t5jax import data, prepare, sources
from t5jax.errors import DataError
from t5jax.tokenizer import load_tokenizer
from t5jax.train_config import DataConfig

TOK = load_tokenizer("byt5")
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn"]


def write_pairs(path, n, seed=0):
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    f.write("inputs\ttargets\n")  # a header row, skipped by both paths
    for k in range(n):
      ws = [str(k), *rng.choice(WORDS, size=int(rng.integers(1, 5)))]
      f.write(" ".join(ws) + "\t" + " ".join(reversed(ws)) + "\n")
      if k % 7 == 3:
        f.write("\n")  # blank lines are skipped
  return str(path)


def write_docs_gz(path, n, seed=0):
  rng = np.random.default_rng(seed)
  lines = [
    f"doc {k} " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))) for k in range(n)
  ]
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return str(path), lines


def run_prepare(inp, out, kind, **kw):
  return prepare.prepare(str(inp), str(out), TOK, kind=kind, tokenizer_name="byt5", **kw)


def rows(batches):
  """(encoder inputs, targets) of every unpacked row with a target, as tuples."""
  out = []
  for b in batches:
    for enc, tgt in zip(b["encoder_input_tokens"], b["decoder_target_tokens"], strict=True):
      if tgt.any():
        out.append((tuple(enc[enc > 0]), tuple(tgt[tgt > 0])))
  return out


def test_prepared_pairs_give_the_raw_files_examples(tmp_path):
  a = write_pairs(tmp_path / "a.tsv", 23, seed=0)
  b = write_pairs(tmp_path / "b.tsv", 17, seed=1)
  m = run_prepare(f"{a},{b}", tmp_path / "prep", "tsv", prefix="rev: ", records_per_shard=10)
  assert m["kind"] == "pairs" and m["format"] == "tsv" and m["prefix"] == "rev: "
  assert [s["records"] for s in m["shards"]] == [10, 10, 3, 10, 7]  # 23 = 10+10+3, 17 = 10+7
  assert m["tokenizer_sha256"] == TOK.fingerprint() and m["vocab_size"] == TOK.vocab_size
  # Records hold the untruncated ids of prefix + input and of the target, each with eos.
  first = sources.ArrayRecordFile(str(tmp_path / "prep" / m["shards"][0]["file"]))[0]
  inp, tgt = sources.decode_tokens(first)
  raw0 = next(sources.iter_records(a, "pairs", fmt="tsv"))[1]
  assert inp.tolist() == TOK.encode("rev: " + raw0[0]) and tgt.tolist() == TOK.encode(raw0[1])

  lengths = dict(max_input_length=24, max_target_length=12)  # some inputs are truncated
  raw_cfg = DataConfig(kind="tsv", train_file=f"{a},{b}", prefix="rev: ", **lengths)
  prep_cfg = DataConfig(kind="tsv", train_file=str(tmp_path / "prep"), **lengths)
  for shuffle in (False, True):
    got = {}
    for name, cfg in (("raw", raw_cfg), ("prepared", prep_cfg)):
      it = data.make_datasets(cfg.replace(shuffle=shuffle), TOK, batch_size=4, seed=3).train
      got[name] = take(it, 10)  # one epoch: 40 examples
    if not shuffle:
      assert_batches_equal(got["raw"], got["prepared"])
    else:
      assert sorted(rows(got["raw"])) == sorted(rows(got["prepared"]))
      assert rows(got["raw"]) != rows(got["prepared"])  # another order (global vs windowed)
  # Packed batches from prepared shards hold the same examples too.
  packed = data.make_datasets(prep_cfg.replace(pack=True, shuffle=False), TOK, batch_size=4, seed=3)
  assert packed.train.get_state()  # a saveable position
  assert next(packed.train)["encoder_segment_ids"].max() > 1


def test_prepared_text_gives_the_same_span_corruption_batches(tmp_path):
  gz, docs = write_docs_gz(tmp_path / "docs.txt.gz", 60)
  m = run_prepare(gz, tmp_path / "prep", "span_corruption", records_per_shard=25)
  assert m["kind"] == "text" and [s["records"] for s in m["shards"]] == [25, 25, 10]
  arrays = [
    sources.decode_tokens(raw)
    for s in m["shards"]
    for raw in sources.ArrayRecordFile(str(tmp_path / "prep" / s["file"])).read_range(
      0, s["records"]
    )
  ]
  assert all(len(x) == 1 for x in arrays)  # one array per document, without eos
  assert [x[0].tolist() for x in arrays] == [TOK.encode(d)[:-1] for d in docs]

  base = dict(kind="span_corruption", max_input_length=32, max_target_length=12, shuffle=False)
  for pack in (False, True):
    raw = data.make_datasets(
      DataConfig(train_file=gz, pack=pack, **base), TOK, batch_size=4, seed=5
    )
    cfg = DataConfig(train_file=str(tmp_path / "prep"), pack=pack, **base)
    prep = data.make_datasets(cfg, TOK, batch_size=4, seed=5)
    assert_batches_equal(take(raw.train, 8), take(prep.train, 8))
  # Shuffled: the prepared path still corrupts every document of the corpus.
  cfg = DataConfig(train_file=str(tmp_path / "prep"), **{**base, "shuffle": True})
  batches = take(data.make_datasets(cfg, TOK, batch_size=4, seed=5).train, 6)
  assert all(b["encoder_input_tokens"].shape == (4, 32) for b in batches)


@pytest.mark.slow
def test_shards_are_byte_identical_whatever_the_workers(tmp_path):
  files = [write_pairs(tmp_path / f"{k}.tsv", 15 + 4 * k, seed=k) for k in range(3)]
  digests = []
  for workers in (1, 2):
    out = tmp_path / f"w{workers}"
    m = run_prepare(",".join(files), out, "pairs", num_workers=workers, records_per_shard=8)
    names = sorted(os.listdir(out))
    digest = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names if "." in n}
    digests.append((m["shards"], digest))
  assert digests[0] == digests[1]
  assert len(digests[0][0]) == 8  # 15 -> 2, 19 -> 3, 23 -> 3 shards


def test_the_manifest_is_written_last_and_a_failure_leaves_nothing(tmp_path, monkeypatch):
  good = write_pairs(tmp_path / "a.tsv", 12)
  bad = tmp_path / "b.tsv"
  bad.write_text("x\ty\nno tab here\n")
  out = tmp_path / "out"
  with pytest.raises(DataError, match=f"^{bad}:2: expected 2 tab-separated fields"):
    run_prepare(f"{good},{bad}", out, "pairs", records_per_shard=5)
  assert not out.exists()  # the shards of a.tsv were written, then removed with the folder

  # When the manifest is written, every shard and the tokenizer are already in place.
  seen = []
  real = prepare.atomic_write

  def check(path, text):
    seen.append(sorted(os.listdir(out)))
    assert not os.path.exists(path)
    real(path, text)

  monkeypatch.setattr(prepare, "atomic_write", check)
  m = run_prepare(good, out, "pairs", records_per_shard=5)
  files = sorted(s["file"] for s in m["shards"])
  assert seen == [sorted([*files, "tokenizer"])]

  # An interruption before the manifest (here: while saving the tokenizer) leaves no manifest
  # and none of the shards; an existing folder stays, emptied.
  monkeypatch.setattr(prepare, "atomic_write", real)
  out2 = tmp_path / "out2"
  out2.mkdir()

  class Interrupt:
    def __getattr__(self, name):
      return getattr(TOK, name)

    def save(self, directory):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(good, str(out2), Interrupt(), kind="pairs", tokenizer_name="byt5")
  assert out2.is_dir() and os.listdir(out2) == []


@pytest.mark.slow
def test_a_killed_prepare_is_not_a_prepared_folder_and_overwrite_redoes_it(tmp_path):
  src = write_pairs(tmp_path / "a.tsv", 30)
  out = tmp_path / "out"
  # A process killed (os._exit, no cleanup) once its second shard is finished.
  script = (
    "import os, sys\n"
    "from t5jax import prepare\n"
    "close = prepare._ShardWriter.close\n"
    "def close_then_die(self):\n"
    "  r = close(self)\n"
    "  if r[0].endswith('00001.arrayrecord'): os._exit(9)\n"
    "  return r\n"
    "prepare._ShardWriter.close = close_then_die\n"
    "sys.exit(prepare.main(sys.argv[1:]))\n"
  )
  args = [f"--input={src}", f"--output={out}", "--kind=pairs", "--tokenizer=byt5"]
  args.append("--records_per_shard=10")
  env = {**os.environ, "PYTHONPATH": REPO}
  killed = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True)
  assert killed.returncode == 9
  assert sorted(os.listdir(out)) == [
    "shard-00000-00000.arrayrecord",
    "shard-00000-00001.arrayrecord",
  ]
  assert sources.prepared_manifest(str(out)) is None  # not taken for a prepared corpus
  assert prepare.main(args) == 1  # refused without --overwrite
  assert prepare.main([*args, "--overwrite", "--quiet"]) == 0
  assert [s["records"] for s in sources.prepared_manifest(str(out))["shards"]] == [10, 10, 10]
  # --overwrite removes only what prepare writes.
  (out / "notes.txt").write_text("mine")
  assert prepare.main([*args, "--overwrite"]) == 1
  assert (out / "notes.txt").exists() and (out / sources.MANIFEST).exists()


def test_bad_input_and_flags_are_one_line_errors(tmp_path, capsys):
  tsv = tmp_path / "bad.tsv"
  tsv.write_text("a\tb\nc\td\n\nno tab\n")
  utf = tmp_path / "bad.txt.gz"
  with gzip.open(utf, "wb") as f:
    f.write(b"fine\ncaf\xe9\n")
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n')
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  good = write_pairs(tmp_path / "good.tsv", 4)
  cases = [
    ([f"--input={tsv}", "--kind=pairs"], 1, f"{tsv}:4: expected 2 tab-separated fields"),
    ([f"--input={utf}", "--kind=text"], 1, f"{utf}:2: invalid UTF-8"),
    ([f"--input={jsonl}", "--kind=jsonl"], 1, f"{jsonl}:2: missing field 'target'"),
    ([f"--input={empty}", "--kind=text"], 1, f"{empty}: no records"),
    ([f"--input={tmp_path}/*.parquet", "--kind=text"], 1, "--input: "),
    ([f"--input={good}", "--kind=text"], 1, "a TSV file holds input/target pairs"),
    ([f"--input={good}", "--kind=pairs", "--tokenizer=nope.model"], 1, "--tokenizer=nope.model"),
    ([f"--input={good}", "--kind=pairs", "--records_per_shard=0"], 1, "--records_per_shard=0"),
    ([f"--input={good}", "--kind=words"], 2, "--kind: invalid choice: 'words'"),
    ([f"--input={good}", "--kind=pairs", "--num_workers=x"], 2, "--num_workers: invalid int"),
  ]
  for k, (argv, status, fragment) in enumerate(cases):
    out = tmp_path / f"out{k}"
    if not any(a.startswith("--tokenizer") for a in argv):
      argv = [*argv, "--tokenizer=byt5"]
    try:
      rc = prepare.main([*argv, f"--output={out}", "--quiet"])
    except SystemExit as e:  # argparse's flag errors
      rc = e.code
    assert rc == status, (argv, rc)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare: error: "), err
    assert fragment in err[0], err[0]
    assert not out.exists()


@pytest.mark.slow
def test_cli_then_train_py_trains_from_prepared_shards(server, tmp_path, capsys):
  train = write_pairs(tmp_path / "train.tsv", 40)
  evals = write_pairs(tmp_path / "eval.tsv", 8, seed=9)
  flags = ["--kind=tsv", "--tokenizer=byt5", "--prefix=rev: "]
  # `python -m t5jax.prepare` as a user types it, for the training shards...
  out = tmp_path / "prep_train"
  cmd = [sys.executable, "-m", "t5jax.prepare", f"--input={train}", f"--output={out}", *flags]
  env = {**os.environ, "PYTHONPATH": REPO}
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"--config.data.train_file={out}" in done.stdout
  # ...and the same entry point in this process for the eval shards (a Python start saved).
  capsys.readouterr()
  out = tmp_path / "prep_eval"
  assert prepare.main([f"--input={evals}", f"--output={out}", *flags]) == 0
  assert f"--config.data.train_file={out}" in capsys.readouterr().out
  # train.py as a process of the fork server (tests/helpers/fork_server.py).
  workdir = tmp_path / "wd"
  run = server.run(
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--config.data.kind=tsv",
    f"--config.data.train_file={tmp_path / 'prep_train'}",
    f"--config.data.eval_file={tmp_path / 'prep_eval'}",
    "--config.data.max_input_length=16",
    "--config.data.max_target_length=12",
    *TINY_FLAGS,
    "--config.num_train_steps=3",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
    "--config.eval_generate_examples=2",
    "--config.eval_batch_size=4",
  )
  assert run.rc == 0, run.stderr
  assert_quiet(run.stderr)
  rows_ = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows_ if r["split"] == "train"] == [1, 2, 3]
  assert any(r["split"] == "eval" and np.isfinite(r["loss"]) for r in rows_)
  # The run took the prepared folder's tokenizer (no tokenizer was given or trained).
  assert open(workdir / "tokenizer" / "byt5.txt").read().startswith("byt5")


# ------------------------------------------------------------------------------------------------
# Chunked text (--chunk_length): blocks of whole chunks, read a batch at a time.

CHUNK_LENGTHS = dict(max_input_length=32, max_target_length=12)  # raw chunks of 34 tokens


def _file_chunks(docs, length):
  ids = np.concatenate([np.asarray(TOK.encode(d)[:-1], np.int32) for d in docs])
  return ids[: len(ids) // length * length].reshape(-1, length), len(ids) % length


def _chunked(tmp_path, **kw):
  length = data.span_corruption_raw_length(32, 12, 0.15, 3.0)
  a, docs_a = write_docs_gz(tmp_path / "a.txt.gz", 40, seed=1)
  b, docs_b = write_docs_gz(tmp_path / "b.txt.gz", 25, seed=2)
  m = run_prepare(f"{a},{b}", tmp_path / "prep", "text", chunk_length=length, **kw)
  chunks = [_file_chunks(docs_a, length), _file_chunks(docs_b, length)]
  return m, length, chunks


def _rebuilt(batches):
  """The raw chunk of every row, rebuilt from its corrupted inputs and targets."""
  out = []
  for b in batches:
    for enc, tgt in zip(b["encoder_input_tokens"], b["decoder_target_tokens"], strict=True):
      out.append(tuple(rebuild_corrupted(enc[enc > 0], tgt[tgt > 0], TOK)))
  return out


def test_chunked_text_holds_each_files_chunks(tmp_path):
  m, length, chunks = _chunked(tmp_path, chunks_per_record=3, records_per_shard=7)
  assert m["version"] == 3 and m["chunk_length"] == length == 34 and m["chunks_per_record"] == 3
  assert m["dropped_tokens"] == sum(tail for _, tail in chunks)
  for f, (want, _) in enumerate(chunks):
    shards = [s for s in m["shards"] if s["file"].startswith(f"shard-{f:05d}-")]
    assert all(s["chunks"] <= 9 for s in shards)  # 7 chunks a shard, rounded up to records
    got = []
    for s in shards:
      records = sources.ArrayRecordFile(str(tmp_path / "prep" / s["file"]))
      arrays = [sources.decode_tokens(r) for r in records.read_range(0, s["records"])]
      assert all(len(x) == 1 and len(x[0]) in (length, 2 * length, 3 * length) for x in arrays)
      got += [x[0] for x in arrays]
      assert sum(len(x[0]) for x in arrays) == s["chunks"] * length
    np.testing.assert_array_equal(np.concatenate(got), want.reshape(-1))
  total = sum(len(c) for c, _ in chunks)
  assert sources.count_records(str(tmp_path / "prep")) == total  # mixture rates count chunks


def test_chunked_prepared_batches_are_the_chunks_corrupted(tmp_path):
  _, _, chunks = _chunked(tmp_path, chunks_per_record=3)
  want = [tuple(c) for file_chunks, _ in chunks for c in file_chunks.tolist()]
  n = len(want)
  base = DataConfig(
    kind="span_corruption", train_file=str(tmp_path / "prep"), shuffle_buffer=5, **CHUNK_LENGTHS
  )
  for pack in (False, True):
    it = data.make_datasets(base.replace(pack=pack, shuffle=False), TOK, batch_size=4, seed=1).train
    assert "window" in json.dumps(it.get_state())  # read as chunk blocks
    got = _rebuilt(take(it, n // 4 + 3))
    assert got == (want + want)[: len(got)]  # file order, then the next epoch
  it = data.make_datasets(base, TOK, batch_size=4, seed=1).train
  got = _rebuilt(take(it, n // 4))
  left = list(want)
  for row in got:  # the first epoch: chunks of the corpus, each once, in another order
    left.remove(row)
  assert got != want[: len(got)]
  again = _rebuilt(take(data.make_datasets(base, TOK, batch_size=4, seed=1).train, 3))
  assert again == got[:12]  # deterministic for a seed
  other = _rebuilt(take(data.make_datasets(base, TOK, batch_size=4, seed=2).train, 3))
  assert other != got[:12]


def test_chunked_prepared_resume_is_bit_identical(tmp_path):
  _chunked(tmp_path, chunks_per_record=3)
  cfg = DataConfig(
    kind="span_corruption",
    train_file=str(tmp_path / "prep"),
    shuffle_buffer=5,
    pack=True,
    **CHUNK_LENGTHS,
  )
  for hosts in (1, 2):
    for depth in (0, 1, 3, 7, 30):  # across windows and epochs
      kw = dict(batch_size=4, seed=3, process_index=hosts - 1, process_count=hosts)
      it = data.make_datasets(cfg, TOK, **kw).train
      take(it, depth)
      state = json.loads(json.dumps(it.get_state()))
      after = take(it, 4)
      resumed = data.make_datasets(cfg, TOK, **kw).train
      resumed.set_state(state)
      assert_batches_equal(after, take(resumed, 4))


def test_chunk_batches_hosts_and_workers_are_disjoint_and_complete(tmp_path):
  from t5jax import streams

  _, length, chunks = _chunked(tmp_path, chunks_per_record=2)
  paths = sources.prepared_manifest(str(tmp_path / "prep"))["paths"]
  want = sorted(tuple(c) for file_chunks, _ in chunks for c in file_chunks.tolist())
  for hosts, workers in ((1, 1), (2, 1), (3, 1), (2, 2)):
    got = []
    for h in range(hosts):
      for w in range(workers):
        ds = streams.ChunkBatches(
          paths, length, 1, chunks_per_record=2, seed=4, shuffle=True, window=3,
          shard_index=h, shard_count=hosts,
        )  # fmt: skip
        ds.set_slice(slice(w, None, workers))
        it = iter(ds)
        while True:
          row = next(it)["tokens"][0]
          if it.get_state()["epoch"] > 0:
            break
          got.append(tuple(row.tolist()))
    assert sorted(got) == want, (hosts, workers)


def test_chunked_folder_at_other_lengths_is_read_as_documents(tmp_path):
  _, length, chunks = _chunked(tmp_path)
  cfg = DataConfig(
    kind="span_corruption",
    train_file=str(tmp_path / "prep"),
    max_input_length=48,
    max_target_length=16,
    shuffle=False,
  )
  it = data.make_datasets(cfg, TOK, batch_size=2, seed=0).train
  assert "window" not in json.dumps(it.get_state())
  raw = data.span_corruption_raw_length(48, 16, 0.15, 3.0)
  flat = np.concatenate([c.reshape(-1) for c, _ in chunks])
  got = _rebuilt(take(it, 3))
  assert got == [tuple(flat[k * raw : (k + 1) * raw].tolist()) for k in range(6)]


def test_prepared_versions_and_chunk_errors(tmp_path, capsys):
  gz, _ = write_docs_gz(tmp_path / "docs.txt.gz", 30)
  run_prepare(gz, tmp_path / "docs", "text")
  manifest = tmp_path / "docs" / sources.MANIFEST
  m = json.loads(manifest.read_text())
  # A folder of version 1 (documents, before chunking existed) reads as it did.
  del m["chunk_length"]
  manifest.write_text(json.dumps({**m, "version": 1}))
  cfg = DataConfig(kind="span_corruption", train_file=str(tmp_path / "docs"), **CHUNK_LENGTHS)
  assert next(data.make_datasets(cfg, TOK, batch_size=2, seed=0).train)
  manifest.write_text(json.dumps({**m, "version": 4}))
  with pytest.raises(DataError, match="prepared with format version 4; this t5jax reads"):
    sources.prepared_manifest(str(tmp_path / "docs"))
  # A record that is not whole chunks of the manifest's length names its file and record.
  m, length, _ = _chunked(tmp_path)
  manifest = tmp_path / "prep" / sources.MANIFEST
  raw = data.span_corruption_raw_length(33, 12, 0.15, 3.0)
  assert length % raw
  manifest.write_text(json.dumps({**m, "chunk_length": raw}))
  cfg = cfg.replace(train_file=str(tmp_path / "prep"), max_input_length=33, shuffle=False)
  first = tmp_path / "prep" / m["shards"][0]["file"]
  with pytest.raises(
    DataError, match=f"^{first}: record 0: \\d+ ids, not whole chunks of {raw}\\b"
  ):
    data.make_datasets(cfg, TOK, batch_size=2, seed=0)
  # Flags.
  for argv, fragment in (
    (["--kind=pairs", "--chunk_length=10"], "--chunk_length=10: >= 1 for --kind=text"),
    (["--kind=text", "--chunk_length=-1"], "--chunk_length=-1"),
    (["--kind=text", "--chunk_length=10", "--chunks_per_record=0"], "--chunks_per_record=0"),
  ):
    out = tmp_path / "bad"
    rc = prepare.main([f"--input={gz}", f"--output={out}", "--tokenizer=byt5", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and fragment in err[0], err
    assert not out.exists()


def _int32_record(*arrays):
  """A record as versions 1-2 wrote it: count, lengths, int32 ids."""
  head = np.array([len(arrays), *map(len, arrays)], "<u4").tobytes()
  return head + b"".join(np.asarray(a, "<i4").tobytes() for a in arrays)


def test_token_records_store_uint16_ids_when_they_fit_and_read_int32_records_too(tmp_path):
  from t5jax import streams

  rng = np.random.default_rng(0)
  small = rng.integers(0, 1 << 16, 50).astype(np.int32)
  small[:2] = 0, (1 << 16) - 1  # both ends of uint16
  wide = small.copy()
  wide[7] = 1 << 16  # one id past uint16: the record keeps int32
  cases = (((small,), 2), ((small, small[:9]), 2), ((wide,), 4), ((wide, small), 4))
  for arrays, itemsize in cases:
    raw = sources.encode_tokens(*arrays)
    n = sum(map(len, arrays))
    assert len(raw) == 4 * (1 + len(arrays)) + itemsize * n
    for got, want in zip(sources.decode_tokens(raw), arrays, strict=True):
      assert got.dtype == np.int32 and got.tolist() == want.tolist()
    old = _int32_record(*arrays)  # versions 1-2 read as they did
    assert [a.tolist() for a in sources.decode_tokens(old)] == [a.tolist() for a in arrays]
    if len(arrays) == 1:
      for r in (raw, old):
        assert streams._chunk_block(r, 10, "f: record 0").tolist() == arrays[0].tolist()
  for bad in (sources.encode_tokens(small)[:-1], _int32_record(small)[:-2], b"\x01\x00"):
    with pytest.raises(DataError, match="^f: record 3: not a prepared token record$"):
      sources.decode_tokens(bad, "f: record 3")
    with pytest.raises(DataError, match="^f: record 3: not a prepared token record$"):
      streams._chunk_block(bad, 10, "f: record 3")

  # A chunked folder rewritten with int32 records (as version 2 wrote it), and one where every
  # other record is int32 (as a vocabulary past uint16 leaves some records), give the same
  # batches.
  m, _, _ = _chunked(tmp_path, chunks_per_record=3)
  rewritten = {"old": (2, lambda i: True), "mixed": (3, lambda i: i % 2 == 1)}
  for name, (version, wide) in rewritten.items():
    folder = tmp_path / name
    folder.mkdir()
    for s in m["shards"]:
      prep = str(tmp_path / "prep" / s["file"])
      recs = sources.ArrayRecordFile(prep).read_range(0, s["records"])
      assert all(int(np.frombuffer(r, "<u4", 1)[0]) == sources.NARROW_IDS | 1 for r in recs)
      w = array_record_module.ArrayRecordWriter(str(folder / s["file"]), "group_size:1")
      for i, r in enumerate(recs):
        w.write(_int32_record(*sources.decode_tokens(r)) if wide(i) else r)
      w.close()
    assert any(wide(i) for s in m["shards"] for i in range(s["records"]))
    assert name == "old" or not all(wide(i) for s in m["shards"] for i in range(s["records"]))
    (folder / sources.MANIFEST).write_text(json.dumps({**m, "version": version}))
    (folder / prepare.TOKENIZER_DIR).symlink_to(tmp_path / "prep" / prepare.TOKENIZER_DIR)
  base = DataConfig(kind="span_corruption", **CHUNK_LENGTHS, pack=True)
  got = [
    take(data.make_datasets(base.replace(train_file=str(d)), TOK, batch_size=4, seed=1).train, 5)
    for d in (tmp_path / "prep", tmp_path / "old", tmp_path / "mixed")
  ]
  assert_batches_equal(got[0], got[1])
  assert_batches_equal(got[0], got[2])


@pytest.mark.slow
def test_chunked_shards_are_byte_identical_whatever_the_workers(tmp_path):
  files = [write_docs_gz(tmp_path / f"{k}.txt.gz", 20 + 9 * k, seed=k)[0] for k in range(3)]
  digests = []
  for workers in (1, 2):
    out = tmp_path / f"w{workers}"
    m = run_prepare(
      ",".join(files), out, "text", num_workers=workers, chunk_length=21, chunks_per_record=4
    )
    names = sorted(os.listdir(out))
    digest = {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in names if "." in n}
    digests.append((m["shards"], m["dropped_tokens"], digest))
  assert digests[0] == digests[1]


@pytest.mark.slow
def test_chunked_prepared_worker_processes_resume_exactly(tmp_path):
  _chunked(tmp_path, chunks_per_record=3)
  script = (
    "import json, sys\n"
    "import numpy as np\n"
    "from t5jax import data\n"
    "from t5jax.tokenizer import ByteTokenizer\n"
    "from t5jax.train_config import DataConfig\n"
    "def main():\n"
    f"  cfg = DataConfig(kind='span_corruption', train_file={str(tmp_path / 'prep')!r},\n"
    "    max_input_length=32, max_target_length=12, pack=True, shuffle_buffer=5, num_workers=2)\n"
    "  make = lambda: data.make_datasets(cfg, ByteTokenizer(), batch_size=4, seed=2).train\n"
    "  it = make()\n"
    "  ref = [next(it) for _ in range(12)]\n"
    "  it = make()\n"
    "  [next(it) for _ in range(5)]\n"
    "  state = json.loads(json.dumps(it.get_state()))\n"
    "  assert 'window' in json.dumps(state)\n"
    "  again = make()\n"
    "  again.set_state(state)\n"
    "  got = [next(again) for _ in range(7)]\n"
    "  ok = all(np.array_equal(a[k], b[k]) for a, b in zip(got, ref[5:]) for k in a)\n"
    "  print('EQUAL' if ok else 'DIFFERENT')\n"
    "if __name__ == '__main__':\n"
    "  main()\n"
  )
  (tmp_path / "run.py").write_text(script)
  env = {**os.environ, "PYTHONPATH": REPO}
  out = subprocess.run(
    [sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, env=env, timeout=300
  )
  assert "EQUAL" in out.stdout, out.stderr[-2000:]
