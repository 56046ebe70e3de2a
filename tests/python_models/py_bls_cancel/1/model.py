import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            start = pb_utils.get_input_tensor_by_name(request, "START")
            stream = pb_utils.InferenceRequest(
                model_name="py_ticker", requested_output_names=["TICK"],
                inputs=[pb_utils.Tensor("START", start.as_numpy())]).exec(decoupled=True)
            ticks = []
            for response in stream:
                ticks.append(int(pb_utils.get_output_tensor_by_name(response, "TICK").as_numpy()[0]))
                if len(ticks) == 3:
                    stream.cancel()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("TICKS", np.array(ticks, np.int32))]))
        return out
