import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            upper = np.array([[s.upper() for s in row] for row in text], dtype=np.object_)
            rows = text.shape[0]
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("UPPER", upper),
                pb_utils.Tensor("BATCHED", np.full((rows, 1), len(requests), np.int32)),
                pb_utils.Tensor("PARAMS", np.array([[request.parameters().encode()]] * rows, dtype=np.object_)),
            ], parameters={"rows": rows, "model": "text_batch", "upper": True}))
        return out
