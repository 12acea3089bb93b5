#!/usr/bin/env bash
# Every GPU figure in one call, on one GPU in well under 8 minutes: the CUDA-marked tests, then
# `training.bench --parts gpu` at the paper's shapes (ViT-B/32, bf16, local batch 512, m 4096, T_u 10) next to
# OpenCLIP, then `--input-pipeline device`'s GPU JPEG decoding (training.bench.gpu_decode), then one report
# (default docs/results/gpu/report.md). See src/training/bench/gpu_check.py.
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run]
#
# --dry-run: the same steps on the CPU at tiny sizes (CI runs it: tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# One torch thread on a CPU dry run (tiny tensors; a shared CI machine); the GPU run keeps torch's default.
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && export OMP_NUM_THREADS=1; done
exec timeout 470 "${PYTHON:-python}" -m training.bench.gpu_check "$@"
