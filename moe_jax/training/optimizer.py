"""AdamW as in the V3 recipe: beta1 0.9, beta2 0.95, decoupled weight decay 0.1 on matrices only, gradient
clipping at global norm 1.0. The learning rate is applied by the train step (`updates * -lr`), since the V3
schedule depends on tokens seen as well as steps.

Which parameters decay is decided from their logical axis names, not their rank: a scanned RMSNorm scale is
[layers, d] but still a vector. Norm scales and biases are not decayed; the routing biases are not parameters
at all (moe_jax.training.balancing).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax


def decay_mask(boxed_params: Any) -> Any:
  """True for leaves with >= 2 axes besides the scanned 'layers' axis (matrices, embeddings, expert stacks)."""

  def is_matrix(leaf):
    if isinstance(leaf, nn.Partitioned):
      return sum(name != "layers" for name in leaf.names) >= 2
    return len(leaf.shape) >= 2

  return jax.tree.map(is_matrix, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


TRAINABLE = ("all", "indexer")


def trainable_mask(params: Any, trainable: str) -> Any:
  """True for the parameters that train: all, or only the DSA indexers' (the V3.2 dense warm-up stage)."""
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable={trainable!r} is not one of {TRAINABLE}")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: trainable == "all" or any(getattr(k, "key", None) == "indexer" for k in path), params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(train_cfg: Any, mask: Any, train_mask: Any = None) -> optax.GradientTransformation:
  """Gradient -> direction (multiply by -lr to get the update). With `train_mask`, frozen parameters get a zero
  direction and no optimiser state (optax.masked keeps only the trained leaves' Adam moments)."""
  adamw = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip_norm),
      optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=mask),
  )
  if train_mask is None:
    return adamw
  frozen = jax.tree.map(lambda t: not t, train_mask)
  return optax.chain(optax.masked(adamw, train_mask), optax.masked(optax.set_to_zero(), frozen))
