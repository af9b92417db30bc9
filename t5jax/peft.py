"""Parameter-efficient fine-tuning: LoRA adapters and a soft prompt over a frozen T5.

The adapters and the prompt are parameters of the model itself (`T5Config.lora_*`,
`T5Config.prompt_length`; `t5jax.layers.lora_params`): `<W>_lora_a` / `<W>_lora_b` beside each
adapted projection `W`, stacked like the layers under `scan_layers`, and `params["prompt"]`. A
run splits the parameter tree in two (`split`): the trainable leaves (adapters, prompt), which the
train state, the gradients and the optimizer state hold, and the frozen base, which the step reads
as a separate, non-donated argument (`t5jax.trainer.make_train_step`'s `frozen`). `combine`
joins them again for evaluation and decoding.

Export: `merge` folds `W + (alpha / r) A @ B` into plain parameters (then `hf.save_hf`), and
`save_peft` writes the adapters as PEFT's `adapter_config.json` + `adapter_model.safetensors`
(PEFT's key names for transformers' T5), which `peft.PeftModel.from_pretrained` loads onto the
base model. A soft prompt has no transformers form: it stays in the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t5jax import model
from t5jax.config import T5Config
from t5jax.layers import init_std
from t5jax.partitioning import STACKED
from t5jax.workdir import Paths, atomic_open, atomic_write

Params = dict[str, Any]

# The parameters the model reads only in its compute dtype (`.astype(config.dtype)` before use):
# frozen, they can be held in that dtype with the same results (`cast_frozen`).
COMPUTE_DTYPE_WEIGHTS = (
  "query", "key", "value", "out", "wi", "wi_0", "wi_1", "wo", "shared", "lm_head",
)  # fmt: skip


def is_trainable(name: str) -> bool:
  """Whether the parameter called `name` is trained by parameter-efficient fine-tuning."""
  return name == "prompt" or name.endswith(("_lora_a", "_lora_b"))


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def _prune(tree: Params, keep) -> Params:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _prune(v, keep)
      if sub:
        out[k] = sub
    elif keep(k):
      out[k] = v
  return out


def split(params: Params) -> tuple[Params, Params]:
  """`(trainable, frozen)`: the adapters and prompt, and everything else (same nesting)."""
  return _prune(params, is_trainable), _prune(params, lambda k: not is_trainable(k))


def combine(frozen: Params, trainable: Params) -> Params:
  """The whole parameter tree of `split`'s two parts (no array is copied)."""
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def cast_frozen(frozen: Params, config: T5Config) -> Params:
  """The frozen base with the weights the model reads only in `config.dtype` held in it
  (`COMPUTE_DTYPE_WEIGHTS`): exact, and half the bytes in bfloat16. Norm scales and position
  bias tables, read in float32, stay as they are."""

  def cast(path, x):
    if _leaf_name(path) in COMPUTE_DTYPE_WEIGHTS:
      return x.astype(config.dtype) if hasattr(x, "astype") else x
    return x

  return jax.tree_util.tree_map_with_path(cast, frozen)


def trainable_shapes(config: T5Config) -> Params:
  """ShapeDtypeStructs of the adapters and prompt `config` declares."""
  shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
  return split(shapes)[0]


def init_trainable(
  config: T5Config, base: Params, seed: int, *, prompt_init: str = "vocab"
) -> Params:
  """Fresh adapters and prompt for `base` (numpy float32, on the host).

  LoRA: `A` normal with std `fan_in**-0.5` (`t5jax.layers.init_std`), `B` zero, so the adapted
  model starts equal to its base. Prompt: `prompt_init` "vocab" copies the embeddings of
  `prompt_length` token ids drawn from the first 5000 of the vocabulary (as the prompt tuning
  paper samples common tokens); "random" draws uniform in [-0.5, 0.5].
  """
  rng = np.random.default_rng(seed)
  out: Params = {}

  def draw(path, s):
    name = _leaf_name(path)
    if name == "prompt":
      if prompt_init == "vocab":
        ids = rng.integers(0, min(5000, config.vocab_size), size=s.shape[0])
        return np.asarray(base["shared"], np.float32)[np.sort(ids)]
      return rng.uniform(-0.5, 0.5, s.shape).astype(np.float32)
    std = init_std(name, config)
    return (rng.standard_normal(s.shape, np.float32) * std).astype(np.float32)

  out = jax.tree_util.tree_map_with_path(draw, trainable_shapes(config))
  return out


# --- merging and PEFT's format ---------------------------------------------------------------


def _pairs(tree: Params, path=()):
  """`(path of W's module, W's name)` of every adapter pair in `tree`."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _pairs(v, path + (k,))
    elif k.endswith("_lora_a"):
      yield path, k[: -len("_lora_a")]


def _delta(a: np.ndarray, b: np.ndarray, scale: float, stacked: bool) -> np.ndarray:
  """`scale * A @ B` shaped like `W` (`[in..., r] @ [r, out...]`; stacked: layers first)."""
  lead = a.shape[:1] if stacked else ()
  r = a.shape[-1]
  d = np.matmul(a.reshape(lead + (-1, r)), b.reshape(lead + (r, -1))) * np.float32(scale)
  return d.reshape(a.shape[:-1] + b.shape[1 + len(lead) :])


def merge(params: Params, config: T5Config) -> tuple[T5Config, Params]:
  """`(base config, params)` with every adapter folded into its weight (`W + scale * A @ B`),
  float32 numpy on the host, either layer layout. A soft prompt cannot be folded in: ValueError."""
  if config.prompt_length:
    raise ValueError("a soft prompt cannot be merged into the weights (no transformers form)")
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  trainable, out = split(params)
  for path, name in _pairs(trainable):
    node, sub = out, trainable
    for k in path:
      node, sub = node[k], sub[k]
    a, b = sub[f"{name}_lora_a"], sub[f"{name}_lora_b"]
    node[name] = node[name] + _delta(a, b, config.lora_scale, STACKED in path)
  return config.without_peft(), out


def _hf_modules(config: T5Config) -> dict[tuple[str, ...], str]:
  """Our per-layer weight path -> transformers' module name (`encoder.block.0....q`)."""
  from t5jax import hf

  return {ours: key[: -len(".weight")] for key, ours, *_ in hf.key_map(config.without_peft())}


def peft_tensors(config: T5Config, trainable: Params) -> dict[str, np.ndarray]:
  """The adapters under PEFT's names for transformers' T5: `base_model.model.<module>.lora_A.
  weight` `[r, in]` and `lora_B.weight` `[out, r]` (torch's `Linear` layout)."""
  per_layer = model.convert_params(
    combine(_skeleton(config), jax.tree.map(lambda x: np.asarray(x, np.float32), trainable)),
    config.replace(scan_layers=False),
  )
  trainable = split(per_layer)[0]
  modules = _hf_modules(config)
  out = {}
  for path, name in _pairs(trainable):
    node = trainable
    for k in path:
      node = node[k]
    a, b = node[f"{name}_lora_a"], node[f"{name}_lora_b"]
    r = a.shape[-1]
    module = modules[path + (name,)]
    out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
    out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
  return out


def _skeleton(config: T5Config) -> Params:
  """Empty per-stack layer dicts, so `convert_params` finds the stacks it converts."""
  return {"encoder": {}, "decoder": {}}


def save_peft(config: T5Config, trainable: Params, path: str, *, base_model: str = "") -> None:
  """Writes the LoRA adapters as a PEFT folder: `adapter_config.json` and
  `adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained(t5, path)`."""
  from safetensors.numpy import save

  if not config.lora_rank:
    raise ValueError("the model has no LoRA adapters to save")
  tensors = peft_tensors(config, trainable)
  modules = sorted({k[len("base_model.model.") : -len(".lora_A.weight")] for k in tensors
                    if k.endswith(".lora_A.weight")})  # fmt: skip
  os.makedirs(path, exist_ok=True)
  with atomic_open(os.path.join(path, "adapter_model.safetensors"), "wb") as fh:
    fh.write(save(tensors, metadata={"format": "pt"}))
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "SEQ_2_SEQ_LM",
    "base_model_name_or_path": base_model or None,
    "r": config.lora_rank,
    "lora_alpha": config.lora_alpha,
    "lora_dropout": config.lora_dropout,
    # Every adapted module by its full name: the per-stack choice (encoder / decoder / cross)
    # has no short form among PEFT's suffixes.
    "target_modules": modules,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
  }
  atomic_write(os.path.join(path, "adapter_config.json"), json.dumps(adapter_config, indent=2))


# --- a workdir's base ------------------------------------------------------------------------


def write_pointer(workdir: str, base: str, config: T5Config) -> None:
  """Records in `workdir/peft.json` which base the checkpoints' adapters / prompt belong to."""
  info = {
    "base": os.path.abspath(base),
    "lora_rank": config.lora_rank,
    "lora_targets": list(config.lora_targets),
    "prompt_length": config.prompt_length,
  }
  atomic_write(Paths(workdir).peft_pointer, json.dumps(info, indent=2))


def read_pointer(workdir: str) -> dict[str, Any] | None:
  """`peft.json` of a workdir, or None when the run trained every parameter."""
  path = Paths(workdir).peft_pointer
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as fh:
      info = json.load(fh)
    if not isinstance(info, dict) or not isinstance(info.get("base"), str):
      raise ValueError("expected an object with a 'base' path")
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from e
  return info


def to_device(tree: Params, shardings) -> Params:
  """`tree` placed in `shardings` (a matching tree), as jax arrays."""
  return jax.device_put(jax.tree.map(jnp.asarray, tree), shardings)
