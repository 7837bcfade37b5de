"""The device mesh: `config.mesh` -> `jax.sharding.Mesh`, and the logical-to-mesh rules table.

Four mesh axes, outermost first (the order `jax.make_mesh` lays out over devices, so the innermost axes --
tensor, then expert -- land on the fastest links):
  data    pure data parallelism: parameters replicated, batch split
  fsdp    data parallelism with parameters and optimiser state split on their `embed` dim (ZeRO-3 style)
  expert  routed experts split on their leading axis; tokens reach them by all-to-all inside shard_map
  tensor  Megatron-style: attention heads, FFN and expert widths, and the vocabulary split

The rules map the model's logical axis names (moe_jax.layers.base) to mesh axes; flax assigns them in table
order and never uses a mesh axis twice in one array, so the activation `embed` dim stays whole once `batch`
has taken fsdp. Tokens are split over data x fsdp x expert everywhere outside the experts: expert parallelism
costs no batch parallelism.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
from ml_collections.config_dict import placeholder  # a None field the command line can set
import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# (logical axis, mesh axis or axes or None). Unlisted logical axes are replicated.
_DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # tokens: every axis but tensor
    ("expert", "expert"),  # routed experts' leading axis
    ("vocab", "tensor"),  # embedding / head rows and the logits' vocab dim
    ("heads", "tensor"),  # attention heads (q, k, v up-projections and the output projection)
    ("kv_heads", "tensor"),  # gqa's key/value heads (must divide by tensor, as heads)
    ("mlp", "tensor"),  # dense and shared-expert SwiGLU width
    ("expert_mlp", "tensor"),  # routed-expert SwiGLU width
    ("embed", "fsdp"),  # the model dim of every matrix (FSDP); activations keep it whole (batch took fsdp)
    ("q_lora", None), ("kv_lora", None), ("qk_nope", None), ("qk_rope", None), ("v_head", None), ("qk_head", None),
    ("index_heads", None), ("index_head", None),  # the DSA indexer: small, replicated
    ("router_expert", None), ("norm", None), ("mtp_concat", None), ("layers", None), ("length", None),
)


def axis_names(target) -> tuple[str, ...]:
  """A rule's or PartitionSpec entry's mesh axes as a tuple: None -> (), "x" -> ("x",), ("x", "y") -> itself."""
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def dividing_axes(axes: Sequence[str], size: int, sizes: dict) -> tuple[str, ...]:
  """The longest prefix of mesh `axes` whose product divides `size`: how far a dim of that size can be split."""
  axes = tuple(axes)
  while axes and size % math.prod(sizes[a] for a in axes):
    axes = axes[:-1]
  return axes


def check_mesh_sizes(mesh_cfg: Any) -> None:
  """Each axis a positive integer or -1, and at most one -1 (no device count needed)."""
  for a in MESH_AXES:
    v = mesh_cfg[a]
    if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
      raise ValueError(f"invalid config: config.mesh.{a}={v!r} must be a positive integer or -1 (the rest)")
  free = [a for a in MESH_AXES if mesh_cfg[a] == -1]
  if len(free) > 1:
    raise ValueError(f"invalid config: only one mesh axis may be -1, got {free}")


def default_rules() -> tuple:
  return _DEFAULT_RULES


def base_mesh_config() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.data = -1  # data-parallel ways; -1 = the devices the other axes leave (default: everything on data)
  m.fsdp = 1  # fully-sharded data-parallel ways (params and optimiser state split on `embed`)
  m.expert = 1  # expert-parallel ways: must divide n_routed_experts
  m.tensor = 1  # tensor-parallel ways: must divide heads, FFN widths and vocab
  m.rules = default_rules()  # ((logical axis, mesh axes), ...): see moe_jax.sharding.mesh
  # Multi-host (jax.distributed.initialize). None = read JAX's own environment / cluster auto-detection;
  # with a single process nothing is initialised.
  m.coordinator_address = placeholder(str)  # "host:port" of process 0
  m.num_processes = placeholder(int)  # processes in the job
  m.process_id = placeholder(int)  # this process's index
  return m


def mesh_shape(mesh_cfg: Any, n_devices: int) -> dict[str, int]:
  """{axis: size} with the -1 axis resolved; raises naming the axes and the device count when they disagree."""
  check_mesh_sizes(mesh_cfg)
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}
  free = [a for a, v in sizes.items() if v == -1]
  fixed = math.prod(v for v in sizes.values() if v != -1)
  desc = " x ".join(f"{a}={v}" for a, v in sizes.items())
  if free:
    if n_devices % fixed:
      raise ValueError(f"invalid config: mesh {desc}: the fixed axes' product {fixed} does not divide the "
                       f"{n_devices} devices")
    sizes[free[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"invalid config: mesh {desc} has {fixed} devices but {n_devices} are available")
  return sizes


def make_mesh(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The 4-axis mesh over `devices` (default: all devices of all processes), axes of type Auto (XLA SPMD)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_of(mesh_cfg: Any) -> tuple:
  """The rules as a tuple of (str, str | tuple | None), validated against the mesh axis names."""
  out = []
  for i, rule in enumerate(mesh_cfg.rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"invalid config: config.mesh.rules[{i}]={rule!r} must be (logical axis, mesh axes)")
    logical, target = rule
    bad = [n for n in axis_names(target) if n not in MESH_AXES]
    if bad:
      raise ValueError(f"invalid config: config.mesh.rules[{i}]={rule!r} names {bad}, not among {MESH_AXES}")
    out.append((logical, target if target is None or isinstance(target, str) else tuple(target)))
  return tuple(out)


def batch_axes(rules: Sequence) -> tuple[str, ...]:
  """The mesh axes the batch dim is split over under `rules`."""
  for logical, target in rules:
    if logical == "batch":
      return axis_names(target)
  return ()
