"""MLA over the compressed latent cache (absorbed and naive) equals the full-sequence MLA at every position: the
same MLA module, once over all tokens and once over a cache (moe_jax.model.cache writes the entries)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import debug
from moe_jax.inference import cache_bytes_per_token, init_cache
from moe_jax.layers import MLA
from moe_jax.layers.attention import LatentCache, attention_inputs
from moe_jax.model.cache import write_entries


def _setup(q_lora: bool, decode_attention: str = "absorbed"):
  cfg = debug.get_model_config()
  cfg.dtype = "float32"
  cfg.decode_attention = decode_attention
  if not q_lora:
    cfg.q_lora_rank = None
  B, T = 2, 10
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.hidden_size), jnp.float32)
  pos = jnp.tile(jnp.arange(T), (B, 1))
  mla = MLA(cfg)
  params = mla.init(jax.random.key(1), x, attention_inputs(cfg, pos, jnp.ones((B, T), jnp.int32)))["params"]
  # Non-trivial norm scales, so a wrong norm would show.
  params = jax.tree.map(lambda a: a * (1 + 0.1 * jax.random.normal(jax.random.key(2), a.shape)), params)
  full, _ = mla.apply({"params": params}, x, attention_inputs(cfg, pos, jnp.ones((B, T), jnp.int32)))
  return cfg, mla, params, x, full


def _empty(cfg, batch, slots):
  return LatentCache(jnp.zeros((batch, slots, cfg.kv_lora_rank)), jnp.zeros((batch, slots, cfg.qk_rope_head_dim)))


def _cached_step(cfg, mla, params):
  """(x [B,T,D], cache, length [B]) -> (out, cache with the T entries written, length + T)."""
  @jax.jit
  def step(x_, cache, length_B):
    T = x_.shape[1]
    pos = length_B[:, None] + jnp.arange(T)[None]
    inputs = attention_inputs(cfg, pos, jnp.ones(pos.shape, jnp.int32), length_B, cache.ckv_BSC.shape[1])
    out, new = mla.apply({"params": params}, x_, inputs, cache)
    return out, write_entries(cache, new, length_B), length_B + T
  return step


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_prefill_then_decode_equals_full_forward(q_lora, form):
  cfg, mla, params, x, full = _setup(q_lora, form)
  step = _cached_step(cfg, mla, params)
  cache, length = _empty(cfg, 2, 16), jnp.zeros((2,), jnp.int32)
  P = 4
  out, cache, length = step(x[:, :P], cache, length)
  outs = [out]
  for t in range(P, x.shape[1]):  # one token at a time
    out, cache, length = step(x[:, t:t + 1], cache, length)
    outs.append(out)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(length, [10, 10])


def test_sequences_at_different_lengths_decode_together():
  cfg, mla, params, x, full = _setup(True)
  step = _cached_step(cfg, mla, params)
  caches = []
  for b, n in ((0, 3), (1, 7)):  # prefill each sequence to its own length
    _, c, _ = step(x[b:b + 1, :n], _empty(cfg, 1, 12), jnp.zeros((1,), jnp.int32))
    caches.append(c)
  cache = jax.tree.map(lambda *parts: jnp.concatenate(parts), *caches)  # (no indexer keys: a None field)
  pos = jnp.asarray([3, 7])
  xs = x[jnp.arange(2), pos][:, None]
  out, cache, length = step(xs, cache, pos)
  chex.assert_trees_all_close(out[:, 0], full[jnp.arange(2), pos], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(length, [4, 8])


def test_cache_holds_only_the_latent_and_rope_key():
  from configs import deepseek_v3
  cfg = deepseek_v3.get_model_config()
  assert cache_bytes_per_token(cfg, jnp.bfloat16) == (512 + 64) * 2  # 576 values vs 32,768 for MHA
  small = debug.get_model_config()
  c = init_cache(small, 1, 4, jnp.bfloat16)
  assert c.layers["moe_layers"].ckv_BSC.shape == (2, 1, 4, small.kv_lora_rank)  # [layers, B, S, C]
  assert c.mtp.kpe_BSR.shape == (1, 4, small.qk_rope_head_dim)
