"""Multi-head Latent Attention (MLA): training, prefill and decoding over the compressed latent cache.

DeepSeek-V2 report, sec. 2.1 (eqs. 9-19), with h_t the block input:
  c_Q  = RMSNorm(W_DQ h_t)                      (q_lora_rank; V2-Lite has no c_Q: q = W_Q h_t)
  q^C  = W_UQ c_Q       [n_h, d_h]              q^R = RoPE(W_QR c_Q)   [n_h, d_h^R]
  c_KV = RMSNorm(W_DKV h_t)                     (kv_lora_rank: with k^R, the only thing cached at decode)
  k^C  = W_UK c_KV      [n_h, d_h]              k^R = RoPE(W_KR h_t)   [d_h^R], one key shared by all heads
  v^C  = W_UV c_KV      [n_h, d_v]
  o_t,i = sum_j softmax_j(scale * (q^C_t,i . k^C_j,i + q^R_t,i . k^R_j)) v^C_j,i ;  u_t = W_O [o_t,1; ...; o_t,n_h]
The two score terms are computed separately so the shared RoPE key is never broadcast over heads.

One module, two forms of the same sum (`MLA.__call__`; the projections are built in one place, `_project`):
- naive (training, and checking): per-head k^C and v^C are built from c_KV for every key;
- absorbed (decoding over the cache; V2 report sec. 2.1.3): since q^C_t,i . (W_UK,i c_KV_j) =
  (W_UK,i^T q^C_t,i) . c_KV_j, fold W_UK into the query and apply W_UV after the latent-weighted sum,
      q~_t,i = W_UK,i^T q^C_t,i  [kv_lora_rank];   o_t,i = W_UV,i sum_j a_t,i,j c_KV_j,
  so attention reads the cached latents directly and never materialises per-head K or V for cached tokens.

Keys come in blocks (`_attend`): the T tokens of the call, plus -- when a cache is passed -- the S cached slots.
The cache is read, never written here: the call returns the new tokens' (c_KV, k^R) and the model writes them
at each sequence's length (moe_jax.model.cache), so a scanned layer stack moves only T new rows per layer.
Masking: token t attends to the cached slots its `AttentionInputs.cached_B11S` allows and to tokens t' <= t of
the call in its own document (`segment_ids`); RoPE uses per-token positions, so packed rows behave like
separate sequences and cached decoding continues at each sequence's own position.

Parameter names follow the report's matrices (W_DQ -> wq_a, W_UQ/W_QR -> wq_b_nope/wq_b_rope, W_DKV -> w_dkv,
W_KR -> w_kr, W_UK -> w_uk, W_UV -> w_uv, W_O -> wo).

DeepSeek Sparse Attention (V3.2; `index_n_heads` set): a lightning indexer (moe_jax.layers.indexer) scores the
visible keys and each query attends to its top-`index_topk`. Over at most k keys that is every visible key, and
the forms above run with the selection as a mask (also the dense warm-up stage, where only the indexer's KL loss
reads the scores); over more, the gathered form (moe_jax.layers.sparse_attention) reads only the selected latents.

`GQA` is the baseline MLA is measured against (config.attention_type "mha" | "gqa"): multi-head attention
(Vaswani et al. 2017) with key/value heads shared by groups of query heads (grouped-query attention, Ainslie et
al. 2023; MHA is one query head per key/value head). It keeps MLA's per-head dims, so the two differ only in what
is cached: q_i = W_Q,i h_t, k_j = W_K,j h_t  [N + R, RoPE on the last R dims of each head], v_j = W_V,j h_t [A]
for key/value head j = i // (H / k); the cache holds every key/value head's k and v: k x (N + R + A) values per
token and layer, against MLA's C + R (V2 report Table 1).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import kv_heads, softmax_scale, uses_indexer
from moe_jax.kernels.attention import attend, resolve_attention
from moe_jax.layers.base import as_dtype, constrain, normal_init, project
from moe_jax.layers.indexer import Indexer, index_kl_per_query, mean_over_queries, select_top_k, visible_scores
from moe_jax.layers.lora import adapted_param
from moe_jax.layers.sparse_attention import attend_selected
from moe_jax.layers.norm import RMSNorm
from moe_jax.layers.rope import apply_rope, rope_cos_sin

# DeepSeek's official code and transformers build the q and kv latent norms with the RMSNorm default eps,
# not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentCache(NamedTuple):
  """One MLA layer's cache entries: per token only c_KV and the RoPE'd shared key k^R (576 values for V3), and
  with DeepSeek Sparse Attention the indexer's key (moe_jax.layers.indexer)."""
  ckv_BSC: jax.Array  # normalised kv latents c_KV
  kpe_BSR: jax.Array  # RoPE'd shared keys k^R
  index_k_BSd: jax.Array | None = None  # DSA: the lightning indexer's keys k^I [B, S, index_head_dim]


class KVCache(NamedTuple):
  """One mha/gqa layer's cache entries: per token every key/value head's RoPE'd key and value."""
  k_BSke: jax.Array  # keys [B, S, kv heads, N + R]
  v_BSkA: jax.Array  # values [B, S, kv heads, A]


class AttentionInputs(NamedTuple):
  """What every MLA layer of one call shares: RoPE at the tokens' positions and the masks."""
  cos_BTR: jax.Array
  sin_BTR: jax.Array
  segment_ids_BT: jax.Array  # token t sees token t' <= t of the call with the same id
  mask_B1TT: jax.Array | None  # bool: that as a [T, T] mask (None: a kernel backend reads segment_ids instead)
  cached_B11S: jax.Array | None = None  # bool: the cache slots every token of the sequence sees (None: no cache)


def attention_mask(segment_ids_BT):
  """[B, 1, T, T] boolean: causal by index and within one document."""
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_doc_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT[None] & same_doc_BTT)[:, None]


def gathered_sparse(cfg: Any, n_keys: int) -> bool:
  """DSA's sparse stage over more keys than it selects: MLA attends in the gathered form, no [T, S] mask."""
  return uses_indexer(cfg) and cfg.index_stage == "sparse" and n_keys > cfg.index_topk


def attention_inputs(cfg: Any, positions_BT, segment_ids_BT, cache_length_B=None, cache_slots: int = 0):
  """AttentionInputs for a call; with `cache_length_B`, the first cache_length_b of `cache_slots` are visible.

  The [B, 1, T, T] mask is built only for the einsum form (`attention_impl="xla"`, and every call over a cache).
  """
  cos_BTR, sin_BTR = rope_cos_sin(cfg, positions_BT)
  cached = None
  if cache_length_B is not None:
    cached = (jnp.arange(cache_slots)[None, :] < cache_length_B[:, None])[:, None, None, :]
  einsum_form = cache_length_B is not None or resolve_attention(cfg.attention_impl) == "xla" or uses_indexer(cfg)
  einsum_form = einsum_form and not gathered_sparse(cfg, positions_BT.shape[1] + cache_slots)
  return AttentionInputs(cos_BTR, sin_BTR, segment_ids_BT, attention_mask(segment_ids_BT) if einsum_form else None,
                         cached)


class MLA(nn.Module):
  config: Any

  def _project(self, x_BTD, inputs: AttentionInputs):
    """The one place q (no-RoPE and RoPE parts), c_KV and k^R are built from the block input; also returns the
    query latent c_Q (None without q_lora_rank), which the DSA indexer reads."""
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    weight = partial(adapted_param, self, init=init, dtype=pdtype, group="attention")  # + LoRA if configured
    D, H, N, R = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
    mm = lambda a, w: project(a, w.astype(dtype))  # noqa: E731
    if c.q_lora_rank is not None:
      Q = c.q_lora_rank
      wq_a = weight("wq_a", (D, Q), ("embed", "q_lora"))
      cq_BTQ = RMSNorm(LATENT_NORM_EPS, dtype, pdtype, axis_name="q_lora", name="q_norm")(mm(x_BTD, wq_a))
      wq_nope = weight("wq_b_nope", (Q, H, N), ("q_lora", "heads", "qk_nope"))
      wq_rope = weight("wq_b_rope", (Q, H, R), ("q_lora", "heads", "qk_rope"))
      q_nope_BTHN = mm(cq_BTQ, wq_nope)
      q_rope_BTHR = mm(cq_BTQ, wq_rope)
    else:
      wq_nope = weight("wq_nope", (D, H, N), ("embed", "heads", "qk_nope"))
      wq_rope = weight("wq_rope", (D, H, R), ("embed", "heads", "qk_rope"))
      q_nope_BTHN = mm(x_BTD, wq_nope)
      q_rope_BTHR = mm(x_BTD, wq_rope)
      cq_BTQ = None
    q_rope_BTHR = apply_rope(q_rope_BTHR, inputs.cos_BTR, inputs.sin_BTR, c.rope_interleave)
    C = c.kv_lora_rank
    w_dkv = weight("w_dkv", (D, C), ("embed", "kv_lora"))
    w_kr = weight("w_kr", (D, R), ("embed", "qk_rope"))
    ckv_BTC = RMSNorm(LATENT_NORM_EPS, dtype, pdtype, axis_name="kv_lora", name="kv_norm")(mm(x_BTD, w_dkv))
    ckv_BTC = constrain(ckv_BTC, ("batch", "length", "kv_lora"))
    kpe_BTR = apply_rope(mm(x_BTD, w_kr), inputs.cos_BTR, inputs.sin_BTR, c.rope_interleave)
    return q_nope_BTHN, q_rope_BTHR, LatentCache(ckv_BTC, kpe_BTR), cq_BTQ

  @nn.compact
  def __call__(self, x_BTD, inputs: AttentionInputs, cache: LatentCache | None = None):
    """Returns (out [B, T, D], the T tokens' LatentCache entries when a cache was passed, else None).

    cache: [B, S, ...] entries of earlier tokens (read only; `inputs.cached_B11S` says which slots count).
    """
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    weight = partial(adapted_param, self, init=init, dtype=pdtype, group="attention")  # + LoRA if configured
    D, H, N, A, C = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    q_nope_BTHN, q_rope_BTHR, new, cq_BTQ = self._project(x_BTD.astype(dtype), inputs)
    w_uk_CHN = weight("w_uk", (C, H, N), ("kv_lora", "heads", "qk_nope")).astype(dtype)
    w_uv_CHA = weight("w_uv", (C, H, A), ("kv_lora", "heads", "v_head")).astype(dtype)
    dsa = uses_indexer(c)
    n_keys = x_BTD.shape[1] + (0 if cache is None else cache.ckv_BSC.shape[1])
    impl = "xla" if cache is not None or dsa else resolve_attention(c.attention_impl)
    if impl != "xla":  # a kernel backend (moe_jax.kernels.attention): per-head keys and values, no [T, T] mask
      k_nope_BTHN = project(new.ckv_BSC, w_uk_CHN)
      v_BTHA = project(new.ckv_BSC, w_uv_CHA)
      o_BTHA = attend(impl, q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, new.kpe_BSR, v_BTHA, inputs.segment_ids_BT,
                      scale=softmax_scale(c), block=c.attention_block_size)
    else:
      blocks = [(new, inputs.mask_B1TT)]
      if cache is not None:
        blocks.insert(0, (LatentCache(cache.ckv_BSC.astype(dtype), cache.kpe_BSR.astype(dtype)), inputs.cached_B11S))
      sparse = dsa and c.index_stage == "sparse"
      training = dsa and cache is None and self.is_mutable_collection("losses") and not self.is_initializing()
      if dsa:  # the lightning indexer (inputs detached in the sparse stage: its KL loss moves only itself)
        ix, icq = (jax.lax.stop_gradient(x_BTD), jax.lax.stop_gradient(cq_BTQ)) if sparse else (x_BTD, cq_BTQ)
        proj = Indexer(c, name="indexer")(ix, icq, inputs)
        index_keys = ([] if cache is None else [cache.index_k_BSd]) + [proj.k_BTd]
        new = new._replace(index_k_BSd=proj.k_BTd)
      if gathered_sparse(c, n_keys):  # each query reads its top-k latents only (moe_jax.layers.sparse_attention)
        keys = [k for k, _ in blocks]
        o_BTHA, kl_BT = attend_selected(
            q_nope_BTHN, q_rope_BTHR, w_uk_CHN, w_uv_CHA, [k.ckv_BSC for k in keys], [k.kpe_BSR for k in keys],
            proj.q_BThd, proj.w_BTh, index_keys, inputs.cached_B11S, inputs.segment_ids_BT, topk=c.index_topk,
            scale=softmax_scale(c), block=c.attention_block_size, with_kl=training)
      else:  # the mask form: dense scores, with the indexer's selection as a mask in the sparse stage
        if dsa:  # the scores (the warm-up's KL reads them over every visible key); a top-k only when sparse
          index_scores_BTS = visible_scores(proj, index_keys, [m for _, m in blocks])
          if sparse:
            selected = select_top_k(index_scores_BTS, [m for _, m in blocks], c.index_topk)
            blocks = [(keys, sel) for (keys, _), sel in zip(blocks, selected)]
        absorb = cache is not None and c.decode_attention == "absorbed"
        o_BTHA, probs_BHTS = _attend(q_nope_BTHN, q_rope_BTHR, blocks, w_uk_CHN, w_uv_CHA, absorb, softmax_scale(c),
                                     dtype)
        if training:
          kl_BT = index_kl_per_query(probs_BHTS, index_scores_BTS,
                                     jnp.concatenate([m for _, m in blocks], axis=-1)[:, 0])
      if training:
        self.sow("losses", "index_kl", mean_over_queries(kl_BT, inputs.segment_ids_BT != 0))
    o_BTHA = constrain(o_BTHA, ("batch", "length", "heads", "v_head"))
    wo_HAD = weight("wo", (H, A, D), ("heads", "v_head", "embed"), n_in=2)
    # One 2-D matmul (heads x value dims contracted together): as an einsum over (h, a), XLA's CPU layout
    # assignment transposed the whole [H, A, D] weight on every call (measured: 7x slower at V3 dims).
    out_BTD = project(o_BTHA, wo_HAD.astype(dtype), contract=2)
    return out_BTD, (new if cache is not None else None)


def _attend(q_nope_BTHN, q_rope_BTHR, blocks, w_uk_CHN, w_uv_CHA, absorb: bool, scale: float, dtype):
  """softmax over the keys of every (LatentCache [B, S_i, ...], mask [B, 1, T | 1, S_i]) block together; returns
  (o [B, T, H, A], the probabilities [B, H, T, sum S_i]).

  Scores in float32 (the scale carries YaRN's mscale^2); the blocks' scores are joined for one softmax and the
  probabilities split again, so a cache block is read in place, never concatenated with the new keys.
  """
  f32 = jnp.float32
  if absorb:
    q_lat_BTHC = jnp.einsum("bthn,chn->bthc", q_nope_BTHN, w_uk_CHN)
  scores = []
  for keys, mask in blocks:
    rope_BHTS = jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, keys.kpe_BSR, preferred_element_type=f32)
    if absorb:
      nope_BHTS = jnp.einsum("bthc,bsc->bhts", q_lat_BTHC, keys.ckv_BSC, preferred_element_type=f32)
    else:
      k_nope_BSHN = jnp.einsum("bsc,chn->bshn", keys.ckv_BSC, w_uk_CHN)
      nope_BHTS = jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=f32)
    scores.append(jnp.where(mask, (nope_BHTS + rope_BHTS) * scale, jnp.finfo(f32).min))
  probs_BHTS = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dtype)
  acc, start = 0.0, 0  # sum over blocks: of latents (absorbed, W_UV applied once after) or of values (naive)
  for keys, _ in blocks:
    S = keys.ckv_BSC.shape[1]
    p_BHTS = probs_BHTS[..., start:start + S]
    start += S
    if absorb:
      acc = acc + jnp.einsum("bhts,bsc->bthc", p_BHTS, keys.ckv_BSC, preferred_element_type=f32)
    else:
      v_BSHA = jnp.einsum("bsc,cha->bsha", keys.ckv_BSC, w_uv_CHA)
      acc = acc + jnp.einsum("bhts,bsha->btha", p_BHTS, v_BSHA, preferred_element_type=f32)
  if absorb:
    acc = jnp.einsum("bthc,cha->btha", acc.astype(dtype), w_uv_CHA, preferred_element_type=f32)
  return acc.astype(dtype), probs_BHTS


class GQA(nn.Module):
  """Multi-head / grouped-query attention with MLA's head dims (the module docstring); same call as `MLA`."""

  config: Any

  @nn.compact
  def __call__(self, x_BTD, inputs: AttentionInputs, cache: KVCache | None = None):
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    weight = partial(adapted_param, self, init=init, dtype=pdtype, group="attention")  # + LoRA if configured
    D, H, N, R, A = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    k = kv_heads(c)
    x_BTD = x_BTD.astype(dtype)
    mm = lambda a, w: project(a, w.astype(dtype))  # noqa: E731
    wq = weight("wq", (D, H, N + R), ("embed", "heads", "qk_head"))
    wk = weight("wk", (D, k, N + R), ("embed", "kv_heads", "qk_head"))
    wv = weight("wv", (D, k, A), ("embed", "kv_heads", "v_head"))

    def rope(t):  # RoPE on the last R dims of each head
      return jnp.concatenate([t[..., :N], apply_rope(t[..., N:], inputs.cos_BTR, inputs.sin_BTR, c.rope_interleave)], -1)

    q_BTHe = rope(mm(x_BTD, wq))
    new = KVCache(rope(mm(x_BTD, wk)), mm(x_BTD, wv))
    impl = "xla" if cache is not None else resolve_attention(c.attention_impl)
    if impl != "xla":  # a kernel backend takes one key per query head and a shared RoPE key: give it none
      g = H // k
      k_BTHe, v_BTHA = jnp.repeat(new.k_BSke, g, axis=2), jnp.repeat(new.v_BSkA, g, axis=2)
      o_BTHA = attend(impl, q_BTHe, q_BTHe[..., :0], k_BTHe, k_BTHe[:, :, 0, :0], v_BTHA, inputs.segment_ids_BT,
                      scale=softmax_scale(c), block=c.attention_block_size)
    else:
      blocks = [(new, inputs.mask_B1TT)]
      if cache is not None:
        blocks.insert(0, (KVCache(cache.k_BSke.astype(dtype), cache.v_BSkA.astype(dtype)), inputs.cached_B11S))
      o_BTHA = _attend_grouped(q_BTHe, blocks, softmax_scale(c), dtype)
    o_BTHA = constrain(o_BTHA, ("batch", "length", "heads", "v_head"))
    wo_HAD = weight("wo", (H, A, D), ("heads", "v_head", "embed"), n_in=2)
    out_BTD = project(o_BTHA, wo_HAD.astype(dtype), contract=2)
    return out_BTD, (new if cache is not None else None)


def _attend_grouped(q_BTHe, blocks, scale: float, dtype):
  """softmax over every (KVCache [B, S_i, k, ...], mask) block's keys together; query head i reads key/value head
  i // g (g = H / k) without the keys being repeated: the query heads are viewed as [k, g]."""
  f32 = jnp.float32
  B, T, H, e = q_BTHe.shape
  k = blocks[0][0].k_BSke.shape[2]
  q_BTkge = q_BTHe.reshape(B, T, k, H // k, e)
  scores = []
  for keys, mask in blocks:
    s_BkgTS = jnp.einsum("btkge,bske->bkgts", q_BTkge, keys.k_BSke, preferred_element_type=f32)
    scores.append(jnp.where(mask[:, :, None], s_BkgTS * scale, jnp.finfo(f32).min))
  probs_BkgTS = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(dtype)
  acc, start = 0.0, 0
  for keys, _ in blocks:
    S = keys.k_BSke.shape[1]
    acc = acc + jnp.einsum("bkgts,bska->btkga", probs_BkgTS[..., start:start + S], keys.v_BSkA,
                           preferred_element_type=f32)
    start += S
  return acc.reshape(B, T, H, -1).astype(dtype)


def attention_class(config: Any):
  """The attention module config.attention_type names: MLA, or GQA for "mha" / "gqa"."""
  return MLA if config.attention_type == "mla" else GQA
