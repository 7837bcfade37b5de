#!/usr/bin/env bash
# V3.2's two-stage recipe on the embedded corpus (CPU scale), against continuing the dense model:
#   base      configs/default.py, 1100 steps (the default model)
#   dense     base + 300 steps at a constant LR, dense MLA                          (the comparison)
#   warmup    base + fresh lightning indexers, 100 steps: dense attention, only the indexers train (KL loss)
#   sparse    warmup + 300 steps at the same LR: MLA attends to the indexer's top-32 of up to 128 tokens
#   no_warmup base + fresh indexers straight into the sparse stage (the control: what the warm-up buys)
# Every stage is a normal trainer workdir under ROOT (resumable: rerunning skips finished stages);
# stage 2-4 start from the previous one through --config.init_from. Ends with a table of held-out bits/byte.
# Usage: bash scripts/dsa_two_stage.sh [ROOT=experiments/runs/dsa_two_stage] [--config.x.y=v for every stage]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-experiments/runs/dsa_two_stage}"
shift || true
PY="${VENV:-.venv}/bin/python"
train() {  # WORKDIR flags...
  local work="$1"; shift
  if [ -f "$work/eval.json" ]; then echo "== $work: done"; return; fi
  echo "== $work"
  "$PY" -m moe_jax.train --config=configs/default.py --workdir="$work" "$@" "${COMMON[@]}"
}
COMMON=("$@")
CONTINUE=(--config.train.learning_rate=3e-4 --config.train.lr_final=3e-4 --config.train.warmup_steps=0
          --config.train.lr_decay_start=0 --config.train.eval_every=100 --config.checkpoint.every=100)
DSA=(--config.model.index_n_heads=4 --config.model.index_head_dim=32 --config.model.index_topk=32)
train "$ROOT/base"
train "$ROOT/dense" --config.init_from="$ROOT/base" --config.train.num_steps=300 "${CONTINUE[@]}"
train "$ROOT/warmup" --config.init_from="$ROOT/base" --config.train.num_steps=100 "${CONTINUE[@]}" "${DSA[@]}" \
  --config.model.index_stage=dense_warmup --config.train.trainable=indexer --config.train.learning_rate=1e-3 \
  --config.train.lr_final=1e-3
train "$ROOT/sparse" --config.init_from="$ROOT/warmup" --config.train.num_steps=300 "${CONTINUE[@]}" "${DSA[@]}"
train "$ROOT/no_warmup" --config.init_from="$ROOT/base" --config.train.num_steps=300 "${CONTINUE[@]}" "${DSA[@]}"
"$PY" - "$ROOT" <<'PY'
import json, os, sys
root = sys.argv[1]
ev = {s: json.load(open(os.path.join(root, s, "eval.json"))) for s in ("base", "dense", "warmup", "sparse", "no_warmup")}
print(f"{'stage':<8} {'bits/byte':>9} {'vs dense':>9} {'tokens/s':>9}")
for s, e in ev.items():
  print(f"{s:<8} {e['bits_per_byte']:>9.4f} {e['bits_per_byte'] / ev['dense']['bits_per_byte'] - 1:>+9.2%} "
        f"{e.get('tokens_per_sec') or 0:>9.0f}")
PY
