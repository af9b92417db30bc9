"""The training loop: config -> tokenizer, data, mesh, state; steps, evaluation, checkpoints.

`train_and_evaluate(config, workdir)` starts from scratch, from a HuggingFace folder
(`config.init_from`), or resumes what the workdir holds. The loop never blocks on the step it
just dispatched: it reads step n-1's metrics while step n runs, except before a checkpoint or an
evaluation, where it first checks that the loss is finite so a NaN state is never saved.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from t5jax import checkpoint, data, hf, optim, sharding, train_config, trainer
from t5jax import metrics as metrics_lib
from t5jax.config import T5Config, get_config
from t5jax.errors import ConfigError
from t5jax.errors import TrainingError as TrainingError  # its home is t5jax.errors
from t5jax.train_config import TrainConfig

# --- configuration ---------------------------------------------------------------------------


def model_config_from(config: TrainConfig, tokenizer) -> T5Config:
  """The T5Config of a run: `init_from`'s architecture, else `config.model` (preset + fields)."""
  fields = dict(config.model)
  preset = fields.pop("preset", "")
  dtype = fields.get("dtype", "float32")
  if config.init_from:
    cfg = T5Config.from_hf_dict(
      hf.read_hf_config(config.init_from),
      has_lm_head=None,
    )
    return cfg.replace(
      dtype=dtype, dropout_rate=float(fields.get("dropout_rate", cfg.dropout_rate))
    )
  try:
    base = get_config(preset).to_dict() if preset else {}
    base.update(fields)
    if not base.get("vocab_size"):
      # 0 = the tokenizer's size, rounded up to a multiple of 128 as T5 does.
      base["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    return T5Config.from_dict(base)
  except ValueError as e:  # an unknown preset, dtype or an inconsistent architecture
    raise ConfigError(str(e)) from e


def _check_compatible(saved: T5Config, now: T5Config, workdir: str) -> None:
  diffs = [
    f"{k}: saved {v!r}, now {now.to_dict()[k]!r}"
    for k, v in saved.to_dict().items()
    if k not in ("dropout_rate", "dtype") and now.to_dict()[k] != v
  ]
  if diffs:
    raise TrainingError(
      f"{workdir}: cannot resume with an incompatible model config ({'; '.join(diffs)}); "
      "use a new --workdir or the saved config"
    )


def _gather_json(obj: Any) -> dict[str, Any]:
  """Every process's JSON-able `obj`, keyed by process index (for data iterator states)."""
  if jax.process_count() == 1:
    return {"0": obj}
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size]))))
  padded = np.zeros(n, np.uint8)
  padded[: raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return {str(i): json.loads(bytes(row).rstrip(b"\0").decode()) for i, row in enumerate(everything)}


# --- evaluation ------------------------------------------------------------------------------


def evaluate(config, model_cfg, state, eval_data, eval_step, tokenizer, mesh) -> dict[str, float]:
  """Loss and token accuracy over the eval set; exact match, BLEU and chrF on a sample."""
  totals: dict[str, float] = {}
  for batch in eval_data.batches():
    sums = eval_step(state.params, sharding.shard_batch(batch, mesh))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  out = {
    "loss": totals["loss_sum"] / max(totals["num_tokens"], 1.0),
    "accuracy": totals["num_correct"] / max(totals["num_tokens"], 1.0),
  }
  n = min(int(config.eval_generate_examples), len(eval_data.examples))
  if n and jax.process_count() == 1:
    out.update(generation_metrics(config, model_cfg, state.params, eval_data, tokenizer, n))
  return out


def generation_metrics(config, model_cfg, params, eval_data, tokenizer, n) -> dict[str, float]:
  import sacrebleu

  from t5jax.generate import generate

  preds, refs = [], []
  bs, s_len = int(config.eval_batch_size), config.data.max_input_length
  for start in range(0, n, bs):
    chunk = eval_data.tokenized[start : min(start + bs, n)]
    inputs = np.zeros((bs, s_len), np.int32)
    for i, ex in enumerate(chunk):
      inputs[i, : len(ex["inputs"])] = ex["inputs"]
    out = generate(
      params, model_cfg, jnp.asarray(inputs), max_new_tokens=config.data.max_target_length
    )
    seqs = np.asarray(out.sequences)
    preds += [tokenizer.decode(seqs[i].tolist()) for i in range(len(chunk))]
    refs += [t for _, t in eval_data.examples[start : start + len(chunk)]]
  exact = float(np.mean([p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)]))
  return {
    "exact_match": exact,
    "bleu": sacrebleu.corpus_bleu(preds, [refs]).score,
    "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
  }


# --- export ----------------------------------------------------------------------------------


def export(workdir: str, model_cfg: T5Config, params) -> None:
  """Writes `export/params.safetensors` (parameters alone) and `export/hf/` (HuggingFace)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  if jax.process_index() != 0:
    return
  out = os.path.join(workdir, "export")
  os.makedirs(out, exist_ok=True)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  save_file(flat, os.path.join(out, "params.safetensors"))
  hf.save_hf(model_cfg, params, os.path.join(out, "hf"))
  tok = os.path.join(workdir, "tokenizer")
  for name in os.listdir(tok) if os.path.isdir(tok) else []:
    with open(os.path.join(tok, name), "rb") as src:
      dst = "spiece.model" if name.endswith(".model") else name
      with open(os.path.join(out, "hf", dst), "wb") as fh:
        fh.write(src.read())


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


def _agreed_stop(signal_number: int | None, step: int, every: int) -> int | None:
  """The signal to stop on at this step, the same on every process.

  One process alone may receive SIGTERM; if it saved and left while the others ran on, the next
  collective would hang. With several processes the flags are compared every `every` steps (a
  small all-gather), and all stop together at the first such step after any was signalled.
  """
  if jax.process_count() == 1:
    return signal_number
  if step % every:
    return None
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array([signal_number or 0], np.int32))
  return int(np.max(flags)) or None


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


def train_and_evaluate(
  config: ml_collections.ConfigDict | TrainConfig, workdir: str
) -> dict[str, Any]:
  """Runs (or resumes) training as `config` says; returns the last train and eval metrics."""
  if not isinstance(config, TrainConfig):
    config = train_config.from_config_dict(config)
  config.check_processes(jax.process_count())
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  main = jax.process_index() == 0
  seed = int(config.seed)

  # Everything is checked before the workdir is written to, so a failed start changes nothing
  # there (a trained tokenizer is saved only once the run can go ahead).
  tok_dir = os.path.join(workdir, "tokenizer")
  tok_saved = os.path.isdir(tok_dir) and bool(os.listdir(tok_dir))
  tokenizer = data.build_tokenizer(config.data, workdir if tok_saved else None, seed)
  model_cfg = model_config_from(config, tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise TrainingError(
      f"tokenizer has {tokenizer.vocab_size} ids but config.model.vocab_size is "
      f"{model_cfg.vocab_size}; raise --config.model.vocab_size or use a smaller tokenizer"
    )
  saved_cfg_path = os.path.join(workdir, "model_config.json")
  if os.path.exists(saved_cfg_path):
    _check_compatible(checkpoint.load_model_config(workdir), model_cfg, workdir)

  mesh = sharding.create_mesh(config.mesh)
  schedule = optim.make_schedule(config.optimizer)
  tx = optim.make_optimizer(config.optimizer, schedule)
  state_sh = trainer.state_shardings(model_cfg, tx, mesh)
  global_bs = int(config.batch_size)
  datasets = data.make_datasets(
    config.data,
    tokenizer,
    batch_size=global_bs // jax.process_count(),
    seed=seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  ckpt = checkpoint.CheckpointManager(
    workdir,
    keep=int(config.keep_checkpoints),
    best_metric=config.best_metric,
    best_mode=config.best_mode,
    async_save=bool(config.async_checkpoints),
  )
  last_saved = ckpt.latest_step()
  if last_saved is not None:
    abstract = trainer.abstract_state(model_cfg, tx, state_sh)
    try:
      state, data_states = ckpt.restore(abstract, last_saved)
    except (ValueError, KeyError, TypeError) as e:  # e.g. another optimizer's state
      ckpt.close()
      raise TrainingError(
        f"{workdir}: cannot restore checkpoint {last_saved} into this config's train state "
        f"(was it saved with another optimizer? {type(e).__name__}: "
        f"{str(e).splitlines()[0][:300].rstrip(':')}); use the saved config or a new --workdir"
      ) from e
    key = str(jax.process_index())
    if key not in data_states or len(data_states) != jax.process_count():
      raise TrainingError(
        f"{workdir}: checkpoint {last_saved} holds data positions of {len(data_states)} "
        f"processes; this run has {jax.process_count()}"
      )
    datasets.train.set_state(data_states[key])
  elif config.init_from:
    _, params = hf.load_hf(config.init_from, config=model_cfg)
    state = trainer.state_from_params(params, tx, state_sh)
  else:
    state = trainer.init_state_sharded(model_cfg, tx, mesh, jax.random.PRNGKey(seed), state_sh)
  if main:  # the run can go ahead: record what it is
    if not tok_saved:
      tokenizer.save(tok_dir)
    checkpoint.save_json(saved_cfg_path, model_cfg.to_dict())
    # Not "config.json": decode.py takes a folder holding one for a HuggingFace model.
    checkpoint.save_json(os.path.join(workdir, "train_config.json"), config.to_dict())

  loss_cfg = config.loss
  step_fn = trainer.make_train_step(
    model_cfg, tx, schedule, loss_cfg, num_microbatches=int(config.num_microbatches)
  )
  train_step = trainer.jit_train_step(step_fn, state_sh, mesh)
  eval_step = trainer.jit_eval_step(
    trainer.make_eval_step(model_cfg, loss_cfg), state_sh.params, mesh
  )
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)

  writer = metrics_lib.MetricWriter(workdir, main, resume_step=int(jax.device_get(state.step)))
  stop = _StopFlag()
  stop.install()
  total = int(config.num_train_steps)
  step = int(jax.device_get(state.step))
  pbar = None
  if main and config.progress_bar:
    from tqdm import tqdm

    pbar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
  tokens_per_step = global_bs * (config.data.max_input_length + config.data.max_target_length)
  window: list[dict[str, float]] = []
  last_train, last_eval = {}, {}
  t_window = time.perf_counter()
  pending = None

  def consume(item):
    nonlocal t_window, last_train
    s, m = item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    _check_finite(s, m, last_saved, workdir)
    window.append(m)
    if s % int(config.log_every) == 0 or s == total:
      dt = time.perf_counter() - t_window
      avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
      avg["tokens_per_sec"] = tokens_per_step * len(window) / max(dt, 1e-9)
      avg["steps_per_sec"] = len(window) / max(dt, 1e-9)
      writer.write(s, "train", avg)
      last_train = avg
      if pbar is not None:
        pbar.set_postfix(
          loss=f"{avg['loss']:.3f}", lr=f"{avg['learning_rate']:.2e}",
          tok_s=f"{avg['tokens_per_sec']:.0f}",
        )  # fmt: skip
      window.clear()
      t_window = time.perf_counter()

  try:
    # Under the mesh, the model's activation constraints (t5jax.sharding) take effect.
    with jax.set_mesh(mesh):
      while step < total:
        batch = sharding.shard_batch(next(datasets.train), mesh)
        state, metrics = train_step(state, batch, dropout_rng)
        step += 1
        if pending is not None:
          consume(pending)
        pending = (step, metrics)
        if pbar is not None:
          pbar.update(1)
        do_eval = datasets.eval is not None and (
          step % int(config.eval_every) == 0 or step == total
        )
        if do_eval:
          consume(pending)  # a non-finite loss stops here, before anything is evaluated or saved
          pending = None
          last_eval = evaluate(config, model_cfg, state, datasets.eval, eval_step, tokenizer, mesh)
          writer.write(step, "eval", last_eval)
          if pbar is not None:
            pbar.write(
              f"step {step}: eval " + " ".join(f"{k}={v:.4g}" for k, v in last_eval.items())
            )
          if config.best_metric:
            ckpt.save_best(step, state, _gather_json(datasets.train.get_state()), last_eval)
        # Read once, after the evaluation: a signal that arrives during it (or from here on) still
        # gets its save, now or after the next step.
        signalled = _agreed_stop(stop.signal, step, int(config.log_every))
        if step % int(config.checkpoint_every) == 0 or step == total or signalled:
          if pending is not None:
            consume(pending)
            pending = None
          ckpt.save(step, state, _gather_json(datasets.train.get_state()), force=True)
          last_saved = step
        if signalled:
          if pbar is not None:
            pbar.write(f"signal {signalled}: saved step {step}; exiting")
          break
      if pending is not None:
        consume(pending)
      ckpt.wait()
      if step >= total:
        export(workdir, model_cfg, state.params)
  finally:
    stop.restore()
    if pbar is not None:
      pbar.close()
    ckpt.close()
    writer.close()
  return {"train": last_train, "eval": last_eval, "step": step}
