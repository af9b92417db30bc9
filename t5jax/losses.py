"""Training losses: cross-entropy with label smoothing and z-loss, token accuracy.

Everything here is a pure function of float32 logits and integer targets; there are no parameters.
Shapes (name suffixes, as in `t5jax.layers`): B batch, T target length, V vocab.

Conventions follow the T5 / t5x recipe:

* **Label smoothing** `ls`: the soft target puts `1 - ls` on the true token and `ls / (V - 1)` on
  every other token. The entropy of that soft target is subtracted, so the per-token loss is the KL
  divergence from the soft target and its minimum is 0 (not the entropy).
* **z-loss** `z`: adds `z * log(sum(exp(logits)))**2` per token, which keeps the softmax normaliser
  near 1 and stabilises bf16 training. It is part of the returned loss and also reported alone.
* **Normaliser**: the weighted per-token losses are summed and divided by a chosen factor; see
  `loss_normalizer`.

The one-hot soft target is never materialised: with `logp = log_softmax(logits)`,
`-sum(soft * logp) = -(c - l) * logp[target] - l * sum(logp)` where `c = 1 - ls`,
`l = ls / (V - 1)` and `sum(logp) = sum(logits) - V * logsumexp(logits)`.
Plain `jnp` ops, so `jax.grad` is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from t5jax.decoding import argmax

Normalizer = str | float | int


def smoothing_constants(label_smoothing: float, vocab_size: int) -> tuple[float, float, float]:
  """Returns (confidence, low_confidence, normalizing_constant) for label smoothing.

  The normalizing constant is the entropy of the soft target, so that a prediction equal to the
  soft target has loss exactly 0.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  confidence = 1.0 - label_smoothing
  if label_smoothing == 0.0:
    return confidence, 0.0, 0.0
  low = label_smoothing / (vocab_size - 1)
  # x*log(x) -> 0 as x -> 0; the tiny offset keeps log finite for huge vocabularies.
  entropy = -(confidence * math.log(confidence) + (vocab_size - 1) * low * math.log(low + 1e-20))
  return confidence, low, entropy


def cross_entropy_with_logits(
  logits_BTV: jax.Array,
  targets_BT: jax.Array,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Per-token smoothed cross-entropy plus z-loss (unweighted).

  Args:
    logits_BTV: float logits [B, T, V] (cast to float32).
    targets_BT: integer target ids [B, T].
    label_smoothing: mass moved from the true token to the others, in [0, 1).
    z_loss: coefficient of `logsumexp(logits)**2`; 0 disables it.

  Returns:
    `(loss_BT, z_loss_BT)`, both float32 [B, T]. `loss_BT` already includes `z_loss_BT`.
  """
  logits = logits_BTV.astype(jnp.float32)
  vocab_size = logits.shape[-1]
  confidence, low, entropy = smoothing_constants(label_smoothing, vocab_size)

  log_z_BT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), -1)[..., 0]
  target_logp_BT = target_logit_BT - log_z_BT
  loss_BT = -confidence * target_logp_BT
  if low > 0.0:
    # Sum of log-probabilities over the whole vocabulary, minus the target's (counted above).
    sum_logp_BT = jnp.sum(logits, axis=-1) - vocab_size * log_z_BT
    loss_BT = loss_BT - low * (sum_logp_BT - target_logp_BT) - entropy

  z_loss_BT = z_loss * jnp.square(log_z_BT) if z_loss else jnp.zeros_like(log_z_BT)
  return loss_BT + z_loss_BT, z_loss_BT


def parse_normalizer(normalizer: Normalizer) -> tuple[str, float]:
  """The one parser of loss normalisers (`compute_loss` and the train step both use it).

  Args:
    normalizer: one of
      * `"num_tokens"`: the sum of weights (real target tokens); the loss is a mean per token.
      * `"total_tokens"`: `B * T`, counting padding; constant for a fixed batch shape.
      * `"constant:<float>"` or a number: a fixed factor, as in t5x's pretraining (e.g.
        `233472 = 2048 * 114`), so every token has the same gradient weight whatever the padding.
      * `"batch"`: a mean per sequence, then over sequences (`compute_loss` only: it does not
        survive summing microbatches, so the train step rejects it).

  Returns:
    `(kind, constant)`: kind "num_tokens", "total_tokens", "batch" or "constant"; constant is the
    factor for "constant", else 0.

  Raises:
    ValueError: anything else.
  """
  if isinstance(normalizer, int | float) and not isinstance(normalizer, bool):
    return "constant", float(normalizer)
  if normalizer in ("num_tokens", "total_tokens", "batch"):
    return normalizer, 0.0
  if isinstance(normalizer, str) and normalizer.startswith("constant:"):
    try:
      return "constant", float(normalizer.split(":", 1)[1])
    except ValueError:
      pass
  raise ValueError(
    f"unknown loss normalizer {normalizer!r}: use 'num_tokens', 'total_tokens', 'batch', a number "
    "or 'constant:<number>'"
  )


def loss_normalizer(normalizer: Normalizer, weights_BT: jax.Array) -> jax.Array | float:
  """The factor the summed weighted loss is divided by (see `parse_normalizer`; not "batch").

  Args:
    normalizer: see `parse_normalizer`.
    weights_BT: loss weights [B, T].

  Returns:
    A scalar (array or Python float).
  """
  kind, constant = parse_normalizer(normalizer)
  if kind == "num_tokens":
    return jnp.maximum(jnp.sum(weights_BT), 1e-8)
  if kind == "total_tokens":
    return float(weights_BT.size)
  if kind == "constant":
    return constant
  raise ValueError("the 'batch' normalizer is applied by compute_loss, not as one factor")


def compute_loss(
  logits_BTV: jax.Array,
  targets_BT: jax.Array,
  weights_BT: jax.Array | None = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  normalizer: Normalizer = "num_tokens",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar training loss and metrics for one batch.

  Args:
    logits_BTV: float logits [B, T, V].
    targets_BT: integer targets [B, T].
    weights_BT: loss weights [B, T] (0/1, int or float); `None` means `targets != 0` (pad is 0).
    label_smoothing: see `cross_entropy_with_logits`.
    z_loss: see `cross_entropy_with_logits`.
    normalizer: see `parse_normalizer`; `"batch"` averages each sequence's loss over its weighted
      tokens, then averages over sequences with at least one weighted token.

  Returns:
    `(loss, aux)`: the scalar loss to differentiate, and float32 scalars
    * `loss`: the same loss;
    * `z_loss`: the z-loss part of `loss`, normalised the same way;
    * `cross_entropy`: `loss - z_loss`;
    * `accuracy`: weighted fraction of tokens whose argmax equals the target;
    * `loss_sum`, `z_loss_sum`, `num_correct`, `num_tokens`: unnormalised sums, so that a caller
      accumulating microbatches or evaluating over many batches can normalise once at the end.
  """
  if weights_BT is None:
    weights_BT = targets_BT != 0
  weights_BT = weights_BT.astype(jnp.float32)
  loss_BT, z_BT = cross_entropy_with_logits(
    logits_BTV, targets_BT, label_smoothing=label_smoothing, z_loss=z_loss
  )
  loss_sum = jnp.sum(loss_BT * weights_BT)
  z_sum = jnp.sum(z_BT * weights_BT)
  num_tokens = jnp.sum(weights_BT)
  correct_BT = (argmax(logits_BTV) == targets_BT).astype(jnp.float32)
  num_correct = jnp.sum(correct_BT * weights_BT)

  if parse_normalizer(normalizer)[0] == "batch":
    row_weight_B = jnp.sum(weights_BT, axis=-1)
    row_scale_B = jnp.where(row_weight_B > 0, 1.0 / jnp.maximum(row_weight_B, 1e-8), 0.0)
    num_rows = jnp.maximum(jnp.sum(row_weight_B > 0), 1)
    loss = jnp.sum(jnp.sum(loss_BT * weights_BT, -1) * row_scale_B) / num_rows
    z = jnp.sum(jnp.sum(z_BT * weights_BT, -1) * row_scale_B) / num_rows
  else:
    norm = loss_normalizer(normalizer, weights_BT)
    loss = loss_sum / norm
    z = z_sum / norm

  aux = {
    "loss": loss,
    "z_loss": z,
    "cross_entropy": loss - z,
    "accuracy": num_correct / jnp.maximum(num_tokens, 1e-8),
    "loss_sum": loss_sum,
    "z_loss_sum": z_sum,
    "num_correct": num_correct,
    "num_tokens": num_tokens,
  }
  return loss, aux


def blocked_loss_sums(
  hidden_BTD: jax.Array,
  targets_BT: jax.Array,
  weights_BT: jax.Array | None,
  project: Callable[[jax.Array], jax.Array],
  *,
  block_size: int,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> dict[str, jax.Array]:
  """`compute_loss`'s sums without the whole float32 `[B, T, V]` logits: the output projection
  runs inside blocks of `block_size` target positions (each `[B, block_size, V]`).

  A `lax.scan` walks the blocks; each block is `jax.checkpoint`ed, so the backward pass keeps
  only the block's hidden states and recomputes its logits (one more output-layer matmul forward,
  about 2% of a t5-v1_1-base step). `T` need not divide by `block_size` (the tail is padded with
  weight 0). Equal to `compute_loss` on `project(hidden_BTD)` up to float32 summation order.

  Args:
    hidden_BTD: the decoder's final hidden states `[B, T, D]` (`model.forward(...,
      return_hidden=True)`).
    targets_BT: integer targets `[B, T]`.
    weights_BT: loss weights `[B, T]`; None means `targets != 0`.
    project: hidden `[B, t, D]` -> float32 logits `[B, t, V]` (`model.logits_from_hidden`).
    block_size: target positions per block, >= 1.
    label_smoothing, z_loss: see `cross_entropy_with_logits`.

  Returns:
    float32 scalars `loss_sum`, `z_loss_sum`, `num_correct`, `num_tokens` (as `compute_loss`'s).
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  if weights_BT is None:
    weights_BT = targets_BT != 0
  weights_BT = weights_BT.astype(jnp.float32)
  b, t, d = hidden_BTD.shape
  blocks = -(-t // block_size)
  pad = blocks * block_size - t

  def split(x):  # [B, T, ...] -> [blocks, B, block_size, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, blocks, block_size) + x.shape[2:]), 1, 0)

  @jax.checkpoint
  def block(h_BtD, targets_Bt, weights_Bt):
    logits_BtV = project(h_BtD)
    loss_Bt, z_Bt = cross_entropy_with_logits(
      logits_BtV, targets_Bt, label_smoothing=label_smoothing, z_loss=z_loss
    )
    correct_Bt = (argmax(logits_BtV) == targets_Bt).astype(jnp.float32)
    return jnp.stack(
      [jnp.sum(loss_Bt * weights_Bt), jnp.sum(z_Bt * weights_Bt), jnp.sum(correct_Bt * weights_Bt)]
    )

  def body(total, xs):
    return total + block(*xs), None

  xs = (split(hidden_BTD), split(targets_BT.astype(jnp.int32)), split(weights_BT))
  total, _ = jax.lax.scan(body, jnp.zeros((3,), jnp.float32), xs)
  return {
    "loss_sum": total[0],
    "z_loss_sum": total[1],
    "num_correct": total[2],
    "num_tokens": jnp.sum(weights_BT),
  }
