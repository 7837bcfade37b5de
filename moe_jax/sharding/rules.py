"""From logical axis names to shardings: per-parameter PartitionSpecs, divisibility checks, shard shapes.

Works on the boxed trees `jax.eval_shape(model.init, ...)` returns (leaves wrapped in flax's
`nn.Partitioned`, which carries the logical names), so nothing is allocated.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.sharding.mesh import axis_names


def mesh_spec(logical_axes: Sequence[str | None], rules: Sequence) -> P:
  """PartitionSpec over mesh axes for one array's logical axis names."""
  return P(*nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def shard_shape(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> tuple[int, ...]:
  """The per-device block of an array of `shape` split by `spec` on a mesh of `sizes` (dims must divide)."""
  out = []
  for i, d in enumerate(shape):
    ways = math.prod(sizes[a] for a in axis_names(spec[i] if i < len(spec) else None))
    out.append(d // ways)
  return tuple(out)


def check_divisible(name: str, shape: Sequence[int], logical_axes: Sequence[str | None] | None, spec: P,
                    sizes: Mapping[str, int]) -> None:
  """Raises naming the array, the dim and the mesh axes when a split dim is not a multiple of their size."""
  for i, d in enumerate(shape):
    axes = axis_names(spec[i] if i < len(spec) else None)
    ways = math.prod(sizes[a] for a in axes)
    if d % ways:
      logical = logical_axes[i] if logical_axes else None
      raise ValueError(
          f"invalid config: {name} dim {i} (logical {logical!r}) has size {d}, not divisible by mesh axes "
          f"{axes} = {ways} ways (mesh {dict(sizes)}); change config.mesh or the rules in config.mesh.rules")


def _logical_axes(leaf) -> tuple | None:
  return tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None


def param_specs(boxed_params: Any, rules: Sequence, sizes: Mapping[str, int]) -> dict[str, tuple]:
  """{"path/to/param": (shape, logical axes, mesh PartitionSpec)}, checking divisibility on the way."""
  flat = traverse_util.flatten_dict(boxed_params, sep="/", is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
  out = {}
  for path, leaf in flat.items():
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    logical = _logical_axes(leaf)
    spec = mesh_spec(logical, rules) if logical else P()
    check_divisible(f"parameter {path} {tuple(value.shape)}", value.shape, logical, spec, sizes)
    out[path] = (tuple(value.shape), logical, spec)
  return out


def logical_shardings(tree: Any, specs: Mapping[str, tuple], mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for any tree whose leaves sit under parameter-shaped dict paths (params, Adam moments).

  A leaf is split like the parameter whose path its trailing dict keys spell and whose shape it has; any
  other leaf (step counters, scalars, the routing biases) is replicated.
  """
  def one(path, leaf):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    for start in range(len(keys)):
      hit = specs.get("/".join(str(k) for k in keys[start:]))
      if hit is not None and hit[0] == tuple(leaf.shape):
        return NamedSharding(mesh, hit[2])
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)
