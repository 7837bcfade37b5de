"""Grouped matmul (gmm): out[m] = lhs[m] @ rhs[group(m)], with groups given as sizes of consecutive row blocks.

Backends
- "ragged_dot": `jax.lax.ragged_dot`. Differentiable by JAX. On CPU XLA computes every group densely (cost grows
  with the number of experts); on GPU/TPU the compiler decides.
- "tiled": portable XLA. Rows are cut into tiles of `TILE_ROWS` with every group padded to whole tiles (at most
  M/TILE_ROWS + E tiles, a static bound), each tile is multiplied by its own group's weights in one batched
  matmul, and the rows are put back. Cost ~ the rows' FLOPs plus one weight read per tile, whatever E is, so
  it is the CPU default (on CPU, ragged_dot's cost is E times the active FLOPs). Differentiable by JAX.
- "reference": a loop over experts, each a masked dense matmul. Slow (E dense matmuls) and only meant as an
  independent check in tests and benchmarks.
Pallas kernels join this table in a later change; the call signature stays the same.

Rows past `sum(group_sizes)` belong to no group: their output is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("ragged_dot", "tiled", "reference")
TILE_ROWS = 128
_AUTO = {"cpu": "tiled", "gpu": "ragged_dot", "cuda": "ragged_dot", "rocm": "ragged_dot", "tpu": "ragged_dot"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Maps "auto" to the platform's default and checks that `backend` exists."""
  platform = platform or jax.default_backend()
  if backend == "auto":
    return _AUTO.get(platform, "ragged_dot")
  if backend not in BACKENDS:
    raise ValueError(f"gmm backend {backend!r} is not one of {('auto',) + BACKENDS} (platform {platform!r})")
  return backend


def _reference(lhs_MK, rhs_EKN, group_sizes_E, preferred_element_type):
  ends_E = jnp.cumsum(group_sizes_E)
  starts_E = ends_E - group_sizes_E
  rows_M = jnp.arange(lhs_MK.shape[0])
  out_MN = jnp.zeros((lhs_MK.shape[0], rhs_EKN.shape[2]), preferred_element_type)
  for e in range(rhs_EKN.shape[0]):
    in_group_M = (rows_M >= starts_E[e]) & (rows_M < ends_E[e])
    prod_MN = jnp.dot(lhs_MK, rhs_EKN[e], preferred_element_type=preferred_element_type)
    out_MN = out_MN + jnp.where(in_group_M[:, None], prod_MN, 0)
  return out_MN


def _tiled(lhs_MK, rhs_EKN, group_sizes_E, preferred_element_type, tm: int = TILE_ROWS):
  M, K = lhs_MK.shape
  E, _, N = rhs_EKN.shape
  n_tiles = M // tm + E  # each group wastes less than one tile
  tiles_E = (group_sizes_E + tm - 1) // tm
  tile_end_E = jnp.cumsum(tiles_E)
  tile_start_E = tile_end_E - tiles_E
  row_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  tile_X = jnp.arange(n_tiles)
  group_X = jnp.minimum(jnp.searchsorted(tile_end_E, tile_X, side="right"), E - 1)
  offset_XR = (tile_X - tile_start_E[group_X])[:, None] * tm + jnp.arange(tm)[None, :]  # row within its group
  live_XR = (offset_XR < group_sizes_E[group_X][:, None]) & (tile_X < tile_end_E[-1])[:, None]
  # Padding slots read a zero row (index M) and write to distinct out-of-range rows (dropped), so the write
  # indices stay unique: the scatter and its transpose (a gather) need no conflict handling.
  rows_XR = row_start_E[group_X][:, None] + offset_XR
  read_XR = jnp.where(live_XR, rows_XR, M)
  write_XR = jnp.where(live_XR, rows_XR, M + jnp.arange(n_tiles * tm).reshape(n_tiles, tm))
  lhs_pad = jnp.concatenate([lhs_MK, jnp.zeros((1, K), lhs_MK.dtype)], axis=0)
  out_XRN = jnp.einsum("xrk,xkn->xrn", lhs_pad[read_XR], rhs_EKN[group_X],
                       preferred_element_type=preferred_element_type)
  return jnp.zeros((M, N), preferred_element_type).at[write_XR.reshape(-1)].set(
      out_XRN.reshape(-1, N), mode="drop", unique_indices=True)


def gmm(lhs_MK, rhs_EKN, group_sizes_E, *, backend: str = "auto", preferred_element_type=None):
  """Grouped matmul. lhs_MK: [M, K] rows sorted by group; rhs_EKN: [E, K, N]; group_sizes_E: int32 [E].

  Returns [M, N] in `preferred_element_type` (default: lhs dtype). Rows beyond sum(group_sizes_E) are zero.
  """
  if lhs_MK.ndim != 2 or rhs_EKN.ndim != 3 or group_sizes_E.ndim != 1:
    raise ValueError(f"gmm expects lhs [M,K], rhs [E,K,N], group_sizes [E]; got {lhs_MK.shape}, "
                     f"{rhs_EKN.shape}, {group_sizes_E.shape}")
  if lhs_MK.shape[1] != rhs_EKN.shape[1] or rhs_EKN.shape[0] != group_sizes_E.shape[0]:
    raise ValueError(f"gmm shape mismatch: lhs {lhs_MK.shape}, rhs {rhs_EKN.shape}, group_sizes {group_sizes_E.shape}")
  out_dtype = preferred_element_type or lhs_MK.dtype
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  backend = resolve_backend(backend)
  if backend == "reference":
    return _reference(lhs_MK, rhs_EKN, group_sizes_E, out_dtype)
  if backend == "tiled":
    return _tiled(lhs_MK, rhs_EKN, group_sizes_E, out_dtype)
  return jax.lax.ragged_dot(lhs_MK, rhs_EKN, group_sizes_E, preferred_element_type=out_dtype)
