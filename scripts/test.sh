#!/usr/bin/env bash
# Sets up a virtual environment (once), installs moe_jax with its test extras, and runs the test suite on CPU.
# Usage: bash scripts/test.sh [pytest args...]     (VENV=path to use another environment)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-auto}" --durations=15 "$@"
