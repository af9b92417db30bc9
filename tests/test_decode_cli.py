"""decode.py end to end on a tiny HuggingFace-layout checkpoint, including every bad input."""

import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard
from helpers.cli import run_script
from helpers.decode_cli import run_cli, run_error, write

from t5jax import inference
from t5jax.generate import generate, rank
from t5jax.hf import load_hf
from t5jax.quantize import quantize
from t5jax.tokenizer import load_tokenizer, train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXTS = ["hi", "hello there", "a much longer input line of text here", "", "b", "ünïcode ✓", "xyz"]


def expected_outputs(checkpoint, texts, max_input_length, prepare=None, **kwargs):
  """Each input decoded alone (batch 1, padded to max_input_length) through the library;
  `prepare(config, params) -> (config, params)` changes the model first."""
  config, params = load_hf(checkpoint)
  if prepare is not None:
    config, params = prepare(config, params)
  tok = load_tokenizer(checkpoint)
  outs = []
  for text in texts:
    ids = tok.encode(text)
    if len(ids) > max_input_length:
      ids = ids[: max_input_length - 1] + [ids[-1]]
    row = np.zeros((1, max_input_length), np.int32)
    row[0, : len(ids)] = ids
    seqs = np.asarray(generate(params, config, row, **kwargs).sequences)
    outs.append(tok.decode(seqs.reshape(-1, seqs.shape[-1])[0].tolist()).replace("\n", " "))
  return outs


def test_text_in_order_batched_bucketed_truncated(checkpoint, tmp_path, capsys):
  inp = write(tmp_path, "in.txt", "\n".join(TEXTS) + "\n")
  out = str(tmp_path / "out.txt")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--output_file", out]
  args += ["--batch_size", "2", "--max_new_tokens", "6", "--max_input_length", "16"]
  code, stdout, err = run_cli(args, capsys)
  assert code == 0, err
  assert "truncated 1 of 7 inputs" in err
  with open(out, encoding="utf-8") as f:
    got = f.read().split("\n")
  assert got[-1] == "" and len(got) == len(TEXTS) + 1
  assert got[:-1] == expected_outputs(checkpoint, TEXTS, 16, max_new_tokens=6)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_quantize_decodes_as_the_library_does(checkpoint, tmp_path, capsys, mode):
  inp = write(tmp_path, "in.txt", "\n".join(TEXTS) + "\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--quantize", mode, "--no_progress"]
  args += ["--batch_size", "3", "--max_new_tokens", "6", "--max_input_length", "64"]
  if mode == "int8":
    args += ["--float_output_layer"]
  code, stdout, err = run_cli(args, capsys)
  assert code == 0, err

  def prepare(config, params):
    if mode == "bf16":
      return config.replace(dtype="bfloat16"), quantize(params, config, "bfloat16")
    return config, quantize(params, config, output_layer=False)

  assert stdout.split("\n")[:-1] == expected_outputs(
    checkpoint, TEXTS, 64, prepare=prepare, max_new_tokens=6
  )


def test_jsonl_beam_with_tsv_input(checkpoint, tmp_path, capsys):
  rows = "id\tinputs\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TEXTS[:4]))
  inp = write(tmp_path, "in.tsv", rows)
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--output_format", "jsonl"]
  args += ["--method", "beam", "--num_beams", "3", "--num_return_sequences", "2"]
  args += ["--max_new_tokens", "6", "--batch_size", "2"]
  code, stdout, err = run_cli(args, capsys)
  assert code == 0, err
  records = [json.loads(line) for line in stdout.splitlines()]
  assert [r["input"] for r in records] == TEXTS[:4]
  for r in records:
    assert len(r["outputs"]) == 2 and len(r["scores"]) == 2
    assert r["scores"][0] >= r["scores"][1]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_input_decodes_as_the_plain_file(checkpoint, tmp_path, capsys, compression):
  """decode.py reads inputs through the training data's line reader: a .tsv.gz / .tsv.zst file is
  the same input as its .tsv (same outputs), and a corrupt one is one line naming the file."""
  rows = ("id\tinputs\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(TEXTS[:3]))).encode()
  plain = write(tmp_path, "in.tsv", rows, "wb")
  if compression == "gzip":
    packed, ext = gzip.compress(rows), ".gz"
  else:
    packed, ext = zstandard.ZstdCompressor().compress(rows), ".zst"
  squeezed = write(tmp_path, "in.tsv" + ext, packed, "wb")
  args = ["--checkpoint", checkpoint, "--max_new_tokens", "5", "--no_progress"]
  outs = []
  for inp in (plain, squeezed):
    code, stdout, err = run_cli(args + ["--input_file", inp], capsys)
    assert code == 0, err
    outs.append(stdout)
  assert outs[0] == outs[1] and len(outs[0].splitlines()) == 3
  broken = write(tmp_path, "broken.tsv" + ext, packed[: len(packed) // 2], "wb")
  assert "broken.tsv" + ext in run_error(args + ["--input_file", broken], capsys)


def test_jsonl_input_sampling_deterministic(checkpoint, tmp_path, capsys):
  lines = "".join(json.dumps({"text": t, "other": 1}) + "\n" for t in TEXTS[:3])
  inp = write(tmp_path, "in.jsonl", lines)
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--method", "sample", "--seed", "3"]
  args += ["--top_k", "20", "--top_p", "0.9", "--temperature", "0.8", "--max_new_tokens", "6"]
  args += ["--input_column", "text", "--batch_size", "2", "--no_progress"]
  first = run_cli(args, capsys)
  second = run_cli(args, capsys)
  assert first[0] == 0 and first[1] == second[1] and len(first[1].splitlines()) == 3


def test_sentencepiece_tokenizer_flag(checkpoint, tmp_path, capsys):
  corpus = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)]
  spm_path = str(tmp_path / "tok.model")
  train_sentencepiece(corpus, 300, spm_path)
  inp = write(tmp_path, "in.txt", "the fox\nthe dog jumps\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--tokenizer", spm_path]
  args += ["--max_new_tokens", "6", "--batch_size", "2"]
  code, stdout, err = run_cli(args, capsys)
  assert code == 0, err
  assert len(stdout.splitlines()) == 2


def test_stdin_auto_detects_tsv_and_jsonl_and_keeps_text(checkpoint, tmp_path, capsys, monkeypatch):
  """--input_format auto on stdin: a TSV header or a JSON object on the first line says so; any
  other line, a tab in it or not, is a prompt."""
  base = ["--checkpoint", checkpoint, "--max_new_tokens", "6", "--batch_size", "2", "--no_progress"]

  def decode_stdin(data, *extra):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    code, out, err = run_cli(base + list(extra), capsys)
    assert code == 0, err
    return out

  texts = TEXTS[:3]
  text_file = write(tmp_path, "in.txt", "\n".join(texts) + "\n")
  want = run_cli(base + ["--input_file", text_file], capsys)
  assert want[0] == 0 and len(want[1].splitlines()) == 3, want
  rows = "".join(f"{i}\t{t}\n" for i, t in enumerate(texts))
  assert decode_stdin("id\tinputs\n" + rows) == want[1]
  assert decode_stdin("id\tsrc\n" + rows, "--input_column", "src") == want[1]
  assert decode_stdin("".join(json.dumps({"id": 1, "text": t}) + "\n" for t in texts)) == want[1]
  # No header: the tab is part of the prompt (as --input_format text reads it).
  tabbed = "id\tsrc\nhi\n"
  assert decode_stdin(tabbed) == decode_stdin(tabbed, "--input_format", "text")
  assert len(decode_stdin(tabbed).splitlines()) == 2


@pytest.mark.slow
def test_stdin_stdout_subprocess(checkpoint):
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "decode.py"), "--checkpoint", checkpoint]
    + ["--max_new_tokens", "6", "--batch_size", "2"],
    input=b"one\ntwo\nthree\n",
    capture_output=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr.decode()
  assert len(proc.stdout.decode().splitlines()) == 3


@pytest.mark.slow
@pytest.mark.parametrize(
  "mesh,method",
  [
    (["--mesh_data", "2", "--mesh_tensor", "2"], ["--method", "greedy"]),
    (["--mesh_fsdp", "4"], ["--method", "beam", "--num_beams", "2", "--num_return_sequences", "2"]),
  ],
)
def test_mesh_of_four_devices_matches_one_device(checkpoint, tmp_path, capsys, mesh, method):
  """decode.py on 4 (forced host) devices, sharded, gives the one-device run's outputs."""
  inp = write(tmp_path, "in.txt", "\n".join(TEXTS) + "\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--output_format", "jsonl"]
  args += ["--max_new_tokens", "6", "--max_input_length", "16", "--no_progress", *method]
  # Reference: this process (one device unless XLA_FLAGS says otherwise), batches of 4 rows.
  code, want, err = run_cli(args + ["--batch_size", "4"], capsys)
  assert code == 0, err
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env["XLA_FLAGS"] = flags.strip()
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "decode.py"), *args, "--batch_size", "3", *mesh],
    capture_output=True,
    env=env,
    timeout=300,
  )
  err = proc.stderr.decode()
  assert proc.returncode == 0, err
  assert "--batch_size 3 rounded up to 4" in err  # data x fsdp is 2 or 4
  want = [json.loads(line) for line in want.splitlines()]
  got = [json.loads(line) for line in proc.stdout.decode().splitlines()]
  assert [r["outputs"] for r in got] == [r["outputs"] for r in want]
  # Sharded matmuls and reductions sum in another order: scores agree to float32 rounding.
  np.testing.assert_allclose([r["scores"] for r in got], [r["scores"] for r in want], atol=1e-4)


def test_bad_inputs(checkpoint, tmp_path, capsys):
  good = write(tmp_path, "good.txt", "hello\n")
  base = ["--checkpoint", checkpoint]
  assert "cannot read" in run_error(base + ["--input_file", str(tmp_path / "missing.txt")], capsys)
  assert "cannot read" in run_error(base + ["--input_file", str(tmp_path)], capsys)  # a folder
  bad_utf8 = write(tmp_path, "bad.txt", b"fine\nstill fine\nbad \xff\xfe\n", mode="wb")
  assert ":3: invalid UTF-8" in run_error(base + ["--input_file", bad_utf8], capsys)
  empty = write(tmp_path, "empty.txt", "")
  assert "empty input" in run_error(base + ["--input_file", empty], capsys)
  header_only = write(tmp_path, "h.tsv", "inputs\n")
  assert "empty input" in run_error(base + ["--input_file", header_only], capsys)
  no_col = write(tmp_path, "c.tsv", "a\tb\n1\t2\n")
  assert "--input_column" in run_error(base + ["--input_file", no_col], capsys)
  bad_json = write(tmp_path, "j.jsonl", '{"inputs": "x"}\n{oops\n')
  assert "j.jsonl:2: invalid JSON" in run_error(base + ["--input_file", bad_json], capsys)
  out_missing_dir = ["--output_file", str(tmp_path / "nodir" / "out.txt")]
  assert "does not exist" in run_error(base + ["--input_file", good] + out_missing_dir, capsys)


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--method", "beam", "--top_k", "5"], "--top_k requires --method sample"),
    (["--method", "beam", "--temperature", "0.5"], "--temperature requires --method sample"),
    (["--num_beams", "4"], "--num_beams requires --method beam"),
    (["--method", "sample", "--length_penalty", "2"], "--length_penalty requires --method beam"),
    (["--num_return_sequences", "2"], "requires --method beam or sample"),
    (["--method", "beam", "--num_beams", "2", "--num_return_sequences", "3"], "<= --num_beams"),
    (["--method", "sample", "--top_p", "0"], "--top_p must be in"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--mesh_data", "3", "--mesh_tensor", "5"], "needs 15 devices, have"),
    (["--mesh_fsdp", "0"], "mesh sizes must be positive"),
    (["--mesh_fsdp", "-1"], "at most one -1"),
    (["--return_token_scores"], "--return_token_scores needs --output_format jsonl"),
    (
      ["--min_new_tokens", "7", "--max_new_tokens", "6"],
      "--min_new_tokens must be in [0, --max_new",
    ),
    (["--repetition_penalty", "-1"], "--repetition_penalty must be > 0"),
    (["--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be >= 0"),
    (["--bad_words_ids", ""], "--bad_words_ids must be a non-empty list"),
    (["--bad_words_ids", "5;"], "--bad_words_ids must be a non-empty list of non-empty"),
    (["--bad_words_ids", "5 x"], "--bad_words_ids: token ids must be integers"),
    (["--suppress_tokens", ""], "--suppress_tokens must be a non-empty list"),
    (["--suppress_tokens", "600"], "ids must be < the vocabulary size 512"),
    (["--method", "beam", "--min_p", "0.1"], "--min_p requires --method sample"),
    (["--method", "sample", "--min_p", "1.5"], "--min_p must be in [0, 1]"),
    (["--method", "sample", "--typical_p", "0"], "--typical_p must be in (0, 1]"),
    (["--candidates", "/nonexistent/c.txt"], "cannot read"),
    (["--float_output_layer"], "--float_output_layer applies only with --quantize"),
    (["--quantize", "bf16", "--dtype", "float32"], "--quantize bf16 computes in bfloat16"),
  ],
)
def test_incompatible_flags(checkpoint, tmp_path, capsys, flags, message):
  good = write(tmp_path, "good.txt", "hello\n")
  assert message in run_error(["--checkpoint", checkpoint, "--input_file", good] + flags, capsys)


def test_bad_checkpoints(checkpoint, tmp_path, capsys):
  good = write(tmp_path, "good.txt", "hello\n")

  def err(folder, *extra):
    return run_error(["--checkpoint", folder, "--input_file", good, *extra], capsys)

  assert "not found" in err(str(tmp_path / "nope"))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text(open(os.path.join(checkpoint, "config.json")).read())
  assert "no weights" in err(str(no_weights))
  no_tok = tmp_path / "no_tok"
  no_tok.mkdir()
  for name in ("config.json", "model.safetensors"):
    os.symlink(os.path.join(checkpoint, name), no_tok / name)
  assert "no tokenizer" in err(str(no_tok))
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  assert "t5jax" in err(str(empty)) or "no weights" in err(str(empty))


def test_strict_rejects_long_inputs(checkpoint, tmp_path, capsys):
  inp = write(tmp_path, "long.txt", "short\n" + "x" * 40 + "\n")
  line = run_error(
    ["--checkpoint", checkpoint, "--input_file", inp, "--max_input_length", "8"] + ["--strict"],
    capsys,
  )
  assert "input 2 is longer than --max_input_length 8" in line


def test_bucketing_shapes():
  assert [inference.bucket_length(n, 512) for n in (1, 8, 9, 100, 600)] == [8, 8, 16, 128, 512]
  ids = [[5] * n + [1] for n in (3, 20, 4, 30, 2)]
  batches = list(inference.make_batches(ids, batch_size=2, max_len=64))
  shapes = {b.shape for _, b in batches}
  assert shapes == {(2, 8), (2, 32)}
  seen = sorted(i for idx, _ in batches for i in idx if i >= 0)
  assert seen == list(range(5))


# --- issue 9: outputs never replace inputs or a good file half-written; one line for bad input ---


def test_output_is_written_atomically_never_over_the_input(
  checkpoint, tmp_path, capsys, monkeypatch
):
  inp = write(tmp_path, "in.txt", "hello\nworld\n")
  assert "is the input file" in run_error(
    ["--checkpoint", checkpoint, "--input_file", inp, "--output_file", inp], capsys
  )
  link = tmp_path / "link.txt"
  os.symlink(inp, link)
  assert "is the input file" in run_error(
    ["--checkpoint", checkpoint, "--input_file", inp, "--output_file", str(link)], capsys
  )
  assert open(inp).read() == "hello\nworld\n"

  # An unwritable output path is reported before the checkpoint is even loaded.
  def no_load(*args, **kwargs):
    raise AssertionError("loaded before the output path was checked")

  monkeypatch.setattr("t5jax.inference.load", no_load)
  for bad in ("/proc/t5jax_cannot_write_here.txt", str(tmp_path)):
    line = run_error(
      ["--checkpoint", checkpoint, "--input_file", inp, "--output_file", bad], capsys
    )
    assert bad in line, line
  monkeypatch.undo()

  # A run that fails mid-way (here: decoding raises) leaves the old output as it was, no temp file.
  out = write(tmp_path, "out.txt", "OLD\n")

  def fail(*args, **kwargs):
    raise RuntimeError("simulated failure during decoding")

  monkeypatch.setattr("t5jax.inference.generate_all", fail)
  with pytest.raises(RuntimeError, match="simulated"):
    run_script("decode.py", ["--checkpoint", checkpoint, "--input_file", inp, "--output_file", out])
  monkeypatch.undo()
  assert open(out).read() == "OLD\n"
  assert sorted(os.listdir(tmp_path)) == ["in.txt", "link.txt", "out.txt"]
  code, _, err = run_cli(
    [
      "--checkpoint",
      checkpoint,
      "--input_file",
      inp,
      "--output_file",
      out,
      "--max_new_tokens",
      "4",
    ],
    capsys,
  )
  assert code == 0, err
  assert open(out).read().count("\n") == 2
  assert sorted(os.listdir(tmp_path)) == ["in.txt", "link.txt", "out.txt"]


def test_a_byte_order_mark_is_not_part_of_the_input(checkpoint, tmp_path, capsys):
  outs = []
  for name, body in (("a.jsonl", '{"inputs": "hello"}\n'), ("a.tsv", "inputs\nhello\n")):
    plain = write(tmp_path, name, body)
    bom = write(tmp_path, "bom_" + name, ("\ufeff" + body).encode("utf-8"), mode="wb")
    for path in (plain, bom):
      code, stdout, err = run_cli(
        ["--checkpoint", checkpoint, "--input_file", path, "--max_new_tokens", "4"], capsys
      )
      assert code == 0, err
      outs.append(stdout)
  assert outs[0] == outs[1] and outs[2] == outs[3]


def test_garbage_checkpoint_files_are_one_line(checkpoint, tmp_path, capsys):
  good = write(tmp_path, "good.txt", "hello\n")

  def variant(name, files):
    """The checkpoint with some of its files replaced (the others linked)."""
    folder = tmp_path / name
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "byt5.txt"):
      if f not in files and os.path.exists(os.path.join(checkpoint, f)):
        os.symlink(os.path.join(checkpoint, f), folder / f)
    for f, content in files.items():
      (folder / f).write_bytes(content)
    return str(folder)

  def err(folder, *extra):
    return run_error(["--checkpoint", folder, "--input_file", good, *extra], capsys)

  rng = np.random.default_rng(0)
  garbage = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
  assert "model.safetensors: not a readable safetensors" in err(
    variant("w", {"model.safetensors": garbage})
  )
  assert "config.json: expected a JSON object, got a list" in err(
    variant("c", {"config.json": b"[1, 2]"})
  )
  cfg = json.load(open(os.path.join(checkpoint, "config.json")))
  huge = json.dumps({**cfg, "vocab_size": 10**12}).encode()
  assert "vocab_size 1000000000000 exceeds the limit 2147483647" in err(
    variant("v", {"config.json": huge})
  )
  spm = variant("s", {"spiece.model": garbage})
  os.remove(os.path.join(spm, "byt5.txt"))
  line = err(spm)
  assert "spiece.model: not a SentencePiece model" in line, line
  tok = os.path.join(spm, "spiece.model")
  assert "spiece.model: not a SentencePiece model" in err(checkpoint, "--tokenizer", tok)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--max_new_tokens", "1000000000"], "--max_new_tokens 1000000000 cannot be allocated"),
    (["--method", "beam", "--length_penalty", "nan"], "--length_penalty must be a finite number"),
    (["--method", "beam", "--num_beams", "0"], "--num_beams must be >= 1"),
  ],
)
def test_unusable_generation_settings_are_one_line(checkpoint, tmp_path, capsys, flags, message):
  good = write(tmp_path, "good.txt", "hello\n")
  line = run_error(["--checkpoint", checkpoint, "--input_file", good] + flags, capsys)
  assert message in line, line
  if "max_new_tokens" in flags:
    assert "at most" in line and "GiB" in line  # the limit is named


def test_generation_controls_flags(checkpoint, tmp_path, capsys):
  """Every processor flag at once, with per-token scores: the library's outputs for the same
  options, token scores as many as the generated tokens (EOS included) and summing to the score."""
  inp = write(tmp_path, "in.txt", "\n".join(TEXTS[:4]) + "\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--output_format", "jsonl"]
  args += ["--max_new_tokens", "6", "--max_input_length", "16", "--no_progress"]
  flags = ["--min_new_tokens", "3", "--repetition_penalty", "1.3", "--no_repeat_ngram_size", "2"]
  flags += ["--bad_words_ids", "104 105;106", "--suppress_tokens", "107", "--return_token_scores"]
  code, stdout, err = run_cli(args + flags, capsys)
  assert code == 0, err
  records = [json.loads(line) for line in stdout.splitlines()]
  kw = dict(
    max_new_tokens=6, min_new_tokens=3, repetition_penalty=1.3, no_repeat_ngram_size=2,
    bad_words_ids=[[104, 105], [106]], suppress_tokens=[107],
  )  # fmt: skip
  assert [r["outputs"][0] for r in records] == expected_outputs(checkpoint, TEXTS[:4], 16, **kw)
  for r in records:
    assert 3 <= len(r["token_scores"][0]) <= 6
  # No processor: token scores are the model's log-probs and sum to the score.
  code, stdout, err = run_cli(args + ["--return_token_scores"], capsys)
  for r in map(json.loads, stdout.splitlines()):
    np.testing.assert_allclose(sum(r["token_scores"][0]), r["scores"][0], atol=1e-4)


def test_sampling_min_p_typical_flags(checkpoint, tmp_path, capsys):
  inp = write(tmp_path, "in.txt", "\n".join(TEXTS[:3]) + "\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--method", "sample", "--seed", "1"]
  args += ["--min_p", "0.2", "--typical_p", "0.9", "--max_new_tokens", "6", "--no_progress"]
  code, stdout, err = run_cli(args, capsys)
  assert code == 0, err
  assert len(stdout.splitlines()) == 3


def test_decoder_prefix_column(checkpoint, tmp_path, capsys):
  """A TSV prefix column, different lengths per row (one empty): each output is what the library
  generates after that row's prefix alone."""
  texts, prefixes = ["hi", "hello there", "", "b"], ["ab", "", "x", "hello"]
  rows = "inputs\tprefix\n" + "".join(f"{t}\t{p}\n" for t, p in zip(texts, prefixes, strict=True))
  inp = write(tmp_path, "in.tsv", rows)
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--decoder_prefix_column", "prefix"]
  args += ["--max_new_tokens", "5", "--max_input_length", "16", "--batch_size", "4"]
  args += ["--method", "beam", "--num_beams", "2", "--no_progress"]
  code, stdout, err = run_cli(args, capsys)
  assert code == 0, err
  config, params = load_hf(checkpoint)
  tok = load_tokenizer(checkpoint)
  rows = np.zeros((4, 16), np.int32)
  pre = np.zeros((4, 8), np.int32)  # one compilation: a fixed width, the lengths per row
  for i, (text, prefix) in enumerate(zip(texts, prefixes, strict=True)):
    ids, p = tok.encode(text), tok.encode(prefix)[:-1]
    rows[i, : len(ids)], pre[i, : len(p)] = ids, p
  lengths = [len(tok.encode(p)) - 1 for p in prefixes]
  assert len(set(lengths)) == 4  # a different prefix length per row, one of them 0
  out = generate(
    params, config, rows, method="beam", num_beams=2, max_new_tokens=5, decoder_prefix=pre,
    decoder_prefix_lengths=lengths,
  )  # fmt: skip
  want = [tok.decode(s.tolist()).replace("\n", " ") for s in np.asarray(out.sequences)]
  assert stdout.splitlines() == want


def test_candidates_rank(checkpoint, tmp_path, capsys):
  """--candidates FILE and a JSONL candidates column: the library's rank() best candidate."""
  groups = [["yes", "no"], ["maybe", "a", "bbb"], ["x"]]
  inp = write(tmp_path, "in.txt", "\n".join(TEXTS[:3]) + "\n")
  cands = write(tmp_path, "c.txt", "".join("\t".join(g) + "\n" for g in groups))
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--candidates", cands, "--no_progress"]
  code, stdout, err = run_cli(args + ["--output_format", "jsonl"], capsys)
  assert code == 0, err
  records = [json.loads(line) for line in stdout.splitlines()]
  config, params = load_hf(checkpoint)
  tok = load_tokenizer(checkpoint)
  for r, text, g in zip(records, TEXTS, groups, strict=False):
    ids = tok.encode(text)
    out = rank(params, config, np.array([ids], np.int32), [[tok.encode(c) for c in g]])
    np.testing.assert_allclose(r["scores"], np.asarray(out.scores)[0], atol=1e-4)
    assert r["best"] == int(out.best[0]) and r["candidates"] == g
  pairs = zip(TEXTS[:3], groups, strict=True)
  lines = "".join(json.dumps({"text": t, "choices": g}) + "\n" for t, g in pairs)
  jsonl = write(tmp_path, "in.jsonl", lines)
  args = ["--checkpoint", checkpoint, "--input_file", jsonl, "--candidates_column", "choices"]
  code, stdout, err = run_cli(args + ["--no_progress"], capsys)
  assert code == 0, err
  assert stdout.splitlines() == [g[r["best"]] for g, r in zip(groups, records, strict=True)]
  short = write(tmp_path, "short.txt", "yes\tno\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--candidates", short]
  assert "1 candidate lines for 3 inputs" in run_error(args, capsys)
  empty = write(tmp_path, "empty.txt", "yes\t\nno\nx\n")
  assert "empty.txt:1: empty candidate" in run_error(args[:-1] + [empty], capsys)
