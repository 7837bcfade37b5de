"""Rotary position embedding with YaRN frequency scaling, in DeepSeek's interleaved layout.

RoPE rotates pairs of dimensions by angle p * theta_j, theta_j = base^(-2j/d) (Su et al., RoFormer). DeepSeek's
checkpoints pair dimensions (x0,x1),(x2,x3),... ("interleaved"); other models pair (x_j, x_{j+d/2}).

YaRN (Peng et al. 2023, sec. 3.2 "NTK-by-parts"): with extension factor s, frequencies whose wavelength makes
more than beta_fast rotations over the original context are kept, those under beta_slow are divided by s, and a
linear ramp between the two blends them. The correction dims are floor/ceil'd as in DeepSeek's official code.
The cos/sin are multiplied by mscale(s, mscale)/mscale(s, mscale_all_dim) (1 for all DeepSeek releases); the
softmax temperature part of YaRN lives in `moe_jax.config.softmax_scale`.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from moe_jax.config import yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
  return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: Any) -> tuple[np.ndarray, float]:
  """Returns (inv_freq [d_R/2] float32, cos/sin scale) for the config's RoPE (+ YaRN)."""
  dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
  inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32), 1.0
  s, orig = float(rs.factor), int(rs.original_max_position_embeddings)
  low = max(math.floor(_yarn_correction_dim(rs.beta_fast, dim, base, orig)), 0)
  high = min(math.ceil(_yarn_correction_dim(rs.beta_slow, dim, base, orig)), dim - 1)
  if low == high:
    high += 0.001  # as the official code: avoid a zero-width ramp
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  keep = 1.0 - ramp  # 1 = extrapolate (keep theta), 0 = interpolate (theta / s)
  inv_freq = inv_freq / s * (1.0 - keep) + inv_freq * keep
  mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
  if mscale and mscale_all:
    attn_factor = yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all)
  else:
    attn_factor = yarn_mscale(s, 1.0)
  return inv_freq.astype(np.float32), float(attn_factor)


def rope_cos_sin(cfg: Any, positions_BT):
  """cos, sin of shape [B, T, d_R/2] (float32) for integer positions."""
  inv_freq, attn_factor = rope_frequencies(cfg)
  angles_BTR = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  return jnp.cos(angles_BTR) * attn_factor, jnp.sin(angles_BTR) * attn_factor


def apply_rope(x_BTHD, cos_BTR, sin_BTR, interleave: bool = True):
  """Rotates the last dim of x [B, T, (H,) D] by position; cos/sin [B, T, D/2]. Computed in float32."""
  dtype = x_BTHD.dtype
  x = x_BTHD.astype(jnp.float32)
  extra = x.ndim - cos_BTR.ndim  # broadcast over a heads axis if present
  cos = cos_BTR.reshape(cos_BTR.shape[:2] + (1,) * extra + cos_BTR.shape[2:])
  sin = sin_BTR.reshape(sin_BTR.shape[:2] + (1,) * extra + sin_BTR.shape[2:])
  if interleave:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(dtype)
