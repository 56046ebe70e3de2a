"""Kiln's onnx executor vs onnxruntime: same model file, same input, same machine and
threads, one run; median latency in ms and the Kiln/ORT ratio. Kiln and ORT take turns
(ROUNDS rounds each), so that load from elsewhere on a shared machine falls on both; the
ratio printed is the median of the rounds' ratios. Run by `cargo xtask bench`
with the path of the `bench_plan` example binary and the folder `make_bench_models` wrote
(ResNet-50 and DenseNet-121 light models with a symbolic batch dimension, and a BERT
encoder of all-MiniLM-L6-v2's shape with random weights)."""
import os
import subprocess
import sys
import time

import numpy as np


def feeds_for(inputs, batch, seq):
    """The inputs `bench_plan` builds: unknown dims are batch (first) or seq; floats are
    arange(n)/n, integers 1 for a mask and (31 i) mod 1000 otherwise."""
    feeds = {}
    for i in inputs:
        dims = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else seq) for k, d in enumerate(i.shape)]
        n = int(np.prod(dims))
        if i.type == "tensor(int64)":
            v = np.ones(n, np.int64) if "mask" in i.name else (31 * np.arange(n, dtype=np.int64)) % 1000
            feeds[i.name] = v.reshape(dims)
        else:
            feeds[i.name] = (np.arange(n).reshape(dims) / n).astype(np.float32)
    return feeds


def ort_session(path, batch, seq):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = feeds_for(s.get_inputs(), batch, seq)
    s.run(None, feeds)
    return s, feeds


def ort_median(session, iters):
    s, feeds = session
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


ROUNDS = int(os.environ.get("KILN_BENCH_ROUNDS", "3"))


def main():
    bench_bin, models = sys.argv[1], sys.argv[2]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed; ONNX comparison skipped")
        return
    print(f"{'model':26} {'batch':>5} {'kiln ms':>9} {'ort ms':>9} {'kiln/ort':>9}  kiln top ops")
    # (file, sequence length, [(batch, iterations)])
    runs = [
        ("light_resnet50_dynbatch", 1, [(1, 20), (8, 5)]),
        ("light_densenet121_dynbatch", 1, [(1, 10), (8, 3)]),
        ("bert_minilm", 128, [(1, 20), (8, 5)]),
    ]
    for name, seq, batches in runs:
        path = os.path.join(models, name + ".onnx")
        label = f"{name} s{seq}" if seq > 1 else name
        for batch, iters in batches:
            try:
                session = ort_session(path, batch, seq)
            except Exception as e:
                print(f"{label:26} {batch:>5} ort: {str(e)[:80]}")
                continue
            kilns, orts, top = [], [], ""
            for _ in range(ROUNDS):
                k = subprocess.run([bench_bin, path, str(iters), str(batch), str(seq)], capture_output=True, text=True)
                if k.returncode != 0:
                    break
                kilns.append(float(k.stdout.strip()))
                top = top or ", ".join(k.stderr.strip().split(", ")[:4])
                orts.append(ort_median(session, iters))
            if len(kilns) < ROUNDS:
                print(f"{label:26} {batch:>5} kiln failed: {k.stderr.strip()[-200:]}")
                continue
            ratio = float(np.median([a / b for a, b in zip(kilns, orts)]))
            kiln, o = float(np.median(kilns)), float(np.median(orts))
            print(f"{label:26} {batch:>5} {kiln:>9.2f} {o:>9.2f} {ratio:>9.2f}  {top}", flush=True)


if __name__ == "__main__":
    main()
