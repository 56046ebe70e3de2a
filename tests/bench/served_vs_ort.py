"""Serves each ONNX file given as a Triton folder (`backend: "onnxruntime"`, `max_batch_size:
4`) on the built server (`KILN_DIST`, default target/kiln) and compares its first output with
onnxruntime's on the same file, for a random batch of 1 and of 2:
`served_vs_ort.py <model.onnx> ...`. Meant for `make_bench_models`' `*_random_dynbatch.onnx`
files (ONNX's light models with random weights) and BERT-style graphs (integer inputs: token
ids below 1000, masks of ones; other dynamic dimensions 16): prints the largest difference
relative to the largest output value."""
import os
import sys

import numpy as np
import onnxruntime as ort
import tritonclient.http as httpclient

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))
from conftest import serving_onnx  # noqa: E402


def main():
    for path in sys.argv[1:]:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        first_out = session.get_outputs()[0].name
        with serving_onnx(path) as kiln:
            client = httpclient.InferenceServerClient(kiln.url)
            for batch in (1, 2):
                rng = np.random.default_rng(3)
                feeds, inputs = {}, []
                for i in session.get_inputs():
                    dims = [batch] + [d if isinstance(d, int) else 16 for d in i.shape[1:]]
                    if i.type == "tensor(float)":
                        x = rng.standard_normal(dims).astype(np.float32)
                    elif "mask" in i.name:
                        x = np.ones(dims, np.int64)
                    else:
                        x = rng.integers(0, 1000, dims).astype(np.int64)
                    inp = httpclient.InferInput(i.name, dims, "FP32" if x.dtype == np.float32 else "INT64")
                    inp.set_data_from_numpy(x)
                    feeds[i.name] = x
                    inputs.append(inp)
                got = client.infer("m", inputs).as_numpy(first_out)
                want = session.run(None, feeds)[0]
                scale = np.abs(want).max()
                print(f"{os.path.basename(path):45} batch {batch}: largest difference "
                      f"{np.abs(got - want).max() / scale:.2e} of the largest value", flush=True)


if __name__ == "__main__":
    main()
