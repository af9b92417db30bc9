"""Model FLOPs of T5 training and inference steps, by formula (matrix multiplications only).

A multiply-add counts as 2 FLOPs. With B batch rows, S encoder (input) tokens and T decoder
(target) tokens per row, D = d_model, A = num_heads * d_kv (the attention inner width), F = d_ff,
V = vocab_size, L_e / L_d encoder / decoder layers, and M = 3 matrices in a gated MLP (wi_0, wi_1,
wo), 2 otherwise:

  encoder, per layer:   B*S * (8*D*A + 2*M*D*F)        q, k, v, o projections and the MLP
                        + 4*B*S*S*A                     attention: Q K^T and A V over S keys
  decoder, per layer:   B*T * (8*D*A + 2*M*D*F)        self-attention projections and the MLP
                        + 4*B*T*T*A                     self-attention Q K^T and A V over T keys
                        + B*T * 4*D*A                   cross-attention q and o projections
                        + B*S * 4*D*A                   cross-attention k and v, over encoder tokens
                        + 4*B*T*S*A                     cross-attention Q K^T and A V over S keys
  output layer:         B*T * 2*D*V

  forward = sum of the above;   training step = 3 * forward (backward = 2 * forward).

Not counted: embedding lookups, relative position biases, norms, softmax, activations, the loss
and the optimizer (all linear in the activations, not in a weight dimension). Attention counts the
whole T x T (and S x S) score matrix, as the model computes it; no discount for the causal mask
or padding. Tokens are counted as laid out, padding included.
"""

from __future__ import annotations

from t5jax.config import T5Config


def forward_flops_breakdown(
  config: T5Config, batch: int, input_len: int, target_len: int
) -> dict[str, int]:
  """Matmul FLOPs of one forward pass (encoder + decoder + output layer), by part.

  Args:
    config: the model.
    batch: rows B.
    input_len: encoder tokens per row S.
    target_len: decoder tokens per row T.

  Returns:
    dict of ints: `encoder_dense` (projections and MLP), `encoder_attention` (Q K^T, A V),
    `decoder_dense` (self- and cross-attention projections, cross-attention k/v over encoder
    tokens, MLP), `decoder_attention` (self and cross Q K^T, A V), `output` (the vocab
    projection), and `total`.
  """
  b, s, t = batch, input_len, target_len
  d, a, f, v = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
  le, ld = config.num_layers, config.num_decoder_layers
  mlp = (3 if config.is_gated else 2) * 2 * d * f  # per token
  proj = 4 * 2 * d * a  # q, k, v, o per token
  parts = {
    "encoder_dense": le * b * s * (proj + mlp),
    "encoder_attention": le * 4 * b * s * s * a,
    "decoder_dense": ld * (b * t * (proj + mlp + 2 * 2 * d * a) + b * s * 2 * 2 * d * a),
    "decoder_attention": ld * (4 * b * t * t * a + 4 * b * t * s * a),
    "output": 2 * b * t * d * v,
  }
  parts["total"] = sum(parts.values())
  return parts


def forward_flops(config: T5Config, batch: int, input_len: int, target_len: int) -> int:
  """Matmul FLOPs of one forward pass; see the module docstring for the formula."""
  return forward_flops_breakdown(config, batch, input_len, target_len)["total"]


def train_step_flops(config: T5Config, batch: int, input_len: int, target_len: int) -> int:
  """Model FLOPs of one training step (forward + backward): 3 times the forward pass."""
  return 3 * forward_flops(config, batch, input_len, target_len)
