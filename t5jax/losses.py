"""Training losses: cross-entropy with label smoothing and z-loss, token accuracy.

Everything here is a pure function of float32 logits and integer targets; there are no parameters.
Shapes: B batch, T target length, V vocab.

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

import jax
import jax.numpy as jnp

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
  logits_BxTxV: jax.Array,
  targets_BxT: jax.Array,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Per-token smoothed cross-entropy plus z-loss (unweighted).

  Args:
    logits_BxTxV: float logits [B, T, V] (cast to float32).
    targets_BxT: integer target ids [B, T].
    label_smoothing: mass moved from the true token to the others, in [0, 1).
    z_loss: coefficient of `logsumexp(logits)**2`; 0 disables it.

  Returns:
    `(loss_BxT, z_loss_BxT)`, both float32 [B, T]. `loss_BxT` already includes `z_loss_BxT`.
  """
  logits = logits_BxTxV.astype(jnp.float32)
  vocab_size = logits.shape[-1]
  confidence, low, entropy = smoothing_constants(label_smoothing, vocab_size)

  log_z_BxT = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None].astype(jnp.int32), -1)[
    ..., 0
  ]
  target_logp_BxT = target_logit_BxT - log_z_BxT
  loss_BxT = -confidence * target_logp_BxT
  if low > 0.0:
    # Sum of log-probabilities over the whole vocabulary, minus the target's (counted above).
    sum_logp_BxT = jnp.sum(logits, axis=-1) - vocab_size * log_z_BxT
    loss_BxT = loss_BxT - low * (sum_logp_BxT - target_logp_BxT) - entropy

  z_loss_BxT = z_loss * jnp.square(log_z_BxT) if z_loss else jnp.zeros_like(log_z_BxT)
  return loss_BxT + z_loss_BxT, z_loss_BxT


def loss_normalizer(normalizer: Normalizer, weights_BxT: jax.Array) -> jax.Array | float:
  """The factor the summed weighted loss is divided by.

  Args:
    normalizer: one of
      * `"num_tokens"`: the sum of weights (real target tokens); the loss is a mean per token.
      * `"total_tokens"`: `B * T`, counting padding; constant for a fixed batch shape.
      * `"constant:<float>"` or a number: a fixed factor, as in t5x's pretraining (e.g.
        `233472 = 2048 * 114`), so every token has the same gradient weight whatever the padding.
      * `"batch"`: handled in `compute_loss` (mean per sequence, then mean over sequences).
    weights_BxT: loss weights [B, T].

  Returns:
    A scalar (array or Python float).
  """
  if isinstance(normalizer, int | float):
    return float(normalizer)
  if normalizer == "num_tokens":
    return jnp.maximum(jnp.sum(weights_BxT), 1e-8)
  if normalizer == "total_tokens":
    return float(weights_BxT.size)
  if normalizer.startswith("constant:"):
    return float(normalizer.split(":", 1)[1])
  raise ValueError(f"unknown loss normalizer {normalizer!r}")


def compute_loss(
  logits_BxTxV: jax.Array,
  targets_BxT: jax.Array,
  weights_BxT: jax.Array | None = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  normalizer: Normalizer = "num_tokens",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar training loss and metrics for one batch.

  Args:
    logits_BxTxV: float logits [B, T, V].
    targets_BxT: integer targets [B, T].
    weights_BxT: loss weights [B, T] (0/1, int or float); `None` means `targets != 0` (pad is 0).
    label_smoothing: see `cross_entropy_with_logits`.
    z_loss: see `cross_entropy_with_logits`.
    normalizer: see `loss_normalizer`; `"batch"` averages each sequence's loss over its weighted
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
  if weights_BxT is None:
    weights_BxT = targets_BxT != 0
  weights_BxT = weights_BxT.astype(jnp.float32)
  loss_BxT, z_BxT = cross_entropy_with_logits(
    logits_BxTxV, targets_BxT, label_smoothing=label_smoothing, z_loss=z_loss
  )
  loss_sum = jnp.sum(loss_BxT * weights_BxT)
  z_sum = jnp.sum(z_BxT * weights_BxT)
  num_tokens = jnp.sum(weights_BxT)
  correct_BxT = (jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
  num_correct = jnp.sum(correct_BxT * weights_BxT)

  if normalizer == "batch":
    row_weight_B = jnp.sum(weights_BxT, axis=-1)
    row_scale_B = jnp.where(row_weight_B > 0, 1.0 / jnp.maximum(row_weight_B, 1e-8), 0.0)
    num_rows = jnp.maximum(jnp.sum(row_weight_B > 0), 1)
    loss = jnp.sum(jnp.sum(loss_BxT * weights_BxT, -1) * row_scale_B) / num_rows
    z = jnp.sum(jnp.sum(z_BxT * weights_BxT, -1) * row_scale_B) / num_rows
  else:
    norm = loss_normalizer(normalizer, weights_BxT)
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
