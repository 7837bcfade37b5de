"""Keep freed host memory in the process, so XLA's CPU runtime does not page-fault its step buffers every step.

XLA's CPU runtime allocates one temporary buffer per execution of a compiled step (the default run's train
step: 496 MB) and frees it at the end. glibc serves an allocation that large, made from one of XLA's worker
threads, with a fresh `mmap` whatever `M_MMAP_THRESHOLD` says (a thread arena's heap is at most 64 MB), and
returns it with `munmap`: every step the kernel maps and zeroes ~0.5 GB again, one 4 KiB page fault at a time.
Measured on the 2-core CPU (docs/benchmarks.md, issue #15): 121,000 minor faults and 0.26-0.30 s of system
time per default train step, 15-20% of the step.

`keep_host_memory()` sets, through `mallopt(3)`, one malloc arena for every thread (`M_ARENA_MAX` = 1), no
`mmap` for large blocks (`M_MMAP_MAX` = 0; the heap still falls back to it if it cannot grow) and no trimming
of the heap's free top below 2 GiB (`M_TRIM_THRESHOLD`): a freed step buffer is reused by the next step.
Measured: 0 faults per step after the first, system time 0.01 s. The cost: the process keeps its peak heap
(the training process needs it again next step anyway).

It must run before XLA's threads first allocate (before the first computation); the entry points call it at
the start of `main`, and a notebook can call it in its first cell. Linux with glibc only; a no-op elsewhere, or
with MOE_JAX_KEEP_HOST_MEMORY=0. Not a library kernel question: jax has no option for it (XLA's CPU client
allocates with the C library), and preloading tcmalloc/jemalloc would be a system dependency.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)

_done: bool | None = None


def keep_host_memory() -> bool:
  """Applies the malloc settings above once per process; True if they are in effect."""
  global _done
  if _done is not None:
    return _done
  _done = False
  if os.environ.get("MOE_JAX_KEEP_HOST_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success (the arena setting alone would not stop the faults; it is harmless).
  _done = all(mallopt(p, v) == 1 for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_BYTES)))
  return _done
