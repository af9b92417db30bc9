"""HuggingFace checkpoint import and export.

`load_hf(path)` reads a HuggingFace model folder (`config.json` plus `model.safetensors`, or
sharded safetensors with their index) without torch. `pytorch_model.bin` files are pickles: they
load only with `allow_pickle=True`, through torch's `weights_only=True` loader. `save_hf` writes a
folder that `transformers.AutoModelForSeq2SeqLM.from_pretrained` loads with the same logits.

Every tensor is checked: a missing, unexpected or mis-shaped tensor stops the load with an error
that names it; there is no silent partial load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from t5jax.config import T5Config
from t5jax.errors import CheckpointError as CheckpointError  # its home is t5jax.errors
from t5jax.model import convert_params
from t5jax.workdir import atomic_open, atomic_write

# Tensors HuggingFace checkpoints may carry that the model does not use: copies of `shared`, and
# a cross-attention bias table some original T5 1.0 exports include but nothing reads.
_IGNORED = (
  "encoder.embed_tokens.weight",
  "decoder.embed_tokens.weight",
  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
}


# --- the key map -----------------------------------------------------------------------------

# (hf_key, our_path, to_ours, to_hf, our_shape)
Entry = tuple[str, tuple[str, ...], Callable, Callable, tuple[int, ...]]


def _linear_in(d_in: int, h: int, k: int):
  """torch `(H*K, D)` <-> our `(D, H, K)`."""
  return (lambda w: w.T.reshape(d_in, h, k), lambda w: w.reshape(d_in, h * k).T)


def _linear_out(h: int, k: int, d: int):
  """torch `(D, H*K)` <-> our `(H, K, D)`."""
  return (lambda w: w.T.reshape(h, k, d), lambda w: w.reshape(h * k, d).T)


def _transpose():
  return (lambda w: w.T, lambda w: w.T)


def _same():
  return (lambda w: w, lambda w: w)


def key_map(config: T5Config) -> list[Entry]:
  """Every tensor of a HuggingFace T5 checkpoint and where it lives in our params."""
  d, h, k, f, v = config.d_model, config.num_heads, config.d_kv, config.d_ff, config.vocab_size
  nb = config.relative_attention_num_buckets
  entries: list[Entry] = [("shared.weight", ("shared",), *_same(), (v, d))]
  if not config.tie_word_embeddings:
    entries.append(("lm_head.weight", ("lm_head",), *_transpose(), (d, v)))

  def attention(hf: str, ours: tuple[str, ...]):
    for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
      entries.append((f"{hf}.{proj}.weight", ours + (name,), *_linear_in(d, h, k), (d, h, k)))
    entries.append((f"{hf}.o.weight", ours + ("out",), *_linear_out(h, k, d), (h, k, d)))

  def norm(hf: str, ours: tuple[str, ...]):
    entries.append((f"{hf}.weight", ours + ("scale",), *_same(), (d,)))

  def mlp(hf: str, ours: tuple[str, ...]):
    ins = ("wi_0", "wi_1") if config.is_gated else ("wi",)
    for name in ins:
      entries.append((f"{hf}.{name}.weight", ours + (name,), *_transpose(), (d, f)))
    entries.append((f"{hf}.wo.weight", ours + ("wo",), *_transpose(), (f, d)))

  def relpos(hf_block: str, ours: tuple[str, ...]):
    entries.append(
      (
        f"{hf_block}.layer.0.SelfAttention.relative_attention_bias.weight",
        ours + ("relpos_bias", "rel_embedding"),
        *_same(),
        (nb, h),
      )
    )

  for stack, n_layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    if not config.per_layer_position_bias:
      relpos(f"{stack}.block.0", (stack,))
    for i in range(n_layers):
      blk, ours = f"{stack}.block.{i}", (stack, f"layers_{i}")
      if config.per_layer_position_bias:
        relpos(blk, ours)
      if stack == "encoder":
        attention(f"{blk}.layer.0.SelfAttention", ours + ("attention",))
        norm(f"{blk}.layer.0.layer_norm", ours + ("pre_attention_layer_norm",))
        mlp(f"{blk}.layer.1.DenseReluDense", ours + ("mlp",))
        norm(f"{blk}.layer.1.layer_norm", ours + ("pre_mlp_layer_norm",))
      else:
        attention(f"{blk}.layer.0.SelfAttention", ours + ("self_attention",))
        norm(f"{blk}.layer.0.layer_norm", ours + ("pre_self_attention_layer_norm",))
        attention(f"{blk}.layer.1.EncDecAttention", ours + ("encoder_decoder_attention",))
        norm(f"{blk}.layer.1.layer_norm", ours + ("pre_cross_attention_layer_norm",))
        mlp(f"{blk}.layer.2.DenseReluDense", ours + ("mlp",))
        norm(f"{blk}.layer.2.layer_norm", ours + ("pre_mlp_layer_norm",))
    norm(f"{stack}.final_layer_norm", (stack, f"{stack}_norm"))
  return entries


# --- reading tensors -------------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file into numpy (bf16 via ml_dtypes), memory-mapped."""
  header, n = _safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = _check_tensor_entry(path, name, info, data.size)
    arr = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    out[name] = arr
  return out


def _safetensors_header(path: str) -> tuple[dict[str, Any], int]:
  """The JSON header of a safetensors file and its length, checked against the file's size."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      (n,) = struct.unpack("<Q", fh.read(8))
      if n > size - 8:
        raise ValueError(f"header length {n} exceeds the file's {size} bytes")
      header = json.loads(fh.read(n))
  except (OSError, ValueError, struct.error) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: not a readable safetensors file (header is not an object)")
  return header, n


def _check_tensor_entry(path: str, name: str, info: Any, data_size: int) -> tuple[int, int]:
  """A header entry's byte range, after checking its dtype, shape and offsets fit the file."""

  def bad(why: str):
    return CheckpointError(f"{path}: tensor {name}: {why}")

  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise bad("header entry lacks dtype, shape or data_offsets")
  if info["dtype"] not in _ST_DTYPES:
    raise bad(f"unsupported dtype {info['dtype']}")
  shape, offsets = info["shape"], info["data_offsets"]
  ints = (list, tuple)
  if not isinstance(shape, ints) or not all(isinstance(d, int) and d >= 0 for d in shape):
    raise bad(f"bad shape {shape!r}")
  if not (
    isinstance(offsets, ints) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
  ):
    raise bad(f"bad data_offsets {offsets!r}")
  start, end = offsets
  nbytes = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
  if not 0 <= start <= end <= data_size or end - start != nbytes:
    raise bad(f"data_offsets {offsets} do not fit shape {shape} in {data_size} data bytes")
  return start, end


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  import torch  # only for opted-in pickle checkpoints

  sd = torch.load(path, map_location="cpu", weights_only=True)
  return {k: t.detach().to(torch.float32).numpy() for k, t in sd.items()}


_WEIGHT_NAMES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "pytorch_model.bin",
  "pytorch_model.bin.index.json",
)


def has_weights(folder: str) -> bool:
  """True when `folder` holds one of the weight files `load_hf` reads."""
  return any(os.path.exists(os.path.join(folder, n)) for n in _WEIGHT_NAMES)


def _weight_files(folder: str, allow_pickle: bool) -> Iterator[tuple[str, Callable]]:
  def p(name):
    return os.path.join(folder, name)

  if os.path.exists(p("model.safetensors")):
    yield p("model.safetensors"), read_safetensors
    return
  for index, reader in (
    ("model.safetensors.index.json", read_safetensors),
    ("pytorch_model.bin.index.json", _read_pickle),
  ):
    if os.path.exists(p(index)):
      if reader is _read_pickle and not allow_pickle:
        break
      with open(p(index)) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
      for name in files:
        yield p(name), reader
      return
  if os.path.exists(p("pytorch_model.bin")) or os.path.exists(p("pytorch_model.bin.index.json")):
    if not allow_pickle:
      raise CheckpointError(
        f"{folder}: only pytorch_model.bin (a pickle) found; pass allow_pickle=True to load it "
        "with torch's weights_only=True loader, or convert it to safetensors"
      )
    yield p("pytorch_model.bin"), _read_pickle
    return
  raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def has_lm_head(folder: str) -> bool | None:
  """Whether `folder`'s safetensors weights hold `lm_head.weight`, from their headers alone
  (None: no safetensors weights). transformers 5.x writes `tie_word_embeddings: true` into every
  config.json, so the weights decide tying."""
  try:
    files = [f for f, reader in _weight_files(folder, False) if reader is read_safetensors]
  except CheckpointError:
    return None
  if not files or not all(os.path.isfile(f) for f in files):
    return None
  return any("lm_head.weight" in _safetensors_header(f)[0] for f in files)


def read_hf_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: no config.json (is this a HuggingFace model folder?)")
  try:
    with open(path) as fh:
      hf_cfg = json.load(fh)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable config ({e})") from e
  _check_hf_config(path, hf_cfg)
  return hf_cfg


# Sizes a config.json may give; token ids are int32, so the vocabulary is bounded by that.
_SIZE_LIMITS = {
  "vocab_size": 2**31 - 1,
  "d_model": 2**20,
  "d_kv": 2**16,
  "d_ff": 2**22,
  "num_heads": 2**12,
  "num_layers": 2**12,
  "num_decoder_layers": 2**12,
  "relative_attention_num_buckets": 2**16,
}


def _check_hf_config(path: str, hf_cfg: Any) -> None:
  """A config.json must be an object whose sizes are positive integers within `_SIZE_LIMITS`."""
  if not isinstance(hf_cfg, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got a {type(hf_cfg).__name__}")
  for key, limit in _SIZE_LIMITS.items():
    v = hf_cfg.get(key)
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or not 1 <= v:
      raise CheckpointError(f"{path}: {key} must be a positive integer, got {v!r}")
    if v > limit:
      raise CheckpointError(f"{path}: {key} {int(v)} exceeds the limit {limit}")


# --- public API ------------------------------------------------------------------------------


def load_hf(
  path: str,
  *,
  allow_pickle: bool = False,
  config: T5Config | None = None,
  scan_layers: bool | None = None,
) -> tuple[T5Config, dict[str, Any]]:
  """Loads a HuggingFace T5 / mT5 / UMT5 / ByT5 folder.

  Args:
    path: folder with `config.json` and weights.
    allow_pickle: permit `pytorch_model.bin` (loaded with `torch.load(weights_only=True)`).
    config: overrides the architecture read from `config.json` (e.g. to set `dtype`).
    scan_layers: sets `config.scan_layers` (parameters stacked over layers); None keeps the
      config's (False for a config.json).

  Returns:
    `(config, params)`, params as float32 numpy arrays in the layout of `t5jax.init_params`
    (per layer, or stacked over layers with `config.scan_layers`).

  Raises:
    CheckpointError / ValueError: unsupported architecture, or missing, unexpected or
      mis-shaped tensors (all named).
  """
  hf_cfg = read_hf_config(path)
  tensors: dict[str, np.ndarray] = {}
  for file, reader in _weight_files(path, allow_pickle):
    if not os.path.isfile(file):
      raise CheckpointError(f"{path}: weight file {os.path.basename(file)} listed but missing")
    tensors.update(reader(file))
  if config is None:
    has_head = "lm_head.weight" in tensors
    try:
      config = T5Config.from_hf_dict(hf_cfg, has_lm_head=has_head)
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointError(f"{path}: config.json does not describe a T5 ({e})") from e
  if scan_layers is not None:
    config = config.replace(scan_layers=scan_layers)
  entries = key_map(config)
  expected = {e[0] for e in entries}
  missing = sorted(expected - tensors.keys())
  unexpected = sorted(set(tensors) - expected - set(_IGNORED))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors {_short(missing)}")
    if unexpected:
      parts.append(f"unexpected tensors {_short(unexpected)}")
    raise CheckpointError(f"{path}: " + "; ".join(parts))
  params: dict[str, Any] = {}
  bad = []
  for hf_key, ours, to_ours, to_hf, shape in entries:
    want = to_hf(_shaped(shape)).shape
    got = tuple(tensors[hf_key].shape)
    if got != want:
      bad.append(f"{hf_key} (expected {want}, got {got})")
      continue
    w = np.asarray(tensors[hf_key]).astype(np.float32)
    _set(params, ours, np.ascontiguousarray(to_ours(w)))
  if bad:
    raise CheckpointError(f"{path}: mis-shaped tensors {_short(bad)}")
  return config, convert_params(params, config)


def save_hf(config: T5Config, params: dict[str, Any], path: str, *, dtype: str = "float32") -> None:
  """Writes `config.json`, `generation_config.json` and `model.safetensors` to `path`.

  `params` may be in either layout (per layer or stacked over layers); HuggingFace gets one
  tensor per layer either way.
  """
  from safetensors.numpy import save

  os.makedirs(path, exist_ok=True)
  params = convert_params(params, config.replace(scan_layers=False))
  tensors = {}
  for hf_key, ours, _, to_hf, _ in key_map(config):
    w = np.asarray(_get(params, ours), dtype=np.float32)
    tensors[hf_key] = np.ascontiguousarray(to_hf(w)).astype(np.dtype(dtype))
  with atomic_open(os.path.join(path, "model.safetensors"), "wb") as fh:
    fh.write(save(tensors, metadata={"format": "pt"}))
  hf_cfg = config.to_hf_dict()
  hf_cfg["dtype"] = dtype
  atomic_write(os.path.join(path, "config.json"), json.dumps(hf_cfg, indent=2))
  gen = {
    "decoder_start_token_id": config.decoder_start_token_id,
    "eos_token_id": config.eos_token_id,
    "pad_token_id": config.pad_token_id,
  }
  atomic_write(os.path.join(path, "generation_config.json"), json.dumps(gen, indent=2))


def _shaped(shape: tuple[int, ...]) -> np.ndarray:
  """A read-only array of `shape` that allocates nothing (for the shapes of key_map's maps)."""
  return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))


def _short(names: list[str], n: int = 8) -> str:
  more = f" ... and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def _set(tree: dict, path: tuple[str, ...], value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree
