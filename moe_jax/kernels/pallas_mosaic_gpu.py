"""Pallas Mosaic GPU grouped matmul for Hopper (sm_90): wgmma, TMA loads pipelined over I, persistent over SMs.

It runs on the tiles layout (`layout.py`): every group padded to whole tiles of `tm` rows, so each output tile
belongs to exactly one expert, a tile is stored whole with one TMA copy, and no two CTAs write the same rows.
Work items are (tile, column block) pairs; each of the `num_sms` persistent CTAs takes every num_sms-th item.
Tiles past the last live one (the static bound's slack) are skipped without loading anything:

    out[x*tm : (x+1)*tm, n*tn : (n+1)*tn] = sum_k lhs[x-th tile, k-block] @ rhs[group[x], k-block, n-block]

with bf16 (or f16) inputs and a float32 wgmma accumulator. Padding rows inside a partial tile are zero rows
and produce zeros; dead tiles' output is never read back.

The weight gradient (tgmm) is a second kernel: work items are (expert, I block, O block); each walks its
expert's tiles (contiguous in the layout), TMA-loads the lhs and dout tiles and accumulates lhs^T @ dout with
wgmma (transposed A from shared memory); experts with no rows write zeros:

    drhs[e, k-block, n-block] = sum over tiles x of e of lhs[x, :, k-block]^T @ dout[x, :, n-block]

The tgmm loads are not pipelined yet (one tile in flight): correct, not tuned. Under the GPU interpreter the
wgmma with a transposed A operand (which the interpreter cannot read) is replaced by the same product as a dot.

EXPERIMENTAL and opt-in: validated in Pallas' GPU interpret mode on CPU (tests/test_kernels.py); not in
`auto` until it has run on a lent H100 (docs/benchmarks.md says whether it has).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from moe_jax.kernels import layout as layout_lib
from moe_jax.kernels import xla_tiled
from moe_jax.kernels.interpret import kernel_target

try:  # the GPU interpreter's parameters are not re-exported by every jax version
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _InterpretParams
except ImportError:  # pragma: no cover
  _InterpretParams = None

NUM_SMS = 132  # H100 SXM / H200; `_num_sms()` asks the device. A persistent grid beyond the SM count only queues


def _num_sms() -> int:
  return kernel_target().core_count or NUM_SMS


def _tile_gmm_kernel(group_gmem, live_gmem, lhs_gmem, rhs_gmem, out_gmem, *, tm: int, tn: int, tk: int,
                     n_tiles: int, n_blocks: int, k_steps: int, max_concurrent_steps: int):

  @plgpu.nd_loop((n_tiles * n_blocks,), collective_axes="sm")
  def _work(info):
    (item,) = info.index
    x, nb = item // n_blocks, item % n_blocks

    @pl.when(x < live_gmem[0])
    def _():
      g = group_gmem[x]

      def acc_scope(acc_ref):
        plgpu.emit_pipeline(
            lambda _, a_smem, b_smem: plgpu.wgmma(acc_ref, a_smem, b_smem),
            grid=(k_steps,),
            in_specs=[plgpu.BlockSpec((tm, tk), lambda k: (x, k), delay_release=1),
                      plgpu.BlockSpec((tk, tn), lambda k: (k, nb), delay_release=1)],
            max_concurrent_steps=max_concurrent_steps,
        )(lhs_gmem, rhs_gmem.at[g])
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn)))

      @partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, tn), out_gmem.dtype))
      def _(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[pl.ds(x * tm, tm), pl.ds(nb * tn, tn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _interpret_params():
  if _InterpretParams is None:
    raise NotImplementedError(f"this jax ({jax.__version__}) has no Pallas GPU interpret mode")
  return _InterpretParams()


def _persistent_kernel(body, out_type, n_items: int, num_sms: int, interpret: bool):
  """A kernel whose CTAs (at most one per SM) stride over `n_items` work items with `nd_loop(..., "sm")`."""
  return plgpu.kernel(
      body, out_type=out_type, grid=(min(num_sms, n_items),), grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else False)


def _pick(dim: int, preferred: int) -> int:
  for t in (preferred, 128, 64, 32, 16):
    if t <= preferred and dim % t == 0:
      return t
  raise ValueError(f"pallas_mosaic_gpu needs I and O divisible by 16; got a dimension of {dim}")


@partial(jax.jit, static_argnames=("out_dtype", "interpret", "tn", "tk", "max_concurrent_steps", "num_sms"))
def tile_gmm(lhs_XZI, rhs_EIO, group_X, live_tiles, out_dtype, interpret: bool = False, tn: int = 128,
             tk: int = 64, max_concurrent_steps: int = 4, num_sms: int = NUM_SMS):
  """out[x] = lhs[x] @ rhs[group[x]] for tiles x < live_tiles; [X, Z, O] (dead tiles undefined)."""
  X, tm, I = lhs_XZI.shape
  O = rhs_EIO.shape[2]
  tn, tk = _pick(O, tn), _pick(I, tk)
  if tm % 64:
    raise ValueError(f"pallas_mosaic_gpu needs tiles of a multiple of 64 rows (one warpgroup's wgmma); got {tm}")
  kernel = _persistent_kernel(
      partial(_tile_gmm_kernel, tm=tm, tn=tn, tk=tk, n_tiles=X, n_blocks=O // tn, k_steps=I // tk,
              max_concurrent_steps=max_concurrent_steps),
      jax.ShapeDtypeStruct((X * tm, O), out_dtype), X * (O // tn), num_sms, interpret)
  out = kernel(group_X.astype(jnp.int32), jnp.reshape(live_tiles, (1,)).astype(jnp.int32),
               lhs_XZI.reshape(X * tm, I), rhs_EIO)
  return out.reshape(X, tm, O)


def _tile_tgmm_kernel(start_gmem, end_gmem, lhs_gmem, dout_gmem, out_gmem, *, tm: int, tk: int, tn: int,
                      n_groups: int, k_blocks: int, n_blocks: int, interpret: bool):

  @plgpu.nd_loop((n_groups * k_blocks * n_blocks,), collective_axes="sm")
  def _work(info):
    (item,) = info.index
    e, rest = item // (k_blocks * n_blocks), item % (k_blocks * n_blocks)
    kb, nb = rest // n_blocks, rest % n_blocks

    def smem_scope(a_smem, b_smem, barriers):
      def load(x):
        plgpu.copy_gmem_to_smem(lhs_gmem.at[pl.ds(x * tm, tm), pl.ds(kb * tk, tk)], a_smem, barriers.at[0])
        plgpu.copy_gmem_to_smem(dout_gmem.at[pl.ds(x * tm, tm), pl.ds(nb * tn, tn)], b_smem, barriers.at[1])
        plgpu.barrier_wait(barriers.at[0])
        plgpu.barrier_wait(barriers.at[1])

      if interpret:  # the GPU interpreter cannot read a transposed wgmma operand: same loop, a plain dot
        def tile(x, acc):
          load(x)
          return acc + jnp.dot(a_smem[...].T, b_smem[...], preferred_element_type=jnp.float32)
        return jax.lax.fori_loop(start_gmem[e], end_gmem[e], tile, jnp.zeros((tk, tn), jnp.float32))

      def acc_scope(acc_ref):
        @pl.loop(start_gmem[e], end_gmem[e])
        def _tile(x):
          load(x)
          plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_smem, (1, 0)), b_smem)  # Hopper: A transposed from SMEM
          plgpu.wgmma_wait(0)  # the next copy overwrites a_smem / b_smem
        return acc_ref[...]
      return pl.run_scoped(acc_scope, plgpu.ACC((tk, tn)))

    acc = pl.run_scoped(smem_scope, plgpu.SMEM((tm, tk), lhs_gmem.dtype), plgpu.SMEM((tm, tn), dout_gmem.dtype),
                        plgpu.Barrier(num_barriers=2))

    @partial(pl.run_scoped, o_smem=plgpu.SMEM((tk, tn), out_gmem.dtype))
    def _(o_smem):
      o_smem[...] = acc.astype(o_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[e, pl.ds(kb * tk, tk), pl.ds(nb * tn, tn)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@partial(jax.jit, static_argnames=("num_groups", "out_dtype", "interpret", "tk", "tn", "num_sms"))
def tile_tgmm(lhs_XZI, dout_XZO, group_X, live_tiles, num_groups: int, out_dtype, interpret: bool = False,
              tk: int = 64, tn: int = 128, num_sms: int = NUM_SMS):
  """drhs[e] = sum over live tiles x of group e of lhs[x]^T @ dout[x]: [E, I, O] (zeros for empty experts)."""
  X, tm, I = lhs_XZI.shape
  O = dout_XZO.shape[2]
  tk, tn = _pick(I, tk), _pick(O, tn)
  if tk % 64:
    raise ValueError(f"pallas_mosaic_gpu tgmm needs I divisible by 64 (the wgmma height); got I={I}")
  start_E, end_E = layout_lib.group_tile_ranges(group_X, live_tiles, num_groups)
  kernel = _persistent_kernel(
      partial(_tile_tgmm_kernel, tm=tm, tk=tk, tn=tn, n_groups=num_groups, k_blocks=I // tk, n_blocks=O // tn,
              interpret=interpret),
      jax.ShapeDtypeStruct((num_groups, I, O), out_dtype), num_groups * (I // tk) * (O // tn), num_sms, interpret)
  return kernel(start_E, end_E, lhs_XZI.reshape(X * tm, I), dout_XZO.reshape(X * tm, O))


_TILE_ROWS = 64  # one warpgroup's wgmma height; also bounds per-expert padding waste


def gmm(lhs_MI, rhs_EIO, group_sizes_E, out_dtype, interpret: bool = False):
  M, I = lhs_MI.shape
  O = rhs_EIO.shape[2]
  pad_k, pad_n = -I % 16, -O % 16  # TMA/wgmma tiles are multiples of 16 wide; zero columns change nothing
  lhs_MI = jnp.pad(lhs_MI, ((0, 0), (0, pad_k)))
  rhs_EIO = jnp.pad(rhs_EIO.astype(lhs_MI.dtype), ((0, 0), (0, pad_k), (0, pad_n)))
  row_of_slot_P, group_X = layout_lib.tiles_from_rows(group_sizes_E, M, _TILE_ROWS)
  lhs_XZI = xla_tiled.rows_to_tiles(lhs_MI, row_of_slot_P, _TILE_ROWS)
  live = layout_lib.live_tiles(group_sizes_E, _TILE_ROWS)
  out_XZO = tile_gmm(lhs_XZI, rhs_EIO, group_X, live, jnp.dtype(out_dtype), interpret=interpret, num_sms=_num_sms())
  return xla_tiled.tiles_to_rows(out_XZO, row_of_slot_P, M)[:, :O]


def tgmm(lhs_MI, dout_MO, group_sizes_E, out_dtype, interpret: bool = False):
  I, O = lhs_MI.shape[1], dout_MO.shape[1]
  pad_k, pad_n = -I % 64, -O % 16  # zero columns add zero rows / columns to the result, cut off below
  lhs_MI = jnp.pad(lhs_MI, ((0, 0), (0, pad_k)))
  dout_MO = jnp.pad(dout_MO.astype(lhs_MI.dtype), ((0, 0), (0, pad_n)))
  row_of_slot_P, group_X = layout_lib.tiles_from_rows(group_sizes_E, lhs_MI.shape[0], _TILE_ROWS)
  lhs_XZI = xla_tiled.rows_to_tiles(lhs_MI, row_of_slot_P, _TILE_ROWS)
  dout_XZO = xla_tiled.rows_to_tiles(dout_MO, row_of_slot_P, _TILE_ROWS)
  live = layout_lib.live_tiles(group_sizes_E, _TILE_ROWS)
  out = tile_tgmm(lhs_XZI, dout_XZO, group_X, live, group_sizes_E.shape[0], jnp.dtype(out_dtype),
                  interpret=interpret, num_sms=_num_sms())
  return out[:, :I, :O]
