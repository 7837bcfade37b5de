"""Run an experiment: every (variant, seed) through the trainer, resumable, with progress and ETA.

    python -m experiments.run balancing --workdir=/tmp/exp/balancing [--scale=cpu|paper] [--seeds=3]
        [--only=VARIANT[/SEED]] [--config.train.num_steps=50 ...]
    python -m experiments.run --list

Runs land in WORKDIR/<variant>/seed<k>/ (normal training workdirs); rerunning skips finished runs and resumes an
interrupted one. --only runs one variant (or one variant and seed), e.g. one job per run on a cluster. Extra
--config.x.y=v flags apply to every run. Then: python -m experiments.report <name> --workdir=WORKDIR.
Exit codes: 0 done (or stopped by SIGTERM/SIGINT with a checkpoint), 1 bad input, 2 some run diverged.
"""

from __future__ import annotations

import argparse
import sys

from experiments.framework import overrides as ov
from experiments.framework import registry
from experiments.framework.spec import SCALES
from experiments.framework.sweep import ExperimentError, run_experiment
from moe_jax.cli import fail
from moe_jax.host_memory import keep_host_memory
from moe_jax.platforms import prefer_cpu_without_accelerators
from moe_jax.training.checkpoint import quiet_orbax_errors


def parse_args(argv: list[str]):
  p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n\n")[0])
  p.add_argument("name", nargs="?", help=f"one of {list(registry.NAMES)}")
  p.add_argument("--workdir", help="where the runs go (WORKDIR/<variant>/seed<k>/)")
  p.add_argument("--scale", default="cpu", choices=SCALES, help="cpu: the minutes-scale preset; paper: the papers' models")
  p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the experiment's, 3)")
  p.add_argument("--only", default=None, help="VARIANT or VARIANT/SEED: run just that")
  p.add_argument("--list", action="store_true", help="print every experiment and its variants, then exit")
  return p.parse_known_args(argv)


def main(argv: list[str]) -> int:
  args, rest = parse_args(argv)
  if args.list:
    print(registry.describe(args.scale))
    return 0
  if not args.name or not args.workdir:
    fail("give an experiment name and --workdir (python -m experiments.run --list shows the experiments)")
  prefer_cpu_without_accelerators()  # no plugin noise before jax falls back to the CPU
  keep_host_memory()
  quiet_orbax_errors()
  try:
    exp = registry.get(args.name)
    flags = ov.parse_flags(exp.base(args.scale), rest)
    result = run_experiment(exp, args.workdir, scale=args.scale, seeds=args.seeds, only=args.only, flags=flags)
  except ExperimentError as e:
    fail(e)
  except ValueError as e:  # unknown name, bad override
    fail(e)
  if result["failed"]:
    print(f"{len(result['failed'])} run(s) diverged: {', '.join(result['failed'])} (see their failed.json)")
    return 2
  if not result["preempted"]:
    print(f"all {result['total']} run(s) finished; next: python -m experiments.report {args.name} "
          f"--workdir={args.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
