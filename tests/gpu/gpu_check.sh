#!/usr/bin/env bash
# Runs on the lent GPU machine (no Rust, no internet): the server and the CUDA candle backend
# built here by `cargo xtask build-cuda` (stripped: ~58 MiB of the 64 MiB carry limit) plus
# tests/gpu; prints one table (see gpu_check.py).
#   run command:  bash tests/gpu/gpu_check.sh
#   carry:        ["target/kiln-cuda/kiln", "target/kiln-cuda/backends/candle"]
set -euo pipefail
cd "$(dirname "$0")/../.."
SP=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
export LD_LIBRARY_PATH="$SP/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
WORK=$(mktemp -d)
python3 tests/gpu/gpu_check.py target/kiln-cuda "$WORK"
