"""Layers: the building blocks of the DeepSeek-V2/V3 model (imports only from moe_jax.config and kernels)."""

from moe_jax.layers.attention import MLA, attention_mask
from moe_jax.layers.dispatch import capacity_dispatch, dropless_dispatch
from moe_jax.layers.mlp import SwiGLU
from moe_jax.layers.moe import MoE, MoEStats
from moe_jax.layers.norm import RMSNorm
from moe_jax.layers.rope import apply_rope, rope_cos_sin, rope_frequencies
from moe_jax.layers.router import Router, RouterOutput

__all__ = [
    "MLA", "MoE", "MoEStats", "RMSNorm", "Router", "RouterOutput", "SwiGLU", "apply_rope", "attention_mask",
    "capacity_dispatch", "dropless_dispatch", "rope_cos_sin", "rope_frequencies",
]
