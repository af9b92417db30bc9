"""A training run in two parts: `setup(config, workdir) -> Run`, then `loop(run)`.

`train_and_evaluate(config, workdir)` does both: it starts from scratch, from a HuggingFace folder
(`config.init_from`), or resumes what the workdir holds. `setup` checks everything (config, data
files, tokenizer, model, a saved run's compatibility) before it writes to the workdir, so a failed
start changes nothing there. The loop never blocks on the step it just dispatched: it reads step
n-1's metrics while step n runs, except before a checkpoint or an evaluation, where it first
checks that the loss is finite so a NaN state is never saved. Evaluation is `t5jax.evaluate`, the
export `checkpoint.export`, the multi-host agreements `t5jax.distributed`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from t5jax import (
  checkpoint,
  data,
  distributed,
  hf,
  peft,
  sharding,
  train_config,
  trainer,
)
from t5jax import metrics as metrics_lib
from t5jax import workdir as workdir_lib
from t5jax.config import ATTENTION_IMPLS, T5Config, get_config, usable_attention_impls
from t5jax.errors import ConfigError
from t5jax.errors import TrainingError as TrainingError  # its home is t5jax.errors
from t5jax.evaluate import evaluate
from t5jax.generate import GenerateConfig
from t5jax.tokenizer import BYT5_MARKER, SPM_FILENAME, Tokenizer
from t5jax.train_config import TrainConfig

# --- set-up ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """Everything the loop needs: what `setup` built, and the state it advances."""

  config: TrainConfig
  workdir: str
  model_cfg: T5Config
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh
  datasets: data.Datasets
  ckpt: checkpoint.CheckpointManager
  state: trainer.TrainState
  train_step: Callable
  eval_step: Callable
  dropout_rng: jax.Array
  last_saved: int | None  # the step of the last checkpoint (None: none yet)
  lock: workdir_lib.WorkdirLock | None = None  # held by process 0 until the loop ends
  # Parameter-efficient fine-tuning: the frozen base (placed on the mesh, outside the state).
  frozen: Any = None

  @property
  def params(self) -> Any:
    """The model's whole parameter tree: the state's, with the frozen base if there is one."""
    if self.frozen is None:
      return self.state.params
    return peft.combine(self.frozen, self.state.params)


def model_config_from(config: TrainConfig, tokenizer) -> T5Config:
  """The T5Config of a run: `init_from`'s architecture, else `config.model` (preset + fields)."""
  fields = dict(config.model)
  preset = fields.pop("preset", "")
  dtype = fields.get("dtype", "float32")
  if config.init_from:
    cfg = T5Config.from_hf_dict(
      hf.read_hf_config(config.init_from),
      has_lm_head=hf.has_lm_head(config.init_from),
    )
    lora = config.lora
    try:
      return cfg.replace(
        dtype=dtype,
        attention_impl=str(fields.get("attention_impl", cfg.attention_impl)),
        dropout_rate=float(fields.get("dropout_rate", cfg.dropout_rate)),
        scan_layers=bool(fields.get("scan_layers", False)),
        remat=str(fields.get("remat", "none")),
        lora_rank=lora.rank,
        lora_alpha=float(lora.alpha) if lora.rank else 0.0,
        lora_dropout=float(lora.dropout) if lora.rank else 0.0,
        lora_targets=lora.targets(cfg.is_gated),
        prompt_length=config.prompt.length,
      )
    except ValueError as e:
      raise ConfigError(str(e)) from e
  try:
    base = get_config(preset).to_dict() if preset else {}
    base.update(fields)
    if not base.get("vocab_size"):
      # 0 = the tokenizer's size, rounded up to a multiple of 128 as T5 does.
      base["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    return T5Config.from_dict(base)
  except ValueError as e:  # an unknown preset, dtype or an inconsistent architecture
    raise ConfigError(str(e)) from e


# Model fields that change how a step computes, not the parameters: a run may resume with others.
RESUMABLE_CHANGES = ("dropout_rate", "dtype", "attention_impl", "remat", "lora_dropout")


def _check_compatible(saved: T5Config, now: T5Config, workdir: str) -> None:
  diffs = [
    f"{k}: saved {v!r}, now {now.to_dict()[k]!r}"
    for k, v in saved.to_dict().items()
    if k not in RESUMABLE_CHANGES and now.to_dict()[k] != v
  ]
  if diffs:
    raise TrainingError(
      f"{workdir}: cannot resume with an incompatible model config ({'; '.join(diffs)}); "
      "use a new --workdir or the saved config"
    )


def _tokenizer_and_model(config: TrainConfig, workdir: str) -> tuple[Tokenizer, T5Config, bool]:
  """The run's tokenizer (the workdir's if saved), its model config, and whether the tokenizer
  was already saved; checks the vocabulary and a saved run's architecture."""
  paths = workdir_lib.Paths(workdir)
  tok_saved = paths.has_tokenizer()
  data_cfg = config.data
  if config.init_from and not data_cfg.tokenizer and not tok_saved:
    # A pretrained model's ids are its own tokenizer's: never train a new one for it.
    folder = config.init_from
    if not any(os.path.isfile(os.path.join(folder, f)) for f in (SPM_FILENAME, BYT5_MARKER)):
      raise TrainingError(
        f"--config.init_from={folder} holds no tokenizer ({SPM_FILENAME}); set "
        "--config.data.tokenizer to the model's own (a .model file, a folder or byt5)"
      )
    data_cfg = data_cfg.replace(tokenizer=folder)
  tokenizer = data.build_tokenizer(data_cfg, workdir if tok_saved else None, config.seed)
  model_cfg = model_config_from(config, tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise TrainingError(
      f"tokenizer has {tokenizer.vocab_size} ids but config.model.vocab_size is "
      f"{model_cfg.vocab_size}; raise --config.model.vocab_size or use a smaller tokenizer"
    )
  if os.path.exists(paths.model_config):
    _check_compatible(checkpoint.load_model_config(workdir), model_cfg, workdir)
  return tokenizer, model_cfg, tok_saved


def _restore(ckpt, step: int, abstract, datasets, workdir: str, *, close_on_error=True):
  """The train state of checkpoint `step`, with this process's data position set."""
  try:
    state, data_states = ckpt.restore(abstract, step)
  except (ValueError, KeyError, TypeError) as e:  # e.g. another optimizer's state
    if close_on_error:
      ckpt.close()
    raise TrainingError(
      f"{workdir}: cannot restore checkpoint {step} into this config's train state "
      f"(was it saved with another optimizer? {type(e).__name__}: "
      f"{str(e).splitlines()[0][:300].rstrip(':')}); use the saved config or a new --workdir"
    ) from e
  key = str(jax.process_index())
  if key not in data_states or len(data_states) != jax.process_count():
    raise TrainingError(
      f"{workdir}: checkpoint {step} holds data positions of {len(data_states)} "
      f"processes; this run has {jax.process_count()}"
    )
  datasets.train.set_state(data_states[key])
  return state


def _record(run_config: TrainConfig, workdir: str, tokenizer, tok_saved: bool, model_cfg) -> None:
  """Writes what the run is, once it can go ahead (process 0)."""
  paths = workdir_lib.Paths(workdir)
  if not tok_saved:
    tokenizer.save(paths.tokenizer)
  checkpoint.save_json(paths.model_config, model_cfg.to_dict())
  checkpoint.save_json(paths.train_config, run_config.to_dict())
  if run_config.is_peft:  # the checkpoints hold the adapters / prompt: where is their base
    peft.write_pointer(workdir, run_config.init_from, model_cfg)


def check_workdir(workdir: str) -> str:
  """The absolute workdir, or a `ConfigError` when it is empty, a file or under a file."""
  if not workdir or not workdir.strip():
    raise ConfigError("--workdir is empty; name the folder the run writes to")
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a folder")
  parent = os.path.dirname(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f"--workdir {workdir} is under {parent}, which is a file")
  return workdir


def _lock(workdir: str) -> workdir_lib.WorkdirLock | None:
  """Process 0 locks the workdir; every process learns whether it could (one error for all)."""
  lock, refused = None, ""
  if distributed.is_main_process():
    try:
      lock = workdir_lib.WorkdirLock(workdir).acquire()
    except TrainingError as e:
      refused = str(e)
  refused = distributed.gather_json(refused)["0"]
  if refused:
    raise TrainingError(refused)
  return lock


def _restore_newest_readable(ckpt, abstract, datasets, workdir: str):
  """`(step, state)` of the newest checkpoint that restores; unreadable newer ones are moved to
  `checkpoints_damaged/` with a warning. A checkpoint that reads but does not fit this config's
  state (another optimizer) is not damage: that error is raised at once."""

  def restore(step):
    return _restore(ckpt, step, abstract, datasets, workdir, close_on_error=False)

  def mismatch(step, e):  # not into this config's state: a mismatch, or damage?
    if isinstance(e, TrainingError) and checkpoint.readable(workdir, step):
      ckpt.close()
      return True
    return False

  step, state, skipped = checkpoint.restore_newest(ckpt.all_steps(), restore, mismatch=mismatch)
  if step is not None:
    if skipped:
      names = ", ".join(str(s) for s, _ in skipped)
      reason = checkpoint.short_error(skipped[0][1])
      moved = checkpoint.move_damaged(workdir, [s for s, _ in skipped])
      print(
        f"warning: checkpoint {names} in {workdir}/checkpoints is unreadable ({reason}); "
        f"resuming from checkpoint {step}; moved to {moved}",
        file=sys.stderr,
      )
      ckpt.reload()
    return step, state
  ckpt.close()
  newest = skipped[0][1]
  raise TrainingError(
    f"{workdir}: no checkpoint can be restored (newest {skipped[0][0]}: "
    f"{checkpoint.short_error(newest)}); use a new --workdir"
  ) from newest


def _check_attention_impl(config: TrainConfig) -> None:
  """`config.model.attention_impl` must run on this backend ("cudnn": an NVIDIA GPU only)."""
  impl = config.model.get("attention_impl", "einsum")
  usable = usable_attention_impls()
  if impl in ATTENTION_IMPLS and impl not in usable:
    raise ConfigError(
      f"--config.model.attention_impl={impl} needs an NVIDIA GPU (cuDNN); on this "
      f"{jax.default_backend()} backend use one of {', '.join(usable)}"
    )


def setup(config: TrainConfig, workdir: str) -> Run:
  """Builds (or restores) everything a run needs; writes to `workdir` only once all is checked."""
  data_shards, fsdp_shards, _ = sharding.mesh_shape(config.mesh, jax.device_count())
  config.check_processes(jax.process_count(), data_shards * fsdp_shards)
  _check_attention_impl(config)
  workdir = check_workdir(workdir)
  tokenizer, model_cfg, tok_saved = _tokenizer_and_model(config, workdir)
  mesh = sharding.create_mesh(config.mesh)
  steps = trainer.build(  # PEFT: the state holds the adapters / prompt only
    model_cfg, config.optimizer, config.loss, mesh, num_microbatches=config.num_microbatches
  )
  datasets = data.make_datasets(
    config.data,
    tokenizer,
    batch_size=config.batch_size // jax.process_count(),
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  init_params = None
  if config.init_from and (config.is_peft or not workdir_lib.Paths(workdir).has_checkpoints()):
    # Read before any write. A PEFT run reads its frozen base at every start (the checkpoints
    # hold only what is trained).
    _, init_params = hf.load_hf(config.init_from, config=model_cfg)
  os.makedirs(workdir, exist_ok=True)
  lock = _lock(workdir)  # before the checkpoint manager, whose start-up cleans temporary saves
  try:
    ckpt = checkpoint.CheckpointManager(
      workdir,
      keep=config.keep_checkpoints,
      best_metric=config.best_metric,
      best_mode=config.best_mode,
      async_save=config.async_checkpoints,
    )
    last_saved = ckpt.latest_step()
    if last_saved is not None:
      last_saved, state = _restore_newest_readable(ckpt, steps.abstract_state(), datasets, workdir)
    elif config.is_peft:
      trainable = peft.init_trainable(
        model_cfg, init_params, config.seed, prompt_init=config.prompt.init
      )
      state = steps.state_from_params(trainable)
    elif init_params is not None:
      state = steps.state_from_params(init_params)
    else:
      state = steps.init_state(jax.random.PRNGKey(config.seed))
    if distributed.is_main_process():  # the run can go ahead: record what it is
      _record(config, workdir, tokenizer, tok_saved, model_cfg)
  except BaseException:
    if lock is not None:
      lock.release(undo=True)  # a start that fails leaves the workdir as it was
    raise
  frozen = None
  if config.is_peft:
    # Held in the compute dtype where the model reads it so (exact; `peft.cast_frozen`).
    frozen = peft.to_device(peft.cast_frozen(init_params, model_cfg), steps.frozen_shardings)
  del init_params
  jitted_step = steps.train_step
  train_step = jitted_step if frozen is None else (lambda s, b, r: jitted_step(s, b, r, frozen))
  return Run(
    config=config,
    workdir=workdir,
    model_cfg=model_cfg,
    tokenizer=tokenizer,
    mesh=mesh,
    datasets=datasets,
    ckpt=ckpt,
    state=state,
    train_step=train_step,
    eval_step=steps.eval_step,
    dropout_rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1),
    last_saved=last_saved,
    lock=lock,
    frozen=frozen,
  )


# --- the loop --------------------------------------------------------------------------------


class _StopFlag:
  """Set by SIGTERM / SIGINT: the loop saves a checkpoint and returns normally (a second
  signal kills the process the default way, e.g. when the save itself hangs)."""

  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    del frame
    if self.signal is not None:  # a second signal: the user wants out now, unsaved
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    self.signal = signum

  def install(self):
    self._old = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

  def restore(self):
    for s, h in self._old.items():
      signal.signal(s, h)


def _check_finite(step: int, metrics: dict[str, float], last_saved: int | None, workdir: str):
  # The parameter norm catches an update that overflowed the parameters while the loss of this
  # step (computed before the update) was still finite: that state must not be saved either.
  for key in ("loss", "grad_norm", "update_norm", "param_norm"):
    if not np.isfinite(metrics[key]):
      kept = (
        f"the last good checkpoint (step {last_saved}) is kept in {workdir}/checkpoints"
        if last_saved is not None
        else "no checkpoint had been saved yet"
      )
      raise TrainingError(f"{key} is {metrics[key]} at step {step}; stopping: {kept}")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _Progress:
  """What the loop shows on stderr: a tqdm bar on a terminal; elsewhere (CI logs, `nohup`, a
  pipe), where a bar draws nothing readable, one plain line per train log row, flushed."""

  def __init__(self, total: int, step: int):
    self.total, self.bar = total, None
    if sys.stderr.isatty():
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)

  def update(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def log(self, step: int, avg: dict[str, float]) -> None:
    """The averaged train metrics of the row written at `step`."""
    if self.bar is not None:
      self.bar.set_postfix(
        loss=f"{avg['loss']:.3f}", lr=f"{avg['learning_rate']:.2e}",
        tok_s=f"{avg['tokens_per_sec']:.0f}",
      )  # fmt: skip
      return
    rate = avg["steps_per_sec"]
    eta = _duration((self.total - step) / rate) if rate > 0 else "?"
    self.write(
      f"train step {step}/{self.total}: loss {avg['loss']:.4f}, {rate:.2f} steps/s, ETA {eta}"
    )

  def write(self, line: str) -> None:
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _TrainLog:
  """Train metrics read one step late (step n-1's while step n runs), checked finite, averaged
  over a `MetricsWindow` and written every `log_every` steps (and at the last)."""

  def __init__(self, run: Run, writer: metrics_lib.MetricWriter, progress: _Progress | None):
    c = run.config
    self.run, self.writer, self.progress = run, writer, progress
    tokens = c.batch_size * (c.data.max_input_length + c.data.max_target_length)
    self.window = metrics_lib.MetricsWindow(tokens_per_step=tokens)
    self.pending: tuple[int, Any] | None = None
    self.last: dict[str, float] = {}

  def push(self, step: int, metrics: Any) -> None:
    """Reads the previous step's metrics, keeps this step's (still computing) for later."""
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    """Reads the pending step's metrics now (a non-finite value raises here)."""
    if self.pending is None:
      return
    (step, metrics), self.pending = self.pending, None
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, metrics, self.run.last_saved, self.run.workdir)
    self.window.add(metrics)
    c = self.run.config
    if step % c.log_every == 0 or step == c.num_train_steps:
      self.last = avg = self.window.average()
      self.writer.write(step, "train", avg)
      if self.progress is not None:
        self.progress.log(step, avg)


def _evaluate(
  run: Run, step: int, writer: metrics_lib.MetricWriter, progress: _Progress | None
) -> dict[str, float]:
  """Evaluates the current state on each evaluation set (a mixture's tasks one by one, then their
  mean as split "eval"), writes the rows, keeps the best checkpoint."""
  c = run.config
  results = {}
  for split, eval_data in run.datasets.eval_sets().items():
    results[split] = evaluate(
      run.params,
      eval_data,
      run.eval_step,
      run.mesh,
      model_cfg=run.model_cfg,
      tokenizer=run.tokenizer,
      generate_config=GenerateConfig(max_new_tokens=c.data.max_target_length),
      num_generate=c.eval_generate_examples,
      batch_size=c.eval_batch_size,
    )
    if split != "eval":
      writer.write(step, split, results[split])
  if "eval" in results:
    out = results["eval"]
  else:  # a mixture: the mean over its tasks of each metric they all report
    keys = set.intersection(*(set(r) for r in results.values()))
    out = {k: float(np.mean([r[k] for r in results.values()])) for k in sorted(keys)}
  writer.write(step, "eval", out)
  if progress is not None:
    progress.write(f"step {step}: eval " + " ".join(f"{k}={v:.4g}" for k, v in out.items()))
  if c.best_metric:
    data_state = distributed.gather_json(run.datasets.train.get_state())
    run.ckpt.save_best(step, run.state, data_state, out)
  return out


def _save(run: Run, step: int) -> None:
  data_state = distributed.gather_json(run.datasets.train.get_state())
  run.ckpt.save(step, run.state, data_state, force=True)
  run.last_saved = step


def _already_trained(run: Run, step: int) -> dict[str, Any]:
  """A workdir trained to `num_train_steps` already: says so and exits (no evaluation, no new
  event file); the export is written only if the earlier run ended before writing it."""
  try:
    wanted = checkpoint.export_files(run.workdir, run.model_cfg)
    # Process 0's view decides (it writes the export): every process joins the export's gather.
    if not distributed.gather_json(all(os.path.isfile(f) for f in wanted))["0"]:
      _export(run)
    if distributed.is_main_process():
      print(
        f"{run.workdir} is already trained to step {step} (--config.num_train_steps="
        f"{run.config.num_train_steps}); nothing to do. To train further raise "
        "--config.num_train_steps; to retrain use a new --workdir.",
        file=sys.stderr,
        flush=True,
      )
  finally:
    run.ckpt.close()
    if run.lock is not None:
      run.lock.release()
  return {"train": {}, "eval": {}, "step": step}


def _export(run: Run) -> None:
  if run.frozen is None:
    checkpoint.export(run.workdir, run.model_cfg, run.state.params)
  else:  # merged from the base as saved (float32), not from its compute-dtype copy
    checkpoint.export(run.workdir, run.model_cfg, run.state.params, peft_base=run.config.init_from)


def loop(run: Run) -> dict[str, Any]:
  """Trains `run` to `num_train_steps` (or a signal); returns the last train and eval metrics."""
  c, total = run.config, run.config.num_train_steps
  step = int(jax.device_get(run.state.step))
  if step >= total:
    return _already_trained(run, step)
  main = distributed.is_main_process()
  writer = metrics_lib.MetricWriter(run.workdir, main, resume_step=step)
  progress = _Progress(total, step) if main and c.progress_bar else None
  log, last_eval = _TrainLog(run, writer, progress), {}
  stop = _StopFlag()
  stop.install()
  try:
    # Under the mesh, the model's activation constraints (t5jax.partitioning) take effect.
    with jax.set_mesh(run.mesh):
      while step < total:
        batch = sharding.shard_batch(next(run.datasets.train), run.mesh)
        run.state, metrics = run.train_step(run.state, batch, run.dropout_rng)
        step += 1
        log.push(step, metrics)
        if progress is not None:
          progress.update()
        if run.datasets.eval_sets() and (step % c.eval_every == 0 or step == total):
          log.flush()  # a non-finite loss stops here, before anything is evaluated or saved
          last_eval = _evaluate(run, step, writer, progress)
        # Read once, after the evaluation: a signal that arrives during it (or from here on) still
        # gets its save, now or after the next step.
        signalled = distributed.agreed_stop(stop.signal, step, c.log_every)
        if step % c.checkpoint_every == 0 or step == total or signalled:
          log.flush()
          _save(run, step)
        if signalled:
          if progress is not None:
            progress.write(f"signal {signalled}: saved step {step}; exiting")
          break
      log.flush()
      run.ckpt.wait()
      if step >= total:
        _export(run)
  finally:
    stop.restore()
    if progress is not None:
      progress.close()
    run.ckpt.close()
    writer.close()
    if run.lock is not None:
      run.lock.release()
  return {"train": log.last, "eval": last_eval, "step": step}


def train_and_evaluate(
  config: ml_collections.ConfigDict | TrainConfig, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) training as `config` says; returns the last train and eval metrics."""
  if not isinstance(config, TrainConfig):
    config = train_config.from_config_dict(config)
  return loop(setup(config, workdir))
