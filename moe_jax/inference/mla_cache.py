"""MLA attention over a compressed latent cache (DeepSeek-V2 report sec. 2.1.2-2.1.3; V3 report sec. 2.1.1).

Per token and layer the cache holds only c_KV (kv_lora_rank values, after the kv RMSNorm) and the RoPE'd shared
key k^R (qk_rope_head_dim values): 576 values for V3, against 2 * 128 * 128 = 32,768 for MHA's per-head K and V.

Naive form (for checking): rebuild per-head keys and values of every cached token,
    k^C_j,i = W_UK,i c_KV_j     v^C_j,i = W_UV,i c_KV_j
    o_t,i   = sum_j softmax_j(scale * (q^C_t,i . k^C_j,i + q^R_t,i . k^R_j)) v^C_j,i

Absorbed form (decode): since q^C_t,i . (W_UK,i c_KV_j) = (W_UK,i^T q^C_t,i) . c_KV_j, fold W_UK into the query
and W_UV into the output:
    q~_t,i  = W_UK,i^T q^C_t,i                       [kv_lora_rank] per head
    a_t,i,j = softmax_j(scale * (q~_t,i . c_KV_j + q^R_t,i . k^R_j))
    o_t,i   = W_UV,i (sum_j a_t,i,j c_KV_j)           (the value up-projection after the weighted sum)
so attention reads the cached latents directly and never materialises per-head K or V for cached tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax.core import meta

from moe_jax.config import softmax_scale
from moe_jax.layers.attention import LATENT_NORM_EPS
from moe_jax.layers.norm import RMSNorm
from moe_jax.layers.rope import apply_rope


class LatentCache(NamedTuple):
  """One layer's cache for B sequences of up to S tokens."""
  ckv_BSC: jax.Array  # normalised kv latents c_KV
  kpe_BSR: jax.Array  # RoPE'd shared keys k^R
  length_B: jax.Array  # int32: tokens cached per sequence


def init_cache(batch: int, max_len: int, cfg: Any, dtype=jnp.bfloat16) -> LatentCache:
  return LatentCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
                     jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype), jnp.zeros((batch,), jnp.int32))


def cache_bytes_per_token(cfg: Any, dtype=jnp.bfloat16) -> int:
  """Per token and layer: (kv_lora_rank + qk_rope_head_dim) x dtype bytes."""
  return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize


def _latent_norm(p, x):
  """The q / kv latent RMSNorm (the MLA layer's `q_norm` / `kv_norm`), in x's dtype."""
  return RMSNorm(LATENT_NORM_EPS, x.dtype).apply({"params": p}, x)


def _queries(p, cfg, x_BTD, cos_BTR, sin_BTR):
  dt = x_BTD.dtype
  if "wq_a" in p:
    cq_BTQ = _latent_norm(p["q_norm"], jnp.einsum("btd,dq->btq", x_BTD, p["wq_a"].astype(dt)))
    q_nope = jnp.einsum("btq,qhn->bthn", cq_BTQ, p["wq_b_nope"].astype(dt))
    q_rope = jnp.einsum("btq,qhr->bthr", cq_BTQ, p["wq_b_rope"].astype(dt))
  else:
    q_nope = jnp.einsum("btd,dhn->bthn", x_BTD, p["wq_nope"].astype(dt))
    q_rope = jnp.einsum("btd,dhr->bthr", x_BTD, p["wq_rope"].astype(dt))
  return q_nope, apply_rope(q_rope, cos_BTR, sin_BTR, cfg.rope_interleave)


def _append(cache: LatentCache, ckv_BTC, kpe_BTR) -> LatentCache:
  """Writes T new tokens at each sequence's own length (per-sequence offsets)."""
  write = jax.vmap(lambda buf, new, at: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), at, 0))
  T = ckv_BTC.shape[1]
  return LatentCache(write(cache.ckv_BSC, ckv_BTC, cache.length_B), write(cache.kpe_BSR, kpe_BTR, cache.length_B),
                     cache.length_B + T)


def mla_attend(p, cfg: Any, x_BTD, cos_BTR, sin_BTR, cache: LatentCache, *, absorb: bool = True):
  """Attends T new tokens (prefill or decode) of B sequences to their cached prefix and themselves (causal).

  p: one MLA layer's params (the `attn` subtree of a block). cos/sin: RoPE at the new tokens' positions.
  Returns (out [B, T, D], the cache with the T tokens appended). The caller keeps length + T <= S.
  """
  p = meta.unbox(p)  # plain arrays whether or not the params carry logical-axis boxes
  dt = x_BTD.dtype
  q_nope_BTHN, q_rope_BTHR = _queries(p, cfg, x_BTD, cos_BTR, sin_BTR)
  ckv_BTC = _latent_norm(p["kv_norm"], jnp.einsum("btd,dc->btc", x_BTD, p["w_dkv"].astype(dt)))
  kpe_BTR = apply_rope(jnp.einsum("btd,dr->btr", x_BTD, p["w_kr"].astype(dt)), cos_BTR, sin_BTR, cfg.rope_interleave)
  start_B = cache.length_B
  cache = _append(cache, ckv_BTC, kpe_BTR)
  ckv_BSC, kpe_BSR = cache.ckv_BSC.astype(dt), cache.kpe_BSR.astype(dt)
  T, S = x_BTD.shape[1], ckv_BSC.shape[1]
  w_uk_CHN, w_uv_CHV = p["w_uk"].astype(dt), p["w_uv"].astype(dt)
  f32 = jnp.float32
  rope_BHTS = jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, kpe_BSR, preferred_element_type=f32)
  if absorb:
    q_lat_BTHC = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_uk_CHN)
    nope_BHTS = jnp.einsum("bthc,bsc->bhts", q_lat_BTHC, ckv_BSC, preferred_element_type=f32)
  else:
    k_nope_BSHN = jnp.einsum("bsc,chn->bshn", ckv_BSC, w_uk_CHN)
    nope_BHTS = jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=f32)
  scores_BHTS = (nope_BHTS + rope_BHTS) * softmax_scale(cfg)
  # Token t (absolute position start + t) sees cached slots s <= start + t.
  visible_BTS = jnp.arange(S)[None, None, :] <= (start_B[:, None] + jnp.arange(T)[None, :])[:, :, None]
  scores_BHTS = jnp.where(visible_BTS[:, None], scores_BHTS, jnp.finfo(f32).min)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(dt)
  if absorb:
    o_lat_BTHC = jnp.einsum("bhts,bsc->bthc", probs_BHTS, ckv_BSC)
    o_BTHV = jnp.einsum("bthc,chv->bthv", o_lat_BTHC, w_uv_CHV)
  else:
    v_BSHV = jnp.einsum("bsc,chv->bshv", ckv_BSC, w_uv_CHV)
    o_BTHV = jnp.einsum("bhts,bshv->bthv", probs_BHTS, v_BSHV)
  return jnp.einsum("bthv,hvd->btd", o_BTHV, p["wo"].astype(dt)), cache
