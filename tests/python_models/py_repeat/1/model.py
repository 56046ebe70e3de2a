import threading

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            sender = request.get_response_sender()
            threading.Thread(target=self.stream, args=(values, sender)).start()
        return None

    def stream(self, values, sender):
        for i, v in enumerate(values):
            if v == 99:
                # An error response that does not end the stream.
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"element {i} is 99", pb_utils.TritonError.INVALID_ARG)))
                continue
            if v < 0:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"negative value {v}", pb_utils.TritonError.INVALID_ARG)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
            sender.send(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("OUT", np.array([v], np.int32))],
                parameters={"index": i}))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
