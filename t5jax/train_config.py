"""A training run's configuration as typed, frozen values: built once, validated where built.

`configs/*.py` write an `ml_collections.ConfigDict` (overridable on the command line);
`from_config_dict` turns it into a `TrainConfig` in one place, and each value checks itself as it
is constructed (`__post_init__`), so a bad field raises `ConfigError` before the run reads a file
or touches its workdir. Library functions take these values, never a ConfigDict:
`data.make_datasets(DataConfig)`, `optim.make_optimizer(OptimizerConfig)`,
`trainer.make_train_step(..., LossConfig)`, `sharding.create_mesh(MeshConfig)`.

The defaults below are the defaults: `configs/base.py` builds its ConfigDict from them
(`default_config_dict`), so every field is documented here, once.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

try:
  import ml_collections
except ImportError:  # a bare accelerator image (benchmarks/gpu.py): only configs/*.py need it
  ml_collections = None

from t5jax import losses
from t5jax.errors import ConfigError
from t5jax.sharding import MeshConfig
from t5jax.tasks import BUILTIN_TASKS

DATA_KINDS = ("builtin", "tsv", "jsonl", "pairs", "span_corruption")
DATA_FORMATS = ("auto", "tsv", "jsonl", "text", "parquet", "arrayrecord")
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "constant", "cosine", "linear")


class _Value:
  """`replace(**changes)` for the frozen dataclasses below (validated again)."""

  def replace(self, **changes: Any):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _check_source(where: str, kind: str, fmt: str, rate: float = 0.0) -> None:
  if kind not in DATA_KINDS:
    raise ConfigError(
      f"--config.{where}kind={kind!r}: use builtin, tsv, jsonl, pairs or span_corruption"
    )
  if fmt not in DATA_FORMATS:
    raise ConfigError(f"--config.{where}format={fmt!r}: use one of {', '.join(DATA_FORMATS)}")
  if rate < 0:
    raise ConfigError(f"--config.{where}rate={rate} must be >= 0 (0 = examples-proportional)")


@dataclasses.dataclass(frozen=True)
class TaskConfig(_Value):
  """One task of a mixture (`config.data.tasks.<name>`): its sources, format, preprocessor and
  rate. Lengths, packing, the tokenizer and span-corruption settings are the mixture's
  (`config.data`)."""

  kind: str = "pairs"  # as DataConfig.kind (builtin, tsv, jsonl, pairs or span_corruption).
  train_file: str = ""  # a file, comma-separated list, glob or directory of shards.
  eval_file: str = ""  # same, for this task's evaluation rows ("" = not evaluated).
  format: str = "auto"  # as DataConfig.format.
  input_field: str = "input"
  target_field: str = "target"
  text_field: str = "text"
  prefix: str = ""  # prepended to every input (T5's task prefix, e.g. "summarize: ").
  # Sampling rate: relative weight of this task; 0 = examples-proportional,
  # min(num_examples, config.data.mixture_cap).
  rate: float = 0.0
  num_examples: int = 0  # for examples-proportional rates: 0 = count the training records.
  builtin_tasks: str = ",".join(BUILTIN_TASKS)  # kind="builtin": which generated tasks.

  def __post_init__(self):
    _check_source("data.tasks.<name>.", self.kind, self.format, self.rate)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Value):
  """`config.data`: what `data.make_datasets` and `data.build_tokenizer` read."""

  # "builtin" (generated demo tasks), "tsv" (input<TAB>target lines, after an optional header row
  # naming the columns: see sources.INPUT_COLUMNS), "jsonl" (one object per line with input_field /
  # target_field), "pairs" (input/target pairs in any format: by extension or `format`) or
  # "span_corruption" (T5 pretraining on documents: text lines, or text_field of JSONL, Parquet or
  # ArrayRecord records).
  kind: str = "builtin"
  # Training data: a file, a comma-separated list, a glob ("c4/*.json.gz") or a directory of
  # shards, each optionally .gz / .zst compressed, or a `python -m t5jax.prepare` output folder.
  train_file: str = ""
  eval_file: str = ""  # same forms, for evaluation; "" = no evaluation set (except for builtin).
  # File format: "auto" (by extension: .tsv, .jsonl/.json, .parquet, .arrayrecord, else text) or
  # one of tsv, jsonl, text, parquet, arrayrecord. kind="tsv"/"jsonl" imply their format.
  format: str = "auto"
  input_field: str = "input"  # jsonl/parquet/arrayrecord: the input field (tsv: a header name).
  target_field: str = "target"  # jsonl/parquet/arrayrecord: the target field (tsv: a header name).
  text_field: str = "text"  # span_corruption over jsonl/parquet/arrayrecord: the document field.
  prefix: str = ""  # prepended to every input of a pairs task, e.g. "summarize: ".
  # Tokenizer: "byt5", a SentencePiece .model or a folder with spiece.model; "" trains a
  # SentencePiece model of spm_vocab_size pieces on the training text (saved in the workdir; read
  # from at most spm_training_records records), or takes a prepared folder's tokenizer.
  tokenizer: str = ""
  spm_vocab_size: int = 512  # used only when training the tokenizer; includes 256 byte pieces.
  spm_training_records: int = 200_000  # records read to train the tokenizer.
  extra_ids: int = 100  # sentinels of a SentencePiece tokenizer (ByT5 always has 125).
  max_input_length: int = 32  # S: encoder length; longer inputs are truncated (eos kept last).
  max_target_length: int = 16  # T: decoder length; longer targets are truncated (eos kept last).
  pack: bool = False  # pack several examples per row (segment ids / positions) for training.
  shuffle: bool = True  # shuffle training examples (seeded; a new order each epoch).
  # Streamed files (text, TSV, JSONL, Parquet): records are shuffled within windows of this many
  # (a bounded shuffle buffer). ArrayRecord and prepared shards are shuffled globally.
  shuffle_buffer: int = 10_000
  # grain worker processes tokenizing, corrupting, packing and batching; 0 = in this process
  # (with background threads). Changing it changes the data order of a resumed run.
  num_workers: int = 0
  max_eval_examples: int = 0  # cap on evaluation examples (per task); 0 = all.
  # Builtin demo tasks (kind="builtin"): comma-separated subset of BUILTIN_TASKS.
  builtin_tasks: str = ",".join(BUILTIN_TASKS)
  builtin_train_size: int = 20000  # generated training examples (a fixed pool, repeated).
  builtin_eval_size: int = 200  # generated held-out examples.
  # Span corruption (kind="span_corruption"), T5 defaults.
  noise_density: float = 0.15  # fraction of tokens masked.
  mean_noise_span_length: float = 3.0  # mean length of a masked span.
  # A mixture: named tasks, each with its sources and rate (see TaskConfig); when given, kind,
  # train_file, eval_file, format, the fields and prefix above are unused. Evaluation reports
  # each task (metrics split "eval/<name>") and their mean ("eval").
  tasks: dict[str, TaskConfig] = dataclasses.field(default_factory=dict)
  mixture_cap: int = 0  # examples-proportional rates count at most this many examples; 0 = no cap.

  def __post_init__(self):
    _check_source("data.", self.kind, self.format)
    for name in (t.strip() for t in self.builtin_tasks.split(",")):
      if name and name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown builtin task {name!r}; choose from {sorted(BUILTIN_TASKS)}")
    if self.shuffle_buffer < 1:
      raise ConfigError(f"--config.data.shuffle_buffer={self.shuffle_buffer} must be >= 1")
    if self.num_workers < 0:
      raise ConfigError(f"--config.data.num_workers={self.num_workers} must be >= 0")
    for name, task in self.tasks.items():
      if not isinstance(task, TaskConfig):
        raise ConfigError(f"--config.data.tasks.{name} must be a task section")
      if task.kind != "builtin" and not task.train_file:
        raise ConfigError(f"--config.data.tasks.{name}.train_file is required")


@dataclasses.dataclass(frozen=True)
class AdafactorConfig(_Value):
  """`config.optimizer.adafactor`, used when name == "adafactor". T5 / t5x defaults."""

  decay_rate: float = 0.8  # Second-moment decay is 1 - (t + 1)**-decay_rate.
  min_dim_size_to_factor: int = 128  # Factor a matrix whose 2 largest dims are >= this.
  factored: bool = True  # Row/column second-moment statistics for large matrices.
  clipping_threshold: float = 1.0  # Clip each update to this RMS; 0 = off.
  multiply_by_parameter_scale: bool = True  # Relative step: updates times param RMS.
  momentum: float = 0.0  # First-moment decay; 0 = no momentum (T5).
  eps: float = 1e-30  # Added to squared gradients.
  # Factor rank > 2 params as matrices, T5-style ([D, H, K] as [D, H*K]); see t5jax.optim.
  matrix_view: bool = True


@dataclasses.dataclass(frozen=True)
class AdamWConfig(_Value):
  """`config.optimizer.adamw`, used when name == "adamw"."""

  b1: float = 0.9  # First-moment decay.
  b2: float = 0.999  # Second-moment decay.
  eps: float = 1e-8  # Added to sqrt(second moment).


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Value):
  """`config.optimizer`, with T5's pretraining defaults (see `t5jax.optim`)."""

  name: str = "adafactor"  # "adafactor" or "adamw".
  learning_rate: float = 1.0  # Base (peak) rate; `schedule` shapes it over steps.
  # "rsqrt": base / sqrt(max(step, warmup_steps)) (T5 pretraining: base 1.0, warmup 10000 gives
  #   0.01 flat, then inverse square root decay); no ramp, as in T5.
  # "constant": base, after an optional linear warmup from 0 (T5 finetuning: 1e-3, no warmup).
  # "cosine": linear warmup from 0 to base, then cosine decay to end_learning_rate at total_steps.
  # "linear": linear warmup from 0 to base, then linear decay to end_learning_rate at total_steps.
  schedule: str = "rsqrt"
  warmup_steps: int = 10_000  # rsqrt: length of the flat start; others: steps of the linear ramp.
  total_steps: int = 0  # cosine/linear: step where decay ends (warmup included). Unused otherwise.
  end_learning_rate: float = 0.0  # cosine/linear: rate reached at total_steps and kept after.
  grad_clip_norm: float = 0.0  # Clip gradients to this global L2 norm first; 0 = off.
  # Weight decay on parameters of rank >= 2 (not norm scales; T5 has no biases); 0 = off.
  # AdamW: decoupled, times the learning rate. Adafactor: `weight_decay * param` subtracted every
  # step, not scaled by the learning rate (optax's convention).
  weight_decay: float = 0.0
  adafactor: AdafactorConfig = dataclasses.field(default_factory=AdafactorConfig)
  adamw: AdamWConfig = dataclasses.field(default_factory=AdamWConfig)

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ConfigError(f"unknown optimizer {self.name!r}")
    if self.schedule not in SCHEDULES:
      raise ConfigError(f"unknown schedule {self.schedule!r}")
    if self.schedule in ("cosine", "linear") and self.total_steps <= self.warmup_steps:
      raise ConfigError(
        f"{self.schedule} schedule needs total_steps ({self.total_steps}) > warmup_steps "
        f"({self.warmup_steps})"
      )


@dataclasses.dataclass(frozen=True)
class LossConfig(_Value):
  """`config.loss`: what the train and eval steps compute (see `t5jax.losses`)."""

  label_smoothing: float = 0.0  # T5 trains without it
  z_loss: float = 1e-4  # coefficient on log(Z)^2, as in T5 / t5x
  # "num_tokens", "total_tokens" or a constant ("constant:<x>" or a number); see
  # `t5jax.losses.parse_normalizer`. ("batch", a mean per sequence, is for `compute_loss` alone.)
  normalizer: str | float = "num_tokens"
  # Target positions per block of the blocked loss: the output layer and the loss run over
  # [batch, block_size] tokens at a time (rematerialised in the backward pass), so the float32
  # [batch, target_length, vocab] logits never exist whole; 0 = all at once
  # (see `losses.blocked_loss_sums`).
  block_size: int = 0

  def __post_init__(self):
    if self.block_size < 0:
      raise ConfigError(f"config.loss.block_size must be >= 0 (0 = off), got {self.block_size}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
    try:
      kind, _ = losses.parse_normalizer(self.normalizer)
    except ValueError as e:
      raise ConfigError(f"config.loss.normalizer: {e}") from e
    if kind == "batch":
      raise ConfigError(
        "config.loss.normalizer='batch' cannot be accumulated over microbatches; use "
        "'num_tokens', 'total_tokens', a number or 'constant:<number>'"
      )

  @property
  def normalizer_spec(self) -> tuple[str, float]:
    """`(kind, constant)` of `losses.parse_normalizer`: num_tokens, total_tokens or constant."""
    return losses.parse_normalizer(self.normalizer)


LORA_ATTENTION = ("q", "k", "v", "o")
LORA_MLP = ("wi", "wi_0", "wi_1", "wo")
PROMPT_INITS = ("vocab", "random")


@dataclasses.dataclass(frozen=True)
class LoraConfig(_Value):
  """`config.lora`: train LoRA adapters over the frozen `init_from` model (see `t5jax.peft`).

  Each adapted projection `x @ W` becomes `x @ W + (alpha / rank) * (dropout(x) @ A) @ B`, with
  `B` zero at the start. Only the adapters (and a prompt, if `config.prompt` has one) are trained.
  """

  rank: int = 0  # r; 0 = no LoRA
  alpha: float = 16.0  # the update is scaled by alpha / rank
  dropout: float = 0.0  # dropout on the adapters' input, training only
  # Adapted projections per stack, comma-separated: attention q, k, v, o; MLP wi, wo (wi = both
  # wi_0 and wi_1 of a gated MLP, which may also be named alone). "" = none in that stack.
  encoder: str = "q,v"  # the encoder's self-attention and MLP
  decoder: str = "q,v"  # the decoder's self-attention and MLP
  cross: str = "q,v"  # the decoder's cross-attention (q, k, v, o only)

  def __post_init__(self):
    if self.rank < 0:
      raise ConfigError(f"--config.lora.rank={self.rank} must be >= 0 (0 = no LoRA)")
    if self.rank and self.alpha <= 0:
      raise ConfigError(f"--config.lora.alpha={self.alpha} must be > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"--config.lora.dropout={self.dropout} must be in [0, 1)")
    for stack in ("encoder", "decoder", "cross"):
      allowed = LORA_ATTENTION if stack == "cross" else LORA_ATTENTION + LORA_MLP
      for name in self._names(stack):
        if name not in allowed:
          raise ConfigError(
            f"--config.lora.{stack}: unknown projection {name!r}; use {', '.join(allowed)}"
          )
    if self.rank and not any(self._names(s) for s in ("encoder", "decoder", "cross")):
      raise ConfigError("config.lora.rank > 0 but encoder, decoder and cross name no projection")

  def _names(self, stack: str) -> list[str]:
    return [n.strip() for n in getattr(self, stack).split(",") if n.strip()]

  def targets(self, gated: bool) -> tuple[str, ...]:
    """`T5Config.lora_targets` for a model with a gated MLP or not ("wi" expanded)."""
    out = []
    for stack in ("encoder", "decoder", "cross"):
      for name in self._names(stack):
        if name in ("wi_0", "wi_1") and not gated:
          raise ConfigError(
            f"--config.lora.{stack}: {name} exists only in a gated MLP; this model has wi"
          )
        names = ("wi_0", "wi_1") if name == "wi" and gated else (name,)
        out += [f"{stack}.{n}" for n in names if f"{stack}.{n}" not in out]
    return tuple(out) if self.rank else ()


@dataclasses.dataclass(frozen=True)
class PromptConfig(_Value):
  """`config.prompt`: prompt tuning, a learned soft prompt before every encoder input, trained
  over the frozen `init_from` model (see `t5jax.peft`). No packing (`data.pack`)."""

  length: int = 0  # N prompt vectors; 0 = no prompt tuning
  # "vocab": the embeddings of N token ids drawn from the first 5000 of the vocabulary;
  # "random": uniform in [-0.5, 0.5].
  init: str = "vocab"

  def __post_init__(self):
    if self.length < 0:
      raise ConfigError(f"--config.prompt.length={self.length} must be >= 0 (0 = none)")
    if self.init not in PROMPT_INITS:
      raise ConfigError(f"--config.prompt.init={self.init!r}: use 'vocab' or 'random'")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Value):
  """The whole run (`configs/base.py` holds the ConfigDict these are built from)."""

  seed: int = 0  # parameters, data order, span corruption and dropout all derive from it
  # `config.model`: a preset name ("preset") and T5Config fields overriding it (vocab_size 0 = the
  # tokenizer's size); the T5Config itself is built once the tokenizer is known (`t5jax.train`).
  model: dict[str, Any] = dataclasses.field(default_factory=dict)
  init_from: str = ""  # a HuggingFace folder to finetune from (its architecture wins)
  # Parameter-efficient fine-tuning of init_from: LoRA adapters and / or a soft prompt are
  # trained, the model itself stays frozen (checkpoints hold only what is trained).
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # -1 = the rest
  batch_size: int = 32  # global rows per step (split over processes, then microbatches)
  num_microbatches: int = 1  # gradient accumulation: the batch is processed in this many pieces
  num_train_steps: int = 1000
  log_every: int = 50  # steps between train metric rows (metrics.jsonl, TensorBoard, progress bar)
  eval_every: int = 500  # steps between evaluations (and at the end)
  eval_batch_size: int = 64  # rows per generation batch during evaluation
  eval_generate_examples: int = 64  # eval examples decoded for exact match / BLEU / chrF; 0 = none
  checkpoint_every: int = 500  # steps between checkpoints (and at the end, and on SIGTERM/SIGINT)
  keep_checkpoints: int = 3  # last K kept
  best_metric: str = ""  # also keep the best checkpoint by this eval metric, e.g. "exact_match"
  best_mode: str = "max"  # "max" or "min" for best_metric
  async_checkpoints: bool = True  # save in the background while training continues
  # Progress on stderr: a bar on a terminal, else (CI logs, nohup) a plain line every log_every
  # steps (step/total, loss, steps/s, ETA) and each eval. False: nothing.
  progress_bar: bool = True

  def __post_init__(self):
    for name in (
      "num_train_steps",
      "num_microbatches",
      "log_every",
      "eval_every",
      "checkpoint_every",
    ):
      if getattr(self, name) < 1:
        raise ConfigError(f"--config.{name}={getattr(self, name)} must be >= 1")
    if self.best_mode not in ("max", "min"):
      raise ConfigError(f"--config.best_mode={self.best_mode!r}: use 'max' or 'min'")
    if self.is_peft and not self.init_from:
      raise ConfigError(
        "config.lora / config.prompt train over a frozen model: set --config.init_from to a "
        "HuggingFace folder"
      )
    if self.prompt.length and self.data.pack:
      raise ConfigError("prompt tuning does not support packing: set --config.data.pack=False")

  @property
  def is_peft(self) -> bool:
    """Parameter-efficient fine-tuning: adapters and / or a prompt over a frozen base."""
    return bool(self.lora.rank or self.prompt.length)

  def check_processes(self, process_count: int, batch_shards: int = 1) -> None:
    """The global batch must split evenly over the processes, then the microbatches, and over
    the mesh's `batch_shards` (its data x fsdp devices, `sharding.mesh_shape`); a run checks this
    before it touches its workdir."""
    if self.batch_size < 1 or self.batch_size % (process_count * self.num_microbatches):
      raise ConfigError(
        f"--config.batch_size={self.batch_size} must divide by process count x num_microbatches"
      )
    if self.batch_size % batch_shards:
      fits = -(-self.batch_size // batch_shards) * batch_shards
      raise ConfigError(
        f"--config.batch_size={self.batch_size} must divide by the {batch_shards} batch shards "
        f"(mesh data x fsdp, --config.mesh) that split every batch; e.g. {fits}"
      )


# --- from and to ml_collections --------------------------------------------------------------


def _is_config_dict(value: Any) -> bool:
  return ml_collections is not None and isinstance(value, ml_collections.ConfigDict)


def _coerce(value: Any, hint: Any, where: str) -> Any:
  if dataclasses.is_dataclass(hint):
    return _build(hint, value, where)
  if hint in (int, float, str, bool):
    if hint is int and isinstance(value, float) and not value.is_integer():
      raise ConfigError(f"{where}={value!r} must be an integer")
    return hint(value)
  if hint == dict[str, Any]:
    return dict(value.to_dict() if _is_config_dict(value) else value)
  if hint == dict[str, TaskConfig]:
    return {str(k): _build(TaskConfig, v, f"{where}.{k}") for k, v in dict(value).items()}
  return value


def _build(cls: type, values: Mapping[str, Any], where: str):
  if _is_config_dict(values):
    values = {k: values[k] for k in values.keys()}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise ConfigError(f"unknown config field {where}.{unknown[0]}")
  return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def from_config_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> TrainConfig:
  """The typed, validated run configuration of a `configs/*.py` ConfigDict (missing fields: the
  defaults above). Raises `ConfigError` naming the field."""
  return _build(TrainConfig, config, "config")


def default_config_dict() -> ml_collections.ConfigDict:
  """A ConfigDict with every field of `TrainConfig` at its default (`config.model` empty)."""
  return ml_collections.ConfigDict(TrainConfig().to_dict())
