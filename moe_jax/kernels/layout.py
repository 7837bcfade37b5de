"""Where each token-copy sits while experts run: the row layouts shared by the gmm backends and the permute ops.

A routed MoE turns T tokens with top-K choices into M = T*K token-copies ("copies", indexed t*K + k). The copies
are sorted by expert into a buffer of P slots. Two layouts:

- **rows** (P = M): copies sorted by expert, back to back; group e owns rows [start_e, start_e + size_e). Used by
  `gmm` (its public row-layout API), ragged_dot and the megablox-style TPU kernel, whose row tiles may straddle
  groups.
- **tiles** (P = X * Z): every group padded to whole tiles of Z rows, so each tile belongs to exactly one group.
  X = ceil(M / Z) + E is a static bound (each group wastes less than one tile). Used by the portable XLA backend
  and the Mosaic GPU kernel: a tile is one matmul with one expert's weights and no two tiles write the same rows.
- **capacity** (P = G * U): a fixed U slots per group, filled in sort order; copies past a group's U-th slot are
  dropped (their slot is P, out of range: they read back zero). GShard capacity dispatch (group = expert) and
  the expert-parallel send buffer (group = destination device) use it.

All three come from one sort: `sorted_ranks` (stable sort by key -> copies per group -> rank within group).
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
  tile_rows: int  # Z (tiles layout); 0 for the rows and capacity layouts

  @property
  def num_slots(self) -> int:
    return self.copy_of_slot_P.shape[0]

  @property
  def dropped_M(self) -> jax.Array:
    """bool [M]: copies the layout has no slot for (the capacity layout's overflow)."""
    return self.slot_of_copy_M >= self.num_slots


def gather_or_zero(x_MD, idx_P):
  """x[idx] with a zero row wherever idx >= M (the out-of-range index marking a padding slot or a dropped copy)."""
  return jnp.take(x_MD, idx_P, axis=0, mode="fill", fill_value=0)


def scatter_slots(values_P, index_P, size: int):
  """out[index[p]] = values[p] for index < size, into zeros of length `size`. The live indices must be distinct;
  padding slots write to distinct out-of-range indices (dropped), so every index stays unique and the scatter
  needs no conflict handling."""
  P = index_P.shape[0]
  write_P = jnp.where(index_P < size, index_P, size + jnp.arange(P, dtype=index_P.dtype))
  return jnp.zeros((size,) + values_P.shape[1:], values_P.dtype).at[write_P].set(
      values_P, mode="drop", unique_indices=True)


def tile_rows_for(num_rows: int, num_groups: int, max_rows: int = 128, min_rows: int = 8) -> int:
  """A static tile height Z: the largest power of two <= max_rows with groups * Z <= rows / 2.

  Padding wastes < Z rows per group, so this bounds the waste at about half the rows even with many small
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


def sorted_ranks(key_M, num_groups: int, keys_per_group: int = 1):
  """The one sort every layout starts from: copies stably sorted by key (no [M, E] one-hot), grouped by
  key // keys_per_group. Returns (order [M]: the copy at each sorted position, group [M] and rank within its group
  [M] at each sorted position, copies per group [G])."""
  M = key_M.shape[0]
  order_M = jnp.argsort(key_M, stable=True).astype(jnp.int32)
  group_M = (key_M[order_M] // keys_per_group).astype(jnp.int32)
  sizes_G = jnp.bincount(key_M // keys_per_group, length=num_groups).astype(jnp.int32)
  rank_M = jnp.arange(M, dtype=jnp.int32) - (jnp.cumsum(sizes_G) - sizes_G)[group_M]
  return order_M, group_M, rank_M, sizes_G


def rows_layout(expert_M, num_experts: int) -> Layout:
  """Copies sorted by expert (stable, so copies of one expert keep token order), back to back."""
  order_P, _, _, sizes_E = sorted_ranks(expert_M, num_experts)
  inv_M = scatter_slots(jnp.arange(order_P.shape[0], dtype=jnp.int32), order_P, order_P.shape[0])
  return Layout(order_P, inv_M, sizes_E, None, 0)


def capacity_layout(key_M, num_groups: int, keys_per_group: int, capacity: int) -> Layout:
  """U = `capacity` slots per group (P = G * U), filled in key order (stable: ties keep copy order); a copy past
  its group's U-th slot is dropped -- its slot is P (out of range), so it gathers zero. group_sizes: the copies
  kept per group."""
  M = key_M.shape[0]
  P = num_groups * capacity
  order_M, group_M, rank_M, sizes_G = sorted_ranks(key_M, num_groups, keys_per_group)
  slot_sorted_M = jnp.where(rank_M < capacity, group_M * capacity + rank_M, P).astype(jnp.int32)
  slot_of_copy_M = scatter_slots(slot_sorted_M, order_M, M)
  copy_of_slot_P = scatter_slots(order_M - M, slot_sorted_M, P) + M  # empty slots: 0 - M + M = M (padding)
  return Layout(copy_of_slot_P, slot_of_copy_M, jnp.minimum(sizes_G, capacity), None, 0)


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
  padding slot) [X*Z], and each tile's group [X]."""
  n_tiles = num_tiles(num_rows, group_sizes_E.shape[0], tile_rows)
  group_X, first_row_X, live_X = tile_groups(group_sizes_E, n_tiles, tile_rows)
  offset_XZ = first_row_X[:, None] + jnp.arange(tile_rows, dtype=jnp.int32)[None, :]  # row within its group
  live_XZ = (offset_XZ < group_sizes_E[group_X][:, None]) & live_X[:, None]
  row_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
  row_XZ = jnp.where(live_XZ, row_start_E[group_X][:, None] + offset_XZ, num_rows)
  return row_XZ.reshape(-1).astype(jnp.int32), group_X


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
