"""The DeepSeek-V2/V3 decoder-only Transformer with optional multi-token prediction modules.

  logits, aux = Transformer(model_config).apply({"params": params}, tokens_BT, segment_ids_BT, positions_BT)

tokens: int32 [B, T]. segment_ids: int [B, T], tokens attend only within their segment and 0 marks padding
(excluded from expert loads and the balance loss); default all ones. positions: int [B, T], the RoPE position
of each token within its document; default 0..T-1.

logits: float32 [B, T, V]. aux (a dict of arrays):
  expert_load      [L_moe, E]  token-copies routed to each expert, per MoE layer (padding excluded)
  balance_loss     [L_moe]     alpha-weighted sequence-wise balance loss per MoE layer
  dropped_fraction [L_moe]     token-copies dropped by capacity dispatch (0 for dropless)
  and, when the config has MTP modules (num_nextn_predict_layers = D > 0) and `mtp=True`:
  mtp_logits       [D, B, T, V] float32; depth k (0-based) at position i predicts token i + k + 2
  mtp_expert_load [D, E], mtp_balance_loss [D], mtp_dropped_fraction [D]  (zeros-width when MTP blocks are dense)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moe_jax.config import n_moe_layers, validate_model_config
from moe_jax.layers import RMSNorm, attention_mask, rope_cos_sin
from moe_jax.layers.base import as_dtype, constrain, normal_init, param
from moe_jax.model.block import block_class
from moe_jax.model.mtp import MTPModule

_STAT_KEYS = ("expert_load", "balance_loss", "dropped_fraction")


def _stack_stats(stats_list, num_experts: int):
  if not stats_list:
    return {"expert_load": jnp.zeros((0, num_experts)), "balance_loss": jnp.zeros((0,)),
            "dropped_fraction": jnp.zeros((0,))}
  return {k: jnp.stack([getattr(s, k) for s in stats_list]) for k in _STAT_KEYS}


class Transformer(nn.Module):
  config: Any  # a model ConfigDict (moe_jax.config.base_model_config schema); validated and frozen on construction

  def __post_init__(self):
    validate_model_config(self.config)
    if not isinstance(self.config, ml_collections.FrozenConfigDict):
      object.__setattr__(self, "config", ml_collections.FrozenConfigDict(self.config))
    super().__post_init__()

  def _layers(self, x_BTD, rope, mask_B1TT, valid_BT, *, is_moe: bool, n: int, name: str):
    """n identical blocks, scanned (params stacked on a leading 'layers' axis) or unrolled (name_0, name_1, ...)."""
    c = self.config
    if n == 0:
      return x_BTD, []
    if c.scan_layers:
      scanned = nn.scan(
          block_class(c, scanned=True),
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=n,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x_BTD, stats = scanned(c, is_moe, name=name)(x_BTD, *rope, mask_B1TT, valid_BT)
      return x_BTD, ([stats] if is_moe else [])
    stats_list = []
    for i in range(n):
      x_BTD, stats = block_class(c, scanned=False)(c, is_moe, name=f"{name}_{i}")(x_BTD, *rope, mask_B1TT, valid_BT)
      if is_moe:
        stats_list.append(stats)
    return x_BTD, stats_list

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, mtp: bool = True):
    c = self.config
    if tokens_BT.ndim != 2 or not jnp.issubdtype(tokens_BT.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [batch, seq]; got {tokens_BT.dtype} {tokens_BT.shape}")
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    for name, arr in (("segment_ids", segment_ids_BT), ("positions", positions_BT)):
      if arr.shape != (B, T):
        raise ValueError(f"{name} shape {arr.shape} != tokens shape {(B, T)}")
    dtype, pdtype = as_dtype(c.dtype), as_dtype(c.param_dtype)
    V, D = c.vocab_size, c.hidden_size

    embed_VD = param(self, "embedding", (V, D), ("vocab", "embed"), normal_init(c), pdtype)
    if c.tie_word_embeddings:
      head_DV = embed_VD.T
    else:
      head_DV = param(self, "lm_head", (D, V), ("embed", "vocab"), normal_init(c), pdtype)

    def head_fn(h_BTD):
      return jnp.einsum("btd,dv->btv", h_BTD, head_DV.astype(dtype), preferred_element_type=jnp.float32)

    valid_BT = segment_ids_BT != 0
    rope = rope_cos_sin(c, positions_BT)
    mask_B1TT = attention_mask(segment_ids_BT)
    # The lookup reads a gathered (replicated) copy of the table: a row gather from a table split on vocab and
    # embed makes XLA's SPMD partitioner fall back to replicating the result anyway, with extra copies.
    lookup_VD = constrain(embed_VD, (None, None))
    x_BTD = constrain(jnp.take(lookup_VD, tokens_BT, axis=0).astype(dtype), ("batch", "length", "embed"))
    x_BTD, _ = self._layers(x_BTD, rope, mask_B1TT, valid_BT, is_moe=False, n=c.first_k_dense_replace,
                            name="dense_layers")
    x_BTD, moe_stats = self._layers(x_BTD, rope, mask_B1TT, valid_BT, is_moe=True, n=n_moe_layers(c),
                                    name="moe_layers")
    h_BTD = RMSNorm(c.rms_norm_eps, dtype, pdtype, name="final_norm")(x_BTD)
    logits_BTV = head_fn(h_BTD)
    if c.scan_layers and moe_stats:
      aux = {k: getattr(moe_stats[0], k) for k in _STAT_KEYS}
    else:
      aux = _stack_stats(moe_stats, c.n_routed_experts)

    if c.num_nextn_predict_layers > 0 and (mtp or self.is_initializing()):
      mtp_logits, mtp_stats = [], []
      for k in range(1, c.num_nextn_predict_layers + 1):
        # Input at position i is token i+k; positions past the row end get token 0 and are never targets.
        shifted_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, min(k, T))))[:, :T]
        h_BTD, logits_k, stats = MTPModule(c, name=f"mtp_{k - 1}")(
            h_BTD, shifted_BT, lookup_VD, head_fn, *rope, mask_B1TT, valid_BT)
        mtp_logits.append(logits_k)
        if stats is not None:
          mtp_stats.append(stats)
      aux["mtp_logits"] = jnp.stack(mtp_logits)
      aux.update({f"mtp_{k}": v for k, v in _stack_stats(mtp_stats, c.n_routed_experts).items()})
    return logits_BTV, aux
