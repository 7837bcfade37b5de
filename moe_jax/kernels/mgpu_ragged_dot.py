"""jax's own Pallas Mosaic GPU grouped matmuls for Hopper (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` and
`transposed_ragged_dot_mgpu`), behind moe_jax's gmm contract.

    gmm : ragged_dot(lhs [M, I], rhs [E, I, O], group_sizes)             -> [M, O]
    tgmm: transposed_ragged_dot(lhs [M, I] as (K=M, m=I), dout [M, O])  -> [E, I, O]
The kernels need I (and, for tgmm, I and O) to be multiples of their blocks and write their output in the input
dtype; this wrapper pads features to whole blocks, zeroes rows past sum(group_sizes), and casts.

NOT YET VALIDATED ON A GPU: no Hopper was lent while this was written; `tests/test_gpu.py` checks it against a
float64 loop when one is. Opt-in (`gmm_backend="mgpu_ragged_dot"`); `auto` does not pick it until then.
"""

from __future__ import annotations

import contextlib
import types

import jax
import jax.numpy as jnp

from moe_jax.kernels.interpret import kernel_target
from moe_jax.kernels.shapes import pad_to_multiple as _pad
from moe_jax.kernels.shapes import zero_rows_past_groups

# Block sizes from the kernels' own tuning sweeps (their `main`), for bf16 on an H100.
_GMM_BLOCKS = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
_TGMM_BLOCKS = dict(block_m=64, block_n=64, block_k=64, max_concurrent_steps=4, grid_block_n=1)


def gmm(lhs_MI, rhs_EIO, group_sizes_E, out_dtype, interpret: bool = False):
  del interpret  # Mosaic GPU kernels have no interpret mode
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu  # Mosaic GPU: imported only when asked for

  O = rhs_EIO.shape[2]
  lhs = _pad(lhs_MI, 1, _GMM_BLOCKS["block_k"])
  rhs = _pad(_pad(rhs_EIO.astype(lhs_MI.dtype), 1, _GMM_BLOCKS["block_k"]), 2, _GMM_BLOCKS["block_n"])
  out_MO = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes_E, **_GMM_BLOCKS)[:, :O]
  return zero_rows_past_groups(out_MO, group_sizes_E, out_dtype)


def tgmm(lhs_MI, dout_MO, group_sizes_E, out_dtype, interpret: bool = False):
  del interpret
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

  M, I = lhs_MI.shape
  O = dout_MO.shape[1]
  live_M = (jnp.arange(M) < jnp.sum(group_sizes_E))[:, None]
  lhs = _pad(jnp.where(live_M, lhs_MI, 0), 1, _TGMM_BLOCKS["block_m"])
  dout = _pad(jnp.where(live_M, dout_MO, 0).astype(lhs_MI.dtype), 1, _TGMM_BLOCKS["block_n"])
  with _sm_count_of_target(transposed_ragged_dot_mgpu):
    out_EIO = transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, dout, group_sizes=group_sizes_E, **_TGMM_BLOCKS)
  return out_EIO[:, :I, :O].astype(out_dtype)


class _TargetDevices(types.ModuleType):
  """`jax` as the kernel module sees it, except that `devices()[0].core_count` is the kernel target's SM count."""

  def __init__(self, core_count: int):
    super().__init__("jax")
    self._device = types.SimpleNamespace(core_count=core_count)

  def __getattr__(self, name):
    return getattr(jax, name)

  def devices(self, *args, **kwargs):
    del args, kwargs
    return [self._device]


@contextlib.contextmanager
def _sm_count_of_target(module):
  """Upstream's transposed kernel sizes its persistent grid from `jax.devices()[0].core_count` while tracing: a
  CPU device when compiling for an H100 from a CPU host (no such attribute), or the wrong GPU model. For the
  trace only, the module sees the kernel target's SM count (moe_jax.kernels.interpret.kernel_target)."""
  cores = kernel_target().core_count
  if cores is None:
    yield
    return
  module.jax = _TargetDevices(cores)
  try:
    yield
  finally:
    module.jax = jax
