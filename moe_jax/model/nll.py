"""Per-token negative log-likelihood: shared by the training objective and inference scoring (both above it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BTV, targets_BT):
  """-log softmax(logits)[target], float32 [B, T]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return lse_BT - picked_BT
