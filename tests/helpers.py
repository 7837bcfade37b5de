"""Shared test helpers: tiny configs, jitted init, numpy conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import debug
from moe_jax.model import Transformer


def tiny_config(**overrides):
  c = debug.get_model_config()
  for k, v in overrides.items():
    c[k] = v
  return c


def init_params(cfg, seed=0, batch=(2, 12)):
  model = Transformer(cfg)
  tokens = jnp.zeros(batch, jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)
  return model, nn.meta.unbox(variables["params"])


def to_numpy64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_bias(params, seed=1, scale=0.3):
  """Gives every router a non-zero e_score_correction_bias (so tests exercise biased selection)."""
  rng = np.random.default_rng(seed)

  def visit(tree):
    if isinstance(tree, dict):
      return {k: (jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype) if k == "e_score_correction_bias"
                  else visit(v)) for k, v in tree.items()}
    return tree

  return visit(params)


def max_rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
