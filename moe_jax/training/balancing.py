"""Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3 report sec. 2.1.2) and the MaxVio balance metric.

The routers' selection biases `e_score_correction_bias` are not trained parameters: they live in the model's
"router" variable collection (moe_jax.model.variables), so they get no gradient, no optimiser state and no
weight decay, and after every step the trainer applies
    b_i <- b_i + gamma * sign(mean_j load_j - load_i)
per MoE layer ("sign", the rule of the paper and of V3), with load_i the token-copies routed to expert i in the *global* batch: the model sums the loads
over the whole batch, and under SPMD `jit` that sum spans every data shard, so all devices apply the same update. The paper's "proportional" variant (its sec. 4.3 ablation of the update rule)
moves each bias by the size of the violation instead of its sign; here the violation is relative to the mean load,
    b_i <- b_i + gamma * (mean_j load_j - load_i) / mean_j load_j,
so gamma has the same meaning under both rules (the largest step a balanced-to-empty expert takes is gamma) and does
not depend on the batch size.

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


BIAS_UPDATE_RULES = ("sign", "proportional")


def update_router_bias(router: dict, aux: dict, rate, rule: str = "sign") -> dict:
  """b <- b + rate * sign(mean(load) - load) ("sign") or + rate * (mean(load) - load) / mean(load)
  ("proportional"), per layer (the last axis is the expert axis), over the "router" collection tree."""
  if rule not in BIAS_UPDATE_RULES:
    raise ValueError(f"bias update rule {rule!r} is not one of {BIAS_UPDATE_RULES}")
  out = {}
  for path, b in traverse_util.flatten_dict(router, sep="/").items():
    load = load_for_bias(path, aux).astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    if rule == "sign":
      delta = jnp.sign(mean - load)
    else:  # a layer that saw no tokens has mean 0: no move
      delta = jnp.where(mean > 0, (mean - load) / jnp.maximum(mean, 1e-30), 0.0)
    out[path] = (b + rate * delta).astype(b.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def max_violation(load_LE):
  """MaxVio per layer: max_i load_i / mean_i load_i - 1 (0 for a layer that saw no tokens)."""
  mean_L = jnp.mean(load_LE, axis=-1)
  return jnp.where(mean_L > 0, jnp.max(load_LE, axis=-1) / jnp.maximum(mean_L, 1e-30) - 1.0, 0.0)


def all_expert_loads(aux: dict):
  """[L_moe + J_moe, E] (J_moe: the MTP blocks that are MoE): the main MoE layers' loads, then the MTP blocks'."""
  return jnp.concatenate([aux["expert_load"], aux.get("mtp_expert_load", aux["expert_load"][:0])], axis=0)
