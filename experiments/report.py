"""Collect an experiment's runs into results.csv, summary.md and PNG plots.

    python -m experiments.report balancing --workdir=/tmp/exp/balancing [--out=DIR]

results.csv: one row per (variant, seed) run; summary.md: mean ± std per variant and, for each of the paper's
claims, the difference with its standard error and whether its direction matches the paper's; *.png: per-metric charts
and training curves. Written to --out (default: the workdir). Runs not finished yet are listed as such.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.framework import plots, registry, results
from experiments.framework.sweep import ExperimentError
from moe_jax.cli import fail


def write_report(name: str, workdir: str, out: str | None = None, log=print) -> dict:
  """Writes results.csv, summary.md and the plots; returns {"rows", "summary", "files"}."""
  exp = registry.get(name)
  workdir = os.path.abspath(workdir)
  manifest = results.read_manifest(exp, workdir)
  rows = results.collect(exp, workdir)
  if not rows:
    raise ExperimentError(f"{workdir} holds no runs of {name} yet")
  out = os.path.abspath(out or workdir)
  os.makedirs(out, exist_ok=True)
  results.write_csv(rows, os.path.join(out, "results.csv"))
  summary = results.summary_markdown(exp, rows, manifest)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(summary)
  files = [os.path.join(out, "results.csv"), os.path.join(out, "summary.md")]
  files += plots.draw_all(exp, workdir, rows, out)
  for p in files:
    log(f"wrote {p}")
  return {"rows": rows, "summary": summary, "files": files}


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
  p.add_argument("name", help=f"one of {list(registry.NAMES)}")
  p.add_argument("--workdir", required=True, help="the experiment's workdir (as given to experiments.run)")
  p.add_argument("--out", default=None, help="where to write results.csv, summary.md and the PNGs (default: workdir)")
  args = p.parse_args(argv)
  try:
    report = write_report(args.name, args.workdir, args.out)
  except (ExperimentError, ValueError, ImportError) as e:
    fail(e)
  print(report["summary"])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
