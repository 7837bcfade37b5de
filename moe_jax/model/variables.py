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

from moe_jax.layers.lora import A_SUFFIX, B_SUFFIX
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


def merge_variables(loaded: dict, fresh: dict, source: str = "the loaded variables") -> tuple[dict, list[str]]:
  """`fresh`'s tree with every leaf `loaded` has put in its place; only lightning-indexer and LoRA-adapter leaves
  may be missing from `loaded` (they keep their fresh values: V3.2 report sec. 2.1.1, continued training from V3.1
  starts with new indexers; a LoRA fine-tune starts with new adapters). Returns (variables, the '/'-joined paths
  left fresh). Raises ValueError naming the first leaf whose shape differs or that is missing and not an indexer's
  or an adapter's; leaves `loaded` has beyond `fresh` are an error too (weights that would be silently dropped)."""
  out, left_fresh = {}, []
  dropped = sorted(set(loaded) - set(fresh))
  if dropped:
    raise ValueError(f"{source} holds collection(s) {dropped} this config has none of: the model configs differ")
  for collection, tree in fresh.items():
    have = flatten_dict(loaded.get(collection, {}))
    merged = {}
    for path, leaf in flatten_dict(tree).items():
      name = "/".join(path)
      if path in have:
        if tuple(have[path].shape) != tuple(leaf.shape):
          raise ValueError(f"{name}: shape {tuple(have[path].shape)} in {source}, {tuple(leaf.shape)} in this config")
        merged[path] = jnp.asarray(have[path], leaf.dtype)
      elif "indexer" in path or path[-1].endswith((A_SUFFIX, B_SUFFIX)):
        merged[path] = leaf
        left_fresh.append(name)
      else:
        raise ValueError(f"{name} is not in {source} and is not a DSA indexer or LoRA parameter: the model configs "
                         "differ in more than index_n_heads or the LoRA fields")
    extra = sorted("/".join(p) for p in set(have) - set(flatten_dict(tree)))
    if extra:
      raise ValueError(f"{source} holds {len(extra)} array(s) this config has no place for ({', '.join(extra[:3])}"
                       f"{' ...' if len(extra) > 3 else ''}): the model configs differ")
    out[collection] = unflatten_dict(merged)
  return out, left_fresh


def add_indexers(variables: dict, v32_config: Any, seed: int = 0) -> dict:
  """A V3 model's variables as a V3.2 (DeepSeek Sparse Attention) model's: every existing leaf kept as it is, the
  lightning indexers freshly initialised (`merge_variables`). `v32_config`: the V3 model config with index_n_heads
  set. Raises ValueError when anything but indexer parameters would be new or a kept leaf's shape differs."""
  fresh = nn.meta.unbox(jax.jit(Transformer(v32_config).init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
  return merge_variables(variables, fresh, "the V3 variables")[0]
