"""What the command-line entry points share: a user-facing failure is one `ERROR:` line and an exit code."""

from __future__ import annotations

import os
import sys

from moe_jax.restore import LoadedModel, load_model
from moe_jax.training.checkpoint import CheckpointsUnreadable, quiet_orbax_errors


def fail(error: BaseException | str, code: int = 1) -> None:
  """Prints `ERROR: <error>` and exits without interpreter teardown (Orbax's background threads would print
  tracebacks while it runs)."""
  print(f"ERROR: {error}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # noqa: SLF001


def load_model_or_exit(spec: str, step: int | None) -> LoadedModel:
  """`restore.load_model`, with unreadable checkpoints reported on stderr and a failure as one error."""
  quiet_orbax_errors()
  try:
    return load_model(spec, step=step, log=lambda m: print(m, file=sys.stderr, flush=True))
  except (CheckpointsUnreadable, FileNotFoundError, ValueError) as e:
    fail(e)
