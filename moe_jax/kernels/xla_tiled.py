"""The portable grouped matmul: plain XLA on the tiles layout, so its cost does not grow with the expert count.

Each tile x holds Z rows of one expert g(x) (see `layout.py`):
    out[x] = lhs[x] @ rhs[g(x)]                         (gmm: one batched matmul over tiles)
    drhs[e] = sum_{x: g(x)=e} lhs[x]^T @ dout[x]        (tgmm: per-tile products added into expert e)
FLOPs are those of the X*Z slots (the copies plus < Z padding rows per expert); weight traffic is one I*O read
per tile. On CPU this is the default backend: `jax.lax.ragged_dot` there computes every group densely (E times
the active FLOPs).

Two formulations of the same math, picked by platform:
- "loop" (CPU): a loop over the live tiles that reads each tile's expert matrix in place. XLA CPU runs small
  batched matmuls one at a time anyway, and gathering weights copies X*I*O values slowly, so the loop is ~2x
  faster than the batched form there; dead tiles (the static bound's slack) cost nothing.
- "batched" (GPU, TPU, other): one batched matmul per chunk of tiles over gathered expert weights (chunks of
  at most `_CHUNK_BYTES` of weights, so V3-sized experts never materialise X copies). A loop of small
  kernels would be launch-bound on an accelerator.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from moe_jax.kernels import layout as layout_lib
from moe_jax.kernels.interpret import kernel_platform
from moe_jax.kernels.shapes import pad_to_multiple
from moe_jax.kernels.vma import match_varying, zeros_varying

_UNROLL = 4  # tiles per loop iteration: amortises XLA CPU's per-iteration overhead over several matmuls
_CHUNK_BYTES = 256 * 2**20  # gathered expert weights per batched matmul ("batched" formulation)
_FORCE_FORMULATION = None  # "loop" | "batched" to override the platform's choice (tests)


def _formulation() -> str:
  return _FORCE_FORMULATION or ("loop" if kernel_platform() == "cpu" else "batched")


def _chunk_tiles(n_tiles: int, matrix_elems: int, itemsize: int) -> int:
  """Tiles per chunk so that the chunk's per-tile [I, O] matrices stay within _CHUNK_BYTES."""
  return max(1, min(n_tiles, _CHUNK_BYTES // max(1, matrix_elems * itemsize)))


def _map_chunks(fn, n_tiles: int, chunk: int, *xs):
  """fn over tile-leading arrays xs, `chunk` tiles at a time (one call when chunk >= n_tiles)."""
  if chunk >= n_tiles:
    return fn(*xs)
  xs = [pad_to_multiple(x, 0, chunk) for x in xs]  # padded tiles are zero rows of group 0: they add nothing
  out = jax.lax.map(lambda args: fn(*args), [x.reshape((-1, chunk) + x.shape[1:]) for x in xs])
  return out.reshape((-1,) + out.shape[2:])[:n_tiles]


def _batched_gmm(lhs_XZI, rhs_EIO, group_X, out_dtype, transpose_rhs):
  X = lhs_XZI.shape[0]
  spec = "xrk,xnk->xrn" if transpose_rhs else "xrk,xkn->xrn"
  mm = lambda l, g: jnp.einsum(spec, l, rhs_EIO[g], preferred_element_type=out_dtype)
  chunk = _chunk_tiles(X, rhs_EIO.shape[1] * rhs_EIO.shape[2], rhs_EIO.dtype.itemsize)
  return _map_chunks(mm, X, chunk, lhs_XZI, group_X)


def _batched_tgmm(lhs_XZI, dout_XZO, group_X, num_groups: int, out_dtype):
  X, _, I = lhs_XZI.shape
  O = dout_XZO.shape[2]
  prod = lambda l, d: jnp.einsum("xrk,xrn->xkn", l, d, preferred_element_type=jnp.float32)
  chunk = _chunk_tiles(X, I * O, 4)
  if chunk >= X:
    out = jax.ops.segment_sum(prod(lhs_XZI, dout_XZO), group_X, num_groups, indices_are_sorted=True)
    return out.astype(out_dtype)

  def body(acc_EIO, args):
    l, d, g = args
    return acc_EIO.at[g].add(prod(l, d)), None
  xs = [pad_to_multiple(x, 0, chunk) for x in (lhs_XZI, dout_XZO, group_X)]
  acc, _ = jax.lax.scan(body, zeros_varying((num_groups, I, O), jnp.float32, lhs_XZI, dout_XZO, group_X),
                        [x.reshape((-1, chunk) + x.shape[1:]) for x in xs])
  return acc.astype(out_dtype)


def _iterations(n_live):
  """Loop trip count: the tiles holding at least one copy (they come first), in iterations of _UNROLL tiles."""
  return (n_live + _UNROLL - 1) // _UNROLL


def tile_gmm_fwd(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype, transpose_rhs: bool = False):
  """out[x] = lhs[x] @ rhs[group[x]] for every tile: [X, Z, O] in out_dtype (zeros for dead tiles).

  A loop over the live tiles only (the static bound's slack of dead tiles costs nothing) that reads each tile's
  expert matrix in place: on XLA CPU this is ~2x faster than one batched matmul over gathered weights (the
  gather alone copies X*I*O values), and it holds no copy of the weights, whatever the model size.
  transpose_rhs: use rhs[e]^T ([E, O, I] given), without materialising the transposed weights (the d lhs pass).
  """
  X, Z, _ = lhs_XZI.shape
  rhs_EIO = jnp.asarray(rhs_EIO)
  if _formulation() == "batched":  # dead tiles are zero rows: computing them is harmless
    return _batched_gmm(jnp.asarray(lhs_XZI), rhs_EIO, group_X, out_dtype, transpose_rhs)
  O = rhs_EIO.shape[1 if transpose_rhs else 2]
  contract = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
  lhs, group = pad_to_multiple(jnp.asarray(lhs_XZI), 0, _UNROLL), pad_to_multiple(group_X, 0, _UNROLL)

  def body(i, out):
    for u in range(_UNROLL):
      x = i * _UNROLL + u
      tile = jax.lax.dot_general(lhs[x], rhs_EIO[group[x]], contract, preferred_element_type=out_dtype)
      out = jax.lax.dynamic_update_index_in_dim(out, tile, x, 0)
    return out
  out0 = zeros_varying((lhs.shape[0], Z, O), out_dtype, lhs, rhs_EIO, group, n_live)
  return jax.lax.fori_loop(0, _iterations(n_live), body, out0)[:X]


def tile_tgmm(lhs_XZI, dout_XZO, group_X, n_live, num_groups: int, out_dtype):
  """drhs[e] = sum over tiles of group e of lhs[x]^T @ dout[x]: [E, I, O] in out_dtype (zero for empty e).

  A loop over experts, each summing its own tiles' products in a [I, O] float32 accumulator and writing it
  once: a per-tile read-modify-write of the [E, I, O] result would move I*O values per tile, which dominates
  when experts are many and small.
  """
  if _formulation() == "batched":
    return _batched_tgmm(lhs_XZI, dout_XZO, group_X, num_groups, out_dtype)
  I, O = lhs_XZI.shape[2], dout_XZO.shape[2]
  start_E, end_E = layout_lib.group_tile_ranges(group_X, n_live, num_groups)

  operands = (lhs_XZI, dout_XZO, group_X, n_live)

  def expert(e, out_EIO):
    tile = lambda x, acc: acc + jnp.dot(lhs_XZI[x].T, dout_XZO[x], preferred_element_type=jnp.float32)
    acc_IO = jax.lax.fori_loop(start_E[e], end_E[e], tile, zeros_varying((I, O), jnp.float32, *operands))
    return jax.lax.dynamic_update_index_in_dim(out_EIO, acc_IO.astype(out_dtype), e, 0)
  return jax.lax.fori_loop(0, num_groups, expert, zeros_varying((num_groups, I, O), out_dtype, *operands))


def tile_gmm(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype):
  """Differentiable tile matmul over the first n_live tiles (the rest are zero): d lhs by the transposed tile
  matmul, d rhs by the tile tgmm."""
  lhs_XZI, rhs_EIO, group_X, n_live = match_varying(jnp.asarray(lhs_XZI), jnp.asarray(rhs_EIO), group_X, n_live)
  return _tile_gmm(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tile_gmm(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype):
  return tile_gmm_fwd(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype)


def _tile_gmm_fwd(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype):
  return tile_gmm_fwd(lhs_XZI, rhs_EIO, group_X, n_live, out_dtype), (lhs_XZI, rhs_EIO, group_X, n_live)


def _tile_gmm_bwd(out_dtype, res, dout_XZO):
  lhs_XZI, rhs_EIO, group_X, n_live = res
  dout_XZO = dout_XZO.astype(lhs_XZI.dtype)
  dlhs = tile_gmm_fwd(dout_XZO, rhs_EIO, group_X, n_live, jnp.float32, transpose_rhs=True).astype(lhs_XZI.dtype)
  drhs = tile_tgmm(lhs_XZI, dout_XZO, group_X, n_live, rhs_EIO.shape[0], rhs_EIO.dtype)
  return dlhs, drhs, None, None


_tile_gmm.defvjp(_tile_gmm_fwd, _tile_gmm_bwd)


# ---- the row-layout API (what `gmm` exposes): rows are moved into tiles and back around the tile matmul ----

def rows_to_tiles(x_MI, row_of_slot_P, tile_rows: int):
  """The rows layout's rows moved into tiles ([X, Z, I]; zero rows in padding slots), given
  `layout.tiles_from_rows`'s slot map."""
  return layout_lib.gather_or_zero(x_MI, row_of_slot_P).reshape(-1, tile_rows, x_MI.shape[1])


def tiles_to_rows(out_XZO, row_of_slot_P, M: int):
  """The inverse move: each live slot's row back to its place in the rows layout ([M, O]; zeros past the groups)."""
  return layout_lib.scatter_slots(out_XZO.reshape(row_of_slot_P.shape[0], -1), row_of_slot_P, M)


def gmm(lhs_MI, rhs_EIO, group_sizes_E, out_dtype):
  M, E = lhs_MI.shape[0], rhs_EIO.shape[0]
  tile_rows = layout_lib.tile_rows_for(M, E)
  row_of_slot_P, group_X = layout_lib.tiles_from_rows(group_sizes_E, M, tile_rows)
  n_live = layout_lib.live_tiles(group_sizes_E, tile_rows)
  out_XZO = tile_gmm_fwd(rows_to_tiles(lhs_MI, row_of_slot_P, tile_rows), rhs_EIO, group_X, n_live, out_dtype)
  return tiles_to_rows(out_XZO, row_of_slot_P, M)


def tgmm(lhs_MI, dout_MO, group_sizes_E, out_dtype):
  M, E = lhs_MI.shape[0], group_sizes_E.shape[0]
  tile_rows = layout_lib.tile_rows_for(M, E)
  row_of_slot_P, group_X = layout_lib.tiles_from_rows(group_sizes_E, M, tile_rows)
  return tile_tgmm(rows_to_tiles(lhs_MI, row_of_slot_P, tile_rows), rows_to_tiles(dout_MO, row_of_slot_P, tile_rows),
                   group_X, layout_lib.live_tiles(group_sizes_E, tile_rows), E, out_dtype)
