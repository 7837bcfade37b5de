"""Merging LoRA adapters into their base weights: W <- W + (alpha / r) A B (moe_jax.layers.lora), in numpy.

Used to export or generate from a LoRA fine-tuning run as a plain model (config lora_rank 0): the merged model
computes what the adapter form computes, up to float32 rounding of the product. Works on any parameter tree
whose adapted weight `w` sits next to `w_lora_a` [lead..., in..., r] and `w_lora_b` [lead..., r, out...]; the
lead dims (experts, the scanned layers axis) are read off the shapes.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from moe_jax.layers.lora import A_SUFFIX, B_SUFFIX, lora_scale


def _merged(w, a, b, scale: float) -> np.ndarray:
  w, a, b = np.asarray(w), np.asarray(a, np.float32), np.asarray(b, np.float32)
  n_lead = a.ndim + b.ndim - 2 - w.ndim
  lead = w.shape[:n_lead]
  a2 = a.reshape(lead + (math.prod(a.shape[n_lead:-1]), a.shape[-1]))
  b2 = b.reshape(lead + (b.shape[n_lead], math.prod(b.shape[n_lead + 1:])))
  delta = np.matmul(a2, b2).reshape(w.shape)
  return (w.astype(np.float32) + np.float32(scale) * delta).astype(w.dtype)


def merge_lora(params: Any, model_cfg: Any) -> Any:
  """The parameter tree with every adapter merged into its weight and the adapter leaves removed."""
  if not model_cfg.get("lora_rank", 0):
    return params
  scale = lora_scale(model_cfg)

  def walk(tree):
    out = {}
    for name, value in tree.items():
      if hasattr(value, "items"):
        out[name] = walk(value)
      elif not (name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)):
        a, b = tree.get(name + A_SUFFIX), tree.get(name + B_SUFFIX)
        out[name] = value if a is None else _merged(value, a, b, scale)
    return out

  return walk(params)


def without_lora(model_cfg: Any) -> ml_collections.ConfigDict:
  """The model config of the merged model (no adapters)."""
  c = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))
  c.lora_rank = 0
  return c
