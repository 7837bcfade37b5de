"""The model's variables: {"params": trained weights, "router": loss-free balancing's routing biases}.

The routing biases (`e_score_correction_bias`, topk_method="noaux_tc" only) are a collection of their own: no
gradient, no optimiser state, no weight decay, replicated on every mesh.
"""

from __future__ import annotations

from typing import Any

from flax.traverse_util import flatten_dict

from moe_jax.layers.router import BIAS_COLLECTION


def flat_variables(variables: dict) -> dict:
  """{path inside its collection: leaf} over "params" and "router" (their paths never collide: the bias paths end
  in e_score_correction_bias, which no parameter does)."""
  return {p: leaf for collection in variables.values() for p, leaf in flatten_dict(collection).items()}


def as_variables(tree: Any) -> dict:
  """A variables dict from a variables dict ({"params": ..., "router": ...}) or a bare params tree (a model
  without routing biases; applying one that has them says where they belong)."""
  if "params" not in tree:
    return {"params": tree}
  unknown = set(tree.keys()) - {"params", BIAS_COLLECTION}
  if unknown:
    raise ValueError(f"unexpected variable collections {sorted(unknown)}; the model has 'params' and "
                     f"{BIAS_COLLECTION!r}")
  return dict(tree)
