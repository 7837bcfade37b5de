"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * g, the statistics in float32 whatever the compute dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers.base import param


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), nn.initializers.ones, self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return normed.astype(self.dtype) * scale.astype(self.dtype)
