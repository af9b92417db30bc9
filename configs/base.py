"""Base configuration: every field t5jax's trainer reads, with T5's defaults.

Not meant to be run as is (it has no data); other configs start from `get_config()` here.
Override any field on the command line, e.g. `--config.model.num_layers=2`. Every field, its
default and its meaning are in `t5jax.train_config` (the typed values this ConfigDict becomes).
"""

import ml_collections

from t5jax.config import get_config as get_model_config
from t5jax.train_config import default_config_dict


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model`: the preset's fields, each overridable; vocab_size 0 = tokenizer's size."""
  fields = get_model_config(preset).to_dict()
  fields.update(overrides)
  return ml_collections.ConfigDict({"preset": preset, **fields})


def get_config() -> ml_collections.ConfigDict:
  c = default_config_dict()  # seed, data, optimizer, loss, mesh, batch and loop fields
  c.model = model_section("t5-v1_1-small")  # architecture (see t5jax.config.T5Config)
  return c
