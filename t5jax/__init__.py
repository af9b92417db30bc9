"""t5jax: T5 in JAX/Flax — HuggingFace-exact model, jitted decoders, sharded training."""

from t5jax.config import PRESETS, T5Config, get_config
from t5jax.errors import CheckpointError
from t5jax.generate import (
  GenerateConfig,
  GenerateOutput,
  RankOutput,
  ScoreOutput,
  generate,
  rank,
  score,
)
from t5jax.hf import load_hf, save_hf
from t5jax.model import (
  decode_step,
  encode,
  forward,
  init_cross_cache,
  init_params,
  init_self_cache,
  param_axes,
  shift_right,
)

__all__ = [
  "PRESETS",
  "CheckpointError",
  "T5Config",
  "GenerateConfig",
  "GenerateOutput",
  "RankOutput",
  "ScoreOutput",
  "decode_step",
  "encode",
  "forward",
  "generate",
  "get_config",
  "init_cross_cache",
  "init_params",
  "init_self_cache",
  "load_hf",
  "param_axes",
  "rank",
  "save_hf",
  "score",
  "shift_right",
]

__version__ = "0.1.0"
