"""onnxruntime on ResNet-50's convolution shapes one at a time, to set beside `conv_bench`
(the same shapes, Kiln's kernels): `ort_conv_layers.py [threads] [batch] [filter]`.
Each shape is a one-node model (Conv with bias, random weights); its time includes the
layout changes onnxruntime makes around a lone convolution (NCHW to its blocked layout
and back), which a whole model mostly avoids. Prints the median of 60 runs per shape."""
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (input channels, size, output channels, kernel, stride): conv_bench's ResNet-50 shapes.
SHAPES = [
    (3, 224, 64, 7, 2), (64, 56, 64, 3, 1), (64, 56, 256, 1, 1), (256, 56, 64, 1, 1),
    (128, 28, 128, 3, 1), (128, 28, 512, 1, 1), (256, 14, 256, 3, 1), (256, 14, 1024, 1, 1),
    (1024, 14, 256, 1, 1), (512, 7, 512, 3, 1), (512, 7, 2048, 1, 1), (2048, 7, 512, 1, 1),
    (128, 56, 128, 3, 2), (256, 28, 256, 3, 2), (512, 14, 512, 3, 2), (256, 56, 512, 1, 2),
    (1024, 14, 2048, 1, 2),
]


def one_conv(ic, h, oc, k, s, batch):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((oc, ic, k, k)) * 0.05).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(oc).astype(np.float32), "b")
    p = k // 2
    out = (h + 2 * p - k) // s + 1
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, ic, h, h])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, oc, out, out])], [w, b])
    # IR 8: what the onnxruntime wheel the suite pins reads.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), out


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    only = sys.argv[3] if len(sys.argv) > 3 else ""
    for ic, h, oc, k, s in SHAPES:
        line = f"ic {ic:4} {h:3}x{h:<3} oc {oc:4} k{k} s{s}"
        if only not in line:
            continue
        model, out = one_conv(ic, h, oc, k, s, batch)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal((batch, ic, h, h)).astype(np.float32)
        for _ in range(5):
            session.run(None, {"x": x})
        times = []
        for _ in range(60):
            t = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        ms = float(np.median(times))
        flops = 2 * batch * oc * ic * k * k * out * out
        print(f"{line}: onnxruntime {ms * 1e3:7.3f} ms {flops / ms / 1e9:6.1f} GF/s")


if __name__ == "__main__":
    main()
