"""Multi-token prediction module (DeepSeek-V3 report sec. 2.2, eqs. 21-23).

Module k (1 <= k <= J) at position i predicts token t_{i+k+1}:
  h'^k_i  = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]        M_k: 2d -> d   (eq. 21)
  h^k_i   = TRM_k(h'^k_i)                                         one transformer block (eq. 22)
  P^k_i   = OutHead(h^k_i)                                        shared with the main model (eq. 23)
The embedding and output head are the main model's (passed in, not owned). Layout follows the published
checkpoint (layer `num_hidden_layers + k - 1`): `eh_proj` takes [enorm(Emb); hnorm(h)] -- embedding first --
and `shared_head.norm` normalises h^k before the head. As in the inference engines serving that checkpoint,
h^0 is the main model's final-normed hidden state and h^k the shared-head-normed output of module k.
The same module drafts tokens at decode time, over a latent cache of its own block (`cache`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moe_jax.config import mtp_block_is_moe
from moe_jax.layers import RMSNorm
from moe_jax.layers.attention import AttentionInputs, KVCache, LatentCache
from moe_jax.layers.base import as_dtype, constrain, normal_init, param, project
from moe_jax.model.block import block_class


class MTPModule(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, h_prev_BTD, tokens_BT, embed_VD, head_fn, inputs: AttentionInputs, valid_BT,
               cache: LatentCache | KVCache | None = None):
    """tokens_BT: t_{i+k} at position i. Returns (h^k [B,T,D] normed, logits [B,T,V] float32, MoEStats or None,
    the block's new cache entries or None)."""
    c = self.config
    dtype, pdtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    D = c.hidden_size
    e_BTD = constrain(jnp.take(embed_VD, tokens_BT, axis=0).astype(dtype), ("batch", "length", "embed"))
    e_BTD = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="enorm")(e_BTD)
    h_BTD = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="hnorm")(h_prev_BTD)
    eh_proj = param(self, "eh_proj", (2 * D, D), ("mtp_concat", "embed"), normal_init(c), pdtype)
    x_BTD = project(jnp.concatenate([e_BTD, h_BTD], axis=-1), eh_proj.astype(dtype))
    block = block_class(c, scanned=False)(c, mtp_block_is_moe(c), name="block")
    x_BTD, (stats, entries) = block(x_BTD, inputs, valid_BT, cache)
    h_out_BTD = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="head_norm")(x_BTD)
    return h_out_BTD, head_fn(h_out_BTD), stats, entries
