import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            added = pb_utils.InferenceRequest(
                model_name="add_sub", requested_output_names=["OUTPUT0"],
                inputs=[pb_utils.Tensor("INPUT0", x), pb_utils.Tensor("INPUT1", x)]).exec()
            if added.has_error():
                raise pb_utils.TritonModelException(added.error().message())
            total = pb_utils.get_output_tensor_by_name(added, "OUTPUT0").as_numpy()
            streamed, indexes = [], []
            stream = await pb_utils.InferenceRequest(
                model_name="py_repeat", requested_output_names=["OUT"],
                inputs=[pb_utils.Tensor("IN", np.array([3, 1, 4], np.int32))]).async_exec(decoupled=True)
            for r in stream:
                if r.output_tensors():
                    streamed.append(int(pb_utils.get_output_tensor_by_name(r, "OUT").as_numpy()[0]))
                    # py_repeat's response parameters come with its responses.
                    indexes.append(json.loads(r.parameters())["index"])
            missing = pb_utils.InferenceRequest(
                model_name="no_such_model", requested_output_names=["Y"],
                inputs=[pb_utils.Tensor("X", x)]).exec()
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("SUM", total),
                pb_utils.Tensor("STREAMED", np.array(streamed, np.int32)),
                pb_utils.Tensor("STREAMED_INDEX", np.array(indexes, np.int32)),
                pb_utils.Tensor("MISSING", np.array([missing.error().message().encode()], dtype=np.object_)),
            ]))
        return out
