"""Inference: drives the model (`moe_jax.model`: prefill and decode over its latent caches) -- sampling, batched
generation with optional MTP speculative decoding, and perplexity. Nothing here restates a layer.

  sampling   temperature / top-k / top-p distributions (greedy = one-hot)
  generator  `Generator`: jitted prefill + while-loop decoding per shape bucket, plain or speculative
  scoring    perplexity and bits per byte of documents
  acceptance how often MTP drafts are accepted (greedy speculative decoding from held-out prompts)
"""

from moe_jax.inference.acceptance import speculative_acceptance
from moe_jax.inference.generator import GenerationResult, Generator, inference_config
from moe_jax.inference.sampling import Sampling, token_probs
from moe_jax.model.cache import DecodeCache, cache_bytes_per_token, init_cache, with_length

__all__ = ["DecodeCache", "GenerationResult", "Generator", "Sampling", "cache_bytes_per_token", "inference_config",
           "init_cache", "speculative_acceptance", "token_probs", "with_length"]
