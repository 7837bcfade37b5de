"""Small helpers shared by the layers: dtypes, initialisers and logically partitioned parameters.

Every parameter is created through `param`, which attaches logical axis names
(`nn.with_logical_partitioning`); the mapping of logical names to mesh axes lives in the experiment config.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Array names end in their shape (x_BTD); the letters are one legend, in README.md ("Shape suffixes").
# Logical axis names used by the model. Parameters:
#   vocab, embed, q_lora, kv_lora, heads, qk_nope, qk_rope, v_head, mlp, expert, expert_mlp, router_expert,
#   norm, mtp_concat, layers (the stacked axis under nn.scan).
# Activations: batch, length, embed, heads, kv_lora, vocab.


def as_dtype(name: str) -> Any:
  return jnp.dtype(name)


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], init: Any, dtype: Any):
  """Creates (or reads) a parameter carrying logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def normal_init(cfg: Any):
  return nn.initializers.normal(stddev=cfg.initializer_range)


def constrain(x, axes: Sequence[str | None]):
  """Logical sharding constraint on an activation; a no-op outside a mesh with logical axis rules."""
  return nn.with_logical_constraint(x, tuple(axes))
