import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.requests = pb_utils.MetricFamily(
            name="py_model_requests", description="Requests the model saw",
            kind=pb_utils.MetricFamily.COUNTER).Metric(labels=labels)
        self.last = pb_utils.MetricFamily(
            name="py_model_last_value", description="The last value",
            kind=pb_utils.MetricFamily.GAUGE).Metric(labels=labels)
        self.values = pb_utils.MetricFamily(
            name="py_model_values", description="Values seen",
            kind=pb_utils.MetricFamily.HISTOGRAM).Metric(labels=labels, buckets=[1.0, 10.0])

    def execute(self, requests):
        out = []
        for request in requests:
            v = float(pb_utils.get_input_tensor_by_name(request, "V").as_numpy()[0])
            self.requests.increment(1)
            self.last.set(v)
            self.values.observe(v)
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("SEEN", np.array([self.requests.value()], np.float64))]))
        return out
