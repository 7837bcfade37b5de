"""Hardware targets by the names their users rent them under, as abstract devices the real compilers accept.

    v4-8, v5p-8, v5p-64, v5p-1024   Google Cloud TPU accelerator types: N counts TensorCores, 2 per chip
                                    (megacore: one JAX device per chip), so v5p-64 is 32 chips
    v5e-16, v6e-8                   N counts chips (one TensorCore each)
    h100-8, h200-256                N NVIDIA GPUs (8 per host, NVLink inside a host)

`target_devices(target)` returns compile-only devices: `jax.experimental.topologies.get_topology_desc` with
libtpu (XLA:TPU, Mosaic included) or with jax's CUDA 12 plugin and an XLA GPU target spec (XLA:GPU with ptxas,
Triton and Mosaic GPU) -- nothing is allocated and no accelerator is needed. The GPU specs ship in
`moe_jax/aot/specs/` in the text-proto form the installed jaxlib parses (`stream_executor.GpuTargetConfigProto`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re

from moe_jax.planning import ACCELERATORS, GiB
from moe_jax.platforms import has_accelerator

_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  topology_prefix: str  # libtpu's name in "v5p:2x2x1"
  cores_per_chip: int  # TensorCores per chip counted by the accelerator type's N
  dims: int  # torus dimensions (3: v4/v5p cubes, 2: v5e/v6e slices)
  chips_per_host: int
  megacore: bool  # two TensorCores behind one device
  planner: str  # its row in moe_jax.planning.ACCELERATORS (peak FLOP/s, HBM per chip)


TPU = {
    "v4": TpuGeneration("v4", 2, 3, 4, True, "tpu-v4"),
    "v5e": TpuGeneration("v5e", 1, 2, 8, False, "tpu-v5e"),
    "v5p": TpuGeneration("v5p", 2, 3, 4, True, "tpu-v5p"),
    "v6e": TpuGeneration("v6e", 1, 2, 8, False, "tpu-v6e"),
}


@dataclasses.dataclass(frozen=True)
class GpuModel:
  spec_file: str  # text proto in moe_jax/aot/specs
  planner: str  # its row in moe_jax.planning.ACCELERATORS
  per_host: int = 8


GPU = {"h100": GpuModel("h100_sxm.txtpb", "h100"), "h200": GpuModel("h200_sxm.txtpb", "h200")}


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given, e.g. "v5p-64"
  platform: str  # "tpu" | "gpu"
  kind: str  # "v5p", "h100", ...
  devices: int  # JAX devices (chips for TPUs, GPUs)
  hbm_bytes: int  # per device
  peak_flops: float  # per device, dense bf16
  topology: str  # what get_topology_desc is given
  num_slices: int = 1

  @property
  def planner_accelerator(self) -> str:
    """The target's row in moe_jax.planning.ACCELERATORS."""
    return (TPU if self.platform == "tpu" else GPU)[self.kind].planner

  @property
  def hosts(self) -> int:
    per = TPU[self.kind].chips_per_host if self.platform == "tpu" else GPU[self.kind].per_host
    return max(1, math.ceil(self.devices / per))


def _tpu_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The torus Google Cloud gives a slice of `chips` chips. 3-D (v4, v5p): 2x2x1, then z, y, x doubled in turn
  (2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...); 2-D (v5e, v6e): 1x1, 1x2, 2x2, 2x4, 4x4, 4x8, ..."""
  if dims == 2:
    a = 1 << (chips.bit_length() - 1) // 2
    return (a, chips // a)
  if chips < 4:
    return (1, chips, 1)
  shape, n, i = [2, 2, 1], chips // 4, 0
  while n > 1:
    shape[2 if i == 0 else (3 - i % 3) % 3] *= 2  # z, then z, y, x, z, y, x, ...
    n //= 2
    i += 1
  return tuple(shape)


_NAME = re.compile(r"^(v4|v5e|v5p|v6e|h100|h200)-(\d+)$")


def parse_target(name: str, num_slices: int = 1) -> Target:
  """`Target` of an accelerator name; raises ValueError naming the accepted forms."""
  m = _NAME.match(name.strip().lower())
  if not m or int(m.group(2)) < 1:
    raise ValueError(f"--target={name!r}: expected a TPU accelerator type (v4-N, v5e-N, v5p-N, v6e-N; N as Google "
                     f"Cloud counts it) or h100-N / h200-N (N GPUs)")
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1")
  kind, n = m.group(1), int(m.group(2))
  if kind in GPU:
    g = GPU[kind]
    if num_slices != 1:
      raise ValueError("--num_slices is for TPU multislice; for more GPUs raise N in --target")
    if n > g.per_host and n % g.per_host:
      raise ValueError(f"--target={name}: more than one host needs a multiple of {g.per_host} GPUs")
    hosts = max(1, n // g.per_host)
    peak, hbm = ACCELERATORS[g.planner]
    return Target(name, "gpu", kind, n, int(hbm), peak, f"{hosts}x1x{min(n, g.per_host)}")
  gen = TPU[kind]
  if n % gen.cores_per_chip:
    raise ValueError(f"--target={name}: {kind}-N counts TensorCores ({gen.cores_per_chip} per chip), so N must "
                     f"be a multiple of {gen.cores_per_chip}")
  chips = n // gen.cores_per_chip
  if chips & (chips - 1):
    raise ValueError(f"--target={name}: {chips} chips is not a slice shape this tool knows (a power of two)")
  shape = _tpu_shape(chips, gen.dims)
  peak, hbm = ACCELERATORS[gen.planner]
  return Target(name, "tpu", kind, chips * num_slices, int(hbm), peak,
                f"{gen.topology_prefix}:{'x'.join(map(str, shape))}", num_slices=num_slices)


def gpu_target_config(kind: str) -> str:
  """The text proto XLA's GPU compiler is told the device is (`GpuTargetConfigProto`)."""
  with open(os.path.join(_SPECS, GPU[kind].spec_file)) as f:
    return f.read()


@functools.lru_cache(maxsize=None)
def _devices(platform: str, kind: str, topology: str, num_slices: int) -> tuple:
  from jax.experimental import topologies

  if platform == "tpu":
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the chips it drives; compile-only devices drive
    # none, so several compiling processes (test workers, a sweep) may load it side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not has_accelerator():  # not a TPU VM: say what libtpu would ask the (absent) metadata server, quietly
      os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{4 if TPU[kind].cores_per_chip == 1 else 8}")
      os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    kwargs = {"chip_config_name": "megacore"} if TPU[kind].megacore else {}
    dims = [int(d) for d in topology.split(":")[1].split("x")] + [1]
    if dims[0] * dims[1] * dims[2] < 4:  # a slice smaller than libtpu's default host (2x2x1) is its own host
      kwargs["chips_per_host_bounds"] = tuple(dims[:3])
    if num_slices > 1:
      kwargs["num_slices"] = num_slices
    if importlib.util.find_spec("libtpu") is None:
      raise RuntimeError("no TPU compiler: libtpu is not installed; pip install 'moe_jax[tpu]'")
    try:
      return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 -- libtpu's own error, with what was asked of it
      raise RuntimeError(f"libtpu cannot make the topology {topology!r} ({kwargs}): {e}") from e
  try:
    topo = topologies.get_topology_desc(topology_name=kind, platform="cuda", target_config=gpu_target_config(kind),
                                        topology=topology)
  except NotImplementedError as e:
    raise RuntimeError("no GPU compiler: jax's CUDA 12 plugin is not loaded; install it with pip install "
                       "'moe_jax[cuda]' and keep CUDA out of JAX_PLATFORMS' way (JAX_PLATFORMS=cpu works: the "
                       "plugin then loads without a driver)") from e
  return tuple(topo.devices)


def target_devices(target: Target) -> list:
  """The target's compile-only devices (cached per target). Raises RuntimeError naming the extra to install."""
  return list(_devices(target.platform, target.kind, target.topology, target.num_slices))
