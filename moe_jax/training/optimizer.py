"""AdamW as in the V3 recipe: beta1 0.9, beta2 0.95, decoupled weight decay 0.1 on matrices only, gradient
clipping at global norm 1.0. The learning rate is applied by the train step (`updates * -lr`), since the V3
schedule depends on tokens seen as well as steps.

Which parameters decay is decided from their logical axis names, not their rank: a scanned RMSNorm scale is
[layers, d] but still a vector. Norm scales and biases are not decayed; the routing biases are not parameters
at all (moe_jax.training.balancing).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


class Rows:
  """A selection leaf: only these rows of a stacked parameter train (ESFT's experts). `index` counts rows of the
  parameter with its first `lead` dims flattened: [E, ...] has lead 1; a scanned [layers, E, ...] has lead 2 and
  row l * E + e."""

  def __init__(self, index, lead: int):
    self.index, self.lead = np.asarray(index, np.int32), lead

  def gather(self, x):
    return x.reshape((-1,) + x.shape[self.lead:])[self.index]

  def scatter(self, rows, like):
    flat = jnp.zeros((math.prod(like.shape[:self.lead]),) + like.shape[self.lead:], rows.dtype)
    return flat.at[self.index].set(rows).reshape(like.shape)

  def __repr__(self):
    return f"Rows({len(self.index)} rows, lead={self.lead})"


def _view(tree: Any, selection: Any, rows: bool = True) -> Any:
  """The trained part of `tree`: whole leaves, gathered rows (or, with rows=False, a per-leaf value such as a
  decay flag kept whole), and optax.MaskedNode() for frozen leaves (which optax's transformations skip, so they
  hold no state)."""
  leaves, treedef = jax.tree.flatten(tree)
  chosen = treedef.flatten_up_to(selection)
  return treedef.unflatten([(s.gather(x) if rows else x) if isinstance(s, Rows) else (x if s else optax.MaskedNode())
                            for x, s in zip(leaves, chosen)])


def restrict_to(inner: optax.GradientTransformation, selection: Any) -> optax.GradientTransformation:
  """`inner` applied to the selected part of the parameters only; frozen parameters and unselected rows get a
  zero direction and no optimiser state. `selection` has one leaf per parameter: True (trains), False (frozen)
  or Rows (only those rows train; Adam's moments are kept for them alone, [rows, ...]).

  optax.masked cannot do the Rows case: its mask is per leaf, and a masked leaf still holds full-size moments.
  """
  def init(params):
    return inner.init(_view(params, selection))

  def update(grads, state, params=None):
    g_view = _view(grads, selection)
    u_view, state = inner.update(g_view, state, None if params is None else _view(params, selection))
    leaves, treedef = jax.tree.flatten(grads)
    chosen, u = treedef.flatten_up_to(selection), treedef.flatten_up_to(u_view)
    out = [s.scatter(ui, g) if isinstance(s, Rows) else (ui if s else jnp.zeros_like(g))
           for g, s, ui in zip(leaves, chosen, u)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init, update)


def make_optimizer(train_cfg: Any, mask: Any, selection: Any = None) -> optax.GradientTransformation:
  """Gradient -> direction (multiply by -lr to get the update). With `selection` (`restrict_to`), only the
  selected parameters (or rows) train: the gradient clipping norm, Adam and weight decay see them alone."""
  decay = mask if selection is None else _view(mask, selection, rows=False)
  adamw = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip_norm),
      optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps),
      optax.add_decayed_weights(train_cfg.weight_decay, mask=decay),
  )
  return adamw if selection is None else restrict_to(adamw, selection)
