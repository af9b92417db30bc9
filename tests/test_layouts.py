"""XLA:CPU's optimized programs move no large array between layouts where the model can avoid it.

- The decoding loop reads its caches and weights in place: no cache- or weight-sized transpose
  inside the `while` body (the caches are stored in the axis orders the attention's dots read,
  `t5jax.layers.kv_axes`). Stored `[., S, H, K]`, every step copied every layer's cross-attention
  keys and values and the self-attention cache.
- The feed-forward block's backward pass reads its cotangents in place: no transpose at all
  (`t5jax.layers.dense` flattens the tokens; contracting `[B, T]` as two axes, every weight
  gradient transposed its `[B, T, F]` cotangent first).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import t5jax
from t5jax import layers, model

# Heads 3 x 8 over d_model 24, 2 examples of 10 tokens, 8 new tokens: a cross-attention leaf has
# 2*3*10*8 = 480 elements, a self-attention leaf 2*3*8*8 = 384 (x3 with beams), a projection
# weight 576; the largest other array in the loop, beam search's [2, 3*56] scores, has 336.
CFG = t5jax.T5Config(
  vocab_size=56, d_model=24, d_kv=8, d_ff=40, num_heads=3, num_layers=1, num_decoder_layers=2,
  feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False,
  dropout_rate=0.0,
)  # fmt: skip
ENC = jnp.asarray([[5, 9, 13, 4, 6, 2, 1, 0, 0, 0], [7, 3, 22, 31, 8, 9, 10, 11, 12, 1]], jnp.int32)
NEW = 8
MIN_ELEMENTS = 2 * 3 * NEW * 8

_HEADER = re.compile(r"^%?([\w.\-]+) \(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\][^ ]* (\w[\w\-]*)\((.*)$")


def _computations(text: str) -> dict[str, list[str]]:
  comps, cur = {}, None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m and line.rstrip().endswith("{"):
      cur = comps.setdefault(m.group(1), [])
    elif cur is not None:
      cur.append(line)
  return comps


def _size(dims: str) -> int:
  size = 1
  for d in filter(None, dims.split(",")):
    size *= int(d)
  return size


def _closure(comps: dict[str, list[str]], name: str) -> list[str]:
  """`name` and every computation it calls (fusions, nested loops), transitively."""
  todo, seen = [name], []
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.append(c)
      for line in comps[c]:
        todo += re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", line)
  return seen


def _loop_transposes(text: str) -> list[str]:
  """Transposes of at least MIN_ELEMENTS elements in the decoding loop's body (its fusions and
  nested layer scans included; the encoder's and cross cache's layer scans run once, before)."""
  comps = _computations(text)
  bodies = {
    b for lines in comps.values() for line in lines for b in re.findall(r"body=%?([\w.\-]+)", line)
  }
  loops = [
    _closure(comps, b) for b in bodies
    if any("decode_step" in line for c in _closure(comps, b) for line in comps[c])
  ]  # fmt: skip
  assert loops, "no decoding loop in the program"
  found = []
  for name in {c for loop in loops for c in loop}:
    for line in comps[name]:
      m = _INSTR.match(line)
      if m and m.group(3) == "transpose" and _size(m.group(2)) >= MIN_ELEMENTS:
        found.append(line.strip()[:160])
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layouts")
@pytest.mark.parametrize("method", ["greedy", "beam"])
@pytest.mark.parametrize("scan", [False, True])
def test_decoding_loop_transposes_no_cache(method, scan):
  cfg = CFG.replace(scan_layers=scan)
  params = model.init_params(cfg, jax.random.key(0))
  kw = dict(method=method, max_new_tokens=NEW, ignore_eos=True)
  if method == "beam":
    kw["num_beams"] = 3
  fn = jax.jit(lambda p, t: t5jax.generate(p, cfg, t, **kw).sequences)
  text = fn.lower(params, ENC).compile().as_text()
  assert _loop_transposes(text) == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layouts")
@pytest.mark.parametrize("gated", [False, True])
def test_mlp_backward_transposes_nothing(gated):
  cfg = CFG.replace(feed_forward_proj="gated-gelu" if gated else "relu")
  mlp = layers.MLP(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 10, cfg.d_model))
  params = mlp.init(jax.random.key(0), x, True)

  def loss(p, x):
    return jnp.sum(jnp.sin(mlp.apply(p, x, True)))

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  transposes = [line.strip()[:160] for line in text.splitlines() if " transpose(" in line]
  assert transposes == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's layouts")
def test_attention_scores_are_not_transposed():
  # Queries first in both products: the [B, H, T, S] scores come out with the keys last for the
  # softmax and feed the value product as they are (keys first, they were transposed).
  b, t, h, k = 2, 10, 3, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, h, k))
  kv = [jax.random.normal(key, (b, t, h, k)) for key in ks[1:]]
  kv = [
    jnp.transpose(x, ["bshk".index(c) for c in a])
    for x, a in zip(kv, layers.EINSUM_KV_AXES, strict=True)
  ]
  bias = jax.random.normal(jax.random.key(1), (1, h, t, t))
  mask = layers.AttentionMask(key_valid=jnp.arange(t)[None] < jnp.asarray([[t], [6]]), causal=True)

  def attend(q, k, v):
    return layers.attend(q, k, v, bias, mask, axes=layers.EINSUM_KV_AXES)

  text = jax.jit(attend).lower(q, *kv).compile().as_text()
  big = [
    line.strip()[:160]
    for line in text.splitlines()
    if (m := _INSTR.match(line))
    and m.group(3) == "transpose"
    and _size(m.group(2)) >= b * h * t * t
  ]
  assert big == []
