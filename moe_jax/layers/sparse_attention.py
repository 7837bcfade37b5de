"""DeepSeek Sparse Attention's main attention in gathered form: each query reads only its top-k latents.

The mask form (moe_jax.layers.attention._attend with the indexer's selection as a mask) computes every [T, S]
score and throws most away; this form never builds a [T, S] tensor per head. Queries go in blocks of Tq
(`config.attention_block_size`); for each block (V3.2 report sec. 2.1, with MLA in its MQA mode, sec. 2.2: one
latent key c_KV_s and one RoPE key k^R_s per token, shared by all heads):
  I_t,s = index scores over every visible key s               [Tq, S]   (the lightning indexer: H^I x D^I per key)
  K_t   = top-k_s I_t,s                                        [Tq, k]   indices (fewer than k visible: the rest
                                                                          are marked invalid)
  gather c_KV and k^R at K_t                                   [Tq, k, C + R]
  o_t,i = W_UV,i sum_{s in K_t} softmax_s(scale (q~_t,i . c_KV_s + q^R_t,i . k^R_s)) c_KV_s
with q~_t,i = W_UK,i^T q^C_t,i (the absorbed query: V2 report sec. 2.1.3). Keys come in blocks (the cache's S
slots, then the call's T tokens) and are gathered from each in place, never concatenated. Each query block is
rematerialised in the backward pass (jax.checkpoint), so training keeps per layer only the block's inputs (q^C,
q^R, the indexer's q^I and w) and its output, not the selection or the gathered latents. Memory per query block
(Tq = min(attention_block_size, 2^17 / k)): Tq x k x (C + R) gathered values, Tq x H x k scores, Tq x H^I x S
index dots. Decoding (T = 1) over a cache of S slots reads k latents, so the main
attention's cost grows with k, not S; the indexer still scores all S keys, at H^I x D^I multiply-adds per key
(V3.2: 64 x 128 = 8,192, against the main attention's 128 heads x 1,152 = 147,456).

Same result as the mask form up to rounding (ties in the top-k aside); tests/test_dsa.py compares both. This form
is always the absorbed one (config.decode_attention="naive" applies to the mask form only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.layers.indexer import index_kl_per_query, index_scores


def _gather(blocks_BSX, idx_BTK):
  """[B, T, K, X]: entry idx of the blocks' keys laid end to end (each block read in place)."""
  out, start = None, 0
  for a_BSX in blocks_BSX:
    S = a_BSX.shape[1]
    local_BTK = jnp.clip(idx_BTK - start, 0, S - 1)
    g_BTKX = jax.vmap(lambda a, i: a[i])(a_BSX, local_BTK)
    out = g_BTKX if out is None else jnp.where(((idx_BTK >= start) & (idx_BTK < start + S))[..., None], g_BTKX, out)
    start += S
  return out


# Gathered (query, key) pairs per query block: the block is min(attention_block_size, this / k) queries, so its
# gathered latents stay near 2^17 x (C + R) values (151 MB at V3's dims in bf16) whatever k is.
GATHER_BUDGET = 1 << 17


def attend_selected(q_nope_BTHN, q_rope_BTHR, w_uk_CHN, w_uv_CHA, ckv_blocks, kpe_blocks, iq_BThd, iw_BTh,
                    index_k_blocks, cached_B11S, segment_ids_BT, *, topk: int, scale: float, block: int,
                    with_kl: bool):
  """The selected-keys attention: (o [B, T, H, A] in q's dtype; KL(p_t || softmax(I_t)) over the selected keys
  [B, T] float32, zeros unless `with_kl`). The absorbed query and the latent sum are formed per query block, so
  only q^C (not the 4x larger q~) and o are kept for the backward pass.

  ckv_blocks / kpe_blocks / index_k_blocks: the key blocks ([B, S_i, ...]): the cache's (when `cached_B11S` says
  which of its slots are valid) and then the call's own T tokens, whose visibility is causal by index within a
  document (`segment_ids_BT`). `p_t` is the attention of query t averaged over heads (a stopped gradient).
  """
  B, T, H, _ = q_nope_BTHN.shape
  A = w_uv_CHA.shape[-1]
  dtype = q_nope_BTHN.dtype
  f32, neg = jnp.float32, jnp.finfo(jnp.float32).min
  Tq = min(block, max(8, GATHER_BUDGET // topk), T)
  n = -(-T // Tq)
  pad = n * Tq - T
  per_query = (q_nope_BTHN, q_rope_BTHR, iq_BThd, iw_BTh, segment_ids_BT, jnp.arange(T, dtype=jnp.int32))
  # padding queries (segment 0, index T) up to a whole number of blocks: computed, then cut off
  per_query = [jnp.pad(a, [(0, 0) if ax != 1 else (0, pad) for ax in range(a.ndim)]) if a.ndim > 1 else
               jnp.pad(a, (0, pad), constant_values=T) for a in per_query]
  chunks = [a.reshape((a.shape[0], n, Tq) + a.shape[2:]).swapaxes(0, 1) if a.ndim > 1 else a.reshape(n, Tq)
            for a in per_query]

  @jax.checkpoint
  def one_block(carry, xs):
    q_nope, q_rope, iq, iw, seg_q, t_q = xs  # [B, Tq, ...]; t_q [Tq]: the queries' indices in the call
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk_CHN)
    scores = []
    for j, k_BSd in enumerate(index_k_blocks):
      s_BtS = index_scores(iq, iw, k_BSd)
      if j == 0 and cached_B11S is not None:
        vis = cached_B11S[:, 0]  # [B, 1, S]
      else:
        t_s = jnp.arange(k_BSd.shape[1])
        vis = (t_s[None, None, :] <= t_q[None, :, None]) & (seg_q[:, :, None] == segment_ids_BT[:, None, :])
      scores.append(jnp.where(vis, s_BtS, -jnp.inf))
    all_BtS = jnp.concatenate(scores, axis=-1)
    vals_BtK, idx_BtK = jax.lax.top_k(all_BtS, topk)
    valid_BtK = vals_BtK > -jnp.inf
    ckv_BtKC, kpe_BtKR = _gather(ckv_blocks, idx_BtK), _gather(kpe_blocks, idx_BtK)
    logits_BtHK = (jnp.einsum("bthc,btkc->bthk", q_lat, ckv_BtKC, preferred_element_type=f32)
                   + jnp.einsum("bthr,btkr->bthk", q_rope, kpe_BtKR, preferred_element_type=f32)) * scale
    probs_BtHK = jax.nn.softmax(jnp.where(valid_BtK[:, :, None], logits_BtHK, neg), axis=-1)
    o_BtHC = jnp.einsum("bthk,btkc->bthc", probs_BtHK.astype(ckv_BtKC.dtype), ckv_BtKC, preferred_element_type=f32)
    o_BtHA = jnp.einsum("bthc,cha->btha", o_BtHC.astype(dtype), w_uv_CHA, preferred_element_type=f32).astype(dtype)
    if not with_kl:
      return carry, (o_BtHA, jnp.zeros(idx_BtK.shape[:2], f32))
    return carry, (o_BtHA, index_kl_per_query(probs_BtHK.swapaxes(1, 2), vals_BtK, valid_BtK))

  _, (o_nBtHA, kl_nBt) = jax.lax.scan(one_block, None, chunks)
  o_BTHA = o_nBtHA.swapaxes(0, 1).reshape(B, n * Tq, H, A)[:, :T]
  kl_BT = kl_nBt.swapaxes(0, 1).reshape(B, n * Tq)[:, :T]
  return o_BTHA, kl_BT
