"""Routing token-copies to experts and back: dropless (sort + grouped matmul) and capacity (GShard) dispatch.

Both take the flattened tokens x [T, D], the router's choices idx/weight [T, K] and the stacked expert
weights, and return y_t = sum_k g_t,k * FFN_{idx_t,k}(x_t) with FFN the SwiGLU expert.

Dropless: the T*K token-copies are sorted by expert (a stable argsort, no [T, E] one-hot), gathered into
expert-contiguous rows (or expert-aligned tiles), pushed through the grouped matmul (`moe_jax.kernels`),
gathered back to (token, k) order and summed with the gating weights. Every copy is computed.

Capacity (GShard, Lepikhin et al. 2020; Switch): each expert has U = ceil(capacity_factor * T * K / E) slots.
Copies claim slots in priority order -- all first choices (k=0) before second choices, tokens in order within a
choice -- and copies past an expert's U-th slot are dropped (contribute zero). The fraction dropped is returned.
Both lay the copies out with `moe_jax.kernels.layout` (one sort -> count -> rank -> slots) and move rows with
the gather-only `permute` / `unpermute`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.kernels import (capacity_layout, gmm, live_tiles, permute, resolve_backend, rows_layout, tile_gmm,
                             tile_rows_for, tiles_layout, unpermute)


def expert_ffn_grouped(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, backend: str):
  dtype = x_MD.dtype
  f32 = jnp.float32
  w_gate_EDF, w_up_EDF, w_down_EFD = (w.astype(dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  gate_MF = gmm(x_MD, w_gate_EDF, group_sizes_E, backend=backend, preferred_element_type=f32)
  up_MF = gmm(x_MD, w_up_EDF, group_sizes_E, backend=backend, preferred_element_type=f32)
  h_MF = (jax.nn.silu(gate_MF) * up_MF).astype(dtype)
  return gmm(h_MF, w_down_EFD, group_sizes_E, backend=backend, preferred_element_type=f32)


def _expert_ffn_tiles(x_XZD, group_X, n_live, w_gate_EDF, w_up_EDF, w_down_EFD):
  """The SwiGLU experts on the tiles layout (portable backend): the gate and up projections as one tile matmul
  against [w_gate | w_up] (one pass over the tiles instead of two), then the down projection; no row moves."""
  dtype = x_XZD.dtype
  f32 = jnp.float32
  F = w_gate_EDF.shape[2]
  w_gate_up_ED2F = jnp.concatenate([w_gate_EDF, w_up_EDF], axis=2).astype(dtype)
  gate_up = tile_gmm(x_XZD, w_gate_up_ED2F, group_X, n_live, f32)
  h_XZF = (jax.nn.silu(gate_up[..., :F]) * gate_up[..., F:]).astype(dtype)
  return tile_gmm(h_XZF, w_down_EFD.astype(dtype), group_X, n_live, f32)


def dropless_dispatch(x_TD, idx_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, backend: str = "auto"):
  """Dropless MoE: returns y [T, D] in x's dtype.

  The token-copies are laid out once per layer (`moe_jax.kernels.layout`): expert-aligned tiles for the
  portable "tiled" backend (all three matmuls then run tile by tile with no row moves in between), sorted rows
  for the others. `permute` gathers the rows in, `unpermute` gathers them back and applies the gating weights.
  """
  T, K = idx_TK.shape
  E, D, _ = w_gate_EDF.shape
  backend = resolve_backend(backend)
  flat_expert_M = idx_TK.reshape(-1)  # M = T*K token-copies, in (token, k) order
  # Named scopes: profiles (scripts/bench_mfu.py) split the layer's time into dispatch and expert matmuls.
  if backend == "tiled":
    with jax.named_scope("dispatch"):
      lay = tiles_layout(flat_expert_M, E, tile_rows_for(T * K, E))
      x_PD = permute(x_TD, lay.copy_of_slot_P, lay.slot_of_copy_M, K)
    with jax.named_scope("routed_experts"):
      y_XZD = _expert_ffn_tiles(x_PD.reshape(-1, lay.tile_rows, D), lay.tile_group_X,
                                live_tiles(lay.group_sizes_E, lay.tile_rows), w_gate_EDF, w_up_EDF, w_down_EFD)
    y_PD = y_XZD.reshape(-1, D)
  else:
    with jax.named_scope("dispatch"):
      lay = rows_layout(flat_expert_M, E)
      x_PD = permute(x_TD, lay.copy_of_slot_P, lay.slot_of_copy_M, K)
    with jax.named_scope("routed_experts"):
      y_PD = expert_ffn_grouped(x_PD, lay.group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, backend)
  with jax.named_scope("dispatch"):
    y_TD = unpermute(y_PD.astype(x_TD.dtype), weight_TK, lay.copy_of_slot_P, lay.slot_of_copy_M)
  return y_TD.astype(x_TD.dtype)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_dispatch(x_TD, idx_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, capacity_factor: float):
  """GShard-style MoE with U slots per expert. Returns (y [T, D], dropped fraction).

  The capacity layout sorts the copies by (expert, k): within an expert all first choices come before second
  choices, and tokens keep their order within a choice (a stable sort of copies in (t, k) order), so slots go to
  copies in GShard's priority order; the rest are dropped.
  """
  T, K = idx_TK.shape
  E, D, _ = w_gate_EDF.shape
  U = expert_capacity(T, K, E, capacity_factor)
  dtype = x_TD.dtype
  priority_key_M = (idx_TK * K + jnp.arange(K, dtype=idx_TK.dtype)[None, :]).reshape(-1)
  lay = capacity_layout(priority_key_M, E, K, U)
  x_EUD = permute(x_TD, lay.copy_of_slot_P, lay.slot_of_copy_M, K).reshape(E, U, D)
  f32 = jnp.float32
  gate_EUF = jnp.einsum("eud,edf->euf", x_EUD, w_gate_EDF.astype(dtype), preferred_element_type=f32)
  up_EUF = jnp.einsum("eud,edf->euf", x_EUD, w_up_EDF.astype(dtype), preferred_element_type=f32)
  h_EUF = (jax.nn.silu(gate_EUF) * up_EUF).astype(dtype)
  out_EUD = jnp.einsum("euf,efd->eud", h_EUF, w_down_EFD.astype(dtype), preferred_element_type=f32)
  y_TD = unpermute(out_EUD.reshape(E * U, D).astype(dtype), weight_TK, lay.copy_of_slot_P, lay.slot_of_copy_M)
  dropped = jnp.mean(lay.dropped_M.astype(f32))  # exact 0 when nothing is dropped
  return y_TD.astype(dtype), dropped
