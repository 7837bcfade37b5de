"""The report's figures (matplotlib, Agg): per metric each variant's mean ± std (a marker with an error bar) and
every seed's value as a dot -- markers, not bars, because the quality metrics' axes do not start at zero and a
bar's height would exaggerate a small difference; per curve key the mean over seeds against the training step,
one line per variant."""

from __future__ import annotations

import os

from experiments.framework import results
from experiments.framework.spec import METRIC_LABELS, Experiment


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise ImportError("the report draws its plots with matplotlib: pip install -e '.[experiments]' "
                      "(or pip install matplotlib)") from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def metric_chart(exp: Experiment, rows: list[dict], metric: str, path: str) -> bool:
  plt = _pyplot()
  variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if results._values(rows, v, metric)]
  if not variants:
    return False
  fig, ax = plt.subplots(figsize=(1.3 * len(variants) + 2, 3.4))
  for i, v in enumerate(variants):
    vals = list(results._values(rows, v, metric).values())
    mean, std, _ = results.mean_std(vals)
    ax.errorbar(i, mean, yerr=std or 0, fmt="o", ms=8, capsize=5, color=f"C{i}")
    ax.plot([i + 0.12] * len(vals), vals, "k.", ms=4, alpha=0.7)
  ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
  ax.set_ylabel(METRIC_LABELS.get(metric, metric))
  lo = min(min(results._values(rows, v, metric).values()) for v in variants)
  hi = max(max(results._values(rows, v, metric).values()) for v in variants)
  if metric not in ("bits_per_byte", "eval_loss"):  # rates, ratios, counts: from zero
    ax.set_ylim(0, hi * 1.15 if hi > 0 else 1)
  ax.set_xlim(-0.6, len(variants) - 0.4)
  ax.grid(axis="y", alpha=0.3)
  ax.set_title(f"{exp.name}: {METRIC_LABELS.get(metric, metric)} (mean ± std, dots = seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def curve_chart(exp: Experiment, series: dict, key: str, path: str) -> bool:
  plt = _pyplot()
  if not series:
    return False
  fig, ax = plt.subplots(figsize=(6, 3.4))
  for i, (variant, (steps, mean)) in enumerate(series.items()):
    ax.plot(steps, mean, color=f"C{i}", label=variant, lw=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel(METRIC_LABELS.get(key, key))
  if key == "max_vio":
    ax.set_yscale("log")
  ax.legend(fontsize=8)
  ax.set_title(f"{exp.name}: {METRIC_LABELS.get(key, key)} during training (mean over seeds)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def draw_all(exp: Experiment, workdir: str, rows: list[dict], out_dir: str) -> list[str]:
  """Every metric chart and curve of the experiment into out_dir; returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for m in exp.charts:
    p = os.path.join(out_dir, f"{m}.png")
    if metric_chart(exp, rows, m, p):
      written.append(p)
  for key, series in results.curves(exp, workdir, exp.curves).items():
    p = os.path.join(out_dir, f"curve_{key}.png")
    if curve_chart(exp, series, key, p):
      written.append(p)
  return written
