"""Base configuration: every field t5jax's trainer reads, with T5's defaults.

Not meant to be run as is (it has no data); other configs start from `get_config()` here.
Override any field on the command line, e.g. `--config.model.num_layers=2`.
"""

import ml_collections

from t5jax.config import get_config as get_model_config
from t5jax.data import default_data_config
from t5jax.optim import default_optimizer_config
from t5jax.sharding import default_mesh_config


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model`: the preset's fields, each overridable; vocab_size 0 = tokenizer's size."""
  fields = get_model_config(preset).to_dict()
  fields.update(overrides)
  return ml_collections.ConfigDict({"preset": preset, **fields})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameters, data order, span corruption and dropout all derive from it
  c.model = model_section("t5-v1_1-small")  # architecture (see t5jax.config.T5Config)
  c.init_from = ""  # a HuggingFace folder to finetune from (its architecture wins)
  c.data = default_data_config()  # see t5jax.data.default_data_config
  c.optimizer = default_optimizer_config()  # see t5jax.optim.default_optimizer_config
  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.0  # T5 trains without it
  c.loss.z_loss = 1e-4  # coefficient on log(Z)^2, as in T5 / t5x
  c.loss.normalizer = "num_tokens"  # "num_tokens" or a constant ("constant:<x>" or a number)
  c.mesh = default_mesh_config()  # (data, fsdp, tensor) sizes; -1 = the rest
  c.batch_size = 32  # global rows per step (split over processes, then microbatches)
  c.num_microbatches = 1  # gradient accumulation: the batch is processed in this many pieces
  c.num_train_steps = 1000
  c.log_every = 50  # steps between train metric rows (metrics.jsonl, TensorBoard, progress bar)
  c.eval_every = 500  # steps between evaluations (and at the end)
  c.eval_batch_size = 64  # rows per generation batch during evaluation
  c.eval_generate_examples = 64  # eval examples decoded for exact match / BLEU / chrF; 0 = none
  c.checkpoint_every = 500  # steps between checkpoints (and at the end, and on SIGTERM/SIGINT)
  c.keep_checkpoints = 3  # last K kept
  c.best_metric = ""  # also keep the best checkpoint by this eval metric, e.g. "exact_match"
  c.best_mode = "max"  # "max" or "min" for best_metric
  c.async_checkpoints = True  # save in the background while training continues
  c.progress_bar = True
  return c
