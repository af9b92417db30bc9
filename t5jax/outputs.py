"""What a decode run writes: one line of text, or one JSON object, per input, in input order.

`t5jax.inputs` reads the requests, `t5jax.inference` decodes them, and this module formats the
results: `generated(...)` for `inference.generate_all`'s sequences, `ranked(...)` for
`inference.rank_all`'s scores. Text output is the best output per input with any newline inside it
made a space, so that line i answers input i. JSONL output keeps everything the decoder returned.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from t5jax.inference import generated_length
from t5jax.tokenizer import Tokenizer

FORMATS = ("text", "jsonl")


def _line(text: str) -> str:
  return text.replace("\n", " ") + "\n"


def _json(record: dict[str, Any]) -> str:
  """One JSONL line; numpy arrays and scalars as lists and numbers."""
  return json.dumps(record, ensure_ascii=False, default=lambda a: a.tolist()) + "\n"


def generated(
  tokenizer: Tokenizer,
  texts: Sequence[str],
  sequences: Sequence[Sequence[Any]],
  scores: Sequence[Any],
  fmt: str = "text",
  token_scores: Sequence[Sequence[Any]] | None = None,
) -> str:
  """The output of `generate_all`: per input its best sequence (text), or an object with the input,
  every returned sequence decoded, their scores and, given `token_scores`, each sequence's
  per-token scores over its generated tokens (EOS included) (jsonl)."""
  outputs = [[tokenizer.decode(s.tolist()) for s in seqs] for seqs in sequences]
  if fmt == "text":
    return "".join(_line(o[0]) for o in outputs)
  records = []
  for i, text in enumerate(texts):
    record = {"input": text, "outputs": [o.replace("\n", " ") for o in outputs[i]]}
    record["scores"] = scores[i]
    if token_scores is not None:
      pairs = zip(sequences[i], token_scores[i], strict=True)
      record["token_scores"] = [ts[: generated_length(seq)] for seq, ts in pairs]
    records.append(_json(record))
  return "".join(records)


def ranked(
  texts: Sequence[str],
  candidates: Sequence[Sequence[str]],
  scores: Sequence[Any],
  best: Sequence[int],
  fmt: str = "text",
) -> str:
  """The output of `rank_all`: per input its best candidate (text), or an object with the input,
  its candidates, their scores and the best one's index (jsonl)."""
  rows = zip(texts, candidates, scores, best, strict=True)
  if fmt == "text":
    return "".join(_line(group[b]) for _, group, _, b in rows)
  keys = ("input", "candidates", "scores", "best")
  return "".join(_json(dict(zip(keys, row, strict=True))) for row in rows)
