"""Copies ONNX's node tests with onnxruntime's outputs as the expected ones, so that Kiln can
be compared with what Triton's onnxruntime backend returns rather than with ONNX's reference:

    pip install --target /tmp/onnxpkg onnx==1.17.0
    PYTHONPATH=/tmp/onnxpkg .venv/bin/python tests/bench/ort_node_reference.py \
        target/model-cache/onnx-tests/node /tmp/ortnode/node
    KILN_ONNX_TESTS=/tmp/ortnode KILN_ONNX_REFERENCE_IS_ORT=1 \
        cargo test --release -p onnx-backend --test node_tests onnx_node_tests

The report (target/tmp/onnx-node-report.txt) then lists Kiln against onnxruntime. Tests
onnxruntime cannot run (newer opsets, unsupported types) are left out."""
import glob
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def read(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return t


def run_ort(case):
    """onnxruntime's outputs for the case's test_data_set_0, or None if it cannot run it."""
    try:
        s = ort.InferenceSession(os.path.join(case, "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = {}
        for i, inp in enumerate(s.get_inputs()):
            p = os.path.join(case, "test_data_set_0", f"input_{i}.pb")
            if os.path.exists(p):
                feeds[inp.name] = numpy_helper.to_array(read(p))
        return s.get_outputs(), s.run(None, feeds)
    except Exception:
        return None


def main():
    src, dst = sys.argv[1], sys.argv[2]
    ort.set_default_logger_severity(4)
    done = skipped = 0
    for name in sorted(os.listdir(src)):
        case = os.path.join(src, name)
        if not os.path.exists(os.path.join(case, "model.onnx")):
            continue
        result = run_ort(case)
        if result is None:
            skipped += 1
            continue
        data = os.path.join(dst, name, "test_data_set_0")
        os.makedirs(data, exist_ok=True)
        shutil.copy(os.path.join(case, "model.onnx"), os.path.join(dst, name, "model.onnx"))
        for f in glob.glob(os.path.join(case, "test_data_set_0", "input_*.pb")):
            shutil.copy(f, data)
        for i, (info, value) in enumerate(zip(*result)):
            ref = os.path.join(case, "test_data_set_0", f"output_{i}.pb")
            out = os.path.join(data, f"output_{i}.pb")
            if isinstance(value, list):
                # A sequence output: written as the SequenceProto the harness reads.
                with open(out, "wb") as f:
                    f.write(numpy_helper.from_list([np.asarray(v) for v in value], info.name).SerializeToString())
                continue
            try:
                tensor = numpy_helper.from_array(np.asarray(value), info.name)
            except Exception:
                continue  # a map output
            # Types numpy cannot hold (BFLOAT16, ...) keep the reference's output.
            if os.path.exists(ref) and read(ref).data_type != tensor.data_type:
                shutil.copy(ref, out)
                continue
            with open(out, "wb") as f:
                f.write(tensor.SerializeToString())
        done += 1
    print(f"copied {done} tests with onnxruntime's outputs; {skipped} onnxruntime cannot run")


if __name__ == "__main__":
    main()
