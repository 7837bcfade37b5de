"""One pre-norm transformer block: h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense or DeepSeekMoE."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moe_jax.layers import MLA, MoE, RMSNorm, SwiGLU
from moe_jax.layers.base import as_dtype, constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """(x [B,T,D], rope cos/sin, mask, valid) -> (x', MoEStats or None). The (carry, out) form suits nn.scan."""

  config: Any
  is_moe: bool

  @nn.compact
  def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_B1TT, valid_BT):
    c = self.config
    dtype, pdtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
    attn_in = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="attn_norm")(x_BTD)
    h_BTD = x_BTD + MLA(c, name="attn")(attn_in, cos_BTR, sin_BTR, mask_B1TT)
    ffn_in = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="ffn_norm")(h_BTD)
    if self.is_moe:
      f_BTD, stats = MoE(c, name="moe")(ffn_in, valid_BT)
    else:
      f_BTD, stats = SwiGLU(c, c.intermediate_size, name="mlp")(ffn_in), None
    return constrain(h_BTD + f_BTD, ("batch", "length", "embed")), stats


def block_class(config: Any, scanned: bool):
  """Block, wrapped in nn.remat when the config asks for activation checkpointing."""
  if config.remat_policy == "none":
    return Block
  # prevent_cse is unnecessary (and costly) inside scan, where XLA cannot CSE across iterations anyway.
  return nn.remat(Block, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not scanned)
