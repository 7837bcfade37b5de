"""Pallas Mosaic GPU grouped matmul for Hopper (sm_90): wgmma, TMA loads pipelined over K, persistent over SMs.

It runs on the tiles layout (`layout.py`): every group padded to whole tiles of `tm` rows, so each output tile
belongs to exactly one expert, a tile is stored whole with one TMA copy, and no two CTAs write the same rows.
Work items are (tile, column block) pairs; each of the `num_sms` persistent CTAs takes every num_sms-th item.
Tiles past the last live one (the static bound's slack) are skipped without loading anything:

    out[x*tm : (x+1)*tm, n*tn : (n+1)*tn] = sum_k lhs[x-th tile, k-block] @ rhs[group[x], k-block, n-block]

with bf16 (or f16) inputs and a float32 wgmma accumulator. Padding rows inside a partial tile are zero rows
and produce zeros; dead tiles' output is never read back.

The weight gradient (tgmm) uses the portable tile tgmm (`xla_tiled.tile_tgmm`: one batched matmul and a
segment sum), which XLA runs on the GPU; a dedicated tgmm kernel is future work.

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

try:  # the GPU interpreter's parameters are not re-exported by every jax version
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as _InterpretParams
except ImportError:  # pragma: no cover
  _InterpretParams = None

NUM_SMS = 132  # H100 SXM; a persistent grid larger than the SM count only queues


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


def _pick(dim: int, preferred: int) -> int:
  for t in (preferred, 128, 64, 32, 16):
    if t <= preferred and dim % t == 0:
      return t
  raise ValueError(f"pallas_mosaic_gpu needs K and N divisible by 16; got a dimension of {dim}")


@partial(jax.jit, static_argnames=("out_dtype", "interpret", "tn", "tk", "max_concurrent_steps", "num_sms"))
def tile_gmm(lhs_XRK, rhs_EKN, group_X, live_tiles, out_dtype, interpret: bool = False, tn: int = 128,
             tk: int = 64, max_concurrent_steps: int = 4, num_sms: int = NUM_SMS):
  """out[x] = lhs[x] @ rhs[group[x]] for tiles x < live_tiles; [X, R, N] (dead tiles undefined)."""
  X, tm, K = lhs_XRK.shape
  N = rhs_EKN.shape[2]
  tn, tk = _pick(N, tn), _pick(K, tk)
  if tm % 64:
    raise ValueError(f"pallas_mosaic_gpu needs tiles of a multiple of 64 rows (one warpgroup's wgmma); got {tm}")
  kernel = plgpu.kernel(
      partial(_tile_gmm_kernel, tm=tm, tn=tn, tk=tk, n_tiles=X, n_blocks=N // tn, k_steps=K // tk,
              max_concurrent_steps=max_concurrent_steps),
      out_type=jax.ShapeDtypeStruct((X * tm, N), out_dtype),
      grid=(min(num_sms, X * (N // tn)),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=_interpret_params() if interpret else False,
  )
  out = kernel(group_X.astype(jnp.int32), jnp.reshape(live_tiles, (1,)).astype(jnp.int32),
               lhs_XRK.reshape(X * tm, K), rhs_EKN)
  return out.reshape(X, tm, N)


_TILE_ROWS = 64  # one warpgroup's wgmma height; also bounds per-expert padding waste


def gmm(lhs_MK, rhs_EKN, group_sizes_E, out_dtype, interpret: bool = False):
  M, K = lhs_MK.shape
  N = rhs_EKN.shape[2]
  pad_k, pad_n = -K % 16, -N % 16  # TMA/wgmma tiles are multiples of 16 wide; zero columns change nothing
  lhs_MK = jnp.pad(lhs_MK, ((0, 0), (0, pad_k)))
  rhs_EKN = jnp.pad(rhs_EKN.astype(lhs_MK.dtype), ((0, 0), (0, pad_k), (0, pad_n)))
  lhs_XRK, row_of_slot_P, group_X = xla_tiled.rows_to_tiles(lhs_MK, group_sizes_E, _TILE_ROWS)
  live = layout_lib.live_tiles(group_sizes_E, _TILE_ROWS)
  out_XRN = tile_gmm(lhs_XRK, rhs_EKN, group_X, live, jnp.dtype(out_dtype), interpret=interpret)
  return xla_tiled.tiles_to_rows(out_XRN, row_of_slot_P, M)[:, :N]


def tgmm(lhs_MK, dout_MN, group_sizes_E, out_dtype, interpret: bool = False):
  del interpret  # the weight gradient is the portable tile tgmm (see the module docstring)
  return xla_tiled.tgmm(lhs_MK, dout_MN, group_sizes_E, out_dtype)


