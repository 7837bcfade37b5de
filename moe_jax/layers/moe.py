"""The DeepSeekMoE layer: shared experts plus fine-grained routed experts (DeepSeekMoE, Dai et al. 2024;
DeepSeek-V3 report eq. 12):  h'_t = u_t + sum_{i<=N_s} FFN^(s)_i(u_t) + sum_{i<=N_r} g_i,t FFN^(r)_i(u_t).
The N_s shared experts are one SwiGLU of width N_s * moe_intermediate_size (as the checkpoints store them).
The residual is added by the block.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers.base import as_dtype, constrain, normal_init
from moe_jax.layers.dispatch import capacity_dispatch, dropless_dispatch
from moe_jax.layers.expert_parallel import mesh_plan, sharded_dropless_dispatch
from moe_jax.layers.lora import adapted_param
from moe_jax.layers.mlp import SwiGLU
from moe_jax.layers.router import Router


class MoEStats(NamedTuple):
  """Per-layer statistics returned next to the output (stacked over layers by the model)."""
  expert_load: jax.Array  # [E] token-copies routed to each expert (before any capacity drop)
  balance_loss: jax.Array  # scalar, alpha-weighted sequence-wise balance loss
  dropped_fraction: jax.Array  # scalar, fraction of token-copies dropped (capacity dispatch, or expert-parallel
  #                               buffer overflow with ep_capacity_factor > 0; else 0)
  gate_sum: jax.Array  # [E] sum over valid tokens of each expert's gating weight g_i,t (0 where not selected):
  #                      ESFT's average gate score (moe_jax.training.esft)


class MoE(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x_BTD, valid_BT):
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    B, T, D = x_BTD.shape
    E, F = c.n_routed_experts, c.moe_intermediate_size
    x_BTD = x_BTD.astype(dtype)
    routing = Router(c, name="router")(x_BTD, valid_BT)

    weight = partial(adapted_param, self, init=init, dtype=pdtype, group="experts", n_lead=1)  # + LoRA if set
    w_gate = weight("wi_gate", (E, D, F), ("expert", "embed", "expert_mlp"))
    w_up = weight("wi_up", (E, D, F), ("expert", "embed", "expert_mlp"))
    w_down = weight("wo", (E, F, D), ("expert", "expert_mlp", "embed"))
    x_TD = x_BTD.reshape(B * T, D)
    idx_TK = routing.topk_idx_BTK.reshape(B * T, -1)
    weight_TK = routing.topk_weight_BTK.reshape(B * T, -1)
    plan = mesh_plan() if c.moe_dispatch == "dropless" else None
    if plan is not None:  # on a multi-device mesh: experts split over `expert`, tokens moved by all-to-all
      y_TD, dropped = sharded_dropless_dispatch(x_TD, idx_TK, weight_TK, w_gate, w_up, w_down, plan,
                                                capacity_factor=c.ep_capacity_factor, backend=c.gmm_backend)
    elif c.moe_dispatch == "dropless":
      y_TD = dropless_dispatch(x_TD, idx_TK, weight_TK, w_gate, w_up, w_down, backend=c.gmm_backend)
      dropped = jnp.zeros((), jnp.float32)
    else:
      y_TD, dropped = capacity_dispatch(x_TD, idx_TK, weight_TK, w_gate, w_up, w_down,
                                        capacity_factor=c.capacity_factor)
    y_BTD = constrain(y_TD.reshape(B, T, D), ("batch", "length", "embed"))
    if c.n_shared_experts > 0:
      y_BTD = y_BTD + SwiGLU(c, c.n_shared_experts * F, name="shared_experts")(x_BTD)
    valid_TK = jnp.broadcast_to(valid_BT.reshape(B * T, 1), idx_TK.shape).astype(jnp.float32)
    gate_sum_E = jnp.zeros((E,), jnp.float32).at[idx_TK].add(weight_TK.astype(jnp.float32) * valid_TK)
    return y_BTD, MoEStats(routing.expert_load_E, routing.balance_loss, dropped, gate_sum_E)
