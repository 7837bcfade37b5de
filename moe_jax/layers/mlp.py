"""SwiGLU feed-forward: FFN(x) = W_down (silu(W_gate x) * (W_up x)) (Shazeer 2020). Dense layers and shared experts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moe_jax.layers.base import as_dtype, normal_init, param, project


class SwiGLU(nn.Module):
  config: Any
  intermediate_size: int

  @nn.compact
  def __call__(self, x_BTD):
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    D, F = c.hidden_size, self.intermediate_size
    wi_gate = param(self, "wi_gate", (D, F), ("embed", "mlp"), init, pdtype).astype(dtype)
    wi_up = param(self, "wi_up", (D, F), ("embed", "mlp"), init, pdtype).astype(dtype)
    wo = param(self, "wo", (F, D), ("mlp", "embed"), init, pdtype).astype(dtype)
    x_BTD = x_BTD.astype(dtype)
    h_BTF = jax.nn.silu(project(x_BTD, wi_gate)) * project(x_BTD, wi_up)
    return project(h_BTF, wo)
