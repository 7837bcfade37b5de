"""Stopping a run cleanly on SIGTERM / SIGINT: a checkpoint at the next step boundary, then exit 0.

Schedulers (Slurm, Kubernetes) and GPU/TPU preemption send SIGTERM and allow a grace period before SIGKILL. The
handler only sets a flag; the trainer reads it after each step, saves, and returns. A second SIGINT (Ctrl-C
twice) raises KeyboardInterrupt at once, for a user who does not want to wait.

Under multi-host training the signal may reach one process only, or reach them at different steps; all processes
must save the same step, so `requested()` all-gathers the flags (one tiny host collective per step, called at the
same loop iteration by every process) and every process sees the same answer.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


class StopOnSignal:
  """Context manager: while inside, SIGTERM/SIGINT request a stop instead of killing the process."""

  def __init__(self, log: Callable[[str], None]):
    self.log = log
    self.signal: str | None = None
    self._previous: dict = {}

  def _handle(self, signum, frame) -> None:
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
    self.signal = _NAMES.get(signum, str(signum))
    self.log(f"{self.signal} received: saving a checkpoint after the current step, then exiting"
             + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
      for s in _NAMES:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous = {}

  def requested(self) -> bool:
    """Whether any process was asked to stop (the same answer on every process)."""
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))
