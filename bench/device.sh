#!/usr/bin/env bash
# One H200 lease in one device call (about 8 minutes): bench/gpu.sh (ours vs diffusers in CUDA bf16), then
# bench/sweep.py (tiny-shapes recipe variants trained side by side on the GPU) in the time left.
#
#   OUT=/some/folder BUDGET_S=480 bash bench/device.sh     # install first: docs/benchmarks.md
#
# Keep BUDGET_S a minute or more under the device call's limit: a command killed at the limit may bring
# nothing of $OUT back.
#
# While gpu.sh times, the sweep's data sets and caches are built on 4 other CPU cores (no GPU work), so the
# benchmark has the GPU to itself. Everything ends by BUDGET_S seconds after the start: gpu.sh gets at most
# GPU_SH_S (default 250) seconds; unfinished training runs are stopped 75 s before the end and scored from
# their newest checkpoint. Results: $OUT/summary.md (+ gpu.sh's files), $OUT/sweep.json and $OUT/sweep.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mmdit-flow-device}"
mkdir -p "$OUT"
END=$(( $(date +%s) + ${BUDGET_S:-480} ))
# batch 256 at 3000 steps: 768 000 samples (the CPU recipe: 40 000 x 32 = 1 280 000); the recipe's training
# shift (3) unless a variant sets another; sdpa attention (the recipe's "math" is the CPU's faster choice)
BASE="data.batch_size=256 data.num_workers=2 optimizer.lr=2e-3 schedule.max_steps=3000 ema.decay=0.998 model.attention_backend=sdpa"
SWEEP=("${PYTHON:-python3}" bench/sweep.py --work /tmp/sweep --json "$OUT/sweep.json"
  --variant base "$BASE"
  --variant shift5 "$BASE objective.shift=5"
  --variant wide_shallow "$BASE model.overrides.hidden_size=160 model.overrides.depth=4"
  --variant data50k "$BASE images=50000"
  --variant h256 "$BASE model.overrides.hidden_size=256 model.overrides.num_heads=4"
  --variant h256_data50k "$BASE model.overrides.hidden_size=256 model.overrides.num_heads=4 images=50000")
PIN_PREP=() PIN_GPU=()
if [ "$(nproc)" -ge 16 ]; then PIN_PREP=(taskset -c 12-15) PIN_GPU=(taskset -c 0-11); fi
# shellcheck disable=SC2086  # SWEEP_ARGS: extra words for bench/sweep.py, e.g. "--smoke --device cpu"
SWEEP+=(${SWEEP_ARGS:-})
OMP_NUM_THREADS=4 "${PIN_PREP[@]}" "${SWEEP[@]}" --prepare-only --cache-device cpu >"$OUT/sweep.log" 2>&1 &
prep=$!
OUT="$OUT" timeout "${GPU_SH_S:-250}" "${PIN_GPU[@]}" bash bench/gpu.sh "$@"
echo "gpu.sh exit $? at $(date -u +%H:%M:%S)"
wait $prep || echo "sweep data preparation failed: $OUT/sweep.log"
"${SWEEP[@]}" --end-by "$END" --eval-reserve 75 >>"$OUT/sweep.log" 2>&1
echo "sweep exit $? at $(date -u +%H:%M:%S)"
tail -12 "$OUT/sweep.log"
