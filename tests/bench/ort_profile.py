"""onnxruntime's per-operator profile of a model, grouped by operator and output shape,
to set beside `KILN_PROFILE_SHAPES=1 bench_plan` (Kiln's, grouped by input and output
shape): `ort_profile.py <model.onnx> [batch] [sequence] [iterations]`. Same inputs as
`onnx_vs_ort.py`; threads = the CPUs this process may use."""
import collections
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from onnx_vs_ort import feeds_for  # noqa: E402


def main():
    import onnxruntime as ort
    path = sys.argv[1]
    batch, seq, iters = (int(a) for a in (sys.argv[2:] + ["1", "1", "10"][len(sys.argv) - 2:])[:3])
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    so.enable_profiling = True
    # The profile file goes to a temporary folder, read and removed below.
    tmp = tempfile.mkdtemp()
    so.profile_file_prefix = os.path.join(tmp, "ort_profile")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = feeds_for(s.get_inputs(), batch, seq)
    s.run(None, feeds)  # warm-up, left out below
    for _ in range(iters):
        s.run(None, feeds)
    profile = s.end_profiling()
    with open(profile) as f:
        events = json.load(f)
    shutil.rmtree(tmp, ignore_errors=True)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = iters + 1
    totals = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels[len(kernels) // runs:]:  # drop the warm-up run's nodes
        a = e["args"]
        key = f"{a.get('op_name')} -> {a.get('output_type_shape')}"
        if os.environ.get("ORT_PROFILE_INPUTS"):
            # ORT_PROFILE_INPUTS=1: keyed by the input shapes too (weights included).
            key = f"{a.get('op_name')} {a.get('input_type_shape')} -> {a.get('output_type_shape')}"
        totals[key][0] += e["dur"] / 1000 / iters
        totals[key][1] += 1
    print(f"total {sum(v[0] for v in totals.values()):.1f} ms per run (kernels only)")
    for key, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"{ms:8.2f} ms  {n // iters:3}x  {key}")


if __name__ == "__main__":
    main()
