"""Fused permute / unpermute around the grouped matmul, with gradients that are gathers too.

    permute  : xs[p]  = x[token(copy_of_slot[p])]            (0 for a padding slot)
    unpermute: y[t]   = sum_k  w[t, k] * ys[slot_of_copy[t*K + k]]   (0 for a copy the layout dropped)
Written with autodiff, each gather's transpose is a scatter-add (serialised on CPU, nondeterministic on GPU).
Here every backward is a gather as well, using the inverse map the layout already holds:
    d x[t]     = sum_k dxs[slot_of_copy[t*K + k]]
    d ys[p]    = w[copy] * dy[token(copy)]                   (copy = copy_of_slot[p]; 0 for a padding slot)
    d w[t, k]  = <ys[slot_of_copy[t*K + k]], dy[t]>
No [tokens, experts] one-hot is ever built (see `layout.py` for the maps).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from moe_jax.kernels.layout import gather_or_zero
from moe_jax.kernels.vma import match_varying


def permute(x_TD, copy_of_slot_P, slot_of_copy_M, top_k: int):
  """Gathers each slot's token row: [P, D] (zero rows in padding slots)."""
  return _permute(*match_varying(x_TD, copy_of_slot_P, slot_of_copy_M), top_k)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute(x_TD, copy_of_slot_P, slot_of_copy_M, top_k: int):
  return gather_or_zero(x_TD, jnp.where(copy_of_slot_P < slot_of_copy_M.shape[0], copy_of_slot_P // top_k,
                                       x_TD.shape[0]))


def _permute_fwd(x_TD, copy_of_slot_P, slot_of_copy_M, top_k):
  return _permute(x_TD, copy_of_slot_P, slot_of_copy_M, top_k), (copy_of_slot_P, slot_of_copy_M)


def _permute_bwd(top_k, res, dxs_PD):
  copy_of_slot_P, slot_of_copy_M = res
  dx_TKD = gather_or_zero(dxs_PD, slot_of_copy_M).reshape(-1, top_k, dxs_PD.shape[1])
  return jnp.sum(dx_TKD.astype(jnp.float32), axis=1).astype(dxs_PD.dtype), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def unpermute(ys_PD, weight_TK, copy_of_slot_P, slot_of_copy_M):
  """y[t] = sum_k w[t, k] ys[slot of (t, k)], float32 [T, D]."""
  return _unpermute(*match_varying(ys_PD, weight_TK, copy_of_slot_P, slot_of_copy_M))


@jax.custom_vjp
def _unpermute(ys_PD, weight_TK, copy_of_slot_P, slot_of_copy_M):
  T, K = weight_TK.shape
  y_TKD = gather_or_zero(ys_PD, slot_of_copy_M).reshape(T, K, -1)
  return jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), weight_TK.astype(jnp.float32))


def _unpermute_fwd(ys_PD, weight_TK, copy_of_slot_P, slot_of_copy_M):
  return _unpermute(ys_PD, weight_TK, copy_of_slot_P, slot_of_copy_M), (ys_PD, weight_TK, copy_of_slot_P,
                                                                        slot_of_copy_M)


def _unpermute_bwd(res, dy_TD):
  ys_PD, weight_TK, copy_of_slot_P, slot_of_copy_M = res
  T, K = weight_TK.shape
  M = slot_of_copy_M.shape[0]
  live_P = copy_of_slot_P < M
  copy_P = jnp.minimum(copy_of_slot_P, M - 1)
  w_P = jnp.where(live_P, weight_TK.reshape(-1)[copy_P].astype(jnp.float32), 0.0)
  dys_PD = (w_P[:, None] * jnp.take(dy_TD, copy_P // K, axis=0)).astype(ys_PD.dtype)
  y_TKD = gather_or_zero(ys_PD, slot_of_copy_M).reshape(T, K, -1).astype(jnp.float32)
  dw_TK = jnp.einsum("tkd,td->tk", y_TKD, dy_TD.astype(jnp.float32)).astype(weight_TK.dtype)
  return dys_PD, dw_TK, None, None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)
