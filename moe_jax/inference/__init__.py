"""Inference: MLA's compressed latent KV cache (absorbed and naive attention over it).

Decoding loops, speculative decoding and the generate entry point build on `mla_cache` (issue #6, open).
"""

from moe_jax.inference.mla_cache import LatentCache, cache_bytes_per_token, init_cache, mla_attend

__all__ = ["LatentCache", "cache_bytes_per_token", "init_cache", "mla_attend"]
