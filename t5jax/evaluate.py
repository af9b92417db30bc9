"""Evaluation during training: loss and token accuracy over the eval set, and generation metrics.

Loss and accuracy are sums over every eval batch (the jitted `trainer.make_eval_step`),
normalised once. Exact match, BLEU and chrF come from decoding the first examples with
`t5jax.inference.generate_all`, the batching decode.py uses (one process only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from t5jax import inference, sharding
from t5jax.config import T5Config
from t5jax.data import EvalData
from t5jax.generate import GenerateConfig
from t5jax.tokenizer import Tokenizer


def evaluate(
  params: Any,
  eval_data: EvalData,
  eval_step: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
  mesh: jax.sharding.Mesh,
  *,
  model_cfg: T5Config,
  tokenizer: Tokenizer,
  generate_config: GenerateConfig,
  num_generate: int,
  batch_size: int,
) -> dict[str, float]:
  """Loss and token accuracy over the eval set; exact match, BLEU and chrF on `num_generate`
  examples decoded `batch_size` at a time (none with several processes)."""
  totals: dict[str, float] = {}
  for batch in eval_data.batches():
    sums = eval_step(params, sharding.shard_batch(batch, mesh))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {
    "loss": totals["loss_sum"] / max(totals["num_tokens"], 1.0),
    "accuracy": totals["num_correct"] / max(totals["num_tokens"], 1.0),
  }
  n = min(num_generate, len(eval_data.examples))
  if n and jax.process_count() == 1:
    out.update(
      generation_metrics(
        params, model_cfg, eval_data, tokenizer, generate_config, n=n, batch_size=batch_size
      )
    )
  return out


def generation_metrics(
  params: Any,
  model_cfg: T5Config,
  eval_data: EvalData,
  tokenizer: Tokenizer,
  generate_config: GenerateConfig,
  *,
  n: int,
  batch_size: int,
) -> dict[str, float]:
  """Exact match, BLEU and chrF of the first `n` eval examples' decoded outputs."""
  import sacrebleu

  token_ids = [ex["inputs"] for ex in eval_data.tokenized[:n]]
  sequences, _ = inference.generate_all(
    params,
    model_cfg,
    token_ids,
    generate_config,
    batch_size=batch_size,
    max_len=eval_data.input_length,
    buckets=False,
  )
  preds = [tokenizer.decode(seqs[0].tolist()) for seqs in sequences]
  refs = [t for _, t in eval_data.examples[:n]]
  exact = float(np.mean([p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)]))
  return {
    "exact_match": exact,
    "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
    "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
  }
