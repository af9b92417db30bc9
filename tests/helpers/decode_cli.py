"""decode.py run in-process (helpers.cli.run_script, output captured by pytest), and the HF
checkpoint its tests decode with."""

from __future__ import annotations

from helpers.cli import run_script
from helpers.hf_models import make_hf_model, save_hf_model


def save_byte_checkpoint(folder: str) -> str:
  """A tiny HF folder with a ByT5 marker: vocab 512 covers bytes (384) and a small SentencePiece
  model."""
  from t5jax.tokenizer import ByteTokenizer

  save_hf_model(make_hf_model("v1_1", seed=1, vocab_size=512, eos_swap=None), folder)
  ByteTokenizer().save(folder)
  return folder


def run_cli(args, capsys):
  """`python decode.py args` in this process (helpers.cli) -> (exit code, stdout, stderr)."""
  code = run_script("decode.py", args)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def run_error(args, capsys) -> str:
  """The one line decode.py prints for bad `args` (exit status 2, nothing on stdout)."""
  code, stdout, err = run_cli(args, capsys)
  assert code == 2 and stdout == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("decode.py: error: "), err
  return lines[0]


def write(tmp_path, name, content, mode="w"):
  """Writes `content` (text as UTF-8, or bytes with mode "wb") to tmp_path/name; its path."""
  path = tmp_path / name
  if mode == "wb":
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8")
  return str(path)
