#!/usr/bin/env bash
# The checks only a GPU can show, in one call (for a lent device; see docs/benchmarks.md for what they found):
# the GPU kernel and attention tests on the device, bench_gmm per GPU backend at V3 shapes against a dense matmul,
# bench_attention as T grows, bench_dsa (DeepSeek Sparse Attention vs dense MLA at V3.2's dims), and bench_mfu
# on configs/bench_1b.py per gmm backend. JSON rows and logs go to ${OUT:-/tmp/gpu_checks}. Each step is bounded
# by `timeout`, so one hang does not eat the rest.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
PY="${PYTHON:-python3}"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2
  shift 2
  echo "=== $name" | tee -a "$OUT/summary.txt"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  echo "rc=$? $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
}
step gpu_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
for kernel in auto mgpu_ragged_dot pallas_mosaic_gpu; do
  step "gmm_$kernel" 150 "$PY" scripts/bench_gmm.py --shapes=v3 --tokens=16384 --kernel="$kernel" --json
done
step attention 240 "$PY" scripts/bench_attention.py --impls=xla,blockwise,cudnn --heads=128 --repeats=3 --json
step dsa 240 "$PY" scripts/bench_dsa.py --heads=128 --index_heads=64 --hidden=7168 --q_lora=1536 \
  --contexts=4096,16384,65536,131072 --prefill_contexts=4096,16384,32768 --train_contexts=32768,131072 --max_gib=60 --json
for kernel in ragged_dot mgpu_ragged_dot; do
  step "mfu_$kernel" 240 "$PY" scripts/bench_mfu.py --config=configs/bench_1b.py --config.model.gmm_backend="$kernel" --json
  # The deviceless report of the same step, to compare its per-device bytes with mfu's peak_bytes_in_use.
  step "compile_$kernel" 240 "$PY" -m moe_jax.compile --config=configs/bench_1b.py --target=h100-1 --steps=train \
    --config.model.gmm_backend="$kernel" --json
done
