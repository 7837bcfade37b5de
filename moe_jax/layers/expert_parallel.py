"""Dropless MoE on a device mesh: tokens travel to the devices holding their experts by all-to-all.

Inside `jax.shard_map` every device holds its own tokens (the batch is split over the mesh's batch axes, which
include `expert`) and E/n of the routed experts (n = size of the `expert` mesh axis; device j of that axis holds
experts [j E/n, (j+1) E/n)). Per device:
  1. lay its T*K token-copies out by expert in a fixed [n, U, D] send buffer, U rows per destination device
     (destination = expert // (E/n)): `kernels.layout.capacity_layout`, the same sort -> count -> rank -> slots
     as the single-device layouts, and the gather-only `permute`; all-to-all the rows and their expert ids
  2. run the received rows through the local experts with the grouped matmul (a rows layout by local expert,
     padding rows last and outside every group)
  3. all-to-all the results back, and `unpermute`: each token's K outputs summed with its gating weights
With U = T*K (ep_capacity_factor <= 0, the default) no copy can overflow: dropless whatever the routing. With
ep_capacity_factor = f > 0, U = ceil(f T K / n): memory n/f times smaller, and copies past a destination's U-th
row are *counted* (returned as the dropped fraction, psum'd over the mesh) and contribute zero -- never silently.
Expert weights enter shard_map split on `expert` (and their width on `tensor`, whose partial outputs are
psum'd); the `fsdp` split of their model dim is gathered at the shard_map boundary, as FSDP does for any layer.

Node-limited routing (V3 sec. 2.1.2 / 3.2.2): group g holds experts [g E/G, (g+1) E/G), so when the experts are
laid out over n devices in order and n divides G (or G divides n), each group sits on n/G devices (or a device
holds G/n groups) and a token restricted to `topk_group` groups reaches at most
`max_devices_per_token` = min(n, topk_group * max(1, n / G)) devices. `expert_device` is that mapping.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.kernels import capacity_layout, permute, resolve_backend, rows_layout, unpermute
from moe_jax.layers.dispatch import dropless_dispatch, expert_ffn_grouped
from moe_jax.sharding import axis_names, batch_axes


def expert_device(expert_idx, n_experts: int, n_devices: int):
  """Index along the `expert` mesh axis of the device holding each expert (contiguous blocks of E/n)."""
  return expert_idx // (n_experts // n_devices)


def max_devices_per_token(cfg: Any, n_devices: int) -> int:
  """Upper bound on the distinct expert-axis devices one token's K experts live on (node-limited routing)."""
  K = cfg.num_experts_per_tok
  bound = min(n_devices, K)
  if cfg.topk_method in ("noaux_tc", "group_limited_greedy") and cfg.n_group > 1:
    G = cfg.n_group
    if n_devices % G == 0:
      bound = min(bound, cfg.topk_group * (n_devices // G))
    elif G % n_devices == 0:
      bound = min(bound, cfg.topk_group)
  return bound


def mesh_plan():
  """(batch axes, expert axis or None, tensor axis or None, axis sizes) from the context mesh and flax rules,
  or None when there is no multi-device mesh (the caller then dispatches locally)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  rules = nn.get_logical_axis_rules()
  if not rules:
    return None
  batch = batch_axes(rules)
  expert = axis_names(nn.logical_to_mesh_axes(("expert",), rules)[0])
  tensor = axis_names(nn.logical_to_mesh_axes(("expert_mlp",), rules)[0])
  if len(expert) > 1 or len(tensor) > 1:
    raise ValueError(f"expert parallelism needs one mesh axis each for 'expert' and 'expert_mlp'; the rules map "
                     f"them to {expert} and {tensor}")
  if expert and expert[0] not in batch:
    raise ValueError(f"the 'expert' mesh axis {expert[0]!r} must also split the batch (rules map 'batch' to "
                     f"{batch}): the all-to-all exchanges tokens between the expert axis' devices")
  return batch, (expert[0] if expert else None), (tensor[0] if tensor else None), dict(mesh.shape)


# Pallas TPU kernels whose pallas_call out_shapes carry no varying-axes type, which a checked shard_map refuses
# ("manual_axis_type ... must not be None"). Their shard_map runs unchecked: its transpose then divides a
# replicated output's cotangent by the axis size and psums a replicated input's cotangent over it, which is exact
# for what `_local` does (psums of per-shard partial sums, all-to-alls, per-device matmuls); tested against the
# one-device reference, values and gradients, in tests/sharding_worker.py.
UNTYPED_KERNELS = ("megablox", "pallas_tpu")


def _buffer_rows(copies: int, n: int, factor: float) -> int:
  return copies if factor <= 0 else min(copies, max(1, math.ceil(factor * copies / n)))


def _local(x_TD, idx_TK, weight_TK, w_gate, w_up, w_down, *, E: int, n: int, factor: float, expert_axis,
           tensor_axis, batch_axes, backend: str):
  T, K = idx_TK.shape
  D = x_TD.shape[1]
  M = T * K
  if n == 1:  # every expert is local: the single-device dispatch on this device's tokens
    y_TD = dropless_dispatch(x_TD, idx_TK, weight_TK, w_gate, w_up, w_down, backend=backend)
    if tensor_axis is not None:
      y_TD = jax.lax.psum(y_TD, tensor_axis)  # each tensor shard computed a slice of the expert width
    return y_TD, jnp.zeros((), jnp.float32)
  E_loc = E // n
  U = _buffer_rows(M, n, factor)
  flat_e_M = idx_TK.reshape(-1)
  # Send side: copies sorted by expert, U slots per destination device (expert // E_loc), overflow dropped.
  send = capacity_layout(flat_e_M, n, E_loc, U)
  send_x = permute(x_TD, send.copy_of_slot_P, send.slot_of_copy_M, K)
  send_e = jnp.take(flat_e_M % E_loc, send.copy_of_slot_P, mode="fill", fill_value=E_loc)  # empty slot: E_loc
  recv_x = jax.lax.all_to_all(send_x.reshape(n, U, D), expert_axis, 0, 0, tiled=True).reshape(n * U, D)
  recv_e = jax.lax.all_to_all(send_e.reshape(n, U), expert_axis, 0, 0, tiled=True).reshape(n * U)
  # Receive side: rows of each local expert together; padding rows (id E_loc) last and outside every group.
  recv = rows_layout(recv_e, E_loc + 1)
  x_rows = permute(recv_x, recv.copy_of_slot_P, recv.slot_of_copy_M, 1)
  y_rows = expert_ffn_grouped(x_rows, recv.group_sizes_E[:E_loc], w_gate, w_up, w_down, backend)
  # Back to the received order (float32, as the grouped matmul returned it, through the psum and the exchange).
  y_recv = unpermute(y_rows, jnp.ones((n * U, 1), jnp.float32), recv.copy_of_slot_P, recv.slot_of_copy_M)
  if tensor_axis is not None:
    y_recv = jax.lax.psum(y_recv, tensor_axis)  # each tensor shard computed a slice of the expert width
  back = jax.lax.all_to_all(y_recv.reshape(n, U, D), expert_axis, 0, 0, tiled=True).reshape(n * U, D)
  y_TD = unpermute(back, weight_TK, send.copy_of_slot_P, send.slot_of_copy_M).astype(x_TD.dtype)
  totals = jnp.stack([jnp.sum(send.dropped_M).astype(jnp.float32), jnp.float32(M)])
  if batch_axes:
    totals = jax.lax.psum(totals, batch_axes)
  return y_TD, totals[0] / totals[1]


def sharded_dropless_dispatch(x_TD, idx_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD, plan, *,
                              capacity_factor: float = 0.0, backend: str = "auto"):
  """Dropless dispatch under `plan` (from `mesh_plan`). Returns (y [T, D], fraction of copies overflowed)."""
  batch, expert_axis, tensor_axis, sizes = plan
  E = w_gate_EDF.shape[0]
  n = sizes[expert_axis] if expert_axis else 1
  if E % n:
    raise ValueError(f"n_routed_experts={E} is not divisible by the expert mesh axis {expert_axis!r} of size {n}")
  tok = P(batch or None, None)
  w_in = P(expert_axis, None, tensor_axis)
  w_out = P(expert_axis, tensor_axis, None)
  backend = resolve_backend(backend)
  fn = jax.shard_map(
      lambda *a: _local(*a, E=E, n=n, factor=capacity_factor, expert_axis=expert_axis, tensor_axis=tensor_axis,
                        batch_axes=batch, backend=backend),
      in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=(tok, P()),
      check_vma=backend not in UNTYPED_KERNELS)
  return fn(x_TD, idx_TK, weight_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
