"""SwiGLU feed-forward: FFN(x) = W_down (silu(W_gate x) * (W_up x)) (Shazeer 2020). Dense layers and shared experts."""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax

from moe_jax.layers.base import as_dtype, normal_init, project
from moe_jax.layers.lora import adapted_param


class SwiGLU(nn.Module):
  config: Any
  intermediate_size: int

  @nn.compact
  def __call__(self, x_BTD):
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    D, F = c.hidden_size, self.intermediate_size
    group = "shared_experts" if self.name == "shared_experts" else "mlp"  # which LoRA target this layer is
    weight = partial(adapted_param, self, init=init, dtype=pdtype, group=group)
    wi_gate = weight("wi_gate", (D, F), ("embed", "mlp")).astype(dtype)
    wi_up = weight("wi_up", (D, F), ("embed", "mlp")).astype(dtype)
    wo = weight("wo", (F, D), ("mlp", "embed")).astype(dtype)
    x_BTD = x_BTD.astype(dtype)
    h_BTF = jax.nn.silu(project(x_BTD, wi_gate)) * project(x_BTD, wi_up)
    return project(h_BTF, wo)
