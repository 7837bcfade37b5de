"""LoRA: low-rank adapters on frozen weights (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A weight W [lead..., in..., out...] used as x . W (contracting the `in` dims; `lead` dims are batch dims, e.g. the
routed experts' [E, ...]) gets two trainable factors, created next to it under the names `<name>_lora_a` and
`<name>_lora_b`:
  A [lead..., in..., r]  ~ N(0, 1/fan_in)       B [lead..., r, out...] = 0
  W' = W + (alpha / r) . A B                    (eq. 3 of the paper: h = W0 x + B A x, scaled by alpha / r)
so at initialisation W' = W exactly (W + 0.0 is W in floating point) and the fine-tuned model starts as the base.

The adapted weight is formed *on the weight side* (W' is computed, then the layer runs unchanged) rather than as
x.W + s.(x.A).B on the activations. Why: the same line serves every use of a weight -- the absorbed MLA decode
that folds W_UK into the query, the expert weights inside grouped matmuls of every dispatch backend (dropless,
capacity, expert-parallel all-to-all), scanned and unscanned layers -- with no second code path per layer. The
cost: one extra [in x r] . [r x out] product per adapted matrix per step and a transient copy of W' (per layer
under scan and remat), small against a step's token work at fine-tuning batch sizes. The gradient reaches A and B
through W' (dL/dW' . B^T, A^T . dL/dW'); the frozen W gets none (the optimiser gives it neither update nor state).

Which matrices are adapted is `config.lora_targets` (moe_jax.config.LORA_TARGETS), by the group a layer passes.
moe_jax.model.lora merges the factors into W for export and generation.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.layers.base import param

A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
RANK_AXIS = "lora"  # the logical name of the rank dim (no mesh rule: replicated)


def lora_scale(cfg: Any) -> float:
  return float(cfg.lora_alpha) / cfg.lora_rank


def adapted_param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], init: Any, dtype: Any,
                  group: str, n_lead: int = 0, n_in: int = 1):
  """The parameter `name` (created as `param` does), plus its LoRA update when `group` is in cfg.lora_targets.

  shape = lead (n_lead dims) + in (n_in dims) + out. Returns W or W + (alpha/r) A B, in W's dtype.
  """
  w = param(module, name, shape, axes, init, dtype)
  c = module.config
  if not c.lora_rank or group not in c.lora_targets:
    return w
  r = c.lora_rank
  lead, fan_in, out = tuple(shape[:n_lead]), tuple(shape[n_lead:n_lead + n_in]), tuple(shape[n_lead + n_in:])
  lead_axes, in_axes, out_axes = tuple(axes[:n_lead]), tuple(axes[n_lead:n_lead + n_in]), tuple(axes[n_lead + n_in:])
  a = param(module, name + A_SUFFIX, lead + fan_in + (r,), lead_axes + in_axes + (RANK_AXIS,),
            nn.initializers.normal(stddev=1.0 / math.sqrt(math.prod(fan_in))), jnp.float32)
  b = param(module, name + B_SUFFIX, lead + (r,) + out, lead_axes + (RANK_AXIS,) + out_axes,
            nn.initializers.zeros, jnp.float32)
  a_LIR = a.reshape(lead + (math.prod(fan_in), r))
  b_LRO = b.reshape(lead + (r, math.prod(out)))
  delta = jnp.matmul(a_LIR, b_LRO, precision=jax.lax.Precision.HIGHEST).reshape(tuple(shape))
  return (w.astype(jnp.float32) + lora_scale(c) * delta).astype(w.dtype)
