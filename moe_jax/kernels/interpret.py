"""What decides where a kernel runs: one switch for every Pallas kernel (grouped matmul, splash attention) to run
in Pallas' interpret mode, a CPU simulation for tests, and the one rule that maps a backend name to one that can
run on this platform."""

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


def resolve_for_platform(what: str, name: str, choices: tuple, native: dict, auto: dict, default: str,
                         simulatable: tuple, alternatives: str, platform: str | None = None,
                         interpret: bool | None = None) -> str:
  """The one rule behind `resolve_backend` (gmm) and `resolve_attention`: "auto" -> the platform's entry of
  `auto`; a name that cannot run here raises naming the platform and what it needs. `native[name]` lists the
  platforms a kernel runs on (None: everywhere); `simulatable` ones also run anywhere in interpret mode."""
  import jax

  platform = platform or jax.default_backend()
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
