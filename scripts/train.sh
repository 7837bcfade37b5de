#!/usr/bin/env bash
# Sets up a virtual environment (once), installs moe_jax, and trains the default model on the embedded corpus.
# Usage: bash scripts/train.sh [WORKDIR] [--config.x.y=... more flags]     (VENV=path to use another environment;
#        CONFIG=configs/other.py for another experiment). Re-running with the same WORKDIR resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
WORKDIR="${1:-/tmp/moe_jax_default}"
shift || true
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
exec "$VENV/bin/python" -m moe_jax.train --config="${CONFIG:-configs/default.py}" --workdir="$WORKDIR" "$@"
