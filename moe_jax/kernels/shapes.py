"""What every kernel wrapper does around a library or Pallas kernel: pad an axis to whole tiles, and hold the gmm
contract on outputs a kernel leaves unwritten (rows past the groups, experts with no rows)."""

from __future__ import annotations

import jax.numpy as jnp


def pad_to_multiple(x, axis: int, multiple: int, value=0):
  """`x` with `axis` padded at its end by `value` up to a multiple of `multiple` (unchanged if it is one)."""
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)], constant_values=value)


def zero_rows_past_groups(out_MO, group_sizes_E, out_dtype):
  """gmm's contract: rows past sum(group_sizes) belong to no group, so their output is zero."""
  live_M = jnp.arange(out_MO.shape[0]) < jnp.sum(group_sizes_E)
  return jnp.where(live_M[:, None], out_MO, 0).astype(out_dtype)


def zero_empty_groups(out_EIO, group_sizes_E, out_dtype):
  """tgmm's contract: an expert with no rows has a zero weight gradient."""
  return jnp.where((group_sizes_E > 0)[:, None, None], out_EIO, 0).astype(out_dtype)
