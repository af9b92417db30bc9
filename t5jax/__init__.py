"""t5jax: T5 in JAX/Flax — HuggingFace-exact model, jitted decoders, sharded training.

The model, decoding and HuggingFace functions are here by name (`t5jax.generate`, ...); every
module is reachable as an attribute once `t5jax` is imported (`t5jax.inference.load`,
`t5jax.tokenizer.load_tokenizer`, ...), imported on first use so that `import t5jax` stays light.
"""

import importlib
import pkgutil

from t5jax.config import PRESETS, T5Config, get_config
from t5jax.errors import CheckpointError
from t5jax.generate import (
  GenerateConfig,
  GenerateOutput,
  RankOutput,
  ScoreOutput,
  check_token_ids,
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
from t5jax.quantize import QuantizedWeight, quantize

__all__ = [
  "PRESETS",
  "CheckpointError",
  "T5Config",
  "GenerateConfig",
  "GenerateOutput",
  "RankOutput",
  "QuantizedWeight",
  "ScoreOutput",
  "check_token_ids",
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
  "quantize",
  "rank",
  "save_hf",
  "score",
  "shift_right",
]

__version__ = "0.1.0"

# The package's modules (besides those imported above), loaded when first named: `t5jax.train`
# imports orbax, grain and TensorBoard, which a decoding user never needs.
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__))


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"t5jax.{name}")
  raise AttributeError(f"module 't5jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_SUBMODULES))
