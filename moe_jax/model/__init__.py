"""The model: blocks, MTP modules and the Transformer (imports layers; nothing above it)."""

from moe_jax.model.block import Block
from moe_jax.model.mtp import MTPModule
from moe_jax.model.transformer import Transformer

__all__ = ["Block", "MTPModule", "Transformer"]
