"""Jitted generation and scoring entry points for T5: encode once, then a `t5jax.decoding` loop.

`generate` compiles one function per (batch, input length, method settings): the encoder runs
once, cross-attention keys/values are computed once per example (batch B) and shared by the r beams
or samples of that example (the model's `decode_step` maps row `b*r + j` to example b), the
self-attention cache `[B*r, L, H, K]` is preallocated, and the loop is a `lax.while_loop` that
stops as soon as every row is finished. Parameters are cast to `config.dtype` once before the loop
(`compute_dtype_params`) and the caches are in that dtype, so no step converts a weight.

Conventions (see also `t5jax.decoding`):
- `sequences` exclude the decoder start token and hold `config.pad_token_id` (0) after EOS, for
  every method (transformers pads finished beams with EOS and greedy/sampled rows with 0), and are
  always `max_new_tokens` long (transformers crops to the longest generated row).
- `scores`: beam search, transformers' `sequences_scores` (sum of log-probs / len**length_penalty);
  greedy and sampling, the sum of the model's log-probabilities of the generated tokens (EOS
  included, padding excluded), under the unwarped distribution.
- Sampling defaults to pure ancestral sampling (top_k=0, top_p=1.0); transformers defaults to
  top_k=50 whenever do_sample=True.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from t5jax import decoding, model
from t5jax.config import T5Config

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Generated tokens and their scores.

  Attributes:
    sequences: int32 [B, L], or [B, n, L] when num_return_sequences n > 1; no start token, padded
      with pad_token_id after EOS.
    scores: float32 [B] or [B, n] (see the module docstring for their meaning per method).
  """

  sequences: jax.Array
  scores: jax.Array


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
  """Log-likelihood of given targets.

  Attributes:
    sequence_scores: float32 [B], sum of token_scores.
    token_scores: float32 [B, T], log p(target_t | inputs, targets_<t), 0 where not scored.
  """

  sequence_scores: jax.Array
  token_scores: jax.Array


def _option(default: Any, help: str, method: str | None = None, **extra: Any) -> Any:
  """A GenerateConfig field: its help text, and the method it belongs to (None: every method).

  `decode.py` builds its flags from these (`flag=False`: library only)."""
  return dataclasses.field(default=default, metadata={"help": help, "method": method, **extra})


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """How `generate` decodes: the one owner of the decoding options, their defaults and checks.

  Frozen and hashable (one compilation per distinct value); validated when built, with messages
  that name the fields (`decode.py` turns the names into its flags). `generate` also takes the
  fields as keyword arguments; `config.replace(**changes)` makes a validated copy.
  """

  method: str = _option("greedy", "greedy, beam search or sampling", choices=METHODS)
  max_new_tokens: int = _option(20, "generated tokens at most, EOS included")
  num_return_sequences: int = _option(1, "the n best beams, or n samples, per input")
  num_beams: int = _option(4, "beams per example", "beam")
  length_penalty: float = _option(
    1.0, "exponent of the length normalisation of finished beams", "beam"
  )
  early_stopping: bool | str = _option(
    False, "stop a beam search as transformers does", "beam",
    choices={"true": True, "false": False, "never": "never"},
  )  # fmt: skip
  length_penalty_style: str = _option(
    "hf", "'hf' (len**length_penalty) or 't5x' (((5+len)/6)**length_penalty)", "beam", flag=False
  )
  temperature: float = _option(1.0, "divides the logits before sampling", "sample")
  top_k: int = _option(0, "sample among the k likeliest tokens (0 disables)", "sample")
  top_p: float = _option(1.0, "sample within this probability mass (1 disables)", "sample")
  ignore_eos: bool = _option(
    False, "never stop at EOS (always generate max_new_tokens; for benchmarks)", flag=False
  )

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    for name in ("max_new_tokens", "num_return_sequences"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.method == "greedy" and self.num_return_sequences != 1:
      raise ValueError("num_return_sequences > 1 requires method beam or sample")
    if self.method == "beam":
      if self.num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
      if not math.isfinite(self.length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
      if self.num_return_sequences > self.num_beams:
        raise ValueError(
          f"num_return_sequences must be <= num_beams ({self.num_beams}), got "
          f"{self.num_return_sequences}"
        )
      if self.early_stopping not in (True, False, "never"):
        raise ValueError(
          f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"
        )
      if self.length_penalty_style not in ("hf", "t5x"):
        raise ValueError(
          f"length_penalty_style must be 'hf' or 't5x', got {self.length_penalty_style!r}"
        )
    if self.method == "sample":
      if not self.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {self.temperature}")
      if self.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
      if not 0.0 < self.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables), got {self.top_p}")

  def replace(self, **changes: Any) -> GenerateConfig:
    return dataclasses.replace(self, **changes)

  def _static(self) -> GenerateConfig:
    """The part that shapes the compiled loop: length penalty and early stopping are traced, and
    the number of returned beams and other methods' settings are applied outside, so they do not
    cause recompilation."""
    beam = self.method == "beam"
    return self.replace(
      length_penalty=0.0,
      early_stopping=False,
      num_beams=self.num_beams if beam else 1,
      num_return_sequences=1 if beam else self.num_return_sequences,
    )


# Parameters the model reads in float32 whatever the compute dtype (norm statistics, the
# relative-position bias); every other floating parameter is a matrix used in `config.dtype`.
_FLOAT32_PARAMS = ("scale", "rel_embedding")


def compute_dtype_params(params: Any, config: T5Config) -> Any:
  """`params` with every matrix cast to `config.dtype` (norm scales and relative-position tables
  kept as they are), so a decoding loop converts no weight per step. The model casts each weight
  to `config.dtype` where it uses it, so the results are the same values (tested)."""
  dtype = jnp.dtype(config.dtype)

  def cast(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in _FLOAT32_PARAMS or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


@functools.partial(jax.jit, static_argnames=("config", "settings"))
def _generate(
  params, encoder_input_tokens, rng, length_penalty, early_stopping, *, config, settings
):
  """Returns sequences [B, r, L] and scores [B, r] (r = num_beams or samples per input)."""
  s = settings
  eos_id = None if s.ignore_eos else config.eos_token_id
  batch = encoder_input_tokens.shape[0]
  rows_per_example = s.num_beams if s.method == "beam" else s.num_return_sequences
  num_rows = batch * rows_per_example
  params = compute_dtype_params(params, config)  # once, outside the loop
  encoded = model.encode(params, config, encoder_input_tokens)
  cross = model.init_cross_cache(params, config, encoded, encoder_input_tokens)
  cache = model.init_self_cache(config, num_rows, s.max_new_tokens)

  def tokens_to_logits(tokens, cache, step):
    return model.decode_step(params, config, tokens, cache, cross, step)

  common = dict(
    max_len=s.max_new_tokens,
    start_id=config.decoder_start_token_id,
    eos_id=eos_id,
    pad_id=config.pad_token_id,
  )
  if s.method == "beam":
    seqs, scores = decoding.beam_search(
      tokens_to_logits,
      cache,
      batch_size=batch,
      num_beams=s.num_beams,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      length_penalty_style=s.length_penalty_style,
      **common,
    )
  else:
    if s.method == "greedy":
      seqs, scores = decoding.greedy_search(tokens_to_logits, cache, num_rows=num_rows, **common)
    else:
      seqs, scores = decoding.sample(
        tokens_to_logits,
        cache,
        rng,
        num_rows=num_rows,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        **common,
      )
    seqs = seqs.reshape(batch, rows_per_example, s.max_new_tokens)
    scores = scores.reshape(batch, rows_per_example)
  return seqs, scores


def generate(
  params: Any,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  generate_config: GenerateConfig | None = None,
  *,
  rng: jax.Array | None = None,
  **options: Any,
) -> GenerateOutput:
  """Generates continuations of a batch of encoder inputs.

  Args:
    params: model parameters (`t5jax.init_params`, `t5jax.load_hf`).
    config: the architecture; `config.dtype` sets the computation dtype.
    encoder_input_tokens: int [B, S], padded with 0 (ending with EOS, as the tokenizer writes).
    generate_config: the decoding options (default `GenerateConfig()`).
    rng: PRNG key for sampling (default `jax.random.key(0)`); same key, same samples.
    **options: `GenerateConfig` fields by name, overriding `generate_config`'s:
      method ("greedy", "beam" or "sample"); max_new_tokens (L, EOS included);
      num_return_sequences (n best beams or n samples per input); beam search: num_beams,
      length_penalty, early_stopping (True, False or "never", transformers' meaning),
      length_penalty_style ("hf": `len**p`, "t5x": `((5+len)/6)**p`); sampling: temperature,
      top_k, top_p, applied in that order (top_k=0 and top_p=1.0 disable their filter);
      ignore_eos (never stop at EOS; for benchmarks).

  Returns:
    `GenerateOutput(sequences [B, L] or [B, n, L], scores [B] or [B, n])`.
  """
  g = (generate_config or GenerateConfig()).replace(**options)
  if rng is None:
    rng = jax.random.key(0)
  tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
  if tokens.ndim != 2:
    raise ValueError(f"encoder_input_tokens must be [B, S], got shape {tokens.shape}")
  code = decoding.EARLY_STOPPING_CODES.get(g.early_stopping, 0) if g.method == "beam" else 0
  seqs, scores = _generate(
    params,
    tokens,
    rng,
    jnp.float32(g.length_penalty),
    jnp.int32(code),
    config=config,
    settings=g._static(),
  )
  n = g.num_return_sequences
  seqs, scores = seqs[:, :n], scores[:, :n]
  if n == 1:
    seqs, scores = seqs[:, 0], scores[:, 0]
  return GenerateOutput(sequences=seqs, scores=scores)


def _target_mask(target_tokens: jax.Array, config: T5Config) -> jax.Array:
  """Tokens up to and including the first EOS; every token of a row without EOS.

  Token 0 can be a generated token before EOS (or in a row cut at the length limit), so padding
  is what follows EOS, not every 0.
  """
  is_eos = target_tokens == config.eos_token_id
  return (jnp.cumsum(is_eos, axis=-1) - is_eos) == 0


@functools.partial(jax.jit, static_argnames=("config",))
def _score(params, encoder_input_tokens, target_tokens, target_mask, *, config: T5Config):
  decoder_inputs = model.shift_right(target_tokens, config.decoder_start_token_id)
  logits = model.forward(params, config, encoder_input_tokens, decoder_inputs)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_scores = jnp.take_along_axis(log_probs, target_tokens[..., None], axis=-1)[..., 0]
  token_scores = jnp.where(target_mask, token_scores, 0.0)
  return token_scores.sum(axis=-1), token_scores


def score(
  params: Any,
  config: T5Config,
  encoder_input_tokens: jax.Array,
  target_tokens: jax.Array,
  target_mask: jax.Array | None = None,
) -> ScoreOutput:
  """Log-likelihood of given targets under the model (teacher forcing, one forward pass).

  Args:
    params: model parameters.
    config: the architecture.
    encoder_input_tokens: int [B, S], padded with 0.
    target_tokens: int [B, T], normally ending with EOS and padded after it (as `generate`
      returns them).
    target_mask: bool [B, T], the tokens to score; default: up to and including the first EOS,
      the whole row where there is none.

  Returns:
    `ScoreOutput(sequence_scores [B], token_scores [B, T])`, natural-log probabilities.
  """
  enc = jnp.asarray(encoder_input_tokens, jnp.int32)
  tgt = jnp.asarray(target_tokens, jnp.int32)
  mask = _target_mask(tgt, config) if target_mask is None else jnp.asarray(target_mask, bool)
  seq, tok = _score(params, enc, tgt, mask, config=config)
  return ScoreOutput(sequence_scores=seq, token_scores=tok)
