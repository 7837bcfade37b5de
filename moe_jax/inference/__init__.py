"""Inference: MLA's compressed latent KV cache, whole-model prefill/decode over it, sampling, and batched
generation with optional MTP speculative decoding.

  mla_cache  one layer's latent cache and MLA over it (absorbed and naive)
  decode     the whole model (main layers and MTP modules) over per-layer caches
  sampling   temperature / top-k / top-p distributions (greedy = one-hot)
  generate   `Generator`: jitted prefill + while-loop decoding per shape bucket, plain or speculative
"""

from moe_jax.inference.generate import GenerationResult, Generator
from moe_jax.inference.mla_cache import LatentCache, cache_bytes_per_token, init_cache, mla_attend
from moe_jax.inference.sampling import Sampling, token_probs

__all__ = ["GenerationResult", "Generator", "LatentCache", "Sampling", "cache_bytes_per_token", "init_cache",
           "mla_attend", "token_probs"]
