"""One switch for every Pallas kernel (grouped matmul, splash attention): run in Pallas' interpret mode, a CPU
simulation for tests."""

from __future__ import annotations

import contextlib
import contextvars

_INTERPRET = contextvars.ContextVar("moe_jax_kernels_interpret", default=False)


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
