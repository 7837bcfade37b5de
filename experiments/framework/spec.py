"""What an experiment declares: its variants (overrides of a base config), seeds, claims and plots.

An experiment module (experiments/<name>.py) defines `EXPERIMENT = Experiment(...)`. A variant is a dict of dotted
config fields -> values applied to the experiment's base config for a scale, so `--list` can print exactly what
each variant changes. A claim is one comparison the paper makes: `variant` against `baseline` on `metric`, with the
direction the paper reports.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

SCALES = ("cpu", "paper")
DIRECTIONS = ("lower", "higher")

# Columns every run reports (eval.json and the trainer's metrics summary; moe_jax.training.metrics).
BASE_METRICS = ("bits_per_byte", "eval_loss", "max_vio_global", "max_vio_batch", "tokens_per_sec")
METRIC_LABELS = {
    "bits_per_byte": "held-out bits/byte", "eval_loss": "held-out loss (nats/token)",
    "max_vio_global": "MaxVio_global", "max_vio_batch": "MaxVio_batch (mean)", "tokens_per_sec": "tokens/s",
    "acceptance_rate": "MTP acceptance", "tokens_per_step": "tokens per main step",
    "cache_bytes_per_token": "decode cache bytes/token", "active_params": "activated params",
    "total_params": "total params", "ce": "training CE (nats/token)", "max_vio": "MaxVio_batch",
    "dropped_fraction": "dropped token share", "general_bits_per_byte": "general held-out bits/byte (after)",
    "general_bits_per_byte_before": "general held-out bits/byte (before)", "trainable_params": "trained params",
    "optimizer_state_bytes": "optimiser state bytes",
}


@dataclasses.dataclass(frozen=True)
class Claim:
  """`variant` minus `baseline` on `metric` is expected to be `expect` (lower/higher) than zero; or, with
  `band=(low, high)` and no baseline, the variant's mean is expected to lie in the band (expect="within")."""
  text: str  # the paper's claim in one sentence
  metric: str  # a results.csv column
  variant: str
  baseline: str | None
  expect: str  # "lower" | "higher": the sign of (variant - baseline) the paper reports; "within" with a band
  paper: str  # the paper's own figures, with the citation
  band: tuple[float, float] | None = None

  def __post_init__(self):
    if self.band is None and (self.expect not in DIRECTIONS or self.baseline is None):
      raise ValueError(f"Claim.expect={self.expect!r} must be one of {DIRECTIONS}, with a baseline")
    if self.band is not None and (self.expect != "within" or self.baseline is not None):
      raise ValueError("a Claim with a band has expect='within' and no baseline")


@dataclasses.dataclass(frozen=True)
class Experiment:
  name: str  # = the module name; the CLI's <name>
  title: str  # one line
  base: Callable[[str], ml_collections.ConfigDict]  # scale -> the base experiment config
  variants: Callable[[str, ml_collections.ConfigDict], dict[str, dict[str, Any]]]  # (scale, base) -> overrides
  claims: tuple[Claim, ...] = ()
  metrics: tuple[str, ...] = BASE_METRICS  # the summary table's columns
  charts: tuple[str, ...] = ("bits_per_byte", "max_vio_global")  # one chart (mean ± std, each seed) per metric
  curves: tuple[str, ...] = ("ce", "max_vio")  # metrics.jsonl keys drawn against the step, mean over seeds
  mtp_acceptance: bool = False  # measure speculative acceptance after training (runs with an MTP module)
  seeds: int = 3  # default number of seeds (0 .. seeds-1 -> config.seed)

  def variant_overrides(self, scale: str) -> dict[str, dict[str, Any]]:
    return self.variants(scale, self.base(scale))

  def check(self, scale: str) -> None:
    """Raises ValueError when a claim names a variant the experiment does not have."""
    names = self.variant_overrides(scale)
    for c in self.claims:
      for v in (c.variant, c.baseline):
        if v is not None and v not in names:
          raise ValueError(f"experiment {self.name!r}: claim {c.text!r} names variant {v!r}, not one of {list(names)}")
