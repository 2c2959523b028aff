#!/usr/bin/env bash
# The device path checked on one GPU in one go (NCCL at N=1, GPU buffers, FP8 on the GPU, bit-exact against
# the CPU; then bench/run.py --gpu against cp + sync), within --budget-s (default 450 s). See bench/gpu_check.py
# and bench/README.md ("One GPU in one go").
#   bench/gpu_check.sh                    on the GPU machine: results in $OUT (default out/gpu_check)
#   bench/gpu_check.sh --cpu-smoke        anywhere: every stage on the CPU with a tiny source
#   bench/gpu_check.sh --download-wheels  with network: the wheels the GPU machine may lack, into .whl/
# PYTHON picks the interpreter (default python3: on the GPU machine the one that holds CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
