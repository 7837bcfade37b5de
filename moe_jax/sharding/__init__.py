"""Meshes, logical-axis rules and shardings (imports nothing from moe_jax's model or training)."""

from moe_jax.sharding.mesh import (
    MESH_AXES, axis_names, base_mesh_config, batch_axes, check_mesh_sizes, default_rules, dividing_axes, make_mesh, mesh_shape, rules_of,
)
from moe_jax.sharding.context import split_of, traced_mesh_sizes
from moe_jax.sharding.rules import check_divisible, logical_shardings, mesh_spec, param_specs, shard_shape

__all__ = [
    "MESH_AXES", "axis_names", "base_mesh_config", "batch_axes", "check_divisible", "check_mesh_sizes", "default_rules", "dividing_axes", "logical_shardings",
    "make_mesh", "mesh_shape", "mesh_spec", "param_specs", "rules_of", "shard_shape", "split_of",
    "traced_mesh_sizes",
]
