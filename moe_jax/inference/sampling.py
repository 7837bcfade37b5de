"""Token distributions for decoding: temperature, top-k, top-p (nucleus), greedy as a one-hot distribution.

All settings are traced values, so one compiled decoder serves every setting. `temperature <= 0` means greedy:
the distribution is the one-hot of the argmax, so sampling from it, and speculative decoding's rejection rule
over it, reduce exactly to greedy decoding (one code path for both).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampling(NamedTuple):
  temperature: float = 0.0  # <= 0: greedy
  top_k: int = 0  # keep the k most likely tokens; 0: all
  top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1: all

  def validate(self) -> "Sampling":
    if not self.top_k >= 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.temperature != self.temperature:  # NaN
      raise ValueError("temperature is NaN")
    return self


def token_probs(logits_BV, temperature, top_k, top_p):
  """float32 [B, V] probabilities after temperature, top-k and top-p; the argmax's one-hot when greedy."""
  logits_BV = logits_BV.astype(jnp.float32)
  V = logits_BV.shape[-1]
  greedy = temperature <= 0
  scaled_BV = logits_BV / jnp.where(greedy, 1.0, temperature)
  onehot_BV = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), V, dtype=jnp.float32)
  # Only a truncated distribution needs the sort over the vocabulary; the branch is picked at run time.
  truncated = ~greedy & ((top_k > 0) & (top_k < V) | (top_p < 1.0))
  plain_BV = jnp.where(greedy, onehot_BV, jax.nn.softmax(scaled_BV, axis=-1))
  return jax.lax.cond(truncated, lambda: _truncated_probs(scaled_BV, top_k, top_p), lambda: plain_BV)


def _truncated_probs(scaled_BV, top_k, top_p):
  V = scaled_BV.shape[-1]
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)  # descending
  # top-k: drop everything below the k-th largest value (ties at the boundary are kept).
  k = jnp.clip(jnp.where(top_k > 0, top_k, V), 1, V)
  kth_B1 = jnp.take_along_axis(sorted_BV, jnp.broadcast_to(k - 1, sorted_BV.shape[:-1])[..., None], axis=-1)
  # top-p: keep sorted token j while the mass strictly before it is < top_p (the first token is always kept).
  sorted_probs_BV = jax.nn.softmax(jnp.where(sorted_BV >= kth_B1, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
  kept_BV = (mass_before_BV < top_p) & (sorted_BV >= kth_B1)
  cutoff_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jax.nn.softmax(jnp.where(scaled_BV >= cutoff_B1, scaled_BV, -jnp.inf), axis=-1)


def sample(rng, probs_BV):
  """int32 [B]: one draw per row (the argmax itself for one-hot rows)."""
  return jax.random.categorical(rng, jnp.log(probs_BV), axis=-1).astype(jnp.int32)
