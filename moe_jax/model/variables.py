"""The model's variables: {"params": trained weights, "router": loss-free balancing's routing biases}.

The routing biases (`e_score_correction_bias`, topk_method="noaux_tc" only) are a collection of their own: no
gradient, no optimiser state, no weight decay, replicated on every mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from moe_jax.layers.router import BIAS_COLLECTION
from moe_jax.model.transformer import Transformer


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


def add_indexers(variables: dict, v32_config: Any, seed: int = 0) -> dict:
  """A V3 model's variables as a V3.2 (DeepSeek Sparse Attention) model's: every existing leaf kept as it is, the
  lightning indexers freshly initialised (V3.2 report sec. 2.1.1: continued training starts from V3.1 with new
  indexers, then the dense warm-up stage). `v32_config`: the V3 model config with index_n_heads set. Raises
  ValueError when anything but indexer parameters would be new or a kept leaf's shape differs."""
  fresh = nn.meta.unbox(jax.jit(Transformer(v32_config).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
  out = {}
  for collection, tree in fresh.items():
    have = flatten_dict(variables.get(collection, {}))
    merged = {}
    for path, leaf in flatten_dict(tree).items():
      if path in have:
        if tuple(have[path].shape) != tuple(leaf.shape):
          raise ValueError(f"{'/'.join(path)}: shape {tuple(have[path].shape)} in the V3 variables, "
                           f"{tuple(leaf.shape)} in the V3.2 config")
        merged[path] = have[path]
      elif "indexer" in path:
        merged[path] = leaf
      else:
        raise ValueError(f"{'/'.join(path)} is not in the V3 variables and is not an indexer parameter: the "
                         "configs differ in more than index_n_heads")
    out[collection] = unflatten_dict(merged)
  return out
