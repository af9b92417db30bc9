"""Issue 24: bad input that gave silent wrong results or tracebacks, in decode.py and the library.

decode.py runs on the tiny HuggingFace-layout checkpoint of tests/conftest.py; the library
checks on a tiny random t5jax model. (The training-side cases, a batch that does not split over
the devices and cuDNN attention without a GPU, are in tests/test_train_cli.py.)
"""

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.decode_cli import run_cli, run_error, write

import t5jax
from t5jax import inference

ROOT_TEXT = "add: 17 + 25\nreverse: a b c d\nsort: 9 3 7 1\n"


# --- decode.py ---------------------------------------------------------------------------------


def test_library_errors_keep_paths_and_words_as_they_are(checkpoint, tmp_path, capsys):
  """Only a library message's parameter names are printed as flags: a path holding a flag's name
  and the word "checkpoint" in a checkpoint error stay as written."""
  good = write(tmp_path, "in.txt", "hi\n")
  missing = str(tmp_path / "seed" / "candidates")
  line = run_error(["--checkpoint", missing, "--input_file", good], capsys)
  assert line == f"decode.py: error: checkpoint folder not found: {missing}", line
  folder = tmp_path / "batch_size"
  folder.mkdir()
  long = write(folder, "input_column.txt", "x" * 40 + "\n")
  line = run_error(["--checkpoint", checkpoint, "--input_file", long, "--max_input_length", "8",
                    "--strict"], capsys)  # fmt: skip
  assert "input 1 is longer than --max_input_length 8 tokens" in line, line
  assert "drop --strict" in line and "--batch_size" not in line, line


@pytest.mark.parametrize(
  "flags", [["--decoder_prefix_column", "prefix"], ["--input_column", "src"]]
)
def test_a_column_flag_on_text_from_stdin_is_an_error(checkpoint, capsys, monkeypatch, flags):
  """The issue's case: plain prompts on stdin with a column flag (each line became its own
  prefix, or the column was ignored)."""
  monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(ROOT_TEXT.encode())))
  line = run_error(["--checkpoint", checkpoint, *flags], capsys)
  assert f"{flags[0]} {flags[1]}: <stdin> is read as plain text" in line, line
  assert "its first line is neither a JSON object nor a TSV header" in line, line


@pytest.mark.parametrize(
  "flags",
  [
    ["--input_column", "src"],
    ["--decoder_prefix_column", "prefix"],
    ["--candidates_column", "choices"],
    ["--input_format", "text", "--input_column", "inputs"],
  ],
)
def test_a_column_flag_on_a_text_file_is_an_error(checkpoint, tmp_path, capsys, flags):
  inp = write(tmp_path, "in.txt", ROOT_TEXT)
  line = run_error(["--checkpoint", checkpoint, "--input_file", inp, *flags], capsys)
  flag = next(f for f in flags if f.endswith("column"))
  assert line.startswith(f"decode.py: error: {flag} ") and "in.txt is read as plain text" in line


def test_the_same_prefix_column_in_a_tsv_still_decodes(checkpoint, tmp_path, capsys):
  """The check refuses only text input: a TSV with the column decodes, and prints what follows
  the prefix (the prefix is not repeated), as decode.py's help says."""
  inp = write(tmp_path, "in.tsv", "inputs\tprefix\nadd: 17 + 25\tab\nb\t\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--decoder_prefix_column", "prefix"]
  code, out, err = run_cli(args + ["--max_new_tokens", "4", "--no_progress"], capsys)
  assert code == 0, err
  assert len(out.splitlines()) == 2
  code, help_out, _ = run_cli(["--help"], capsys)
  assert code == 0
  help_text = " ".join(help_out.split())
  assert "the output printed is what follows it (the prefix is not repeated)" in help_text


@pytest.mark.parametrize(
  "flags",
  [
    ["--method", "beam"],
    ["--num_return_sequences", "2"],
    ["--return_token_scores", "--output_format", "jsonl"],
    ["--max_new_tokens", "5"],
    ["--method", "sample", "--seed", "3"],
  ],
)
def test_rank_mode_refuses_generation_flags(checkpoint, tmp_path, capsys, flags):
  inp = write(tmp_path, "in.txt", "hi\nthere\n")
  cands = write(tmp_path, "c.txt", "yes\tno\nyes\tno\n")
  args = ["--checkpoint", checkpoint, "--input_file", inp, "--candidates", cands, *flags]
  line = run_error(args, capsys)
  assert f"{flags[0]} does not apply to rank classification" in line, line


BIG = "1000000000"


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--method", "sample", "--temperature", "inf"], "--temperature must be > 0 and finite, got"),
    (["--method", "sample", "--temperature", "nan"], "--temperature must be > 0 and finite, got"),
    (["--repetition_penalty", "inf"], "--repetition_penalty must be > 0 and finite, got inf"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 1, got -1"),
    (["--method", "beam", "--num_beams", BIG], f"--num_beams {BIG} cannot be allocated"),
    (
      ["--method", "sample", "--num_return_sequences", BIG],
      f"--num_return_sequences {BIG} cannot be allocated",
    ),
    (["--batch_size", BIG], f"--batch_size {BIG} cannot be allocated"),
  ],
)
def test_each_error_names_the_flag_given(checkpoint, tmp_path, capsys, flags, message):
  good = write(tmp_path, "good.txt", "hello\n")
  line = run_error(["--checkpoint", checkpoint, "--input_file", good, *flags], capsys)
  assert message in line, line
  if "allocated" in message:
    assert "GiB of the device's" in line and "at most" in line, line


def test_an_input_too_long_for_memory_names_max_input_length(checkpoint, tmp_path, capsys):
  """A 150,000-byte line with --max_input_length 200000: a one-line error before any allocation
  (it was 40 lines ending in an allocation failure); a short input at the same flag decodes."""
  inp = write(tmp_path, "long.txt", "x" * 150_000 + "\n")
  args = ["--checkpoint", checkpoint, "--max_input_length", "200000", "--max_new_tokens", "2"]
  line = run_error(args + ["--input_file", inp], capsys)
  assert "--max_input_length 200000 cannot be allocated" in line, line
  assert "the longest input has 150001" in line and "tokens fit" in line, line
  short = write(tmp_path, "short.txt", "hello\n")
  code, out, err = run_cli(args + ["--input_file", short, "--no_progress"], capsys)
  assert code == 0 and len(out.splitlines()) == 1, err


def test_token_ids_beyond_the_model_are_refused(checkpoint, tmp_path, capsys, monkeypatch):
  """decode.py checks every encoded input against the model's vocabulary: a tokenizer whose ids
  do not fit (here one that writes id 600 for a 512-token model) is an error naming the input,
  not NaN scores."""
  config, params, tok = inference.load(checkpoint)

  class Wider:
    vocab_size = tok.vocab_size

    def encode(self, text):
      return [600, 1] if text == "bad" else tok.encode(text)

    def decode(self, ids):
      return tok.decode(ids)

  monkeypatch.setattr("t5jax.inference.load", lambda *a, **k: (config, params, Wider()))
  inp = write(tmp_path, "in.txt", "fine\nbad\n")
  line = run_error(["--checkpoint", checkpoint, "--input_file", inp], capsys)
  assert "input 2: token[0] = 600 is outside the model's vocabulary [0, 512)" in line, line


# --- the library -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  config = t5jax.get_config("t5-v1_1-small").replace(
    vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=1, num_decoder_layers=1
  )
  return config, t5jax.init_params(config, jax.random.PRNGKey(0))


def test_float_token_arrays_and_integer_params_are_refused(tiny):
  config, params = tiny
  tokens = np.array([[5, 6, 1, 0]], np.int32)
  with pytest.raises(TypeError, match=r"encoder_input_tokens must be integer token ids .* float32"):
    t5jax.generate(params, config, tokens.astype(np.float32), max_new_tokens=2)
  with pytest.raises(TypeError, match="target_tokens must be integer token ids"):
    t5jax.score(params, config, tokens, tokens.astype(np.float64))
  with pytest.raises(TypeError, match="candidates must be integer token ids"):
    t5jax.rank(params, config, tokens, np.ones((1, 2, 3), np.float32))
  with pytest.raises(TypeError, match=r"candidates\[0\]\[1\] must be integer token ids"):
    t5jax.rank(params, config, tokens, [[[5, 1], [6.5, 1]]])
  with pytest.raises(TypeError, match="decoder_prefix must be integer token ids"):
    t5jax.generate(params, config, tokens, max_new_tokens=2, decoder_prefix=np.ones((1, 2)))
  int_params = jax.tree.map(lambda x: x.astype(jnp.int32), params)
  for call in (
    lambda: t5jax.generate(int_params, config, tokens, max_new_tokens=2),
    lambda: t5jax.score(int_params, config, tokens, tokens),
    lambda: t5jax.rank(int_params, config, tokens, [[[5, 1]]]),
  ):
    with pytest.raises(TypeError, match=r"params\[.*\] must be a floating-point array, got int32"):
      call()
  with pytest.raises(ValueError, match=r"target_tokens must have one row per input \(1\), got 2"):
    t5jax.score(params, config, tokens, np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match=r"encoder_input_tokens must be \[B, S\], got shape \(4,\)"):
    t5jax.generate(params, config, tokens[0], max_new_tokens=2)


def test_the_checks_cost_nothing_under_jit(tiny):
  """The dtype and shape checks read no values, so generate still traces under jax.jit."""
  config, params = tiny
  tokens = np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)
  jitted = jax.jit(lambda p, t: t5jax.generate(p, config, t, max_new_tokens=3).sequences)
  np.testing.assert_array_equal(
    jitted(params, tokens), t5jax.generate(params, config, tokens, max_new_tokens=3).sequences
  )


def test_check_token_ids(tiny):
  config, _ = tiny
  v = config.vocab_size
  t5jax.check_token_ids(np.array([[0, 5, 63]]), v)
  t5jax.check_token_ids(jnp.array([[0, 5, 63]]), v)
  t5jax.check_token_ids([[1], [5, 6, 1], []], v)  # ragged lists, an empty one
  with pytest.raises(ValueError, match=r"tokens\[1, 2\] = 64 is outside the model's vocabulary"):
    t5jax.check_token_ids(np.array([[0, 5, 6], [1, 2, 64]]), v)
  with pytest.raises(ValueError, match=r"enc\[0, 1\] = -3 is outside .* \[0, 64\)"):
    t5jax.check_token_ids(jnp.array([[0, -3]]), v, name="enc")
  with pytest.raises(ValueError, match=r"tokens\[2\]\[1\] = 99 is outside"):
    t5jax.check_token_ids([[1], [5, 1], [5, 99, 1]], v)
  with pytest.raises(ValueError, match=r"tokens\[1\]\[1, 0\] = 70 is outside"):
    t5jax.check_token_ids([[[1, 2], [3]], [[4], [70]]], v)  # candidates: lists of lists
  with pytest.raises(TypeError, match="must hold integer token ids, got dtype float64"):
    t5jax.check_token_ids(np.array([[1.0, 2.0]]), v)
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda t: t5jax.check_token_ids(t, v))(jnp.array([[1]]))


@pytest.mark.parametrize(
  "options, shapes",
  [
    (dict(), ((0, 3), (0,), None)),
    (dict(method="beam", num_beams=2, num_return_sequences=2), ((0, 2, 3), (0, 2), None)),
    (dict(method="sample", return_token_scores=True), ((0, 3), (0,), (0, 3))),
  ],
)
def test_a_batch_of_zero_rows_gives_empty_outputs(tiny, options, shapes):
  config, params = tiny
  empty = np.zeros((0, 8), np.int32)
  out = t5jax.generate(params, config, empty, max_new_tokens=3, **options)
  got = (out.sequences.shape, out.scores.shape, getattr(out.token_scores, "shape", None))
  assert got == shapes
  assert out.sequences.dtype == jnp.int32 and out.scores.dtype == jnp.float32
  scored = t5jax.score(params, config, empty, np.zeros((0, 5), np.int32))
  assert scored.sequence_scores.shape == (0,) and scored.token_scores.shape == (0, 5)
  ranked = t5jax.rank(params, config, empty, np.zeros((0, 2, 4), np.int32))
  assert ranked.scores.shape == (0, 2) and ranked.best.shape == (0,)
  assert t5jax.rank(params, config, empty, []).best.shape == (0,)


def test_a_cudnn_trained_model_loads_where_there_is_no_cudnn(checkpoint, monkeypatch):
  """inference.load (decode.py) of a model saved with attention_impl="cudnn": where the backend
  has no cuDNN it decodes through XLA's attention ("dot_product") instead of failing."""
  real = inference.hf.load_hf
  monkeypatch.setattr(
    inference.hf,
    "load_hf",
    lambda *a, **k: (lambda c, p: (c.replace(attention_impl="cudnn"), p))(*real(*a, **k)),
  )
  config, params, tok = inference.load(checkpoint)
  usable = t5jax.config.usable_attention_impls()
  assert config.attention_impl == ("cudnn" if "cudnn" in usable else "dot_product")
  out = t5jax.generate(params, config, np.array([tok.encode("hi")], np.int32), max_new_tokens=2)
  assert out.sequences.shape == (1, 2)
