"""Metric sinks: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard event files, and a
one-line progress report on stdout.

On resume, lines for steps after the restored checkpoint (logged before the run died) are removed, so the file
never holds a step twice.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


def _parsed_lines(path: str):
  """(line, parsed object) for every parseable line of a JSON-lines file (a line cut by a kill mid-write is
  skipped); nothing if the file does not exist."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    for ln in f:
      try:
        yield ln, json.loads(ln)
      except json.JSONDecodeError:
        pass


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the lines whose "step" is <= last_step, byte for byte (atomically)."""
  if not os.path.exists(path):
    return
  kept = [ln for ln, row in _parsed_lines(path)
          if isinstance(row, dict) and row.get("step", last_step + 1) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  """Every parseable line of a metrics.jsonl (a line cut by a kill mid-write is skipped); [] if there is none."""
  return [row for _, row in _parsed_lines(path)]


def training_summary(rows: list[dict]) -> dict:
  """Run-level figures from metrics.jsonl rows (the training rows: those with a "loss").

  max_vio_batch: MaxVio of each logged training batch (mean over MoE layers), averaged over the logged steps --
    the Loss-Free Balancing paper's MaxVio_batch, sampled every `log_every` steps (every step when log_every=1).
  tokens_per_sec: the median over the logged windows after the first (which holds the compile); a median, so
    the windows that also held an evaluation or a checkpoint do not move it.
  """
  train = [r for r in rows if "loss" in r and "max_vio" in r]
  if not train:
    return {}
  vio = [float(r["max_vio"]) for r in train]
  tps = [float(r["tokens_per_sec"]) for r in train[1:] if "tokens_per_sec" in r] or [
      float(r["tokens_per_sec"]) for r in train if "tokens_per_sec" in r]
  return {"max_vio_batch": float(np.mean(vio)), "tokens_per_sec": float(np.median(tps)) if tps else None,
          "logged_steps": len(train)}


class MetricWriter:

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "") -> None:
    row = {"step": int(step)} | {prefix + k: _jsonable(v) for k, v in metrics.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k == "step":
          continue
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
          for i, x in enumerate(v):
            self._tb.add_scalar(f"{k}/{i}", x, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def format_eta(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
