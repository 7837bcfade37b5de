"""Routing token-copies to experts and back: dropless (sort + grouped matmul) and capacity (GShard) dispatch.

Both take the flattened tokens x [T, D], the router's choices idx/weight [T, K] and the stacked expert
weights, and return y_t = sum_k g_t,k * FFN_{idx_t,k}(x_t) with FFN the SwiGLU expert.

Dropless: the T*K token-copies are sorted by expert (a stable argsort, no [T, E] one-hot), gathered into
expert-contiguous rows (or expert-aligned tiles), pushed through the grouped matmul (`moe_jax.kernels`),
gathered back to (token, k) order and summed with the gating weights. Every copy is computed.

Capacity (GShard, Lepikhin et al. 2020; Switch): each expert has C = ceil(capacity_factor * T * K / E) slots.
Copies claim slots in priority order -- all first choices (k=0) before second choices, tokens in order within a
choice -- and copies past an expert's C-th slot are dropped (contribute zero). The fraction dropped is returned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.kernels import (gmm, live_tiles, permute, resolve_backend, rows_layout, tile_gmm, tile_rows_for,
                             tiles_layout, unpermute)


def inverse_permutation(order_M):
  """inv such that inv[order[i]] = i: un-sorting becomes a gather (deterministic, no scatter-add)."""
  return jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))


def expert_ffn_grouped(x_MD, group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, backend: str):
  dtype = x_MD.dtype
  f32 = jnp.float32
  w_gate_EDF, w_up_EDF, w_down_EFD = (w.astype(dtype) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
  gate_MF = gmm(x_MD, w_gate_EDF, group_sizes_E, backend=backend, preferred_element_type=f32)
  up_MF = gmm(x_MD, w_up_EDF, group_sizes_E, backend=backend, preferred_element_type=f32)
  h_MF = (jax.nn.silu(gate_MF) * up_MF).astype(dtype)
  return gmm(h_MF, w_down_EFD, group_sizes_E, backend=backend, preferred_element_type=f32)


def _expert_ffn_tiles(x_XRD, group_X, n_live, w_gate_EDF, w_up_EDF, w_down_EFD):
  """The SwiGLU experts on the tiles layout (portable backend): the gate and up projections as one tile matmul
  against [w_gate | w_up] (one pass over the tiles instead of two), then the down projection; no row moves."""
  dtype = x_XRD.dtype
  f32 = jnp.float32
  F = w_gate_EDF.shape[2]
  w_gate_up_ED2F = jnp.concatenate([w_gate_EDF, w_up_EDF], axis=2).astype(dtype)
  gate_up = tile_gmm(x_XRD, w_gate_up_ED2F, group_X, n_live, f32)
  h_XRF = (jax.nn.silu(gate_up[..., :F]) * gate_up[..., F:]).astype(dtype)
  return tile_gmm(h_XRF, w_down_EFD.astype(dtype), group_X, n_live, f32)


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
  if backend == "tiled":
    lay = tiles_layout(flat_expert_M, E, tile_rows_for(T * K, E))
    x_PD = permute(x_TD, lay.copy_of_slot_P, lay.slot_of_copy_M, K)
    y_XRD = _expert_ffn_tiles(x_PD.reshape(-1, lay.tile_rows, D), lay.tile_group_X,
                              live_tiles(lay.group_sizes_E, lay.tile_rows), w_gate_EDF, w_up_EDF, w_down_EFD)
    y_PD = y_XRD.reshape(-1, D)
  else:
    lay = rows_layout(flat_expert_M, E)
    x_PD = permute(x_TD, lay.copy_of_slot_P, lay.slot_of_copy_M, K)
    y_PD = expert_ffn_grouped(x_PD, lay.group_sizes_E, w_gate_EDF, w_up_EDF, w_down_EFD, backend)
  y_TD = unpermute(y_PD.astype(x_TD.dtype), weight_TK, lay.copy_of_slot_P, lay.slot_of_copy_M)
  return y_TD.astype(x_TD.dtype)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_dispatch(x_TD, idx_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, *, capacity_factor: float):
  """GShard-style MoE with a fixed number of slots per expert. Returns (y [T, D], dropped fraction)."""
  T, K = idx_TK.shape
  E, D, _ = w_gate_EDF.shape
  C = expert_capacity(T, K, E, capacity_factor)
  dtype = x_TD.dtype
  # Priority order: copy (k, t) before (k, t+1) before (k+1, *).
  expert_P = idx_TK.T.reshape(-1)  # P = K*T copies in priority order
  token_P = jnp.tile(jnp.arange(T), K)
  order_P = jnp.argsort(expert_P, stable=True)
  sizes_E = jnp.bincount(expert_P, length=E)
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  sorted_expert_P = expert_P[order_P]
  slot_sorted_P = jnp.arange(K * T) - starts_E[sorted_expert_P]  # rank within its expert, by priority
  slot_P = jnp.zeros_like(slot_sorted_P).at[order_P].set(slot_sorted_P)
  kept_P = slot_P < C
  # Scatter kept copies into the [E, C, D] buffer; dropped ones go to a trash slot that is cut off.
  flat_slot_P = jnp.where(kept_P, expert_P * C + slot_P, E * C)
  buf_XD = jnp.zeros((E * C + 1, D), dtype).at[flat_slot_P].set(jnp.take(x_TD, token_P, axis=0))
  buf_ECD = buf_XD[: E * C].reshape(E, C, D)
  f32 = jnp.float32
  gate_ECF = jnp.einsum("ecd,edf->ecf", buf_ECD, w_gate_EDF.astype(dtype), preferred_element_type=f32)
  up_ECF = jnp.einsum("ecd,edf->ecf", buf_ECD, w_up_EDF.astype(dtype), preferred_element_type=f32)
  h_ECF = (jax.nn.silu(gate_ECF) * up_ECF).astype(dtype)
  out_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, w_down_EFD.astype(dtype), preferred_element_type=f32)
  out_XD = jnp.concatenate([out_ECD.reshape(E * C, D), jnp.zeros((1, D), f32)], axis=0)
  y_PD = jnp.take(out_XD, flat_slot_P, axis=0)
  w_P = weight_TK.T.reshape(-1).astype(f32) * kept_P
  y_TD = jnp.zeros((T, D), f32).at[token_P].add(y_PD * w_P[:, None])
  dropped = jnp.sum(~kept_P).astype(f32) / kept_P.size  # exact 0 when nothing is dropped
  return y_TD.astype(dtype), dropped
