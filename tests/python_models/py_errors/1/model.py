import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            mode = pb_utils.get_input_tensor_by_name(request, "MODE").as_numpy()
            if mode[0] == 1:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    "mode 1 is refused", pb_utils.TritonError.INVALID_ARG)))
            elif mode[0] == 2:
                raise ValueError("mode 2 raises")
            elif mode[0] == 3:
                os._exit(3)
            elif mode[0] == 4:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                out.append(None)
            elif mode[0] == 7:
                assert isinstance(request.trace(), pb_utils.InferenceTrace)
                timeout = np.array([request.timeout()], np.int32)
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ECHO", timeout)]))
            else:
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("ECHO", mode)]))
        return out
