"""The experiments, by name: each is experiments/<name>.py defining `EXPERIMENT`."""

from __future__ import annotations

import importlib

from experiments.framework.spec import Experiment

NAMES = ("balancing", "bias_update", "mtp", "moe_architecture", "attention", "balance_loss_scope", "esft")


def get(name: str) -> Experiment:
  if name not in NAMES:
    raise ValueError(f"unknown experiment {name!r}; the experiments are {list(NAMES)} (python -m experiments.run --list)")
  exp = importlib.import_module(f"experiments.{name}").EXPERIMENT
  assert exp.name == name, (exp.name, name)
  return exp


def describe(scale: str = "cpu") -> str:
  """Every experiment, its variants and what each changes in the base config (for --list)."""
  lines = []
  for name in NAMES:
    exp = get(name)
    lines.append(f"{name}: {exp.title} ({exp.seeds} seeds by default)")
    for variant, changes in exp.variant_overrides(scale).items():
      what = ", ".join(f"{k}={v!r}" for k, v in changes.items()) or "(the base config)"
      lines.append(f"  {variant:<22} {what}")
  return "\n".join(lines)
