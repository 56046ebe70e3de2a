"""Kiln's onnx executor vs onnxruntime: same model file, same input, same machine and
threads, one run; median latency in ms and the Kiln/ORT ratio. Run by `cargo xtask bench`
with the path of the `bench_plan` example binary and the ONNX light models."""
import os
import subprocess
import sys
import time

import numpy as np


def ort_median(path, batch, iters):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else 1) for k, d in enumerate(i.shape)]
        n = int(np.prod(dims))
        feeds[i.name] = (np.arange(n).reshape(dims) / n).astype(np.float32)
    s.run(None, feeds)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main():
    bench_bin, light = sys.argv[1], sys.argv[2]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed; ONNX comparison skipped")
        return
    print(f"{'model':22} {'batch':>5} {'kiln ms':>9} {'ort ms':>9} {'kiln/ort':>9}  kiln top ops")
    for name, iters in [("light_resnet50", 20), ("light_densenet121", 10), ("light_inception_v2", 20)]:
        path = os.path.join(light, name + ".onnx")
        for batch in [1]:  # the light models have a fixed batch dimension of 1
            k = subprocess.run([bench_bin, path, str(iters), str(batch)], capture_output=True, text=True)
            if k.returncode != 0:
                print(f"{name:22} {batch:>5} kiln failed: {k.stderr.strip()[-200:]}")
                continue
            kiln = float(k.stdout.strip())
            try:
                o = ort_median(path, batch, iters)
            except Exception as e:  # a fixed batch dimension, for instance
                print(f"{name:22} {batch:>5} {kiln:>9.2f}  ort: {str(e)[:80]}")
                continue
            print(f"{name:22} {batch:>5} {kiln:>9.2f} {o:>9.2f} {kiln / o:>9.2f}  {k.stderr.strip()}")


if __name__ == "__main__":
    main()
