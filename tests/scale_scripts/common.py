"""Shared pieces of the scale-out scripts: a tiny model whose dims divide every test mesh axis.

Imported by the subprocess scripts (after they set `XLA_FLAGS`) and by `tests/test_scale.py`
(for single-device references), so it must not import jax at module level side effects beyond
the library's own.
"""

from __future__ import annotations

import numpy as np

from t5jax import trainer
from t5jax.config import get_config
from t5jax.sharding import MeshConfig
from t5jax.train_config import AdafactorConfig, LossConfig, OptimizerConfig

B, S, T = 16, 12, 8  # global rows (divisible by data * fsdp on every mesh), source, target


def tiny_config(dropout_rate: float = 0.1):
  """d_model 16, 8 heads, d_ff 32, vocab 64: every sharded dimension divides by 8."""
  return get_config(
    "t5-v1_1-small",
    vocab_size=64,
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_heads=8,
    num_layers=1,
    num_decoder_layers=1,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=dropout_rate,
  )


def optimizer_config(name: str = "adafactor") -> OptimizerConfig:
  """A constant rate big enough to move parameters visibly in one step."""
  return OptimizerConfig(
    name=name,
    schedule="constant",
    learning_rate=1e-2,
    adafactor=AdafactorConfig(min_dim_size_to_factor=8),  # factor the tiny matrices too
  )


def loss_config():
  return LossConfig(label_smoothing=0.0, z_loss=1e-4, normalizer="num_tokens")


def build(config, mesh, name: str = "adafactor") -> trainer.TrainSetup:
  """The optimizer, state shardings and jitted steps of `config` over `mesh`."""
  return trainer.build(config, optimizer_config(name), loss_config(), mesh)


def batch(step: int = 0, rows: int = B) -> dict[str, np.ndarray]:
  """A deterministic batch with padding in both inputs and targets (varies with `step`)."""
  rng = np.random.default_rng(1000 + step)
  enc = rng.integers(2, 64, (rows, S), dtype=np.int32)
  tgt = rng.integers(2, 64, (rows, T), dtype=np.int32)
  enc_len = rng.integers(3, S + 1, rows)
  tgt_len = rng.integers(2, T + 1, rows)
  enc[np.arange(S)[None] >= enc_len[:, None]] = 0
  tgt[np.arange(T)[None] >= tgt_len[:, None]] = 0
  dec_in = np.concatenate([np.zeros((rows, 1), np.int32), tgt[:, :-1]], axis=1)
  return {
    "encoder_input_tokens": enc,
    "decoder_input_tokens": dec_in,
    "decoder_target_tokens": tgt,
    "decoder_loss_weights": (tgt > 0).astype(np.float32),
  }


def mesh_cfg(data: int, fsdp: int, tensor: int) -> MeshConfig:
  return MeshConfig(data, fsdp, tensor)
