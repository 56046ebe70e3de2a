import os

import numpy as np
import triton_python_backend_utils as pb_utils


def check_utils(t):
    """triton_python_backend_utils' helpers behave as Triton's (an AssertionError fails the
    request)."""
    assert t.triton_dtype() == 11  # TRITONSERVER_TYPE_FP32
    assert pb_utils.numpy_to_triton_type(np.int64) == 9 and pb_utils.triton_to_numpy_type(8) == np.int32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") == np.object_
    wire = pb_utils.serialize_byte_tensor(np.array([[b"ab"], [b""]], dtype=np.object_))
    assert wire.item() == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert pb_utils.deserialize_bytes_tensor(wire).tolist() == [b"ab", b""]
    assert os.path.basename(pb_utils.get_model_dir()) == "1"
    assert not pb_utils.using_decoupled_model_transaction_policy({"name": "py_dlpack"})


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            t = pb_utils.get_input_tensor_by_name(request, "IN")
            check_utils(t)
            shared = pb_utils.Tensor.from_dlpack("SHARED", t.to_dlpack())
            assert shared.is_cpu() and np.shares_memory(shared.as_numpy(), t.as_numpy())
            doubled = np.from_dlpack(t) * 2
            tripled = pb_utils.get_input_tensor_by_name(request, "IN2").as_numpy()
            tripled *= 3
            out.append(pb_utils.InferenceResponse(output_tensors=[
                shared,
                pb_utils.Tensor("DOUBLED", doubled),
                pb_utils.Tensor("TRIPLED", tripled),
            ]))
        return out
