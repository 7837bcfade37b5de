"""Orbax checkpoints of the train state together with the data iterator's position.

WORKDIR/checkpoints/<step>/{state, data}: `state` is the TrainState (StandardCheckpointHandler), `data` the
Grain iterator state per process (grain.checkpoint.CheckpointHandler). Saves are asynchronous and atomic: Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save (even by SIGKILL)
leaves the previous checkpoint as the latest. On restore, a latest checkpoint that cannot be read is reported
and the one before it is used.

Checkpoints written before the routing biases became the model's "router" collection hold them as one flat
dict keyed "moe_layers/moe/router/e_score_correction_bias" (the same paths, joined); they are read in that
layout and converted, and the next save writes the current one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util


class _Snapshot:
  """The iterator state at save time; Orbax may serialise it later, after the trainer has moved on."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, loader: Any, force: bool = False) -> bool:
    if not force and (self.every <= 0 or step % self.every):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(_Snapshot(loader.get_state())))
    return self.manager.save(step, args=args, force=True)

  def _restore(self, step: int, abstract_state: Any, loader: Any):
    """(state, whether its routing biases were converted from the earlier layout)."""
    saved, convert = router_bias_as_saved(os.path.join(self.directory, str(step), "state"),
                                          abstract_state.router_bias)
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state.replace(router_bias=saved)),
        data=grain.checkpoint.CheckpointRestore(loader)))["state"]
    if convert is None:
      return state, False
    return state.replace(router_bias=convert(state.router_bias)), True

  def restore_latest(self, abstract_state: Any, loader: Any, log: Callable[[str], None] = print):
    """(state, step) from the newest readable checkpoint, or (None, 0) when there is none."""
    for step in reversed(self.steps()):
      try:
        state, converted = self._restore(step, abstract_state, loader)
        if converted:
          log(f"checkpoint {step}: routing biases read from their earlier layout (a flat dict inside the train "
              "state) and converted to the 'router' collection; the next checkpoint is written in the new layout")
        return state, step
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
        log(f"WARNING: checkpoint {os.path.join(self.directory, str(step))} is unreadable "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); trying the previous one")
    return None, 0

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
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
