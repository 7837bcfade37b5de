"""An experiment's results: one row per (variant, seed) run, per-variant mean and std, and the claims' verdicts.

Every figure comes from what the library wrote into the run's workdir -- eval.json (held-out bits per byte and
loss, MaxVio_global over the whole validation split, MaxVio_batch and tokens/s from the trainer's metrics
summary), experiment_metrics.json (parameter counts, decode cache bytes, MTP acceptance) and metrics.jsonl (the
curves); nothing is recomputed here but means, standard deviations and differences.

A claim's difference (variant - baseline) is paired by seed when both variants have the same seeds (the seed
fixes the data order, so pairing removes that variance): mean of the per-seed differences, standard error
std / sqrt(n). Otherwise the two means are compared with Welch's standard error sqrt(s_a^2/n_a + s_b^2/n_b).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import numpy as np

from experiments.framework.spec import METRIC_LABELS, Claim, Experiment
from experiments.framework.sweep import EXTRA, FAILED, MANIFEST, ExperimentError
from moe_jax.training.metrics import read_jsonl

COLUMNS = ("experiment", "variant", "seed", "status", "step", "bits_per_byte", "eval_loss", "max_vio_global",
           "max_vio_batch", "tokens_per_sec", "acceptance_rate", "tokens_per_step", "cache_bytes_per_token",
           "active_params", "total_params", "xz_bits_per_byte", "wall_seconds", "general_bits_per_byte",
           "general_bits_per_byte_before", "trainable_params", "optimizer_state_bytes")


def experiment_name(workdir: str) -> str:
  """The experiment a workdir holds (its experiment.json)."""
  path = os.path.join(workdir, MANIFEST)
  if not os.path.isfile(path):
    raise ExperimentError(f"{workdir} holds no {MANIFEST}: not an experiment workdir")
  with open(path) as f:
    return json.load(f)["experiment"]


def read_manifest(exp: Experiment, workdir: str) -> dict:
  path = os.path.join(workdir, MANIFEST)
  if not os.path.isfile(path):
    raise ExperimentError(f"{workdir} holds no {MANIFEST}: not an experiment workdir (python -m experiments.run "
                          f"{exp.name} --workdir={workdir} makes one)")
  with open(path) as f:
    held = json.load(f)
  if held.get("experiment") != exp.name:
    raise ExperimentError(f"{workdir} holds experiment {held.get('experiment')!r}, not {exp.name!r}")
  return held


def _json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _seeds_on_disk(workdir: str, variant: str) -> list[int]:
  d = os.path.join(workdir, variant)
  if not os.path.isdir(d):
    return []
  return sorted(int(n[4:]) for n in os.listdir(d) if n.startswith("seed") and n[4:].isdigit())


def collect(exp: Experiment, workdir: str) -> list[dict]:
  """One row per run directory of the experiment's variants (status: done | failed | incomplete)."""
  held = read_manifest(exp, workdir)
  variants = exp.variant_overrides(held.get("scale", "cpu"))
  rows = []
  for variant in variants:
    for seed in _seeds_on_disk(workdir, variant):
      d = os.path.join(workdir, variant, f"seed{seed}")
      ev, extra = _json(os.path.join(d, "eval.json")), _json(os.path.join(d, EXTRA))
      cfg = _json(os.path.join(d, "config.json"))
      want = cfg.get("train", {}).get("num_steps")
      status = ("failed" if os.path.isfile(os.path.join(d, FAILED)) else
                "done" if ev and ev.get("step") == want else "incomplete")
      row = {c: None for c in COLUMNS} | {"experiment": exp.name, "variant": variant, "seed": seed, "status": status}
      if status == "done":
        row |= {k: ev.get(k) for k in ("step", "bits_per_byte", "eval_loss", "max_vio_global", "max_vio_batch",
                                        "tokens_per_sec", "xz_bits_per_byte", "general_bits_per_byte",
                                        "general_bits_per_byte_before", "trainable_params", "optimizer_state_bytes")}
        row["wall_seconds"] = ev.get("wall_seconds_this_run")
        row |= {k: extra.get(k) for k in ("acceptance_rate", "tokens_per_step", "cache_bytes_per_token",
                                           "active_params", "total_params")}
      rows.append(row)
  return rows


def curves(exp: Experiment, workdir: str, keys: tuple[str, ...]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
  """{key: {variant: (steps, mean over the variant's finished seeds)}} from metrics.jsonl's training rows."""
  held = read_manifest(exp, workdir)
  out: dict[str, dict] = {k: {} for k in keys}
  for variant in exp.variant_overrides(held.get("scale", "cpu")):
    series = []
    for seed in _seeds_on_disk(workdir, variant):
      rows = [r for r in read_jsonl(os.path.join(workdir, variant, f"seed{seed}", "metrics.jsonl")) if "loss" in r]
      if rows:
        series.append(rows)
    if not series:
      continue
    n = min(len(s) for s in series)  # seeds still running are cut to the shortest
    steps = np.array([r["step"] for r in series[0][:n]])
    for k in keys:
      if all(k in r for s in series for r in s[:n]):
        out[k][variant] = (steps, np.mean([[float(r[k]) for r in s[:n]] for s in series], axis=0))
  return out


def _values(rows: list[dict], variant: str, metric: str) -> dict[int, float]:
  return {r["seed"]: float(r[metric]) for r in rows
          if r["variant"] == variant and r["status"] == "done" and r.get(metric) is not None}


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
  n = len(values)
  if not n:
    return math.nan, None, 0
  return float(np.mean(values)), float(np.std(values, ddof=1)) if n > 1 else None, n


def variant_table(exp: Experiment, rows: list[dict]) -> list[dict]:
  """Per variant: runs done, and (mean, std, n) of each of the experiment's metrics."""
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  out = []
  for v in variants:
    entry = {"variant": v, "done": sum(r["variant"] == v and r["status"] == "done" for r in rows),
             "runs": sum(r["variant"] == v for r in rows)}
    for m in exp.metrics:
      entry[m] = mean_std(list(_values(rows, v, m).values()))
    out.append(entry)
  return out


def judge(claim: Claim, rows: list[dict]) -> dict:
  """The claim measured: diff (or the variant's mean for a band), its standard error, n, whether the direction
  matches the paper's, and whether the difference exceeds two standard errors."""
  a = _values(rows, claim.variant, claim.metric)
  if claim.band is not None:
    mean, std, n = mean_std(list(a.values()))
    se = std / math.sqrt(n) if std is not None else None
    lo, hi = claim.band
    return {"diff": mean, "se": se, "n": n, "paired": False,
            "matches": None if not n else bool(lo <= mean <= hi), "beyond_2se": None}
  b = _values(rows, claim.baseline, claim.metric)
  common = sorted(a.keys() & b.keys())
  if common and len(common) == len(a) == len(b):
    d = [a[s] - b[s] for s in common]
    diff, std, n = mean_std(d)
    se, paired = (std / math.sqrt(n) if std is not None else None), True
  else:
    (ma, sa, na), (mb, sb, nb) = mean_std(list(a.values())), mean_std(list(b.values()))
    diff, n, paired = ma - mb, min(na, nb), False
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb) if sa is not None and sb is not None else None
  if not n:
    return {"diff": math.nan, "se": None, "n": 0, "paired": paired, "matches": None, "beyond_2se": None}
  matches = diff < 0 if claim.expect == "lower" else diff > 0
  return {"diff": diff, "se": se, "n": n, "paired": paired, "matches": bool(matches),
          "beyond_2se": None if se is None else bool(abs(diff) > 2 * se)}


def _fmt(x: float | None, metric: str = "") -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "—"
  if metric.endswith("params") or metric in ("tokens_per_sec", "cache_bytes_per_token"):
    return f"{x:,.0f}"
  return f"{x:.4f}" if abs(x) < 10 else f"{x:,.1f}"


def _pm(stat: tuple, metric: str) -> str:
  mean, std, n = stat
  if not n:
    return "—"
  return _fmt(mean, metric) + ("" if std is None else f" ± {_fmt(std, metric)}")


def _yes_no(x: bool | None) -> str:
  return "—" if x is None else ("yes" if x else "no")


def summary_markdown(exp: Experiment, rows: list[dict], manifest: dict) -> str:
  table = variant_table(exp, rows)
  done = sum(r["status"] == "done" for r in rows)
  wall = sum(r["wall_seconds"] or 0 for r in rows if r["status"] == "done")
  lines = [f"# {exp.name}: {exp.title}", "",
           f"Scale `{manifest.get('scale')}`; {done} of {len(rows)} runs done; training + evaluation wall time of the "
           f"finished runs {wall / 60:.1f} min. Mean ± std over seeds (sample std); `python -m experiments.report "
           f"{exp.name}` wrote this.", ""]
  failed = [f"{r['variant']}/seed{r['seed']}" for r in rows if r["status"] == "failed"]
  if failed:
    lines += [f"Diverged (failed.json): {', '.join(failed)}.", ""]
  head = ["variant", "runs"] + [METRIC_LABELS.get(m, m) for m in exp.metrics]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in table:
    cells = [t["variant"], f"{t['done']}/{t['runs']}" if t["done"] != t["runs"] else str(t["done"])]
    lines.append("| " + " | ".join(cells + [_pm(t[m], m) for m in exp.metrics]) + " |")
  if exp.claims:
    lines += ["", "## The papers' claims at this scale", "",
              "Difference = variant − baseline (paired by seed when both have the same seeds) ± its standard error.",
              "", "| claim | paper | metric | ours | n | direction as the paper's | beyond 2 s.e. |",
              "|---|---|---|---|---|---|---|"]
    for c in exp.claims:
      j = judge(c, rows)
      if c.band is not None:
        ours = f"{c.variant}: {_fmt(j['diff'])}" + ("" if j["se"] is None else f" ± {_fmt(j['se'])}") + \
               f" (paper: {c.band[0]:g}–{c.band[1]:g})"
      else:
        ours = f"{c.variant} − {c.baseline}: {j['diff']:+.4f}" if not math.isnan(j["diff"]) else "—"
        if j["se"] is not None:
          ours += f" ± {j['se']:.4f}"
      lines.append(f"| {c.text} | {c.paper} | {METRIC_LABELS.get(c.metric, c.metric)} | {ours} | {j['n']} | "
                   f"{_yes_no(j['matches'])} | {_yes_no(j['beyond_2se'])} |")
  return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
      w.writerow({k: r.get(k) for k in COLUMNS})
  os.replace(tmp, path)


def read_csv(path: str) -> list[dict[str, Any]]:
  """results.csv back as rows (numbers as floats, seed as int, empty cells as None)."""
  out = []
  with open(path) as f:
    for r in csv.DictReader(f):
      row: dict[str, Any] = {}
      for k, v in r.items():
        if v == "":
          row[k] = None
        elif k in ("experiment", "variant", "status"):
          row[k] = v
        elif k == "seed":
          row[k] = int(v)
        else:
          row[k] = float(v)
      out.append(row)
  return out
