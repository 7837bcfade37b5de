"""jax's own Pallas TPU grouped matmul (`jax.experimental.pallas.ops.tpu.megablox`: gmm / tgmm), the kernel
MaxText runs on TPUs, behind moe_jax's gmm contract.

What this wrapper adds: rows padded to a whole row tile (megablox walks `M / tm` tiles), tile sizes clipped to
small problems, rows past sum(group_sizes) and empty experts' weight gradients set to zero (megablox leaves
those outputs unwritten), and tgmm in moe_jax's argument order (megablox takes lhs transposed, [I, M]).
Tested on CPU in Pallas' TPU interpret mode; never run on a TPU (none has been lent to this project).
"""

from __future__ import annotations

import importlib

from moe_jax.kernels.shapes import pad_to_multiple, zero_empty_groups, zero_rows_past_groups

_TILE = 128  # megablox's default (m, k, n) tiles


def _kernels():
  """The kernel module (the package's `gmm` attribute is the custom-vjp function, not the module). TPU Pallas:
  imported only when asked for."""
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _tiling(M: int, I: int, O: int):
  tm = min(_TILE, -(-M // 8) * 8)
  return tm, min(_TILE, I), min(_TILE, O)


def gmm(lhs_MI, rhs_EIO, group_sizes_E, out_dtype, interpret: bool = False):
  megablox = _kernels()

  M, I = lhs_MI.shape
  tiling = _tiling(M, I, rhs_EIO.shape[2])
  out_MO = megablox.gmm(pad_to_multiple(lhs_MI, 0, tiling[0]), rhs_EIO.astype(lhs_MI.dtype), group_sizes_E,
                        out_dtype, tiling, interpret=interpret)[:M]
  return zero_rows_past_groups(out_MO, group_sizes_E, out_dtype)


def tgmm(lhs_MI, dout_MO, group_sizes_E, out_dtype, interpret: bool = False):
  megablox = _kernels()

  M, I = lhs_MI.shape
  tiling = _tiling(M, I, dout_MO.shape[1])
  tm = tiling[0]
  out_EIO = megablox.tgmm(pad_to_multiple(lhs_MI, 0, tm).T, pad_to_multiple(dout_MO.astype(lhs_MI.dtype), 0, tm),
                          group_sizes_E, out_dtype, tiling, num_actual_groups=group_sizes_E.shape[0],
                          interpret=interpret)
  return zero_empty_groups(out_EIO, group_sizes_E, out_dtype)
