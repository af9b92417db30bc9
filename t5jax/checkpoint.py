"""Orbax checkpoints of a training run, its export, and loading a workdir for inference.

A workdir holds:
  train_config.json      the run's full configuration (ml_collections, as JSON)
  model_config.json      the `T5Config` of the model
  tokenizer/             the tokenizer (SentencePiece model or the ByT5 marker)
  checkpoints/<step>/    orbax: `state` (step, params, optimizer state, sharded) and `data`
                         (the input pipeline's position, per process)
  checkpoints_best/      optionally, the best checkpoint by an eval metric
  export/hf/             a HuggingFace folder written at the end of training (and on demand)
  metrics.jsonl, events.out.tfevents.*   training and eval metrics

Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
complete, so a kill during a save leaves the previous checkpoint intact and the partial one is
ignored on restore.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from t5jax import distributed, hf, model
from t5jax.config import T5Config


class CheckpointManager:
  """Last-K (and optionally best-by-metric) checkpoints of train state plus data position."""

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    best_metric: str = "",
    best_mode: str = "max",
    async_save: bool = True,
  ):
    workdir = os.path.abspath(workdir)
    # cleanup_tmp_directories: a run killed mid-save leaves a partial tmp folder; drop it on start.
    opts = dict(enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self._last = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts),
    )
    self._best = None
    self.best_metric = best_metric
    if best_metric:
      self._best = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints_best"),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          best_fn=lambda m: m[best_metric],
          best_mode=best_mode,
          **opts,
        ),
      )

  def latest_step(self) -> int | None:
    return self._last.latest_step()

  @staticmethod
  def _args(state, data_state):
    return ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
    )

  def save(self, step: int, state, data_state: dict[str, Any] | None, *, force=False) -> None:
    self._last.save(step, args=self._args(state, data_state), force=force)

  def save_best(self, step: int, state, data_state, metrics: dict[str, float]) -> None:
    if self._best is not None and self.best_metric in metrics:
      self._best.save(step, args=self._args(state, data_state), metrics=metrics, force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Restores `(state, data_state)` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
    step = self._last.latest_step() if step is None else step
    out = self._last.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["data"]

  def restore_data_state(self, step: int | None = None) -> dict[str, Any]:
    """The input pipelines' positions saved with a checkpoint, keyed by process index."""
    step = self._last.latest_step() if step is None else step
    return self._last.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

  def all_steps(self) -> list[int]:
    return list(self._last.all_steps())

  def best_steps(self) -> list[int]:
    return [] if self._best is None else list(self._best.all_steps())

  def wait(self) -> None:
    self._last.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._last.close()
    if self._best is not None:
      self._best.close()


def save_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _model_config(workdir: str) -> str:
  return os.path.join(workdir, "model_config.json")


def load_model_config(workdir: str) -> T5Config:
  path = _model_config(workdir)
  with open(path) as fh:
    return T5Config.from_dict(json.load(fh))


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """Parameters alone (on the first local device) from the latest (or given) checkpoint.

  The abstract tree comes from the checkpoint's own metadata, so no config or optimizer is
  needed, and every array is placed on one device whatever mesh saved it.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  mgr = ocp.CheckpointManager(
    directory,
    item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
  )
  try:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no checkpoint")
    meta = mgr.item_metadata(step)["state"]
    cpu = _cpu_sharding()
    abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
      meta.tree if hasattr(meta, "tree") else meta,
    )
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  finally:
    mgr.close()
  return step, out["state"]["params"]


def _cpu_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_for_inference(
  workdir: str, step: int | None = None, *, scan_layers: bool | None = None
) -> tuple[T5Config, Any, str]:
  """`(config, params, tokenizer_path)` of a t5jax training workdir (see `t5jax.inference.load`).

  Uses checkpoint `step` (default the latest) when there is one, else the exported HuggingFace
  folder. `scan_layers` (None: as trained) returns the parameters per layer or stacked over
  layers whatever the run used (`t5jax.model.convert_params`).
  """
  config, params, tok = _load_for_inference(workdir, step)
  if scan_layers is not None and scan_layers != config.scan_layers:
    config = config.replace(scan_layers=scan_layers)
    params = model.convert_params(params, config)
  return config, params, tok


def _load_for_inference(workdir: str, step: int | None) -> tuple[T5Config, Any, str]:
  tok = os.path.join(workdir, "tokenizer")
  if not os.path.isdir(tok) or not os.listdir(tok):
    raise FileNotFoundError(f"{workdir}: no tokenizer/ folder in this t5jax workdir")
  ckpt = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
    _, params = restore_params(workdir, step)
    return load_model_config(workdir), params, tok
  hf_dir = os.path.join(workdir, "export", "hf")
  if os.path.isfile(os.path.join(hf_dir, "config.json")):
    # The run's own config (dtype, scan_layers, ...) over the folder's architecture.
    config = load_model_config(workdir) if os.path.isfile(_model_config(workdir)) else None
    config, params = hf.load_hf(hf_dir, config=config)
    return config, params, tok
  raise FileNotFoundError(f"{workdir}: no checkpoints/ and no export/hf/ with weights")


def export(workdir: str, model_cfg: T5Config, params) -> None:
  """Writes `export/params.safetensors` (parameters alone) and `export/hf/` (HuggingFace, with
  the workdir's tokenizer). Every process calls it (the parameters are gathered); process 0
  writes."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  if not distributed.is_main_process():
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
