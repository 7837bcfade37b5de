"""Parameter shapes and counts from `jax.eval_shape` (no memory, any size).

Counting follows the DeepSeek reports: "activated" parameters per token count the routed experts
num_experts_per_tok of n_routed_experts per MoE layer and exclude the input-embedding lookup (a row gather,
not a matmul); MTP modules are counted separately (the reports' 671B / 37B exclude them).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.config import padded_vocab_size, validate_model_config
from moe_jax.model.transformer import Transformer
from moe_jax.model.variables import flat_variables


def variable_shapes(cfg: Any, boxed: bool = False) -> dict:
  """{"params": ..., "router": ...} as ShapeDtypeStructs (boxed: with their logical-axis metadata)."""
  validate_model_config(cfg)
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens))
  return variables if boxed else nn.meta.unbox(variables)


def param_shapes(cfg: Any, boxed: bool = False):
  """The params pytree as ShapeDtypeStructs (boxed: with their logical-axis metadata)."""
  return variable_shapes(cfg, boxed)["params"]


def _component(path: tuple[str, ...]) -> str:
  """Which row of the summary table a parameter belongs to."""
  if path[0].startswith("mtp_"):
    return "mtp modules"
  if path[0] == "embedding":
    return "embedding (input)"
  if path[0] == "lm_head":
    return "output head"
  if "attn" in path:
    return "attention (MLA)"
  if "router" in path:
    return "routers"
  if "shared_experts" in path:
    return "shared experts"
  if "moe" in path and path[-1] in ("wi_gate", "wi_up", "wo"):
    return "routed experts"
  if "mlp" in path:
    return "dense FFN"
  return "norms"


def count_params(cfg: Any) -> dict:
  """{'total_params', 'active_params', 'total_params_with_mtp', 'active_params_with_mtp',
  'stored_params_hf', 'components': {name: (total, active)}}."""
  shapes = flat_variables(variable_shapes(cfg))  # the routing biases count under "routers"
  frac = cfg.num_experts_per_tok / cfg.n_routed_experts
  components: dict[str, list[int]] = {}
  total = active = mtp_total = mtp_active = 0
  for path, leaf in shapes.items():
    n = int(np.prod(leaf.shape, dtype=np.int64))
    routed = path[-1] in ("wi_gate", "wi_up", "wo") and "moe" in path and "shared_experts" not in path
    a = round(n * frac) if routed else n
    name = _component(path)
    if name == "embedding (input)":
      a = 0 if not cfg.tie_word_embeddings else a
    row = components.setdefault(name, [0, 0])
    row[0] += n
    row[1] += a
    if name == "mtp modules":
      mtp_total += n
      mtp_active += a
    else:
      total += n
      active += a
  emb = cfg.vocab_size * cfg.hidden_size
  # The published checkpoint stores the true vocabulary only (no padding rows), and each MTP layer with its own
  # embedding and head copies.
  padding = (padded_vocab_size(cfg) - cfg.vocab_size) * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  stored = total + mtp_total - padding + cfg.num_nextn_predict_layers * 2 * emb
  return {
      "total_params": total,
      "active_params": active,
      "total_params_with_mtp": total + mtp_total,
      "active_params_with_mtp": active + mtp_active,
      "stored_params_hf": stored,
      "components": {k: tuple(v) for k, v in components.items()},
  }
