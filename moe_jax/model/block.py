"""One pre-norm transformer block: h = x + Attention(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense or DeepSeekMoE.
Attention is MLA, or the MHA/GQA baseline (config.attention_type)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moe_jax.layers import MoE, RMSNorm, SwiGLU
from moe_jax.layers.attention import AttentionInputs, KVCache, LatentCache, attention_class
from moe_jax.layers.base import as_dtype, constrain

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """(x [B,T,D], AttentionInputs, valid [B,T], cache) -> (x', (MoEStats or None, the T tokens' cache entries or
  None)). The (carry, out) form suits nn.scan: x is the carry, the layer's cache a scanned input."""

  config: Any
  is_moe: bool

  @nn.compact
  def __call__(self, x_BTD, inputs: AttentionInputs, valid_BT, cache: LatentCache | KVCache | None = None):
    c = self.config
    dtype, pdtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    x_BTD = constrain(x_BTD, ("batch", "length", "embed"))
    attn_in = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="attn_norm")(x_BTD)
    a_BTD, entries = attention_class(c)(c, name="attn")(attn_in, inputs, cache)
    h_BTD = x_BTD + a_BTD
    ffn_in = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="ffn_norm")(h_BTD)
    if self.is_moe:
      f_BTD, stats = MoE(c, name="moe")(ffn_in, valid_BT)
    else:
      f_BTD, stats = SwiGLU(c, c.intermediate_size, name="mlp")(ffn_in), None
    return constrain(h_BTD + f_BTD, ("batch", "length", "embed")), (stats, entries)


def block_class(config: Any, scanned: bool):
  """Block, wrapped in nn.remat when the config asks for activation checkpointing."""
  if config.remat_policy == "none":
    return Block
  # prevent_cse is unnecessary (and costly) inside scan, where XLA cannot CSE across iterations anyway.
  return nn.remat(Block, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not scanned)
