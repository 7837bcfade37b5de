"""The V3 pre-training schedules (DeepSeek-V3 report sec. 4.2), as pure functions of (step, tokens).

Boundaries are in `config.train.schedule_unit` ("steps" or "tokens": rows x seq_len consumed so far); the LR
warm-up is always in steps, as in the report ("linearly increase during the first 2K steps"). A length of -1
means "until the end of training" (num_steps, or the tokens consumed by then).

  learning rate  0 -> peak linearly over warmup_steps; constant; cosine from lr_decay_start over lr_decay_length
                 down to lr_final, held after; then each (point, value) of lr_tail applies from its point on
                 (V3: 2.2e-4, cosine to 2.2e-5 over 4.3T tokens from 10T, 7.3e-6 for the last 167B).
  batch size     batch_size_start -> data.batch_size linearly over batch_warmup (rows, rounded down; 0 = off)
  MTP weight     mtp_weight until mtp_weight_switch, mtp_weight_after from there (-1 = never switch)
  bias rate      bias_update_rate until bias_update_stop, 0 from there (-1 = never stop)

The functions accept Python numbers (host side) and traced jnp scalars (inside the train step) alike.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

SCHEDULE_UNITS = ("steps", "tokens")


def _position(t: Any, step, tokens):
  return step if t.schedule_unit == "steps" else tokens


def total_tokens(config: Any) -> int:
  """Token slots (rows x seq_len) consumed by the end of training, following the batch-size schedule."""
  tokens = 0
  for step in range(config.train.num_steps):
    tokens += batch_rows(config, step, tokens) * config.data.seq_len
  return tokens


def run_end(config: Any) -> float:
  """The end of training in schedule units."""
  return config.train.num_steps if config.train.schedule_unit == "steps" else total_tokens(config)


def learning_rate(config: Any, step, tokens, end: float):
  """LR at (step, tokens); `end` = run_end(config) (precomputed: it needs a loop over steps in tokens units)."""
  t = config.train
  x = _position(t, step, tokens)
  warm = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / max(t.warmup_steps, 1))
  length = (end - t.lr_decay_start) if t.lr_decay_length == -1 else t.lr_decay_length
  frac = jnp.clip((jnp.asarray(x, jnp.float32) - t.lr_decay_start) / max(length, 1e-9), 0.0, 1.0)
  cos = t.lr_final + 0.5 * (t.learning_rate - t.lr_final) * (1.0 + jnp.cos(math.pi * frac))
  lr = warm * cos
  for point, value in t.lr_tail:
    lr = jnp.where(jnp.asarray(x, jnp.float32) >= point, value, lr)
  return lr


def batch_rows(config: Any, step, tokens) -> int:
  """Live rows of the global batch at this point (host side: plain ints)."""
  t, full = config.train, config.data.batch_size
  if t.batch_warmup <= 0:
    return full
  x = _position(t, step, tokens)
  frac = min(1.0, x / t.batch_warmup)
  return max(1, min(full, int(t.batch_size_start + frac * (full - t.batch_size_start))))


def mtp_weight(config: Any, step, tokens):
  t = config.train
  if t.mtp_weight_switch < 0:
    return jnp.asarray(t.mtp_weight, jnp.float32)
  x = _position(t, step, tokens)
  return jnp.where(jnp.asarray(x, jnp.float32) >= t.mtp_weight_switch, t.mtp_weight_after, t.mtp_weight)


def bias_update_rate(config: Any, step, tokens):
  t = config.train
  if t.bias_update_stop < 0:
    return jnp.asarray(t.bias_update_rate, jnp.float32)
  x = _position(t, step, tokens)
  return jnp.where(jnp.asarray(x, jnp.float32) >= t.bias_update_stop, 0.0, t.bias_update_rate)
