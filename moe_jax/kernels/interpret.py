"""What decides where a kernel runs: the devices a program is compiled for (`KernelTarget`, set from the mesh by
`kernels_for`), one switch for every Pallas kernel to run in Pallas' interpret mode (a CPU simulation for tests),
and the one rule that maps a backend name to one that can run on that platform.

Kernels are chosen from the mesh's devices, never from `jax.default_backend()`: a program compiled ahead of time
for TPUs or H100s on a CPU host (`python -m moe_jax.compile`) must pick the target's kernels, not the host's.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple, Sequence

_INTERPRET = contextvars.ContextVar("moe_jax_kernels_interpret", default=False)
_TARGET = contextvars.ContextVar("moe_jax_kernel_target", default=None)

# Streaming multiprocessors by device kind, for devices that do not report `core_count` (compile-only devices
# built from a target spec). Mosaic GPU's persistent kernels launch one program per SM.
SMS_BY_KIND = {"H100": 132, "H200": 132, "H800": 132, "H20": 78, "GH200": 132}


class KernelTarget(NamedTuple):
  platform: str  # "cpu" | "gpu" | "tpu"
  device_kind: str  # e.g. "NVIDIA H100 80GB HBM3", "TPU v5"
  core_count: int | None  # GPU SMs (None elsewhere or unknown)


def target_of(device) -> KernelTarget:
  """The kernel target of one device (a real or a compile-only one)."""
  platform = {"cuda": "gpu", "rocm": "gpu"}.get(device.platform, device.platform)
  kind = str(getattr(device, "device_kind", ""))
  cores = getattr(device, "core_count", None)
  if not cores and platform == "gpu":
    cores = next((n for k, n in SMS_BY_KIND.items() if k in kind.upper().split()), None)
  return KernelTarget(platform, kind, int(cores) if cores else None)


@contextlib.contextmanager
def kernels_for(devices: Sequence):
  """Within this context kernels are chosen for `devices` (a mesh's), whatever the default backend is."""
  token = _TARGET.set(target_of(list(devices)[0]))
  try:
    yield
  finally:
    _TARGET.reset(token)


def kernel_target() -> KernelTarget:
  """The target set by `kernels_for` (the step's mesh), else the default device's."""
  target = _TARGET.get()
  if target is None:
    import jax
    target = target_of(jax.devices()[0])
  return target


def kernel_platform() -> str:
  return kernel_target().platform


@contextlib.contextmanager
def interpret_kernels(enabled: bool = True):
  """Within this context, Pallas kernels run in Pallas interpret mode (CPU simulation, for tests)."""
  token = _INTERPRET.set(enabled)
  try:
    yield
  finally:
    _INTERPRET.reset(token)


def interpreting() -> bool:
  """Whether the caller is inside `interpret_kernels()`."""
  return _INTERPRET.get()


def resolve_for_platform(what: str, name: str, choices: tuple, native: dict, auto: dict, default: str,
                         simulatable: tuple, alternatives: str, platform: str | None = None,
                         interpret: bool | None = None) -> str:
  """The one rule behind `resolve_backend` (gmm) and `resolve_attention`: "auto" -> the platform's entry of
  `auto`; a name that cannot run here raises naming the platform and what it needs. `native[name]` lists the
  platforms a kernel runs on (None: everywhere); `simulatable` ones also run anywhere in interpret mode.
  The platform defaults to the kernel target's (`kernels_for`)."""
  platform = platform or kernel_platform()
  interpret = interpreting() if interpret is None else interpret
  if name == "auto":
    return auto.get(platform, default)
  if name not in choices:
    raise ValueError(f"{what} {name!r} is not one of {('auto',) + tuple(choices)} (platform {platform!r})")
  needs = native[name]
  if needs is None or platform in needs or (interpret and name in simulatable):
    return name
  how = ("or interpret_kernels() to simulate the kernel for testing" if name in simulatable
         else "it has no interpret mode")
  raise ValueError(f"{what} {name!r} cannot run on platform {platform!r} (it needs {needs[0]}); use "
                   f"{alternatives}; {how}")
