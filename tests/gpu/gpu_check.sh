#!/usr/bin/env bash
# Runs on the lent GPU machine (no Rust, no internet) what tests/gpu/prepare.sh built here:
#   run command:  bash tests/gpu/gpu_check.sh
#   carry:        ["target/gpu-carry"]
# 1. the candle backend's BERTs against PyTorch (gpu_check.py), 2. the onnx backend's
# models on CUDA (gpu_check_onnx.py); each prints one table. GPU_CHECK_DEVICE=cpu runs
# both on the CPU, to try the scripts anywhere.
set -uo pipefail
cd "$(dirname "$0")/../.."
SP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
CARRY=target/gpu-carry
WORK=$(mktemp -d)
tar -C "$WORK" -xJf "$CARRY/kiln-cuda.tar.xz"
status=0
timeout 200 python3 tests/gpu/gpu_check.py "$WORK/kiln-cuda" "$WORK" || status=1
timeout 220 python3 tests/gpu/gpu_check_onnx.py "$WORK/kiln-cuda" "$CARRY" "$WORK" || status=1
exit $status
