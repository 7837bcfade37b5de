"""Orbax checkpoints of the train state together with the data iterator's position, verified on restore.

WORKDIR/checkpoints/<step>/{state, data, fingerprint}: `state` is the TrainState (StandardCheckpointHandler), `data`
the Grain iterator state per process (grain.checkpoint.CheckpointHandler), `fingerprint` two 32-bit sums per array
of the state as it was saved (moe_jax.training.fingerprint), checked after restoring. Saves are asynchronous and
atomic: Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save (even by
SIGKILL) leaves the previous checkpoint as the latest.

Restoring takes the newest checkpoint that reads back *and* matches its fingerprint. Newer ones that fail are moved
to WORKDIR/quarantine/<step>-<time>/ with a REASON file (never deleted), so the retrained steps can be saved again.
If checkpoints exist and none restores, `CheckpointsUnreadable` lists each step and why, and nothing is moved:
a run never silently starts over. A failed write (a full disk) raises `CheckpointWriteError`, one line naming the
directory and the OS error; the partial temporary directory is removed and earlier checkpoints stay intact.

Checkpoints written before the routing biases became the model's "router" collection hold them as one flat
dict keyed "moe_layers/moe/router/e_score_correction_bias" (the same paths, joined); they are read in that
layout and converted, and the next save writes the current one. Checkpoints from before fingerprints restore
unverified (said once).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from moe_jax.training.fingerprint import fingerprint, mismatches


class CheckpointsUnreadable(RuntimeError):
  """Checkpoints exist but none restores; the message lists each step and its error."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (e.g. the disk is full); earlier checkpoints are intact."""


def root_cause(e: BaseException) -> BaseException:
  """The first OSError in an exception's cause/context chain (Orbax wraps them in asyncio layers), else the
  innermost exception."""
  seen, cur, last = set(), e, e
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, OSError):
      return cur
    last = cur
    cur = cur.__cause__ or cur.__context__
  return last


def describe(e: BaseException) -> str:
  """One line: the OS error and the file when tensorstore reports one (its messages carry os_error_code), else the
  root cause's first line."""
  cause = root_cause(e)
  text = str(cause).splitlines()[0] if str(cause) else ""
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    path = re.search(r'Failed \w+: "([^"]+)"', text)
    return f"[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}" + (f": {path.group(1)}" if path else "")
  return f"{type(cause).__name__}: {text}"


def quiet_orbax_errors() -> None:
  """For command-line entry points, which report a failed checkpoint write or read in one line: drop Orbax's
  error logs from its background threads (each failure is logged with full tracebacks by several threads) and the
  "Event loop is closed" tracebacks of tensorstore's late callbacks into Orbax's finished event loop (reported
through sys.unraisablehook)."""

  class _DropOrbaxErrors(logging.Filter):

    def filter(self, record: logging.LogRecord) -> bool:
      return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)

  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropOrbaxErrors())
  previous = sys.unraisablehook

  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  sys.unraisablehook = hook


class _Snapshot:
  """The iterator state at save time; Orbax may serialise it later, after the trainer has moved on."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True,
               quarantine: str | None = None):
    self.directory = os.path.abspath(directory)
    self.quarantine = quarantine or os.path.join(os.path.dirname(self.directory), "quarantine")
    self.every = every
    self._last_step: int | None = None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "fingerprint": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    try:
      yield
    except Exception as e:  # noqa: BLE001 - whatever Orbax raised, the user needs the OS error and the place
      self._abandon()
      raise CheckpointWriteError(f"could not write a checkpoint under {self.directory} (saving step {step}): "
                                 f"{describe(e)}; the checkpoints written before ({self._committed() or 'none'}) "
                                 "are intact") from None

  def _committed(self) -> list[int]:
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit()) if os.path.isdir(self.directory) else []

  def _abandon(self) -> None:
    """After a failed write: stop Orbax's background work and remove its temporary directories."""
    with contextlib.suppress(Exception):
      self.manager.close()
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def save(self, step: int, state: Any, loader: Any, force: bool = False) -> bool:
    if not force and (self.every <= 0 or step % self.every):
      return False
    prints = fingerprint(state)  # of exactly the arrays handed to Orbax, before the next step donates them
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(_Snapshot(loader.get_state())),
                              fingerprint=ocp.args.JsonSave(prints))
    self._last_step = step
    with self._writing(step):
      return self.manager.save(step, args=args, force=True)

  def _restore(self, step: int, abstract_state: Any, loader: Any, log: Callable[[str], None]):
    """The verified state of `step`; raises on any failure."""
    saved, convert = router_bias_as_saved(os.path.join(self.directory, str(step), "state"),
                                          abstract_state.router_bias)
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state.replace(router_bias=saved)),
        data=grain.checkpoint.CheckpointRestore(loader)))["state"]
    if os.path.isdir(os.path.join(self.directory, str(step), "fingerprint")):
      prints = self.manager.restore(step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))["fingerprint"]
      bad = mismatches(prints, state)
      if bad:
        raise ValueError(f"{len(bad)} array(s) differ from the fingerprint recorded at save time (damaged on disk): "
                         f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    else:
      log(f"checkpoint {step} has no fingerprint (written before they were recorded): restored unverified")
    if convert is not None:
      log(f"checkpoint {step}: routing biases read from their earlier layout (a flat dict inside the train "
          "state) and converted to the 'router' collection; the next checkpoint is written in the new layout")
      state = state.replace(router_bias=convert(state.router_bias))
    return state

  def restore_latest(self, abstract_state: Any, loader: Any, log: Callable[[str], None] = print):
    """(state, step) from the newest checkpoint that restores and verifies, or (None, 0) when there is none.

    Raises CheckpointsUnreadable when checkpoints exist but none restores (nothing is moved then)."""
    failed: list[tuple[int, str]] = []
    for step in reversed(self.steps()):
      try:
        state = self._restore(step, abstract_state, loader, log)
      except Exception as e:  # noqa: BLE001 - any failure makes the step unreadable; the reason is kept
        reason = describe(e) if not isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        failed.append((step, reason))
        log(f"WARNING: checkpoint {os.path.join(self.directory, str(step))} is unreadable ({reason}); "
            "trying the previous one")
        continue
      for bad_step, reason in failed:
        self._quarantine(bad_step, reason, log)
      if failed:
        self.manager.reload()
      return state, step
    if failed:
      lines = "\n".join(f"  step {s}: {r}" for s, r in failed)
      raise CheckpointsUnreadable(
          f"none of the {len(failed)} checkpoints under {self.directory} restores:\n{lines}\nNothing was changed. "
          "If the config changed, resume with the run's own config; to start over on purpose pass "
          "--config.checkpoint.restore=never (the old run is moved to previous/), or use a new workdir")
    return None, 0

  def _quarantine(self, step: int, reason: str, log: Callable[[str], None]) -> None:
    if jax.process_index() == 0:
      dest = os.path.join(self.quarantine, f"{step}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
      os.makedirs(self.quarantine, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
      with open(os.path.join(dest, "REASON"), "w") as f:
        f.write(reason + "\n")
      log(f"moved unreadable checkpoint {step} to {dest} (kept for inspection; training continues from an "
          "earlier step)")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine {step}")

  def wait(self) -> None:
    with self._writing(self._last_step):
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._writing(self._last_step):
      self.manager.wait_until_finished()
    self.manager.close()


def router_bias_as_saved(state_dir: str, router: Any):
  """(`router` -- a "router" collection tree, possibly abstract -- in the layout the train state saved in
  `state_dir` holds it, and a function from that layout back to the collection, or None when they agree).
  Earlier runs saved one flat dict keyed by the joined paths; the checkpoint's tree metadata tells which."""
  if not router:
    return router, None
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
  tree = getattr(tree, "tree", tree)
  if not any("/" in str(k) for k in (tree.get("router_bias") or {})):
    return router, None
  return (traverse_util.flatten_dict(router, sep="/"),
          lambda flat: traverse_util.unflatten_dict(dict(flat), sep="/"))


def abstract_like(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (tmp + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
