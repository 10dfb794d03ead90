#!/usr/bin/env bash
# GPU benchmark, ready for an H200 (about 5 minutes in all): ours vs diffusers, in bf16 on one CUDA device.
#
#   bash bench/gpu.sh              # full run (needs CUDA)
#   bash bench/gpu.sh --smoke      # CPU, fp32, tiny sizes: checks that every case runs (about a minute)
#   bash bench/gpu.sh --depth 12   # extra arguments go to each bench/gpu_bench.py call
#   OUT=/some/folder bash bench/gpu.sh
#
# Three cases, each in its own process (so GPU memory is freed in between; a failing case is reported and the
# others still run):
#   sd3       SD3-medium-shaped transformer (24 joint blocks, hidden 1536), 1024^2 = 128x128 latents
#             (4096 image tokens) + 333 text tokens, batch 1
#   flux      FLUX.1-dev-shaped transformer (19 double + 38 single blocks, hidden 3072), 1024^2 = 4096 packed
#             image tokens + 512 T5 tokens, guidance embedding, batch 1
#   pipeline  end to end (prompt encoding, 28 Euler steps with CFG 7, VAE decoding) at 512^2: our
#             TextToImagePipeline vs diffusers' StableDiffusion3Pipeline on the same mid-size random SD3
#             folder (12 blocks of width 768, 8x VAE, small random text encoders), built offline; eager, then
#             each side's best lossless path (ours: pipe.compile() and its prompt cache; diffusers: the
#             regional compile of its transformer blocks; both bf16), compile time and images vs eager logged
# For sd3 and flux it prints, per mode (eager, then torch.compile over each block), the median milliseconds
# per forward of ours and of diffusers, the achieved TFLOP/s (FLOPs per forward counted from the config, as a
# share of the 989 TFLOP/s dense bf16 peak) and the speed-up; first the ours-vs-diffusers relative error on
# the same weights and inputs. For pipeline: seconds per image of each and the speed-up. Every line carries
# the UTC time and the seconds since its case started.
#
# Written to $OUT (default /tmp/mmdit-flow-bench): gpu_bench.log (all output), gpu_bench_<case>.json per
# case, and summary.md / summary.json (one table of all cases).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mmdit-flow-bench}"
# python3 by default: some images (the H200's) have no `python`, and a `python` symlinked to a virtual
# environment's python3 from outside it loses that environment's packages
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export OUT
{
  date -u
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
  failed=()
  for case in sd3 flux pipeline; do
    echo "=== $case ($(date -u +%H:%M:%S))"
    "$PY" bench/gpu_bench.py --family "$case" "$@" || failed+=("$case")
  done
  echo "=== summary ($(date -u +%H:%M:%S))"
  "$PY" bench/gpu_bench.py --summary --out "$OUT"
  if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
  fi
} 2>&1 | tee "$OUT/gpu_bench.log"
