"""A training workdir belongs to one run: one writer at a time, one config, and nothing of it is ever lost.

  WORKDIR/.lock              held (fcntl.flock) by the trainer writing here; holds its pid, host and start time
  WORKDIR/config.json        the run's config, written only once a new run's config has passed every check
  WORKDIR/quarantine/        checkpoint steps that could not be restored, moved aside (moe_jax.training.checkpoint)
  WORKDIR/previous/<time>/   what was here when a run started over (config.checkpoint.restore="never")

Resuming compares the new config with the saved one. Fields in `RESUMABLE` (run length, logging and evaluation
cadence, checkpoint cadence, the mesh -- Orbax reshards on restore -- and model fields that change how, not what,
is computed) may change and are logged; any other difference is a different run and stops the trainer before
anything is written, naming each field with its saved and new value.

The lock is an advisory `flock` on an open file: the kernel releases it when the holder dies (even by SIGKILL),
so a lock file left behind by a dead run is stale by construction and simply taken over.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any, Callable

from moe_jax.config import complete_model_config

RESUMABLE = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.tensorboard",
    "checkpoint.*", "mesh.*", "model.dtype", "model.remat_policy", "model.gmm_backend", "model.decode_attention",
    "model.attention_impl", "model.attention_block_size",
    "model.max_position_embeddings",
)  # fmt: skip
RUN_FILES = ("checkpoints", "metrics.jsonl", "eval.json", "config.json", "tensorboard", "quarantine",
             "esft_experts.json", "esft_relevance.json")


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


class ConfigMismatch(ValueError):
  """The workdir holds a run whose config differs in fields that define the run."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out |= _flatten(v, f"{prefix}{k}.")
    return out
  return {prefix[:-1]: json.loads(json.dumps(tree))}  # tuples -> lists, as config.json holds them


def _resumable(field: str) -> bool:
  return any(field == r or (r.endswith(".*") and field.startswith(r[:-1])) for r in RESUMABLE)


def config_changes(saved: dict, new: dict) -> tuple[list, list]:
  """([(field, saved, new)] that define the run, [(field, saved, new)] that may change on resume).

  The saved model section is completed with the defaults of fields added since it was written (as restoring
  does), so an old workdir compares with the values its checkpoints were made with."""
  saved = dict(saved)
  if "model" in saved:
    saved["model"] = complete_model_config(saved["model"]).to_dict()
  a, b = _flatten(saved), _flatten(new)
  binding, harmless = [], []
  for field in sorted(a.keys() | b.keys()):
    if field not in a:  # a field the saved run's schema did not have
      harmless.append((field, "(absent)", b[field]))
    elif a.get(field) != b.get(field):
      (harmless if _resumable(field) else binding).append((field, a.get(field), b.get(field, "(absent)")))
  return binding, harmless


def check_resume(config_dict: dict, workdir: str, log: Callable[[str], None]) -> None:
  """Raises ConfigMismatch when WORKDIR/config.json describes a different run; logs the allowed changes."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigMismatch(f"{path} cannot be read ({e}); this workdir's run cannot be checked against the new config. "
                         "Use a new workdir, or --config.checkpoint.restore=never to start over (what is here is "
                         "moved to previous/)") from None
  binding, harmless = config_changes(saved, config_dict)
  if binding:
    lines = "\n".join(f"  {f}: {old!r} (saved) != {new!r}" for f, old, new in binding)
    flags = " ".join(f"--config.{f}={old!r}" for f, old, _ in binding[:6])
    raise ConfigMismatch(
        f"{workdir} holds a run with a different config ({len(binding)} field(s) differ):\n{lines}\n"
        f"Nothing was written. To resume that run, use its values (e.g. {flags}); for a new run use a new "
        "workdir, or --config.checkpoint.restore=never to start over here (the old run is moved to previous/)")
  for f, old, new in harmless:
    log(f"resuming with {f} changed: {old!r} -> {new!r}")


def archive_run(workdir: str, log: Callable[[str], None]) -> str | None:
  """Moves a previous run's files to WORKDIR/previous/<time>/ (a restart that loses nothing); returns that dir."""
  present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  dest = os.path.join(workdir, "previous", datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
  os.makedirs(dest)
  for name in present:
    shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
  log(f"starting over (config.checkpoint.restore='never'): the previous run's {', '.join(present)} moved to {dest}")
  return dest


class WorkdirLock:
  """An exclusive, non-blocking lock on WORKDIR/.lock for the life of a run (a context manager)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirInUse(f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); two runs writing "
                         "one workdir would interleave their metrics and checkpoints. Wait for it to finish, stop "
                         "it, or use another workdir") from None
    # Taken: any previous holder is gone (the kernel drops a flock when its process dies), so its record is stale.
    stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    self._fd, self.stale = fd, stale
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
