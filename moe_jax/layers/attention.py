"""Multi-head Latent Attention (MLA), training / prefill form.

DeepSeek-V2 report, sec. 2.1 (eqs. 9-19), with h_t the block input:
  c_Q  = RMSNorm(W_DQ h_t)                      (q_lora_rank; V2-Lite has no c_Q: q = W_Q h_t)
  q^C  = W_UQ c_Q       [n_h, d_h]              q^R = RoPE(W_QR c_Q)   [n_h, d_h^R]
  c_KV = RMSNorm(W_DKV h_t)                     (kv_lora_rank: the only per-head-free thing cached at decode)
  k^C  = W_UK c_KV      [n_h, d_h]              k^R = RoPE(W_KR h_t)   [d_h^R], one key shared by all heads
  v^C  = W_UV c_KV      [n_h, d_v]
  o_t,i = sum_j softmax_j(scale * (q^C_t,i . k^C_j,i + q^R_t,i . k^R_j)) v^C_j,i ;  u_t = W_O [o_t,1; ...; o_t,n_h]
The two score terms are computed separately so the shared RoPE key is never broadcast over heads.
Masking: token t attends to j <= t (by index) within the same document (`segment_ids`); RoPE uses the
per-document `positions`, so packed rows behave like separate sequences.

Parameter names follow the report's matrices (W_DQ -> wq_a, W_UQ/W_QR -> wq_b_nope/wq_b_rope, W_DKV -> w_dkv,
W_KR -> w_kr, W_UK -> w_uk, W_UV -> w_uv, W_O -> wo), split so decode-time absorption can use them directly.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import softmax_scale
from moe_jax.layers.base import as_dtype, constrain, normal_init, param
from moe_jax.layers.norm import RMSNorm
from moe_jax.layers.rope import apply_rope

# DeepSeek's official code and transformers build the q and kv latent norms with the RMSNorm default eps,
# not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def attention_mask(segment_ids_BT):
  """[B, 1, T, T] boolean: causal by index and within one document."""
  T = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
  same_doc_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TT[None] & same_doc_BTT)[:, None]


class MLA(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_B1TT):
    c = self.config
    dtype, pdtype, init = as_dtype(c.dtype), as_dtype(c.param_dtype), normal_init(c)
    D, H, N, R, V = c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    x_BTD = x_BTD.astype(dtype)

    def mm(eq, a, w):
      return jnp.einsum(eq, a, w.astype(dtype))

    # Queries.
    if c.q_lora_rank is not None:
      Q = c.q_lora_rank
      wq_a = param(self, "wq_a", (D, Q), ("embed", "q_lora"), init, pdtype)
      cq_BTQ = RMSNorm(LATENT_NORM_EPS, dtype, pdtype, axis_name="q_lora", name="q_norm")(mm("btd,dq->btq", x_BTD, wq_a))
      wq_nope = param(self, "wq_b_nope", (Q, H, N), ("q_lora", "heads", "qk_nope"), init, pdtype)
      wq_rope = param(self, "wq_b_rope", (Q, H, R), ("q_lora", "heads", "qk_rope"), init, pdtype)
      q_nope_BTHN = mm("btq,qhn->bthn", cq_BTQ, wq_nope)
      q_rope_BTHR = mm("btq,qhr->bthr", cq_BTQ, wq_rope)
    else:
      wq_nope = param(self, "wq_nope", (D, H, N), ("embed", "heads", "qk_nope"), init, pdtype)
      wq_rope = param(self, "wq_rope", (D, H, R), ("embed", "heads", "qk_rope"), init, pdtype)
      q_nope_BTHN = mm("btd,dhn->bthn", x_BTD, wq_nope)
      q_rope_BTHR = mm("btd,dhr->bthr", x_BTD, wq_rope)
    q_rope_BTHR = apply_rope(q_rope_BTHR, cos_BTR, sin_BTR, c.rope_interleave)

    # Keys and values from the joint latent, plus the shared RoPE key.
    C = c.kv_lora_rank
    w_dkv = param(self, "w_dkv", (D, C), ("embed", "kv_lora"), init, pdtype)
    w_kr = param(self, "w_kr", (D, R), ("embed", "qk_rope"), init, pdtype)
    ckv_BTC = RMSNorm(LATENT_NORM_EPS, dtype, pdtype, axis_name="kv_lora", name="kv_norm")(mm("btd,dc->btc", x_BTD, w_dkv))
    ckv_BTC = constrain(ckv_BTC, ("batch", "length", "kv_lora"))
    k_rope_BTR = apply_rope(mm("btd,dr->btr", x_BTD, w_kr), cos_BTR, sin_BTR, c.rope_interleave)
    w_uk = param(self, "w_uk", (C, H, N), ("kv_lora", "heads", "qk_nope"), init, pdtype)
    w_uv = param(self, "w_uv", (C, H, V), ("kv_lora", "heads", "v_head"), init, pdtype)
    k_nope_BSHN = mm("bsc,chn->bshn", ckv_BTC, w_uk)
    v_BSHV = mm("bsc,chv->bshv", ckv_BTC, w_uv)

    # Scores in float32; the scale carries YaRN's mscale^2.
    scores_BHTS = (
        jnp.einsum("bthn,bshn->bhts", q_nope_BTHN, k_nope_BSHN, preferred_element_type=jnp.float32)
        + jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BTR, preferred_element_type=jnp.float32)
    ) * softmax_scale(c)
    scores_BHTS = jnp.where(mask_B1TT, scores_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(dtype)
    o_BTHV = jnp.einsum("bhts,bshv->bthv", probs_BHTS, v_BSHV)
    o_BTHV = constrain(o_BTHV, ("batch", "length", "heads", "v_head"))

    wo = param(self, "wo", (H, V, D), ("heads", "v_head", "embed"), init, pdtype)
    return mm("bthv,hvd->btd", o_BTHV, wo)
