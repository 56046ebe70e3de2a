#!/usr/bin/env bash
# Runs here (the build machine), before gpu_check.sh: puts what the GPU machine needs into
# target/gpu-carry (about 20 MiB, under the 64 MiB a run may carry):
#   kiln-cuda.tar.xz    the server and the CUDA builds of the candle and onnx backends
#                       (`cargo xtask build-cuda`; 118 MiB unpacked, 16 MiB packed)
#   make_bench_models   writes the ONNX models the onnx check serves (random weights, made
#                       there: too big to carry)
#   light/              ONNX's light models and their reference outputs
# Then, on the GPU machine:  bash tests/gpu/gpu_check.sh   carrying ["target/gpu-carry"]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo xtask build-cuda
cargo xtask fetch-onnx-tests
cargo build --release -p onnx-backend --example make_bench_models
out=target/gpu-carry
rm -rf "$out"
mkdir -p "$out/light"
tar -C target -cf - kiln-cuda/kiln kiln-cuda/backends/candle kiln-cuda/backends/onnx |
    xz -T0 -6 >"$out/kiln-cuda.tar.xz"
cp target/release/examples/make_bench_models "$out/"
cp target/model-cache/onnx-tests/light/* "$out/light/"
du -sh "$out"
