"""Small helpers shared by the layers: dtypes, initialisers and logically partitioned parameters.

Every parameter is created through `param`, which attaches logical axis names
(`nn.with_logical_partitioning`); the mapping of logical names to mesh axes lives in the experiment config.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# Array names end in their shape (x_BTD); the letters are one legend, in README.md ("Shape suffixes").
# Logical axis names used by the model. Parameters:
#   vocab, embed, q_lora, kv_lora, heads, kv_heads, qk_nope, qk_rope, qk_head, v_head, mlp, expert, expert_mlp,
#   router_expert, norm, mtp_concat, layers (the stacked axis under nn.scan).
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


def project(x, w, contract: int = 1, preferred_element_type=None):
  """x [..., K_1..K_c] . w [K_1..K_c, F_1..] -> [..., F_1..]: a projection of every token, as ONE 2-D matmul
  [tokens, K] x [K, F] (leading dims and the contracted dims flattened, free reshapes of both).

  Why not einsum("btd,df->btf"): its weight gradient contracts two dims (batch and length), and XLA's CPU
  compiler canonicalises such a dot by transposing an operand into a new buffer, fused into the elementwise
  producer of the gradient, whose strided writes made it the slowest op of the step (measured: a SwiGLU
  layer's forward+backward 67 ms as einsums over [B, T, D], 32 ms as 2-D matmuls; docs/benchmarks.md).
  """
  lead, k_shape = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  if tuple(w.shape[:contract]) != tuple(k_shape):
    raise ValueError(f"project: x's last {contract} dims {k_shape} != w's first {w.shape[:contract]}")
  K = math.prod(k_shape)
  out = jnp.matmul(x.reshape(-1, K), w.reshape(K, -1), preferred_element_type=preferred_element_type)
  return out.reshape(lead + w.shape[contract:])
