"""MLA over the compressed latent cache (absorbed and naive) equals the full-sequence MLA at every position."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import debug
from moe_jax.inference import LatentCache, cache_bytes_per_token, init_cache, mla_attend
from moe_jax.layers import MLA, attention_mask, rope_cos_sin


def _setup(q_lora: bool):
  cfg = debug.get_model_config()
  cfg.dtype = "float32"
  if not q_lora:
    cfg.q_lora_rank = None
  B, T = 2, 10
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size), jnp.float32)
  pos = jnp.tile(jnp.arange(T), (B, 1))
  cos, sin = rope_cos_sin(cfg, pos)
  mask = attention_mask(jnp.ones((B, T), jnp.int32))
  mla = MLA(cfg)
  params = mla.init(jax.random.key(1), x, cos, sin, mask)["params"]
  # Non-trivial norm scales, so a wrong norm would show.
  params = jax.tree.map(lambda a: a * (1 + 0.1 * jax.random.normal(jax.random.key(2), a.shape)), params)
  full = mla.apply({"params": params}, x, cos, sin, mask)
  return cfg, params, x, cos, sin, full


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("absorb", [True, False])
def test_prefill_then_decode_equals_full_forward(q_lora, absorb):
  cfg, params, x, cos, sin, full = _setup(q_lora)
  step = jax.jit(lambda x_, c_, s_, cache: mla_attend(params, cfg, x_, c_, s_, cache, absorb=absorb))
  cache = init_cache(2, 16, cfg, jnp.float32)
  P = 4
  out, cache = step(x[:, :P], cos[:, :P], sin[:, :P], cache)
  outs = [out]
  for t in range(P, x.shape[1]):  # one token at a time
    out, cache = step(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache)
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.length_B, [10, 10])


def test_sequences_at_different_lengths_decode_together():
  cfg, params, x, cos, sin, full = _setup(True)
  caches = []
  for b, n in ((0, 3), (1, 7)):  # prefill each sequence to its own length
    empty = init_cache(1, 12, cfg, jnp.float32)
    _, c = mla_attend(params, cfg, x[b:b + 1, :n], cos[b:b + 1, :n], sin[b:b + 1, :n], empty)
    caches.append(c)
  cache = LatentCache(*(jnp.concatenate(parts) for parts in zip(*caches)))
  pos = jnp.asarray([3, 7])
  xs = x[jnp.arange(2), pos][:, None]
  at = lambda a: a[jnp.arange(2), pos][:, None]  # each sequence's next position
  out, cache = mla_attend(params, cfg, xs, at(cos), at(sin), cache)
  chex.assert_trees_all_close(out[:, 0], full[jnp.arange(2), pos], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.length_B, [4, 8])


def test_cache_holds_only_the_latent_and_rope_key():
  from configs import deepseek_v3
  cfg = deepseek_v3.get_model_config()
  assert cache_bytes_per_token(cfg, jnp.bfloat16) == (512 + 64) * 2  # 576 values vs 32,768 for MHA
  c = init_cache(1, 4, debug.get_model_config(), jnp.bfloat16)
  assert c.ckv_BSC.shape[-1] == debug.get_model_config().kv_lora_rank
