"""Flash-style causal MLA attention in plain JAX: O(T * block) memory, blocks that see nothing skipped.

For every query t and key s <= t of the same document (segment_ids equal):
    score_t,s,h = scale * (q^C_t,h . k^C_s,h + q^R_t,h . k^R_s)        (k^R: one RoPE key shared by all heads)
    o_t,h       = sum_s softmax_s(score_t,s,h) v_s,h
computed over [block x block] tiles with the online softmax of Milakov & Gimelshein (2018) as used by
FlashAttention (Dao et al. 2022, Algorithm 1): per query row a running max m, normaliser l and unnormalised
output; the forward keeps only o and the log-sum-exp lse = m + log l. The backward (FlashAttention-2, Dao 2023,
Algorithm 2) recomputes each tile's probabilities p = exp(score - lse) and, with Delta_t,h = sum_a dO . O,
    dV_s += p^T dO;   dS = p * (dO V^T - Delta) * scale;   dq^C += dS k^C;  dk^C += dS^T q^C
    dq^R += dS k^R (shared key: no head broadcast);   dk^R += sum_h dS_h^T q^R_h
The two score terms stay separate, so the shared RoPE key is never broadcast over heads.

Tiles above the causal diagonal are never visited (loop bounds); tiles with no query-key pair in the same
document are skipped at run time (`lax.cond`). A call of T <= block is one tile, computed without loops.
Scores, softmax statistics and accumulators are float32; probabilities are cast to the input dtype for the
value matmuls, as the einsum form does.

Why not a library kernel: jax's Pallas flash kernels (GPU Triton / TPU) and cuDNN need one head dim for q and
k (and often v); MLA's q^R/k^R split and the shared RoPE key are not expressible there without broadcasting
k^R. This form runs on every platform; `attention_impl="cudnn"`/`"splash"` use the library kernels.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax.kernels.interpret import kernel_platform
from moe_jax.kernels.shapes import pad_to_multiple

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to 0 without inf - inf = nan


def block_size_for(T: int, block: int) -> int:
  """The tile size used for T tokens: `block`, or T itself when one tile holds the whole call."""
  return T if T <= block else block


def blockwise_attention(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT, *,
                        scale: float, block: int = 512):
  """Causal self-attention within documents, tile by tile. Returns o [B, T, H, A] in the inputs' dtype.

  segment_ids_BT: ints >= 0; token t sees token s <= t with the same id (0 = padding sees padding, as the
  einsum form's mask does). T need not be a multiple of `block`: queries and keys are padded with an id no
  real token has (-1), so pad rows see only pad keys and real rows never see them (they come later).
  """
  T = q_nope_BTHN.shape[1]
  dtype = v_BTHA.dtype
  blk = block_size_for(T, block)
  args = [pad_to_multiple(a, 1, blk) for a in (q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA)]
  if kernel_platform() == "cpu" and dtype != jnp.float32:
    # XLA's CPU runtime has no bf16 x bf16 -> f32 dot inside loops (UNIMPLEMENTED in DotThunk), and CPUs have no
    # bf16 matmul units to lose: compute in float32 there.
    args = [a.astype(jnp.float32) for a in args]
  seg_BT = pad_to_multiple(segment_ids_BT.astype(jnp.int32), 1, blk, -1)
  o_BTHA = _attention(*args, seg_BT, float(scale), blk)
  return o_BTHA[:, :T].astype(dtype)


def _tile(x, i, blk):
  return lax.dynamic_slice_in_dim(x, i * blk, blk, axis=1)


def _visible_BTS(seg_BT, i, j, blk):
  """Query tile i may see key tile j at (t, s): same document and s <= t (by index in the call)."""
  q_seg_BT, k_seg_BS = _tile(seg_BT, i, blk), _tile(seg_BT, j, blk)
  t_T = i * blk + jnp.arange(blk)
  s_S = j * blk + jnp.arange(blk)
  return (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (s_S[None, :] <= t_T[:, None])[None]


def _scores_BHTS(qn_BTHN, qr_BTHR, kn_BSHN, kr_BSR, visible_BTS, scale):
  f32 = jnp.float32
  s_BHTS = (jnp.einsum("bthn,bshn->bhts", qn_BTHN, kn_BSHN, preferred_element_type=f32)
            + jnp.einsum("bthr,bsr->bhts", qr_BTHR, kr_BSR, preferred_element_type=f32)) * scale
  return jnp.where(visible_BTS[:, None], s_BHTS, _NEG)


def _forward(qn, qr, kn, kr, v, seg, scale, blk):
  """(o [B, T, H, A] in v's dtype, lse [B, H, T] float32)."""
  B, T, H, _ = qn.shape
  A = v.shape[-1]
  dtype, f32 = v.dtype, jnp.float32

  single = T == blk

  def query_tile(i):
    qn_i, qr_i = _tile(qn, i, blk), _tile(qr, i, blk)

    def key_tile(j, carry):
      visible_BTS = _visible_BTS(seg, i, j, blk)

      def update(carry):
        m_BHT, l_BHT, acc_BHTA = carry
        s_BHTS = _scores_BHTS(qn_i, qr_i, _tile(kn, j, blk), _tile(kr, j, blk), visible_BTS, scale)
        m_new = jnp.maximum(m_BHT, s_BHTS.max(-1))
        p_BHTS = jnp.exp(s_BHTS - m_new[..., None])
        if not single:  # a row that has seen no key yet has m_new = _NEG: its masked scores must not count as 1
          p_BHTS = jnp.where(visible_BTS[:, None], p_BHTS, 0.0)
        alpha_BHT = jnp.exp(m_BHT - m_new)
        pv_BHTA = jnp.einsum("bhts,bsha->bhta", p_BHTS.astype(dtype), _tile(v, j, blk), preferred_element_type=f32)
        return m_new, alpha_BHT * l_BHT + p_BHTS.sum(-1), alpha_BHT[..., None] * acc_BHTA + pv_BHTA

      if single:  # one tile: every row sees itself, nothing to skip or loop over
        return update(carry)
      return lax.cond(visible_BTS.any(), update, lambda c: c, carry)

    init = (jnp.full((B, H, blk), _NEG, f32), jnp.zeros((B, H, blk), f32), jnp.zeros((B, H, blk, A), f32))
    if single:
      m_BHT, l_BHT, acc_BHTA = key_tile(0, init)
    else:
      m_BHT, l_BHT, acc_BHTA = lax.fori_loop(0, i + 1, key_tile, init)  # causal: key tiles 0..i only
    l_BHT = jnp.where(l_BHT == 0, 1.0, l_BHT)  # every row sees itself; a guard, not a case
    return (acc_BHTA / l_BHT[..., None]).astype(dtype), m_BHT + jnp.log(l_BHT)

  if single:
    o_BHTA, lse_BHT = query_tile(0)
    return jnp.swapaxes(o_BHTA, 1, 2), lse_BHT
  o_nBHTA, lse_nBHT = lax.map(query_tile, jnp.arange(T // blk))
  o_BTHA = jnp.transpose(o_nBHTA, (1, 0, 3, 2, 4)).reshape(B, T, H, A)
  lse_BHT = jnp.transpose(lse_nBHT, (1, 2, 0, 3)).reshape(B, H, T)
  return o_BTHA, lse_BHT


def _backward(qn, qr, kn, kr, v, seg, o, lse_BHT, do, scale, blk):
  B, T, H, N = qn.shape
  R, A = qr.shape[-1], v.shape[-1]
  dtype, f32 = v.dtype, jnp.float32
  delta_BHT = jnp.einsum("btha,btha->bht", do.astype(f32), o.astype(f32))
  n = T // blk

  def key_tile(carry, j):
    dqn_BTHN, dqr_BTHR = carry
    kn_j, kr_j, v_j = _tile(kn, j, blk), _tile(kr, j, blk), _tile(v, j, blk)

    def query_tile(i, inner):
      visible_BTS = _visible_BTS(seg, i, j, blk)

      def update(inner):
        dkn_BSHN, dkr_BSR, dv_BSHA, dqn_BTHN, dqr_BTHR = inner
        qn_i, qr_i, do_i = _tile(qn, i, blk), _tile(qr, i, blk), _tile(do, i, blk)
        lse_i = lax.dynamic_slice_in_dim(lse_BHT, i * blk, blk, axis=2)
        delta_i = lax.dynamic_slice_in_dim(delta_BHT, i * blk, blk, axis=2)
        s_BHTS = _scores_BHTS(qn_i, qr_i, kn_j, kr_j, visible_BTS, scale)
        p_BHTS = jnp.exp(s_BHTS - lse_i[..., None])  # lse is finite (every row sees itself): masked -> exactly 0
        dv_BSHA = dv_BSHA + jnp.einsum("bhts,btha->bsha", p_BHTS.astype(dtype), do_i, preferred_element_type=f32)
        dp_BHTS = jnp.einsum("btha,bsha->bhts", do_i, v_j, preferred_element_type=f32)
        ds_BHTS = (p_BHTS * (dp_BHTS - delta_i[..., None]) * scale).astype(dtype)
        dkn_BSHN = dkn_BSHN + jnp.einsum("bhts,bthn->bshn", ds_BHTS, qn_i, preferred_element_type=f32)
        dkr_BSR = dkr_BSR + jnp.einsum("bhts,bthr->bsr", ds_BHTS, qr_i, preferred_element_type=f32)
        dqn_i = _tile(dqn_BTHN, i, blk) + jnp.einsum("bhts,bshn->bthn", ds_BHTS, kn_j, preferred_element_type=f32)
        dqr_i = _tile(dqr_BTHR, i, blk) + jnp.einsum("bhts,bsr->bthr", ds_BHTS, kr_j, preferred_element_type=f32)
        dqn_BTHN = lax.dynamic_update_slice_in_dim(dqn_BTHN, dqn_i, i * blk, axis=1)
        dqr_BTHR = lax.dynamic_update_slice_in_dim(dqr_BTHR, dqr_i, i * blk, axis=1)
        return dkn_BSHN, dkr_BSR, dv_BSHA, dqn_BTHN, dqr_BTHR

      if n == 1:
        return update(inner)
      return lax.cond(visible_BTS.any(), update, lambda c: c, inner)

    init = (jnp.zeros((B, blk, H, N), f32), jnp.zeros((B, blk, R), f32), jnp.zeros((B, blk, H, A), f32),
            dqn_BTHN, dqr_BTHR)
    if n == 1:
      dkn_j, dkr_j, dv_j, dqn_BTHN, dqr_BTHR = query_tile(0, init)
      return (dqn_BTHN, dqr_BTHR), (dkn_j, dkr_j, dv_j)
    dkn_j, dkr_j, dv_j, dqn_BTHN, dqr_BTHR = lax.fori_loop(j, n, query_tile, init)  # causal: query tiles j..n-1
    return (dqn_BTHN, dqr_BTHR), (dkn_j, dkr_j, dv_j)

  init = (jnp.zeros((B, T, H, N), f32), jnp.zeros((B, T, H, R), f32))
  if n == 1:
    (dqn, dqr), (dkn, dkr, dv) = key_tile(init, 0)
    return tuple(g.astype(x.dtype) for g, x in zip((dqn, dqr, dkn, dkr, dv), (qn, qr, kn, kr, v)))
  (dqn, dqr), (dkn_n, dkr_n, dv_n) = lax.scan(key_tile, init, jnp.arange(n))
  untile = lambda x_n: jnp.moveaxis(x_n, 0, 1).reshape((B, T) + x_n.shape[3:])  # noqa: E731
  return (dqn.astype(qn.dtype), dqr.astype(qr.dtype), untile(dkn_n).astype(kn.dtype),
          untile(dkr_n).astype(kr.dtype), untile(dv_n).astype(v.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(qn, qr, kn, kr, v, seg, scale, blk):
  return _forward(qn, qr, kn, kr, v, seg, scale, blk)[0]


def _attention_fwd(qn, qr, kn, kr, v, seg, scale, blk):
  o, lse = _forward(qn, qr, kn, kr, v, seg, scale, blk)
  return o, (qn, qr, kn, kr, v, seg, o, lse)


def _attention_bwd(scale, blk, res, do):
  qn, qr, kn, kr, v, seg, o, lse = res
  return (*_backward(qn, qr, kn, kr, v, seg, o, lse, do.astype(v.dtype), scale, blk), None)


_attention.defvjp(_attention_fwd, _attention_bwd)
