import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            start = int(pb_utils.get_input_tensor_by_name(request, "START").as_numpy()[0])
            for i in range(400):
                if sender.is_cancelled() or request.is_cancelled():
                    pb_utils.Logger.log_info(f"py_ticker cancelled after {i} ticks from {start}")
                    break
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("TICK", np.array([start + i], np.int32))]))
                time.sleep(0.02)
            else:
                pb_utils.Logger.log_info("py_ticker ran to the end")
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
