"""The mesh and rules a program is being traced under (`jax.set_mesh` + `flax.linen.logical_axis_rules`), as the
code that must place work per device reads them: library kernels run per shard inside `jax.shard_map`, since
XLA's SPMD partitioner cannot split a custom call."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from moe_jax.sharding.mesh import axis_names, dividing_axes


def traced_mesh_sizes() -> dict | None:
  """{axis: size} of the context's mesh when it has more than one device and logical-axis rules are set, else
  None (the caller then runs unsharded code)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1 or not nn.get_logical_axis_rules():
    return None
  return dict(mesh.shape)


def split_of(logical: str, size: int, sizes: dict) -> tuple[str, ...] | None:
  """The mesh axes the context's rules map logical axis `logical` to, cut to those that divide `size` (None: the
  dim stays whole). A PartitionSpec entry."""
  target = nn.logical_to_mesh_axes((logical,), nn.get_logical_axis_rules())[0]
  return dividing_axes(axis_names(target), size, sizes) or None
