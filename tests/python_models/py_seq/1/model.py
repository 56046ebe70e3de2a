import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            bls = pb_utils.InferenceRequest(
                model_name="py_seq_echo", inputs=[pb_utils.get_input_tensor_by_name(r, "IN")],
                requested_output_names=["CORR"], correlation_id=r.correlation_id(), flags=r.flags())
            answer = bls.exec()
            if answer.has_error():
                out.append(pb_utils.InferenceResponse(error=answer.error()))
            else:
                out.append(pb_utils.InferenceResponse(output_tensors=answer.output_tensors()))
        return out
