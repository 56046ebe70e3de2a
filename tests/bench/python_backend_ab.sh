#!/usr/bin/env bash
# A/B of the python backend: the same kiln binary (target/kiln, from `cargo xtask build`) with
# the python backend built at BASE (default 7fd4de2, before stubs had a reader thread) and
# with this checkout's, side by side, three alternating rounds; perf_analyzer from .venv.
#   tests/bench/python_backend_ab.sh [BASE]
set -eu
cd "$(dirname "$0")/../.."
BASE=${1:-7fd4de2}
ROOT=$PWD
WORK=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; git worktree remove --force "$WORK/base" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add --detach "$WORK/base" "$BASE" >/dev/null
(cd "$WORK/base" && CARGO_TARGET_DIR="$WORK/target" cargo build --release -q -p python-backend)
cp -r target/kiln/backends "$WORK/be-new"
cp -r target/kiln/backends "$WORK/be-old"
cp "$WORK/target/release/libkiln_python.so" "$WORK/be-old/python/libkiln_python.so"
export LD_LIBRARY_PATH=$(dirname "$(find .venv -name 'libcudart.so.12' | head -1)")
echo '{"data":[{"IN":{"content":[1,2,3],"shape":[3]},"DELAY_MS":{"content":[2,2,2],"shape":[3]}}]}' > "$WORK/in.json"
PA="--measurement-interval 3000 --stability-percentage 1000 --max-trials 3"
for round in 1 2 3; do
  for which in old new; do
    KILN_PYTHON="$ROOT/.venv/bin/python" target/kiln/kiln --model-repository tests/python_models \
      --backend-directory "$WORK/be-$which" --strict-readiness=false \
      --http-port 18100 --grpc-port 18101 --metrics-port 18102 > "$WORK/kiln-$which.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do curl -sf localhost:18100/v2/models/py_async_stream/ready > /dev/null && break; sleep 0.2; done
    # A decoupled async model, one instance, 8 streams of 3 responses 2 ms apart.
    a=$(.venv/bin/perf_analyzer -m py_async_stream -u localhost:18101 -i grpc --streaming \
      --concurrency-range 8 $PA --input-data "$WORK/in.json" 2>&1 | grep -m1 "  Throughput" | awk '{print $2}')
    # A model that is not decoupled (Triton's add_sub), 4 concurrent requests.
    b=$(.venv/bin/perf_analyzer -m add_sub -u localhost:18101 -i grpc --concurrency-range 4 $PA 2>&1 \
      | grep -m1 "  Throughput" | awk '{print $2}')
    echo "round $round $which py_async_stream_requests_per_s=$a add_sub_infer_per_s=$b"
    kill $pid; wait $pid 2>/dev/null || true
  done
done
