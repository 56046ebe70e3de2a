"""Triton's ragged batching (`allow_ragged_batch`, `batch_input`, `batch_output`) on the
onnx backend, with the real tritonclient: requests of different lengths share one graph
execution, the model sees INPUT as one flat tensor plus the batch inputs describing it, and
each client gets its own part back (`tests/onnx_models/ragged_sum.onnx`, from
`cargo xtask gen-onnx`)."""
import concurrent.futures
import os
import shutil
import tempfile

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln

MODELS_DIR = os.path.join(os.path.dirname(__file__), "..", "onnx_models")

BATCH_INPUTS = '''batch_input [
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO target_name: "BOUNDS" data_type: TYPE_INT32 source_input: "INPUT" },
  { kind: BATCH_ELEMENT_COUNT target_name: "COUNT" data_type: TYPE_FP32 source_input: "INPUT" },
  { kind: BATCH_MAX_ELEMENT_COUNT_AS_SHAPE target_name: "MAXLEN" data_type: TYPE_FP32 source_input: "INPUT" },
  { kind: BATCH_ITEM_SHAPE target_name: "SHAPES" data_type: TYPE_INT32 source_input: "INPUT" }
]'''
OUTPUTS = '''output [
  { name: "DOUBLED" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "SUM" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "COUNT_OUT" data_type: TYPE_FP32 dims: [ 1 ] },
  { name: "MAXLEN_OUT" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "SHAPES_OUT" data_type: TYPE_INT32 dims: [ 1 ] }
]'''
SCATTER = 'batch_output [ { target_name: "DOUBLED" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "INPUT" } ]'


def config(name, batch_inputs=BATCH_INPUTS, batch_output=SCATTER):
    return f'''name: "{name}"
backend: "onnxruntime"
max_batch_size: 16
dynamic_batching {{ max_queue_delay_microseconds: 200000 }}
input [ {{ name: "INPUT" data_type: TYPE_FP32 dims: [ -1 ] allow_ragged_batch: true }} ]
{batch_inputs}
{OUTPUTS}
{batch_output}
'''


MODELS = {
    "ragged": config("ragged"),
    # Triton's load-time checks, each failing only its own model.
    "ragged_bad_source": config("ragged_bad_source", BATCH_INPUTS.replace('source_input: "INPUT" }', 'source_input: "NOPE" }', 1)),
    "ragged_bad_type": config("ragged_bad_type", BATCH_INPUTS.replace("TYPE_INT32", "TYPE_INT64", 1)),
    "ragged_bad_target": config("ragged_bad_target", batch_output=SCATTER.replace('"DOUBLED"', '"NOPE"')),
}


@pytest.fixture(scope="module")
def served():
    repo = tempfile.mkdtemp()
    for name, text in MODELS.items():
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copy(os.path.join(MODELS_DIR, "ragged_sum.onnx"), os.path.join(repo, name, "1", "model.onnx"))
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(text)
    k = Kiln("--strict-readiness=false", repo=repo)
    yield k
    k.stop()
    shutil.rmtree(repo, ignore_errors=True)


def infer(module, url, values):
    c = module.InferenceServerClient(url=url)
    x = np.asarray(values, np.float32).reshape(1, -1)
    i = module.InferInput("INPUT", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return x, c.infer("ragged", [i])


@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_requests_of_different_lengths_share_an_execution(served, module):
    url = served.url if module is httpclient else served.grpc_url
    c = httpclient.InferenceServerClient(url=served.url)
    before = c.get_inference_statistics("ragged")["model_stats"][0]
    lengths = [3, 7, 1, 12, 5, 9, 2, 4]
    rng = np.random.default_rng(len(lengths))
    with concurrent.futures.ThreadPoolExecutor(len(lengths)) as pool:
        done = list(pool.map(lambda n: infer(module, url, rng.integers(-50, 50, n)), lengths))
    maxima = []
    for x, r in done:
        n = x.shape[1]
        # The batch output comes back in the request's own shape.
        np.testing.assert_array_equal(r.as_numpy("DOUBLED"), 2 * x)
        np.testing.assert_allclose(r.as_numpy("SUM"), [[x.sum()]])
        np.testing.assert_array_equal(r.as_numpy("COUNT_OUT"), [[n]])
        np.testing.assert_array_equal(r.as_numpy("SHAPES_OUT"), [[n]])
        maxima.append(int(r.as_numpy("MAXLEN_OUT")[0, 0]))
        assert n <= maxima[-1] <= max(lengths)
    after = c.get_inference_statistics("ragged")["model_stats"][0]
    executions = after["execution_count"] - before["execution_count"]
    assert after["inference_count"] - before["inference_count"] == len(lengths)
    # Requests of different shapes were batched: fewer executions than requests, and some
    # request saw a longer neighbour's length as the batch's largest.
    assert executions < len(lengths)
    assert any(m > n for m, n in zip(maxima, lengths))


def test_a_lone_request_is_flattened_too(served):
    x, r = infer(httpclient, served.url, [1.5, 2.5, -4.0])
    np.testing.assert_array_equal(r.as_numpy("DOUBLED"), 2 * x)
    np.testing.assert_allclose(r.as_numpy("SUM"), [[0.0]])
    np.testing.assert_array_equal(r.as_numpy("MAXLEN_OUT"), [[3]])


def test_the_model_shows_its_batch_io_and_hides_batch_inputs(served):
    c = httpclient.InferenceServerClient(url=served.url)
    md = c.get_model_metadata("ragged")
    assert [i["name"] for i in md["inputs"]] == ["INPUT"]
    cfg = c.get_model_config("ragged")
    assert cfg["input"][0]["allow_ragged_batch"] is True
    assert [b["target_name"] for b in cfg["batch_input"]] == [["BOUNDS"], ["COUNT"], ["MAXLEN"], ["SHAPES"]]
    assert cfg["batch_output"][0]["kind"] == "BATCH_SCATTER_WITH_INPUT_SHAPE"
    # A client cannot send a batch input.
    i = httpclient.InferInput("COUNT", [1, 1], "FP32")
    i.set_data_from_numpy(np.float32([[1]]))
    with pytest.raises(InferenceServerException, match="unexpected inference input 'COUNT'"):
        c.infer("ragged", [i])


@pytest.mark.parametrize("model,message", [
    ("ragged_bad_source", "unknown source input name 'NOPE'"),
    ("ragged_bad_type", "batch input data type must be TYPE_INT32 or TYPE_FP32"),
    ("ragged_bad_target", "unknown target output name 'NOPE'"),
])
def test_bad_batch_io_fails_the_load_with_tritons_message(served, model, message):
    c = httpclient.InferenceServerClient(url=served.url)
    assert not c.is_model_ready(model)
    index = {m["name"]: m for m in c.get_model_repository_index()}
    assert message in index[model]["reason"]
    assert c.is_model_ready("ragged")
