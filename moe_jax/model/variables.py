"""The model's variables: {"params": trained weights, "router": loss-free balancing's routing biases}.

The routing biases (`e_score_correction_bias`, topk_method="noaux_tc" only) are a collection of their own: no
gradient, no optimiser state, no weight decay, replicated on every mesh. Trees written before they were (a
params tree holding them, as old code and other tools produce) are converted by `as_variables`.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util

from moe_jax.layers.router import BIAS_COLLECTION, BIAS_NAME


def split_router(params: dict) -> tuple[dict, dict]:
  """(params without any routing bias, the routing biases as a "router" collection tree of the same paths)."""
  flat = traverse_util.flatten_dict(params)
  bias = {k: v for k, v in flat.items() if k[-1] == BIAS_NAME}
  rest = {k: v for k, v in flat.items() if k[-1] != BIAS_NAME}
  return traverse_util.unflatten_dict(rest), traverse_util.unflatten_dict(bias)


def as_variables(tree: Any) -> dict:
  """A variables dict from either a variables dict ({"params": ..., "router": ...}) or a bare params tree (whose
  routing biases, if it holds any, move to the "router" collection)."""
  if not isinstance(tree, dict) and not hasattr(tree, "keys"):
    raise TypeError(f"expected a variables dict or a params tree, got {type(tree).__name__}")
  if "params" in tree:
    unknown = set(tree.keys()) - {"params", BIAS_COLLECTION}
    if unknown:
      raise ValueError(f"unexpected variable collections {sorted(unknown)}; the model has 'params' and "
                       f"{BIAS_COLLECTION!r}")
    if BIAS_COLLECTION in tree:
      return dict(tree)
    tree = tree["params"]
  params, router = split_router(dict(tree))
  return {"params": params, BIAS_COLLECTION: router} if router else {"params": params}
