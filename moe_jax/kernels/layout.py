"""Where each token-copy sits while experts run: the row layouts shared by the gmm backends and the permute ops.

A routed MoE turns T tokens with top-K choices into M = T*K token-copies ("copies", indexed t*K + k). The copies
are sorted by expert into a buffer of P slots. Two layouts:

- **rows** (P = M): copies sorted by expert, back to back; group e owns rows [start_e, start_e + size_e). Used by
  `gmm` (its public row-layout API), ragged_dot and the megablox-style TPU kernel, whose row tiles may straddle
  groups.
- **tiles** (P = X * R): every group padded to whole tiles of R rows, so each tile belongs to exactly one group.
  X = ceil(M / R) + E is a static bound (each group wastes less than one tile). Used by the portable XLA backend
  and the Mosaic GPU kernel: a tile is one matmul with one expert's weights and no two tiles write the same rows.

Slots that hold no copy ("padding slots") read a zero row and are never read back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
  """Index maps between the copies (t*K + k order) and the P buffer slots."""
  copy_of_slot_P: jax.Array  # int32 [P]: the copy in each slot; M (out of range) for a padding slot
  slot_of_copy_M: jax.Array  # int32 [M]: the slot of each copy
  group_sizes_E: jax.Array  # int32 [E]: copies per expert
  tile_group_X: jax.Array | None  # int32 [X]: each tile's expert (tiles layout only; None for rows)
  tile_rows: int  # R (tiles layout); 0 for rows

  @property
  def num_slots(self) -> int:
    return self.copy_of_slot_P.shape[0]


def gather_or_zero(x_ND, idx_P):
  """x[idx] with a zero row wherever idx == N (the out-of-range index marking a padding slot)."""
  x_pad = jnp.concatenate([x_ND, jnp.zeros((1,) + x_ND.shape[1:], x_ND.dtype)], axis=0)
  return jnp.take(x_pad, idx_P, axis=0, mode="clip")


def scatter_slots(values_P, index_P, size: int):
  """out[index[p]] = values[p] for index < size, into zeros of length `size`. The live indices must be distinct;
  padding slots write to distinct out-of-range indices (dropped), so every index stays unique and the scatter
  needs no conflict handling."""
  P = index_P.shape[0]
  write_P = jnp.where(index_P < size, index_P, size + jnp.arange(P, dtype=index_P.dtype))
  return jnp.zeros((size,) + values_P.shape[1:], values_P.dtype).at[write_P].set(
      values_P, mode="drop", unique_indices=True)


def tile_rows_for(num_rows: int, num_groups: int, max_rows: int = 128, min_rows: int = 8) -> int:
  """A static tile height R: the largest power of two <= max_rows with groups * R <= rows / 2.

  Padding wastes < R rows per group, so this bounds the waste at about half the rows even with many small
  experts (E=256, top-8, 4K tokens gives R=64), while big groups keep tall tiles for matmul efficiency.
  """
  r = max_rows
  while r > min_rows and num_groups * r > num_rows // 2:
    r //= 2
  return r


def num_tiles(num_rows: int, num_groups: int, tile_rows: int) -> int:
  return -(-num_rows // tile_rows) + num_groups


def live_tiles(group_sizes_E, tile_rows: int):
  """Tiles of the tiles layout that hold at least one copy (they come first): int32 scalar."""
  return jnp.sum((group_sizes_E + tile_rows - 1) // tile_rows).astype(jnp.int32)


def rows_layout(expert_M, num_experts: int) -> Layout:
  """Copies sorted by expert (stable, so copies of one expert keep token order); no [M, E] one-hot."""
  order_P = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
  inv_M = jnp.zeros_like(order_P).at[order_P].set(jnp.arange(order_P.shape[0], dtype=jnp.int32))
  sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  return Layout(order_P, inv_M, sizes_E, None, 0)


def tile_groups(group_sizes_E, n_tiles: int, tile_rows: int):
  """Per tile of the tiles layout: its group, the offset of its first row within that group, and whether it
  holds any copy. Tiles past the last group's are dead (group clamped to E-1, no live rows)."""
  E = group_sizes_E.shape[0]
  tiles_E = (group_sizes_E + tile_rows - 1) // tile_rows
  tile_end_E = jnp.cumsum(tiles_E)
  tile_X = jnp.arange(n_tiles, dtype=jnp.int32)
  group_X = jnp.minimum(jnp.searchsorted(tile_end_E, tile_X, side="right"), E - 1).astype(jnp.int32)
  first_row_X = (tile_X - (tile_end_E - tiles_E)[group_X]) * tile_rows
  return group_X, first_row_X, tile_X < tile_end_E[-1]


def tiles_from_rows(group_sizes_E, num_rows: int, tile_rows: int):
  """For the rows layout with these group sizes: the row feeding each slot of the tiles layout (num_rows for a
  padding slot) [X*R], and each tile's group [X]."""
  n_tiles = num_tiles(num_rows, group_sizes_E.shape[0], tile_rows)
  group_X, first_row_X, live_X = tile_groups(group_sizes_E, n_tiles, tile_rows)
  offset_XR = first_row_X[:, None] + jnp.arange(tile_rows, dtype=jnp.int32)[None, :]  # row within its group
  live_XR = (offset_XR < group_sizes_E[group_X][:, None]) & live_X[:, None]
  row_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  row_XR = jnp.where(live_XR, row_start_E[group_X][:, None] + offset_XR, num_rows)
  return row_XR.reshape(-1).astype(jnp.int32), group_X


def tiles_layout(expert_M, num_experts: int, tile_rows: int) -> Layout:
  """Copies sorted by expert with every expert's rows padded to whole tiles of `tile_rows`."""
  rows = rows_layout(expert_M, num_experts)
  M = expert_M.shape[0]
  row_of_slot_P, group_X = tiles_from_rows(rows.group_sizes_E, M, tile_rows)
  copy_of_slot_P = jnp.where(row_of_slot_P < M, rows.copy_of_slot_P[jnp.minimum(row_of_slot_P, M - 1)], M)
  copy_of_slot_P = copy_of_slot_P.astype(jnp.int32)
  slot_of_copy_M = scatter_slots(jnp.arange(copy_of_slot_P.shape[0], dtype=jnp.int32), copy_of_slot_P, M)
  return Layout(copy_of_slot_P, slot_of_copy_M, rows.group_sizes_E, group_X, tile_rows)


def group_tile_ranges(group_X, n_live, num_groups: int):
  """[start_E, end_E): each expert's live tiles in the tiles layout (contiguous; empty experts get start == end)."""
  experts = jnp.arange(num_groups, dtype=jnp.int32)
  start_E = jnp.minimum(jnp.searchsorted(group_X, experts, side="left"), n_live).astype(jnp.int32)
  end_E = jnp.minimum(jnp.searchsorted(group_X, experts, side="right"), n_live).astype(jnp.int32)
  return start_E, end_E
