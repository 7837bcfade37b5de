"""MLA attention through jax's Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
the kernel MaxText runs on TPUs.

Splash takes one head dim for q and k (v may differ): q = [q^C; q^R] * scale (splash applies no scale) and
k = [k^C; k^R broadcast over heads]. A causal mask, and documents by splash's `SegmentIds`; T is padded to a
multiple of the 128-token tiles with a segment id no real token has. Batch by `jax.vmap` (splash is per
sequence: [H, T, dims]).

Tested on CPU in Pallas' TPU interpret mode (`interpret=True`); never run on a TPU (none has been lent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.kernels.attention import joint_qk
from moe_jax.kernels.shapes import pad_to_multiple

_TILE = 128  # splash's default q/kv block


def splash_attention(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR, v_BTHA, segment_ids_BT, *, scale: float,
                     interpret: bool = False):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU Pallas: imported when asked for

  T, H = q_nope_BTHN.shape[1:3]
  T_pad = -(-T // _TILE) * _TILE
  q_BTHK, k_BTHK = joint_qk(q_nope_BTHN, q_rope_BTHR, k_nope_BTHN, k_rope_BTR)
  q_BTHK = q_BTHK * jnp.asarray(scale, q_BTHK.dtype)
  q_BHTK, k_BHTK, v_BHTA = (jnp.swapaxes(pad_to_multiple(x, 1, _TILE), 1, 2) for x in (q_BTHK, k_BTHK, v_BTHA))
  seg_BT = pad_to_multiple(segment_ids_BT.astype(jnp.int32), 1, _TILE, -1)
  mask = splash.MultiHeadMask([splash.CausalMask((T_pad, T_pad)) for _ in range(H)])
  blocks = splash.BlockSizes(block_q=_TILE, block_kv=_TILE, block_kv_compute=_TILE, block_q_dkv=_TILE,
                             block_kv_dkv=_TILE, block_kv_dkv_compute=_TILE, block_q_dq=_TILE, block_kv_dq=_TILE)
  kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)
  o_BHTA = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s)))(
      q_BHTK, k_BHTK, v_BHTA, seg_BT)
  return jnp.swapaxes(o_BHTA, 1, 2)[:, :T]
