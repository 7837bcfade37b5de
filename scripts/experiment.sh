#!/usr/bin/env bash
# Sets up a virtual environment (once), installs moe_jax with the experiments extra (matplotlib), runs one
# experiment's sweep and writes its report (results.csv, summary.md, PNGs) into the workdir.
# Usage: bash scripts/experiment.sh NAME [WORKDIR] [--seeds=N --only=V/S --scale=paper --config.x.y=v ...]
#        (WORKDIR defaults to experiments/runs/NAME; VENV=path to use another environment). Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
NAME="${1:?usage: bash scripts/experiment.sh NAME [WORKDIR] [flags]; python -m experiments.run --list}"
shift
WORKDIR="experiments/runs/$NAME"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
  WORKDIR="$1"
  shift
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[experiments]"
"$VENV/bin/python" -m experiments.run "$NAME" --workdir="$WORKDIR" "$@"
exec "$VENV/bin/python" -m experiments.report "$NAME" --workdir="$WORKDIR"
