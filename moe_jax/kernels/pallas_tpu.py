"""Pallas TPU grouped matmul in the megablox style (Gale et al. 2023, "MegaBlocks"; jax's megablox kernels).

The rows layout is cut into row tiles of `tm`. A row tile may straddle groups, so the kernel walks *work items*:
every (group, row tile) pair that overlaps, ordered by group. Their group id and row-tile id are scalar-prefetched
into SMEM and drive the BlockSpec index maps, so each grid step DMAs exactly the lhs tile and the expert's weight
tile it needs:

    gmm : grid (O/tn, W, I/tk); out[tile m, :] (rows of group g) = sum_k lhs[m, k] @ rhs[g, k, :]
    tgmm: grid (I/tk, O/tn, W); drhs[g] = sum over g's work items of lhs[m]^T @ dout[m] (rows of g only)

W = ceil(M/tm) + E - 1 bounds the work items statically (the TPU interpreter needs a static grid); items past
the live count repeat the last one and do nothing. Consecutive work items on one row tile keep the output block
resident, so rows of the next group are merged in with a row mask; the first visit of a tile starts from zeros.
Rows past sum(group_sizes) and experts with no rows are zeroed outside the kernel.

No TPU is lent to this project: this kernel's evidence is Pallas' TPU interpret mode on CPU
(`interpret=True`), which runs the same grid, index maps and block copies. It is opt-in and experimental.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moe_jax.kernels.shapes import pad_to_multiple as _pad_to
from moe_jax.kernels.shapes import zero_empty_groups


def work_items(group_sizes_E, num_rows: int, tm: int):
  """(group_ids [W], m_tile_ids [W], num_live) for the (group, row tile) pairs that overlap, in group order."""
  E = group_sizes_E.shape[0]
  n_work = -(-num_rows // tm) + E - 1
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  first_E = starts_E // tm
  visits_E = jnp.where(group_sizes_E > 0, (ends_E - 1) // tm - first_E + 1, 0)
  visit_end_E = jnp.cumsum(visits_E)
  num_live = visit_end_E[-1]
  w = jnp.minimum(jnp.arange(n_work, dtype=jnp.int32), jnp.maximum(num_live - 1, 0))  # dead items repeat
  group_W = jnp.minimum(jnp.searchsorted(visit_end_E, w, side="right"), E - 1)
  m_tile_W = first_E[group_W] + w - (visit_end_E - visits_E)[group_W]
  return group_W.astype(jnp.int32), m_tile_W.astype(jnp.int32), num_live.astype(jnp.int32)


def _row_mask(offsets_ref, g, m_tile, tm: int):
  rows = m_tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])


def _gmm_kernel(offsets_ref, group_ref, m_tile_ref, live_ref, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int):
  w, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(w < live_ref[0])
  def _():
    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[0], preferred_element_type=jnp.float32)

  @pl.when((k == pl.num_programs(2) - 1) & (w < live_ref[0]))
  def _():
    g, m_tile = group_ref[w], m_tile_ref[w]
    first_visit = (w == 0) | (m_tile_ref[jnp.maximum(w - 1, 0)] != m_tile)
    prev = jnp.where(first_visit, 0, out_ref[...].astype(jnp.float32))
    out_ref[...] = jnp.where(_row_mask(offsets_ref, g, m_tile, tm), acc_ref[...], prev).astype(out_ref.dtype)


def _tgmm_kernel(offsets_ref, group_ref, m_tile_ref, live_ref, lhs_ref, dout_ref, out_ref, acc_ref, *, tm: int):
  w = pl.program_id(2)
  g, m_tile = group_ref[w], m_tile_ref[w]
  first_of_group = (w == 0) | (group_ref[jnp.maximum(w - 1, 0)] != g)
  last_of_group = (w == pl.num_programs(2) - 1) | (group_ref[jnp.minimum(w + 1, pl.num_programs(2) - 1)] != g)

  @pl.when(first_of_group)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(w < live_ref[0])
  def _():
    mask = _row_mask(offsets_ref, g, m_tile, tm)
    lhs = jnp.where(mask, lhs_ref[...], 0)
    acc_ref[...] += jax.lax.dot_general(lhs, dout_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

  @pl.when(last_of_group)
  def _():
    out_ref[0] = acc_ref[...].astype(out_ref.dtype)


def _tiles(M: int, I: int, O: int, tiling):
  tm, tk, tn = tiling
  return min(tm, max(8, M)), min(tk, I), min(tn, O)


@partial(jax.jit, static_argnames=("out_dtype", "tiling", "interpret"))
def gmm(lhs_MI, rhs_EIO, group_sizes_E, out_dtype, tiling=(128, 128, 128), interpret: bool = False):
  M, I = lhs_MI.shape
  E, _, O = rhs_EIO.shape
  tm, tk, tn = _tiles(M, I, O, tiling)
  lhs = _pad_to(_pad_to(lhs_MI, 0, tm), 1, tk)
  rhs = _pad_to(_pad_to(rhs_EIO, 1, tk), 2, tn)
  group_W, m_tile_W, live = work_items(group_sizes_E, M, tm)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes_E)]).astype(jnp.int32)
  grid = (rhs.shape[2] // tn, group_W.shape[0], lhs.shape[1] // tk)
  out = pl.pallas_call(
      partial(_gmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((lhs.shape[0], rhs.shape[2]), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lambda n, w, k, off, grp, mt, lv: (mt[w], k)),
                    pl.BlockSpec((1, tk, tn), lambda n, w, k, off, grp, mt, lv: (grp[w], k, n))],
          out_specs=pl.BlockSpec((tm, tn), lambda n, w, k, off, grp, mt, lv: (mt[w], n)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(offsets, group_W, m_tile_W, live[None], lhs, rhs)
  rows = jnp.arange(M)[:, None]
  return jnp.where(rows < offsets[-1], out[:M, :O], 0).astype(out_dtype)  # never-visited tiles hold garbage


@partial(jax.jit, static_argnames=("out_dtype", "tiling", "interpret"))
def tgmm(lhs_MI, dout_MO, group_sizes_E, out_dtype, tiling=(128, 128, 128), interpret: bool = False):
  M, I = lhs_MI.shape
  O = dout_MO.shape[1]
  E = group_sizes_E.shape[0]
  tm, tk, tn = _tiles(M, I, O, tiling)
  lhs = _pad_to(_pad_to(lhs_MI, 0, tm), 1, tk)
  dout = _pad_to(_pad_to(dout_MO, 0, tm), 1, tn)
  group_W, m_tile_W, live = work_items(group_sizes_E, M, tm)
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes_E)]).astype(jnp.int32)
  grid = (lhs.shape[1] // tk, dout.shape[1] // tn, group_W.shape[0])
  out = pl.pallas_call(
      partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((E, lhs.shape[1], dout.shape[1]), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4, grid=grid,
          in_specs=[pl.BlockSpec((tm, tk), lambda k, n, w, off, grp, mt, lv: (mt[w], k)),
                    pl.BlockSpec((tm, tn), lambda k, n, w, off, grp, mt, lv: (mt[w], n))],
          out_specs=pl.BlockSpec((1, tk, tn), lambda k, n, w, off, grp, mt, lv: (grp[w], k, n)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(offsets, group_W, m_tile_W, live[None], lhs, dout)
  return zero_empty_groups(out[:, :I, :O], group_sizes_E, out_dtype)
