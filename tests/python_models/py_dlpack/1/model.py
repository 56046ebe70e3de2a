import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            t = pb_utils.get_input_tensor_by_name(request, "IN")
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
