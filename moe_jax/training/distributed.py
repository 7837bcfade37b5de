"""Multi-process start-up through JAX's own runtime (`jax.distributed.initialize`).

Sources, first found wins: config.mesh.{coordinator_address, num_processes, process_id}; the environment
variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; otherwise, when
MOE_JAX_DISTRIBUTED=auto, JAX's cluster auto-detection (SLURM, Open MPI, Cloud TPU, Kubernetes). With none of
these the run is single-process and nothing is initialised. It must run before anything touches a device.
"""

from __future__ import annotations

import os
from typing import Any

import jax


def _setting(value, env: str, cast=str):
  if value is not None:
    return value
  raw = os.environ.get(env)
  return cast(raw) if raw not in (None, "") else None


def maybe_initialize(mesh_cfg: Any) -> bool:
  """Initialises jax.distributed when the config or environment asks for it; True if it did."""
  if jax.distributed.is_initialized():
    return False
  address = _setting(mesh_cfg.coordinator_address, "JAX_COORDINATOR_ADDRESS")
  nproc = _setting(mesh_cfg.num_processes, "JAX_NUM_PROCESSES", int)
  pid = _setting(mesh_cfg.process_id, "JAX_PROCESS_ID", int)
  if address is not None:
    if nproc is None or pid is None:
      raise ValueError(f"invalid config: coordinator_address={address!r} needs num_processes and process_id "
                       f"(config.mesh.* or JAX_NUM_PROCESSES / JAX_PROCESS_ID), got {nproc!r} and {pid!r}")
    if not 0 <= pid < nproc:
      raise ValueError(f"invalid config: process_id={pid} must be in [0, num_processes={nproc})")
    jax.distributed.initialize(coordinator_address=address, num_processes=nproc, process_id=pid)
    return True
  if os.environ.get("MOE_JAX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
    return True
  return False
