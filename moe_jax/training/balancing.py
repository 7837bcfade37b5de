"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3 report sec. 2.1.2) and the MaxVio balance metric.

The routers' selection biases `e_score_correction_bias` are not trained parameters: they live in the model's
"router" variable collection (moe_jax.model.variables), so they get no gradient, no optimiser state and no
weight decay, and after every step the trainer applies
    b_i <- b_i + gamma * sign(mean_j load_j - load_i)
per MoE layer, with load_i the token-copies routed to expert i in the *global* batch: the model sums the loads
over the whole batch, and under SPMD `jit` that sum spans every data shard, so all devices apply the same update.

MaxVio (same paper, eq. 6):  MaxVio = max_i load_i / mean_i load_i - 1, per layer; "batch" MaxVio uses one
training batch's loads, "global" MaxVio the loads summed over the whole validation set.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import traverse_util

_MAIN = re.compile(r"^moe_layers(?:_(\d+))?/")
_MTP = re.compile(r"^mtp_(\d+)/")


def load_for_bias(path: str, aux: dict):
  """The expert loads ([E], or [L, E] for scanned layers) that drive the bias at `path`."""
  if m := _MAIN.match(path):
    loads_LE = aux["expert_load"]
    return loads_LE if m.group(1) is None else loads_LE[int(m.group(1))]
  if m := _MTP.match(path):
    return aux["mtp_expert_load"][int(m.group(1))]
  raise ValueError(f"no expert load is known for the routing bias at {path!r}")


def update_router_bias(router: dict, aux: dict, rate) -> dict:
  """b <- b + rate * sign(mean(load) - load), per layer (the last axis is the expert axis), over the "router"
  collection tree."""
  out = {}
  for path, b in traverse_util.flatten_dict(router, sep="/").items():
    load = load_for_bias(path, aux).astype(jnp.float32)
    delta = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    out[path] = (b + rate * delta).astype(b.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def max_violation(load_LE):
  """MaxVio per layer: max_i load_i / mean_i load_i - 1 (0 for a layer that saw no tokens)."""
  mean_L = jnp.mean(load_LE, axis=-1)
  return jnp.where(mean_L > 0, jnp.max(load_LE, axis=-1) / jnp.maximum(mean_L, 1e-30) - 1.0, 0.0)


def all_expert_loads(aux: dict):
  """[L_moe + J_moe, E] (J_moe: the MTP blocks that are MoE): the main MoE layers' loads, then the MTP blocks'."""
  return jnp.concatenate([aux["expert_load"], aux.get("mtp_expert_load", aux["expert_load"][:0])], axis=0)
