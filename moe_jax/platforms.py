"""Which JAX platforms a command asks for on a machine with no accelerator.

jax initialises every installed PJRT plugin on first use unless `JAX_PLATFORMS` names the platforms to use. On a
CPU-only machine the CUDA plugin and libtpu -- which the test extra installs for deviceless compilation
(moe_jax.aot) -- then print tracebacks and warnings before jax falls back to the CPU, burying a command's own
one-line errors. `prefer_cpu_without_accelerators()` asks for the CPU when no accelerator device node exists and
the user has not chosen (`JAX_PLATFORMS` set, even empty, is left alone); the entry points call it at the start of
`main`, before the first computation.
"""

from __future__ import annotations

import glob
import os

# Device nodes of accelerators jax can drive: NVIDIA GPUs, TPU v2-v4 (accel) and v5+ (vfio), AMD GPUs.
_ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")


def has_accelerator() -> bool:
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_NODES)


def prefer_cpu_without_accelerators() -> bool:
  """Sets jax's platforms to "cpu" when JAX_PLATFORMS is unset and the machine has no accelerator; returns
  whether it did. Must run before jax initialises its backends (before the first computation)."""
  if "JAX_PLATFORMS" in os.environ or has_accelerator():
    return False
  import jax

  jax.config.update("jax_platforms", "cpu")
  return True
