"""Orbax checkpoints of a training run: saving, restoring the newest readable one, and export.

The workdir's layout and file names are `t5jax.workdir.Paths`'s.

Saves are asynchronous; orbax writes each step to a temporary folder and renames it when
complete, so a kill during a save leaves the previous checkpoint intact and the partial one is
ignored on restore. A save that fails (a full disk) is one `CheckpointError` naming the step, the
folder and the newest committed checkpoint; what orbax's threads print about it is held back from
the first save to the last wait (`t5jax.orbax_errors`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save

from t5jax import distributed, hf, orbax_errors, peft
from t5jax.config import T5Config
from t5jax.errors import USER_ERRORS, CheckpointError
from t5jax.workdir import Paths, atomic_copy, atomic_open


def committed_steps(directory: str) -> list[int]:
  """The committed steps in an orbax folder (a save in progress or failed has a tmp suffix)."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


class CheckpointManager:
  """Last-K (and optionally best-by-metric) checkpoints of train state plus data position.

  A failed save raises `CheckpointError` from `save`, `save_best`, `wait` or `close` (whichever
  first sees it: saves are asynchronous); the manager is then closed. From the first save to a
  `wait` that finds every save done, what orbax's threads print is held back
  (`orbax_errors.HoldOrbaxErrors`).
  """

  def __init__(
    self,
    workdir: str,
    *,
    keep: int = 3,
    best_metric: str = "",
    best_mode: str = "max",
    async_save: bool = True,
  ):
    paths = Paths(os.path.abspath(workdir))
    self.directory = paths.checkpoints
    self._in_flight: dict[str, int] = {}  # manager ("last", "best") -> its save not waited for
    self._failed = False
    self._quiet = orbax_errors.HoldOrbaxErrors()
    # cleanup_tmp_directories: a run killed mid-save leaves a partial tmp folder; drop it on start.
    opts = dict(enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self._last = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, **opts),
    )
    self._best = None
    self.best_metric = best_metric
    if best_metric:
      self._best = ocp.CheckpointManager(
        paths.checkpoints_best,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          best_fn=lambda m: m[best_metric],
          best_mode=best_mode,
          **opts,
        ),
      )

  def latest_step(self) -> int | None:
    return self._last.latest_step()

  def reload(self) -> None:
    """Re-reads the steps on disk (after `move_damaged`)."""
    self._last.reload()

  @staticmethod
  def _args(state, data_state):
    return ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})
    )

  def _managers(self) -> dict[str, Any]:
    return {"last": self._last} | ({"best": self._best} if self._best is not None else {})

  @contextlib.contextmanager
  def _saving(self, name: str, step: int | None) -> Iterator[None]:
    """Turns a failure of the save of `step` by manager `name` into one `CheckpointError` (and
    closes orbax)."""
    where = str(self._managers()[name].directory)
    if self._failed:
      raise CheckpointError(f"{where}: a checkpoint save failed earlier; nothing more is saved")
    try:
      yield
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise ValueError or bare Exception
      self._failed = True
      self._quiet.drop, self._quiet.held = True, []  # summed up below
      with contextlib.suppress(Exception):
        self._close_orbax()
      kept = committed_steps(where)
      then = (
        f"the older checkpoints are intact; free space and rerun the same command to resume "
        f"from checkpoint {kept[-1]}"
        if kept
        else "no checkpoint was saved before; free space and rerun the same command"
      )
      reason = orbax_errors.save_failure_reason(e)
      raise CheckpointError(f"cannot save checkpoint {step} in {where}: {reason}; {then}") from e

  def _wait_for(self, name: str) -> None:
    """Waits for manager `name`'s save in flight; its failure is that save's."""
    with self._saving(name, self._in_flight.get(name)):
      self._managers()[name].wait_until_finished()
    self._in_flight.pop(name, None)

  def _save(self, name: str, step: int, state, data_state, **kwargs) -> None:
    self._wait_for(name)  # a failure of the previous save is reported as its own
    self._quiet.install()
    self._in_flight[name] = step
    with self._saving(name, step):
      self._managers()[name].save(step, args=self._args(state, data_state), **kwargs)

  def save(self, step: int, state, data_state: dict[str, Any] | None, *, force=False) -> None:
    self._save("last", step, state, data_state, force=force)

  def save_best(self, step: int, state, data_state, metrics: dict[str, float]) -> None:
    if self._best is not None and self.best_metric in metrics:
      self._save("best", step, state, data_state, metrics=metrics, force=True)

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
    """Waits for the saves in flight; raises `CheckpointError` if one failed, else shows what
    orbax printed meanwhile (nothing, normally)."""
    for name in self._managers():
      self._wait_for(name)
    self._quiet.remove()

  def _close_orbax(self) -> None:
    for manager in self._managers().values():
      manager.close()

  def close(self) -> None:
    """Waits for the saves in flight (raising `CheckpointError` if one failed) and closes."""
    if self._failed:
      return
    self.wait()
    self._close_orbax()


def short_error(e: BaseException) -> str:
  """`Type: first line` of an exception, without TensorStore's appended spec dump."""
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text.split(' See full TensorStore details')[0][:200]}"


def readable(workdir: str, step: int) -> bool:
  """True when checkpoint `step`'s whole state restores into its own saved structure (on one
  device): a restore into a run's state that fails on a readable checkpoint is a config
  mismatch, not damage."""
  mgr = _reader(Paths(os.path.abspath(workdir)).checkpoints)
  try:
    with orbax_errors.dropping_failed_reads() as reads:
      try:
        _restore_state_at(mgr, step)
        return True
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception on bad files
        reads.failure(e)
        return False
  finally:
    mgr.close()


def move_damaged(workdir: str, steps: list[int]) -> str:
  """Moves unreadable checkpoints out of orbax's sight, into `checkpoints_damaged/<step>` (a later
  save of the same step would otherwise collide with them); nothing is deleted. Process 0 moves;
  every process waits for it. Returns the folder."""
  paths = Paths(workdir)
  dest = paths.checkpoints_damaged
  if distributed.is_main_process():
    os.makedirs(dest, exist_ok=True)
    for step in steps:
      target, n = os.path.join(dest, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(dest, f"{step}.{n}"), n + 1
      shutil.move(os.path.join(paths.checkpoints, str(step)), target)
  distributed.barrier("t5jax: damaged checkpoints moved")
  return dest


def save_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON atomically (`t5jax.workdir.atomic_open`)."""
  with atomic_open(path, "w") as fh:
    json.dump(obj, fh, indent=2, sort_keys=True)


def load_model_config(workdir: str) -> T5Config:
  path = Paths(workdir).model_config
  try:
    with open(path) as fh:
      d = json.load(fh)
    if not isinstance(d, dict):
      raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    return T5Config.from_dict(d)
  except (OSError, ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: unreadable model config ({e})") from e


def restore_newest(
  steps: list[int],
  restore: Callable[[int], Any],
  *,
  mismatch: Callable[[int, Exception], bool] | None = None,
) -> tuple[int | None, Any, list[tuple[int, BaseException]]]:
  """`(step, restore(step), skipped)` for the newest of `steps` that restores.

  Steps are tried newest first; one whose restore raises is skipped and kept in `skipped` as
  `(step, reason)`, the reason without its traceback (a t5jax error's cause where it has one);
  `step` is None when every one failed. `mismatch(step, error)` True means the checkpoint is not
  damaged but does not fit what the caller restores into (another optimizer): that error is
  raised at once. Meanwhile orbax's reports of the abandoned reads are dropped
  (`orbax_errors.dropping_failed_reads`). The one loop over damaged checkpoints: training's
  resume and `restore_params` both use it.
  """
  skipped: list[tuple[int, BaseException]] = []
  with orbax_errors.dropping_failed_reads() as reads:
    for step in sorted(steps, reverse=True):
      try:
        return step, restore(step), skipped
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise bare Exception on bad files
        if mismatch is not None and mismatch(step, e):
          raise
        wrapped = isinstance(e, USER_ERRORS) and e.__cause__ is not None
        skipped.append((step, reads.failure(e.__cause__ if wrapped else e)))
  return None, None, skipped


def restore_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """Parameters alone (on the first local device) from the latest (or given) checkpoint.

  The abstract tree comes from the checkpoint's own metadata, so no config or optimizer is
  needed, and every array is placed on one device whatever mesh saved it. Without `step`, an
  unreadable newest checkpoint is skipped with a warning naming it (the next newest is tried).
  """
  directory = Paths(os.path.abspath(workdir)).checkpoints
  mgr = _reader(directory)
  try:
    steps = list(mgr.all_steps()) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"{directory}: no checkpoint")
    found, params, skipped = restore_newest(steps, lambda s: _restore_state_at(mgr, s)["params"])
    failures = [f"{s} ({short_error(e)})" for s, e in skipped]
    if found is None:
      raise CheckpointError(f"{directory}: no readable checkpoint: {'; '.join(failures)}")
    if skipped:
      print(
        f"warning: {directory}: skipped unreadable checkpoint {', '.join(failures)}; "
        f"using checkpoint {found}",
        file=sys.stderr,
      )
    return found, params
  finally:
    mgr.close()


def _reader(directory: str):
  return ocp.CheckpointManager(
    directory,
    item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
  )


def _restore_state_at(mgr, step: int):
  meta = mgr.item_metadata(step)["state"]
  if meta is None:
    raise FileNotFoundError(f"checkpoint {step} has no readable state metadata")
  cpu = _cpu_sharding()
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
    meta.tree if hasattr(meta, "tree") else meta,
  )
  out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return out["state"]


def _cpu_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def export_files(workdir: str, model_cfg: T5Config) -> list[str]:
  """The files `export` writes for `model_cfg` (all present: the export is complete)."""
  paths = Paths(workdir)
  files = [paths.export_params]
  if not model_cfg.prompt_length:
    files.append(os.path.join(paths.export_hf, "config.json"))
  if model_cfg.lora_rank:
    files.append(os.path.join(paths.export_peft, "adapter_config.json"))
  return files


def export(workdir: str, model_cfg: T5Config, params, *, peft_base: str = "") -> None:
  """Writes `export/params.safetensors` (parameters alone) and `export/hf/` (HuggingFace, with
  the workdir's tokenizer). Every process calls it (the parameters are gathered); process 0
  writes.

  With `peft_base` (the HuggingFace folder of a PEFT run's frozen base), `params` are the
  trained adapters / prompt: `params.safetensors` holds those, `export/peft/` the LoRA adapters
  in PEFT's format and `export/hf/` the base with the adapters merged in (no `hf/` for a soft
  prompt, which transformers' T5 has no place for)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  if not distributed.is_main_process():
    return
  paths = Paths(workdir)
  os.makedirs(paths.export, exist_ok=True)
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  with atomic_open(paths.export_params, "wb") as fh:
    fh.write(save(flat))
  hf_cfg = model_cfg
  if peft_base:
    if model_cfg.lora_rank:
      peft.save_peft(model_cfg, params, paths.export_peft, base_model=peft_base)
    if model_cfg.prompt_length:
      return
    base = hf.load_hf(peft_base, config=model_cfg)[1]
    hf_cfg, params = peft.merge(peft.combine(base, params), model_cfg)
  hf.save_hf(hf_cfg, params, paths.export_hf)
  tok = paths.tokenizer
  for name in os.listdir(tok) if os.path.isdir(tok) else []:
    dst = "spiece.model" if name.endswith(".model") else name
    atomic_copy(os.path.join(tok, name), os.path.join(paths.export_hf, dst))
