#!/usr/bin/env bash
# GPU benchmark (ready for an H200): ours vs diffusers, SD3-medium-shaped transformer at 1024^2 in bf16,
# eager and torch.compile, ms per forward and achieved TFLOP/s against the 989 TFLOP/s dense bf16 peak.
# A few minutes on one GPU. Results go to $OUT (or /tmp/mmdit-flow-bench) as JSON plus this log.
#
#   bash bench/gpu.sh              # full run (needs CUDA)
#   bash bench/gpu.sh --smoke      # CPU, fp32, tiny: checks that the scripts run
#   bash bench/gpu.sh --depth 12   # extra arguments go to bench/gpu_bench.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mmdit-flow-bench}"
mkdir -p "$OUT"
export OUT
{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  python -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
  python bench/gpu_bench.py --family sd3 "$@"
} 2>&1 | tee "$OUT/gpu_bench.log"
