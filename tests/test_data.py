"""Tests of t5jax.data: span corruption, packing, determinism, resume, sharding, file errors."""

import collections
import json
import math

import numpy as np
import pytest
from helpers.batches import assert_batches_equal, rebuild_corrupted, take

from t5jax import data
from t5jax.tokenizer import EOS_ID, ByteTokenizer
from t5jax.train_config import DataConfig

TOK = ByteTokenizer()


def _cfg(**overrides):
  return DataConfig(**overrides)


def _write_tsv(path, n):
  path.write_text("".join(f"in {i:03d}\tout {i:03d}\n" for i in range(n)))
  return str(path)


def _row_texts(batch, key="encoder_input_tokens"):
  return [TOK.decode(row) for row in batch[key]]


# ------------------------------------------------------------------------------------------------
# Span corruption.


def test_noise_mask_density_and_spans():
  rng = np.random.default_rng(0)
  for length in [2, 3, 10, 57, 100, 568]:
    for _ in range(20):
      mask = data.random_spans_noise_mask(length, 0.15, 3.0, rng)
      num_noise = min(max(round(length * 0.15), 1), length - 1)
      assert mask.sum() == num_noise
      starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
      assert len(starts) == min(max(round(num_noise / 3.0), 1), num_noise, length - num_noise)
      assert not mask[0] and mask[-1]  # non-noise first, noise last (T5's interleaving)
  # Mean span length over many draws is close to 3.
  spans = []
  for _ in range(200):
    mask = data.random_spans_noise_mask(200, 0.15, 3.0, rng)
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    spans += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
  assert abs(np.mean(spans) - 3.0) < 0.1


def test_uniform_subsets_are_uniform_sorted_and_distinct():
  """Every k-subset equally likely (chi-square at a fixed seed), also with 1-2 random bits per
  key, where most draws tie at the k-th key and are drawn again; 64-bit words past 2**16."""
  rng = np.random.default_rng(0)
  draws = 12_000
  for n, k, bits in [(5, 2, 0), (6, 3, 1), (6, 2, 2), (7, 4, 0)]:
    s = data.uniform_subsets(draws, n, k, rng, random_bits=bits)
    assert s.shape == (draws, k) and s.min() >= 0 and s.max() < n
    assert (np.diff(s, axis=1) > 0).all()
    cells = math.comb(n, k)
    counts = collections.Counter(map(tuple, s.tolist()))
    assert len(counts) == cells
    expected = draws / cells
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    # 0.999 quantiles of chi-square with cells - 1 = 9, 19, 14, 34 degrees of freedom.
    assert chi2 < {10: 27.9, 20: 43.8, 15: 36.1, 35: 65.2}[cells], (n, k, bits, chi2)
  wide = data.uniform_subsets(4, 70_000, 5, rng)
  assert wide.dtype == np.int64 and (np.diff(wide, axis=1) > 0).all() and wide.max() < 70_000
  np.testing.assert_array_equal(data.uniform_subsets(3, 4, 4, rng), np.tile(np.arange(4), (3, 1)))
  assert data.uniform_subsets(3, 4, 0, rng).shape == (3, 0)
  a = data.uniform_subsets(8, 481, 27, np.random.default_rng(5))
  np.testing.assert_array_equal(a, data.uniform_subsets(8, 481, 27, np.random.default_rng(5)))


def _span_corrupt_by_loop(tokens, mask, sentinel_id):
  """The definition, token by token: the reference for the vectorised span_corrupt."""
  inputs, targets, span = [], [], -1
  for k, (tok, noise) in enumerate(zip(tokens.tolist(), mask.tolist(), strict=True)):
    if noise:
      if k == 0 or not mask[k - 1]:
        span += 1
        inputs.append(sentinel_id(span))
        targets.append(sentinel_id(span))
      targets.append(tok)
    else:
      inputs.append(tok)
  return inputs + [EOS_ID], targets + [EOS_ID]


def test_span_corrupt_equals_the_token_loop():
  for seed in range(40):
    n = int(np.random.default_rng(seed).integers(2, 600))
    tokens = np.random.default_rng(seed + 100).integers(3, 250, n).astype(np.int32)
    density = [0.15, 0.5, 0.05][seed % 3]
    inputs, targets = data.span_corrupt(
      tokens, np.random.default_rng(seed), TOK.sentinel_id, noise_density=density
    )
    mask = data.random_spans_noise_mask(n, density, 3.0, np.random.default_rng(seed))
    want = _span_corrupt_by_loop(tokens, mask, TOK.sentinel_id)
    assert inputs.tolist() == want[0] and targets.tolist() == want[1], seed


def test_batched_span_corruption_equals_the_token_loop_row_by_row():
  for seed, (rows, n) in enumerate([(5, 568), (3, 40), (8, 7), (2, 2)]):
    tokens = np.random.default_rng(seed).integers(3, 250, (rows, n)).astype(np.int32)
    inputs, targets, mask = data.span_corrupt_batch(
      tokens, np.random.default_rng(seed), TOK.sentinel_id
    )
    assert inputs.shape[0] == targets.shape[0] == rows
    for r in range(rows):
      want = _span_corrupt_by_loop(tokens[r], mask[r], TOK.sentinel_id)
      assert inputs[r].tolist() == want[0] and targets[r].tolist() == want[1], (seed, r)
    if rows > 1 and n > 10:
      assert not np.array_equal(mask[0], mask[1])  # each row has its own spans


def test_span_corrupt_properties():
  tokens = np.array(TOK.encode("The quick brown fox jumps over the lazy dog. " * 4)[:-1])
  for seed in range(10):
    inputs, targets = data.span_corrupt(tokens, np.random.default_rng(seed), TOK.sentinel_id)
    assert inputs[-1] == EOS_ID and targets[-1] == EOS_ID
    sentinels_in = [t for t in inputs.tolist() if TOK.is_sentinel(t)]
    sentinels_tg = [t for t in targets.tolist() if TOK.is_sentinel(t)]
    # Same sentinels, in order <extra_id_0>, <extra_id_1>, ...; targets start with a sentinel.
    assert sentinels_in == sentinels_tg == [TOK.sentinel_id(i) for i in range(len(sentinels_in))]
    assert TOK.is_sentinel(targets[0])
    assert rebuild_corrupted(inputs, targets, TOK) == tokens.tolist()
    noise = len(targets) - 1 - len(sentinels_tg)
    assert noise == round(len(tokens) * 0.15)
  a = data.span_corrupt(tokens, np.random.default_rng(3), TOK.sentinel_id)
  b = data.span_corrupt(tokens, np.random.default_rng(3), TOK.sentinel_id)
  np.testing.assert_array_equal(a[0], b[0])


def test_raw_length_fits_t5_defaults():
  # T5: inputs 512, targets 114 come from raw chunks of 568 tokens.
  assert data.span_corruption_raw_length(512, 114, 0.15, 3.0) == 568
  raw = data.span_corruption_raw_length(32, 12, 0.15, 3.0)
  for seed in range(20):
    inputs, targets = data.span_corrupt(
      np.arange(3, 3 + raw), np.random.default_rng(seed), TOK.sentinel_id
    )
    assert len(inputs) <= 32 and len(targets) <= 12


def test_span_corruption_pipeline(tmp_path):
  corpus = tmp_path / "corpus.txt"
  docs = [f"document {i}: the quick brown fox jumps over the lazy dog" for i in range(30)]
  corpus.write_text("\n".join(docs) + "\n")
  cfg = _cfg(kind="span_corruption", train_file=str(corpus), eval_file=str(corpus))
  cfg = cfg.replace(max_input_length=64, max_target_length=16)
  ds = data.make_datasets(cfg, TOK, batch_size=4, seed=1)
  batch = next(ds.train)
  assert batch["encoder_input_tokens"].shape == (4, 64)
  assert batch["decoder_target_tokens"].shape == (4, 16)
  stream = np.array([t for d in docs for t in TOK.encode(d)[:-1]])
  raw = data.span_corruption_raw_length(64, 16, 0.15, 3.0)
  for k, ex in enumerate(ds.eval.tokenized[:5]):
    rebuilt = rebuild_corrupted(ex["inputs"], ex["targets"], TOK)
    assert len(rebuilt) <= raw
    # Each rebuilt chunk is a window of the concatenated corpus.
    start = raw * k
    assert rebuilt == stream[start : start + len(rebuilt)].tolist()
  assert "<extra_id_0>" in ds.eval.examples[0][0]


# ------------------------------------------------------------------------------------------------
# Packing.


def _check_packed(batch):
  for r in range(batch["encoder_input_tokens"].shape[0]):
    for prefix, tokens in (
      ("encoder", "encoder_input_tokens"),
      ("decoder", "decoder_target_tokens"),
    ):
      seg, pos = batch[f"{prefix}_segment_ids"][r], batch[f"{prefix}_positions"][r]
      tok = batch[tokens][r]
      n = seg.max()
      # Segments 1..n contiguous and in order, then padding (0) with token 0.
      used = seg > 0
      assert used.sum() == used[: used.sum()].sum()
      np.testing.assert_array_equal(np.unique(seg[used]), np.arange(1, n + 1))
      assert np.all(np.diff(seg[used]) >= 0)
      assert np.all(tok[~used] == 0) and np.all(tok[used] > 0)
      for s in range(1, n + 1):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        assert tok[seg == s][-1] == EOS_ID
    seg = batch["decoder_segment_ids"][r]
    assert batch["encoder_segment_ids"][r].max() == seg.max()
    dec_in, tgt = batch["decoder_input_tokens"][r], batch["decoder_target_tokens"][r]
    for s in range(1, seg.max() + 1):
      expected = np.concatenate([[0], tgt[seg == s][:-1]])
      np.testing.assert_array_equal(dec_in[seg == s], expected)
    np.testing.assert_array_equal(batch["decoder_loss_weights"][r], (seg > 0).astype(np.float32))


def test_packed_pipeline_segments_and_pairs(tmp_path):
  cfg = _cfg(kind="tsv", train_file=_write_tsv(tmp_path / "t.tsv", 40), pack=True)
  cfg = cfg.replace(max_input_length=24, max_target_length=24)
  ds = data.make_datasets(cfg, TOK, batch_size=3, seed=0)
  for batch in take(ds.train, 5):
    _check_packed(batch)
    assert batch["decoder_segment_ids"].max() >= 2  # rows really hold several examples
    # Encoder segment s and decoder segment s are the same example.
    for r in range(3):
      enc, dec = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
      for s in range(1, enc.max() + 1):
        src = TOK.decode(batch["encoder_input_tokens"][r][enc == s])
        tgt = TOK.decode(batch["decoder_target_tokens"][r][dec == s])
        assert src.replace("in", "out") == tgt


def test_pack_examples_helper_matches_pad_batch():
  rng = np.random.default_rng(0)
  examples = [
    {"inputs": np.append(rng.integers(3, 50, rng.integers(1, 6)), 1).astype(np.int32),
     "targets": np.append(rng.integers(3, 50, rng.integers(0, 4)), 1).astype(np.int32)}
    for _ in range(7)
  ]  # fmt: skip
  packed, placement = data.pack_examples(examples, 3, 16, 12)
  padded = data.pad_batch(examples, 16, 12)
  _check_packed(packed)
  for k, (ex, p) in enumerate(zip(examples, placement, strict=True)):
    n_in, n_tg = len(ex["inputs"]), len(ex["targets"])
    np.testing.assert_array_equal(
      packed["encoder_input_tokens"][p.row, p.input_start : p.input_start + n_in],
      padded["encoder_input_tokens"][k, :n_in],
    )
    for key in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
      np.testing.assert_array_equal(
        packed[key][p.row, p.target_start : p.target_start + n_tg], padded[key][k, :n_tg]
      )
  with pytest.raises(ValueError, match="does not fit"):
    data.pack_examples(examples, 1, 8, 8)


def test_truncate_and_pad_batch():
  np.testing.assert_array_equal(data.truncate([5, 6, 7, 1], 3), [5, 6, 1])
  np.testing.assert_array_equal(data.truncate([5, 6, 7, 8], 3), [5, 6, 7])
  np.testing.assert_array_equal(data.truncate([5, 1], 3), [5, 1])
  batch = data.pad_batch([{"inputs": np.array([4, 1]), "targets": np.array([7, 8, 1])}], 4, 5, 2)
  np.testing.assert_array_equal(batch["decoder_input_tokens"], [[0, 7, 8, 1, 0], [0] * 5])
  np.testing.assert_array_equal(batch["decoder_loss_weights"], [[1, 1, 1, 0, 0], [0] * 5])
  assert batch["encoder_input_tokens"].dtype == np.int32


# ------------------------------------------------------------------------------------------------
# Determinism, resume, sharding.


@pytest.mark.parametrize("pack", [False, True])
def test_shuffle_is_deterministic_by_seed(tmp_path, pack):
  cfg = _cfg(kind="tsv", train_file=_write_tsv(tmp_path / "t.tsv", 20), pack=pack)
  a = take(data.make_datasets(cfg, TOK, batch_size=4, seed=7).train, 6)
  b = take(data.make_datasets(cfg, TOK, batch_size=4, seed=7).train, 6)
  c = take(data.make_datasets(cfg, TOK, batch_size=4, seed=8).train, 6)
  assert_batches_equal(a, b)
  assert any(
    not np.array_equal(x["encoder_input_tokens"], y["encoder_input_tokens"])
    for x, y in zip(a, c, strict=True)
  )


def test_epochs_cover_data_in_new_orders(tmp_path):
  cfg = _cfg(kind="tsv", train_file=_write_tsv(tmp_path / "t.tsv", 12))
  it = data.make_datasets(cfg, TOK, batch_size=4, seed=0).train
  epochs = [sum((_row_texts(b) for b in take(it, 3)), []) for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == [f"in {i:03d}" for i in range(12)]
  assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])


@pytest.mark.parametrize("kind,pack", [("tsv", False), ("tsv", True), ("span_corruption", True)])
def test_resume_from_state_gives_next_batches(tmp_path, kind, pack):
  if kind == "tsv":
    path = _write_tsv(tmp_path / "t.tsv", 30)
  else:
    path = str(tmp_path / "c.txt")
    (tmp_path / "c.txt").write_text(
      "\n".join(f"line {i} of some text to corrupt" for i in range(40))
    )
  cfg = _cfg(kind=kind, train_file=path, pack=pack)
  it = data.make_datasets(cfg, TOK, batch_size=4, seed=3).train
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 6)  # crosses an epoch boundary
  resumed = data.make_datasets(cfg, TOK, batch_size=4, seed=3).train
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)


def test_host_sharding_disjoint_and_covering(tmp_path):
  cfg = _cfg(kind="tsv", train_file=_write_tsv(tmp_path / "t.tsv", 24))
  seen = []
  for host in range(3):
    it = data.make_datasets(
      cfg, TOK, batch_size=4, seed=0, process_index=host, process_count=3
    ).train
    seen.append(set(sum((_row_texts(b) for b in take(it, 2)), [])))  # one epoch: 8 records
  assert all(len(s) == 8 for s in seen)
  assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
  assert set.union(*seen) == {f"in {i:03d}" for i in range(24)}


def test_eval_single_pass_sharded_and_padded(tmp_path):
  cfg = _cfg(kind="tsv", train_file=_write_tsv(tmp_path / "t.tsv", 4))
  cfg = cfg.replace(eval_file=_write_tsv(tmp_path / "e.tsv", 11))
  evals = [
    data.make_datasets(cfg, TOK, batch_size=2, seed=0, process_index=h, process_count=2).eval
    for h in range(2)
  ]
  assert [len(e) for e in evals] == [6, 5]
  assert evals[0].num_batches == evals[1].num_batches == 3
  rows = []
  for e in evals:
    batches = list(e.batches())
    assert len(batches) == 3 and list(e.batches())[0].keys() == batches[0].keys()
    for b in batches:
      assert b["encoder_input_tokens"].shape == (2, 32)
      rows += [
        t for t, w in zip(_row_texts(b), b["decoder_loss_weights"].sum(1), strict=True) if w > 0
      ]
  assert sorted(rows) == [f"in {i:03d}" for i in range(11)]
  assert evals[1].examples[0] == ("in 001", "out 001")


# ------------------------------------------------------------------------------------------------
# Files.


@pytest.mark.parametrize(
  "content,message",
  [
    ("a\tb\nno tab here\n", ":2: expected 2 tab-separated fields"),
    ("a\tb\tc\n", ":1: expected 2 tab-separated fields (input, target), got 3"),
    ("a\tb\n\n\tb\n", ":3: empty input"),
  ],
)
def test_malformed_tsv(tmp_path, content, message):
  path = tmp_path / "bad.tsv"
  path.write_text(content)
  with pytest.raises(data.DataError) as e:
    data.read_tsv(str(path))
  assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_tsv_header_row_bom_and_invalid_utf8(tmp_path):
  path = tmp_path / "t.tsv"
  # A header row naming the columns is skipped (the names decode.py reads, or the config's).
  for header, names in [("inputs\ttargets", ()), ("input\ttarget", ()), ("q\ta", ("q", "a"))]:
    path.write_text(f"{header}\na b\tb a\nc\tc\n")
    assert data.read_tsv(str(path), *names) == [("a b", "b a"), ("c", "c")]
  # ...and only a first line that names both: else it is an example.
  path.write_text("input\tb a\nc\tc\n")
  assert data.read_tsv(str(path)) == [("input", "b a"), ("c", "c")]
  path.write_bytes(b"\xef\xbb\xbfinputs\ttargets\r\nx\ty\r\n")  # BOM, CRLF
  assert data.read_tsv(str(path)) == [("x", "y")]
  path.write_text("inputs\ttargets\n\n")
  with pytest.raises(data.DataError, match=f"^{path}: no examples \\(an empty shard, or only a"):
    data.read_tsv(str(path))
  for name, content in [
    ("bad.tsv", b"a\tb\nc\t\xff d\n"),
    ("bad.jsonl", b'{"input": "a", "target": "b"}\n{"input": "\xc3("}\n'),
  ]:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.DataError, match=f"^{tmp_path / name}:2: invalid UTF-8 .* at byte "):
      (data.read_tsv if name.endswith("tsv") else data.read_jsonl)(str(tmp_path / name))


@pytest.mark.parametrize(
  "line,message",
  [
    ('{"input": "a"', ":2: invalid JSON"),
    ('["a", "b"]', ":2: expected a JSON object"),
    ('{"input": "a"}', ":2: missing field 'target'"),
    ('{"input": "a", "target": 3}', ":2: field 'target' is int"),
  ],
)
def test_malformed_jsonl(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"input": "x", "target": "y"}\n' + line + "\n")
  with pytest.raises(data.DataError, match=message):
    data.read_jsonl(str(path))


def test_jsonl_fields_missing_and_empty_files(tmp_path):
  path = tmp_path / "ok.jsonl"
  path.write_text('{"q": "2+2", "a": "4", "other": 1}\n\n{"q": "x", "a": ""}\n')
  assert data.read_jsonl(str(path), "q", "a") == [("2+2", "4"), ("x", "")]
  with pytest.raises(data.DataError, match="no such data file"):
    data.read_tsv(str(tmp_path / "missing.tsv"))
  (tmp_path / "empty.tsv").write_text("\n  \n")
  with pytest.raises(data.DataError, match=r"empty.tsv: no examples \(an empty shard"):
    data.read_tsv(str(tmp_path / "empty.tsv"))
  with pytest.raises(data.DataError, match="no data file"):
    data.make_datasets(_cfg(kind="tsv"), TOK, batch_size=2, seed=0)


# ------------------------------------------------------------------------------------------------
# Builtin tasks and the factory.


def test_builtin_tasks_correct_deterministic_disjoint():
  train = data.builtin_task_examples("train", 2000, seed=0)
  assert train == data.builtin_task_examples("train", 2000, seed=0)
  assert train != data.builtin_task_examples("train", 2000, seed=1)
  valid = data.builtin_task_examples("validation", 400, seed=0)
  assert not {x for x, _ in train} & {x for x, _ in valid}
  assert not {x for x, _ in data.builtin_task_examples("train", 2000, seed=5)} & {
    x for x, _ in valid
  }
  for x, y in train[:400]:
    task, arg = x.split(": ", 1)
    if task == "add":
      a, b = arg.split(" + ")
      assert int(y) == int(a) + int(b)
    elif task == "reverse":
      assert y.split() == arg.split()[::-1]
    elif task == "sort":
      assert y.split() == sorted(arg.split(), key=int)
    else:
      assert task == "number to words" and y == data.number_to_words(int(arg))
  assert data.number_to_words(42) == "forty two"
  assert data.number_to_words(700) == "seven hundred"
  assert data.number_to_words(913) == "nine hundred thirteen"
  assert {x.split(":")[0] for x, _ in data.builtin_task_examples("train", 8, 0, ["sort"])} == {
    "sort"
  }


def test_make_datasets_builtin_with_trained_tokenizer(tmp_path):
  cfg = DataConfig(builtin_train_size=500, builtin_eval_size=20, pack=True)
  tok = data.build_tokenizer(cfg, str(tmp_path), seed=0)
  assert data.build_tokenizer(cfg, str(tmp_path)).vocab_size == tok.vocab_size  # reloaded
  train, evaluation, _ = data.make_datasets(cfg, tok, batch_size=8, seed=0)
  batch = next(train)
  _check_packed(batch)
  assert batch["encoder_input_tokens"].shape == (8, cfg.max_input_length)
  assert len(evaluation) == 20
  inp, tgt = evaluation.examples[0]
  np.testing.assert_array_equal(evaluation.tokenized[0]["inputs"], tok.encode(inp))
  assert tok.decode(evaluation.tokenized[0]["targets"]) == tgt


def test_jsonl_kind_and_span_corruption_with_sentencepiece(tmp_path):
  from t5jax.tokenizer import train_sentencepiece

  path = tmp_path / "d.jsonl"
  path.write_text(
    "".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n" for i in range(9))
  )
  cfg = _cfg(
    kind="jsonl", train_file=str(path), eval_file=str(path), input_field="q", target_field="a"
  )
  tok = data.build_tokenizer(cfg)
  train, evaluation, _ = data.make_datasets(cfg, tok, batch_size=2, seed=0)
  assert tok.decode(next(train)["encoder_input_tokens"][0]).startswith("question")
  assert evaluation.examples[3] == ("question 3", "answer 3")
  # Span corruption with SentencePiece: sentinels are the top ids, <extra_id_0> first.
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(f"sentence number {i} about foxes and dogs" for i in range(50)))
  spm_tok = train_sentencepiece(corpus.read_text().splitlines(), 300, None, extra_ids=20)
  cfg = _cfg(kind="span_corruption", train_file=str(corpus), eval_file=str(corpus), pack=True)
  _, evaluation, _ = data.make_datasets(cfg, spm_tok, batch_size=2, seed=0)
  targets = evaluation.tokenized[0]["targets"]
  assert targets[0] == spm_tok.sentinel_id(0) == spm_tok.vocab_size - 1
  cfg = cfg.replace(max_input_length=512, max_target_length=114)
  with pytest.raises(ValueError, match="needs 28 sentinels"):
    data.make_datasets(cfg, spm_tok, batch_size=2, seed=0)


def test_encode_document_is_encode_without_eos(tmp_path):
  from t5jax.tokenizer import encode_document, train_sentencepiece

  lines = [f"sentence number {i} about foxes and dogs" for i in range(50)]
  spm_tok = train_sentencepiece(lines, 300, None, extra_ids=20)
  texts = ["a fox", "", "  ", "x < y", "a <extra_id_3> b", "x</s>y <pad>", "<extra_id_99> z"]
  texts += ["caf\u00e9 dogs", " lead", "trail "]
  for tok in (TOK, spm_tok):
    for text in texts:
      ids = encode_document(tok, text)
      assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text)[:-1], (tok, text)
