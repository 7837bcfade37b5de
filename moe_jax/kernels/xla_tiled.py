"""The portable grouped matmul: plain XLA on the tiles layout, so its cost does not grow with the expert count.

Each tile x holds R rows of one expert g(x) (see `layout.py`):
    out[x] = lhs[x] @ rhs[g(x)]                         (gmm: one batched matmul over tiles)
    drhs[e] = sum_{x: g(x)=e} lhs[x]^T @ dout[x]        (tgmm: per-tile products added into expert e)
FLOPs are those of the X*R slots (the copies plus < R padding rows per expert); weight traffic is one K*N read
per tile, read in place (never gathered into X copies). On CPU this is the default backend: `jax.lax.ragged_dot` there computes
every group densely (E times the active FLOPs).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from moe_jax.kernels import layout as layout_lib

_UNROLL = 4  # tiles per loop iteration: amortises XLA CPU's per-iteration overhead over several matmuls


def _iterations(n_live):
  """Loop trip count: the tiles holding at least one copy (they come first), in iterations of _UNROLL tiles."""
  return (n_live + _UNROLL - 1) // _UNROLL


def _padded(x, multiple: int):
  pad = -x.shape[0] % multiple
  return x if pad == 0 else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def tile_gmm_fwd(lhs_XRK, rhs_EKN, group_X, n_live, out_dtype, transpose_rhs: bool = False):
  """out[x] = lhs[x] @ rhs[group[x]] for every tile: [X, R, N] in out_dtype (zeros for dead tiles).

  A loop over the live tiles only (the static bound's slack of dead tiles costs nothing) that reads each tile's
  expert matrix in place: on XLA CPU this is ~2x faster than one batched matmul over gathered weights (the
  gather alone copies X*K*N values), and it holds no copy of the weights, whatever the model size.
  transpose_rhs: use rhs[e]^T ([E, N, K] given), without materialising the transposed weights (the d lhs pass).
  """
  X, R, _ = lhs_XRK.shape
  rhs_EKN = jnp.asarray(rhs_EKN)
  N = rhs_EKN.shape[1 if transpose_rhs else 2]
  contract = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
  lhs, group = _padded(jnp.asarray(lhs_XRK), _UNROLL), _padded(group_X, _UNROLL)

  def body(i, out):
    for u in range(_UNROLL):
      x = i * _UNROLL + u
      tile = jax.lax.dot_general(lhs[x], rhs_EKN[group[x]], contract, preferred_element_type=out_dtype)
      out = jax.lax.dynamic_update_index_in_dim(out, tile, x, 0)
    return out
  out = jax.lax.fori_loop(0, _iterations(n_live), body, jnp.zeros((lhs.shape[0], R, N), out_dtype))
  return out[:X]


def tile_tgmm(lhs_XRK, dout_XRN, group_X, n_live, num_groups: int, out_dtype):
  """drhs[e] = sum over tiles of group e of lhs[x]^T @ dout[x]: [E, K, N] in out_dtype (zero for empty e).

  A loop over experts, each summing its own tiles' products in a [K, N] float32 accumulator and writing it
  once: a per-tile read-modify-write of the [E, K, N] result would move K*N values per tile, which dominates
  when experts are many and small.
  """
  K, N = lhs_XRK.shape[2], dout_XRN.shape[2]
  experts = jnp.arange(num_groups, dtype=jnp.int32)
  start_E = jnp.minimum(jnp.searchsorted(group_X, experts, side="left"), n_live).astype(jnp.int32)
  end_E = jnp.minimum(jnp.searchsorted(group_X, experts, side="right"), n_live).astype(jnp.int32)

  def expert(e, out_EKN):
    tile = lambda x, acc: acc + jnp.dot(lhs_XRK[x].T, dout_XRN[x], preferred_element_type=jnp.float32)
    acc_KN = jax.lax.fori_loop(start_E[e], end_E[e], tile, jnp.zeros((K, N), jnp.float32))
    return jax.lax.dynamic_update_index_in_dim(out_EKN, acc_KN.astype(out_dtype), e, 0)
  return jax.lax.fori_loop(0, num_groups, expert, jnp.zeros((num_groups, K, N), out_dtype))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def tile_gmm(lhs_XRK, rhs_EKN, group_X, n_live, out_dtype):
  """Differentiable tile matmul over the first n_live tiles (the rest are zero): d lhs by the transposed tile
  matmul, d rhs by the tile tgmm."""
  return tile_gmm_fwd(lhs_XRK, rhs_EKN, group_X, n_live, out_dtype)


def _tile_gmm_fwd(lhs_XRK, rhs_EKN, group_X, n_live, out_dtype):
  return tile_gmm_fwd(lhs_XRK, rhs_EKN, group_X, n_live, out_dtype), (lhs_XRK, rhs_EKN, group_X, n_live)


def _tile_gmm_bwd(out_dtype, res, dout_XRN):
  lhs_XRK, rhs_EKN, group_X, n_live = res
  dout_XRN = dout_XRN.astype(lhs_XRK.dtype)
  dlhs = tile_gmm_fwd(dout_XRN, rhs_EKN, group_X, n_live, jnp.float32, transpose_rhs=True).astype(lhs_XRK.dtype)
  drhs = tile_tgmm(lhs_XRK, dout_XRN, group_X, n_live, rhs_EKN.shape[0], rhs_EKN.dtype)
  return dlhs, drhs, None, None


tile_gmm.defvjp(_tile_gmm_fwd, _tile_gmm_bwd)


# ---- the row-layout API (what `gmm` exposes): rows are moved into tiles and back around the tile matmul ----

def rows_to_tiles(x_MK, group_sizes_E, tile_rows: int):
  M = x_MK.shape[0]
  row_of_slot_P, group_X = layout_lib.tiles_from_rows(group_sizes_E, M, tile_rows)
  x_pad = jnp.concatenate([x_MK, jnp.zeros((1, x_MK.shape[1]), x_MK.dtype)], axis=0)
  return x_pad[row_of_slot_P].reshape(-1, tile_rows, x_MK.shape[1]), row_of_slot_P, group_X


def tiles_to_rows(out_XRN, row_of_slot_P, M: int):
  # Live slots write distinct rows; padding slots write distinct out-of-range rows that are dropped.
  P = row_of_slot_P.shape[0]
  write_P = jnp.where(row_of_slot_P < M, row_of_slot_P, M + jnp.arange(P))
  return jnp.zeros((M, out_XRN.shape[2]), out_XRN.dtype).at[write_P].set(
      out_XRN.reshape(P, -1), mode="drop", unique_indices=True)


def gmm(lhs_MK, rhs_EKN, group_sizes_E, out_dtype):
  M, E = lhs_MK.shape[0], rhs_EKN.shape[0]
  tile_rows = layout_lib.tile_rows_for(M, E)
  lhs_XRK, row_of_slot_P, group_X = rows_to_tiles(lhs_MK, group_sizes_E, tile_rows)
  n_live = layout_lib.live_tiles(group_sizes_E, tile_rows)
  return tiles_to_rows(tile_gmm_fwd(lhs_XRK, rhs_EKN, group_X, n_live, out_dtype), row_of_slot_P, M)


def tgmm(lhs_MK, dout_MN, group_sizes_E, out_dtype):
  M, E = lhs_MK.shape[0], group_sizes_E.shape[0]
  tile_rows = layout_lib.tile_rows_for(M, E)
  lhs_XRK, _, group_X = rows_to_tiles(lhs_MK, group_sizes_E, tile_rows)
  dout_XRN, _, _ = rows_to_tiles(dout_MN, group_sizes_E, tile_rows)
  return tile_tgmm(lhs_XRK, dout_XRN, group_X, layout_lib.live_tiles(group_sizes_E, tile_rows), E, out_dtype)
