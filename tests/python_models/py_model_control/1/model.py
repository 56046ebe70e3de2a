import numpy as np
import triton_python_backend_utils as pb_utils


def text(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()[0].decode()


class TritonPythonModel:
    def initialize(self, args):
        # Model control is refused while a model initializes (it would wait on its own load).
        try:
            pb_utils.load_model("add_sub")
            self.init_result = "loaded"
        except pb_utils.TritonModelException as e:
            self.init_result = f"error: {e}"

    def execute(self, requests):
        out = []
        for request in requests:
            action, model = text(request, "ACTION"), text(request, "MODEL")
            try:
                if action == "load":
                    pb_utils.load_model(model_name=model)
                    result = "ok"
                elif action == "load_config":
                    pb_utils.load_model(model, config=text(request, "CONFIG"))
                    result = "ok"
                elif action == "init_result":
                    result = self.init_result
                elif action == "unload":
                    pb_utils.unload_model(model)
                    result = "ok"
                else:
                    result = str(pb_utils.is_model_ready(model))
            except pb_utils.TritonModelException as e:
                result = f"error: {e}"
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("RESULT", np.array([result.encode()], dtype=np.object_))]))
        return out
