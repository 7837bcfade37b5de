#!/usr/bin/env bash
# The ESFT experiment (experiments/esft.py) end to end, resumable (rerunning skips what is done):
#   1. the base model: configs/default.py on the embedded corpus (the stdlib without its tests), ~15 min on 2 cores
#   2. full / esft_gate / esft_token / lora fine-tuning on the stdlib's test/test_*.py files, 3 seeds each
#   3. the report (summary.md, results.csv, plots in ROOT/esft/report) and the base model's task bits/byte
# Usage: bash scripts/esft_experiment.sh [ROOT=experiments/runs] [--seeds=N] [--config.x.y=v for every run]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-experiments/runs}"
shift || true
PY="${VENV:-.venv}/bin/python"
BASE="$ROOT/esft_base"
if [ ! -f "$BASE/eval.json" ]; then
  "$PY" -m moe_jax.train --config=configs/default.py --workdir="$BASE"
fi
"$PY" -m experiments.run esft --workdir="$ROOT/esft" --config.init_from="$(realpath "$BASE")" \
  --config.data.tokenizer_path="$(realpath "$BASE")/tokenizer.json" "$@"
"$PY" -m experiments.report esft --workdir="$ROOT/esft" --out="$ROOT/esft/report"
"$PY" -m experiments.esft "$(realpath "$BASE")" | tee "$ROOT/esft/report/task_before.json"  # the 0-step reference
