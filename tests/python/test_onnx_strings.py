"""STRING (BYTES) tensors through the onnx backend, with the models Triton's QA generator
builds for ONNX (`tests/onnx_models/`, written by `cargo xtask gen-onnx`): each served
from a Triton folder and compared with onnxruntime on the same file."""
import os
import queue
import shutil
from functools import partial

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln, as_text

MODELS = os.path.join(os.path.dirname(__file__), "..", "onnx_models")


@pytest.fixture(scope="module")
def kiln_strings(tmp_path_factory):
    repo = tmp_path_factory.mktemp("string_repo")
    configs = {
        # Only the platform: inputs, outputs and batching come from the graph.
        "string_add_sub": 'platform: "onnxruntime_onnx"\n',
        "string_add_sub_int32": 'backend: "onnxruntime"\nmax_batch_size: 8\n'
                                'dynamic_batching { max_queue_delay_microseconds: 200000 }\n',
        "string_identity": 'backend: "onnxruntime"\nmax_batch_size: 8\n',
        "string_labels": 'backend: "onnxruntime"\nmax_batch_size: 0\n',
    }
    for name, config in configs.items():
        os.makedirs(repo / name / "1")
        shutil.copy(os.path.join(MODELS, name + ".onnx"), repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(config)
    k = Kiln(repo=str(repo))
    yield k
    k.stop()


def onnxruntime(name, feeds):
    session = ort.InferenceSession(os.path.join(MODELS, name + ".onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def decimal_strings(rng, shape):
    return np.array([str(v) for v in rng.integers(-1000, 1000, size=shape).ravel()],
                    dtype=object).reshape(shape)


def test_config_is_completed_from_the_string_graph(kiln_strings):
    cfg = requests.get(f"http://{kiln_strings.url}/v2/models/string_add_sub/config").json()
    assert cfg["max_batch_size"] > 0
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [
        ("INPUT0", "TYPE_STRING", [16]), ("INPUT1", "TYPE_STRING", [16])]
    assert [(t["name"], t["data_type"]) for t in cfg["output"]] == [
        ("OUTPUT0", "TYPE_STRING"), ("OUTPUT1", "TYPE_STRING")]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name", ["string_add_sub", "string_add_sub_int32"])
def test_string_add_sub_matches_onnxruntime(kiln_strings, protocol, name):
    client_mod = httpclient if protocol == "http" else grpcclient
    url = kiln_strings.url if protocol == "http" else kiln_strings.grpc_url
    client = client_mod.InferenceServerClient(url)
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        a, b = decimal_strings(rng, (batch, 16)), decimal_strings(rng, (batch, 16))
        inputs = []
        for n, v in (("INPUT0", a), ("INPUT1", b)):
            t = client_mod.InferInput(n, [batch, 16], "BYTES")
            t.set_data_from_numpy(v)
            inputs.append(t)
        result = client.infer(name, inputs)
        want = onnxruntime(name, {"INPUT0": a, "INPUT1": b})
        sums = a.astype(np.int64) + b.astype(np.int64)
        assert (as_text(want["OUTPUT0"]) == sums.astype(str).astype(object)).all()
        assert (as_text(result.as_numpy("OUTPUT0")) == as_text(want["OUTPUT0"])).all()
        got1 = result.as_numpy("OUTPUT1")
        if name == "string_add_sub_int32":
            assert got1.dtype == np.int32
            np.testing.assert_array_equal(got1, want["OUTPUT1"])
        else:
            assert (as_text(got1) == as_text(want["OUTPUT1"])).all()


def test_string_requests_are_batched_and_scattered(kiln_strings):
    """Concurrent STRING requests, merged by the dynamic batcher, each get their own rows."""
    name = "string_add_sub_int32"
    client = grpcclient.InferenceServerClient(kiln_strings.grpc_url)
    before = client.get_inference_statistics(name).model_stats[0].execution_count
    rng = np.random.default_rng(5)
    sent, done = [], queue.Queue()
    for i in range(6):
        a, b = decimal_strings(rng, (1, 16)), decimal_strings(rng, (1, 16))
        inputs = []
        for n, v in (("INPUT0", a), ("INPUT1", b)):
            t = grpcclient.InferInput(n, [1, 16], "BYTES")
            t.set_data_from_numpy(v)
            inputs.append(t)
        client.async_infer(name, inputs, partial(lambda i, result, error: done.put((i, result, error)), i))
        sent.append((a, b))
    for _ in sent:
        i, result, error = done.get(timeout=30)
        assert error is None, error
        a, b = sent[i]
        want = onnxruntime(name, {"INPUT0": a, "INPUT1": b})
        assert (as_text(result.as_numpy("OUTPUT0")) == as_text(want["OUTPUT0"])).all()
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), want["OUTPUT1"])
    stats = client.get_inference_statistics(name).model_stats[0]
    assert stats.execution_count - before < len(sent), "the requests were not batched"


def test_string_identity_keeps_every_byte(kiln_strings):
    client = httpclient.InferenceServerClient(kiln_strings.url)
    values = np.array([[b"", b"plain", "\u00e9t\u00e9".encode()], [b"\xff\x00\x01", b" ", b"x" * 1000]],
                      dtype=object)
    t = httpclient.InferInput("INPUT0", [2, 3], "BYTES")
    t.set_data_from_numpy(values)
    got = client.infer("string_identity", [t]).as_numpy("OUTPUT0")
    assert got.shape == (2, 3)
    assert got.tolist() == values.tolist()


def test_string_initializer_gather_and_equal_match_onnxruntime(kiln_strings):
    """A graph of [batch] tensors: as in Triton, auto-complete batches it (max_batch_size 0
    means unset) and declares each tensor as dims [1] with an empty reshape, so clients
    send and receive [batch, 1] while the graph sees [batch]."""
    client = httpclient.InferenceServerClient(kiln_strings.url)
    cfg = client.get_model_config("string_labels")
    assert cfg["max_batch_size"] == 4
    for t in cfg["input"] + cfg["output"]:
        assert t["dims"] == [1] and t["reshape"] == {"shape": []}, t
    ids = np.array([1, 0, 2, -1], dtype=np.int64)
    t = httpclient.InferInput("ID", [4, 1], "INT64")
    t.set_data_from_numpy(ids.reshape(4, 1))
    result = client.infer("string_labels", [t])
    want = onnxruntime("string_labels", {"ID": ids})
    label = result.as_numpy("LABEL")
    assert label.shape == (4, 1)
    assert as_text(label).ravel().tolist() == want["LABEL"].tolist() == ["dog", "cat", "bird", "bird"]
    np.testing.assert_array_equal(result.as_numpy("IS_DOG").ravel(), want["IS_DOG"])


def test_a_string_that_is_no_number_fails_only_its_request(kiln_strings):
    client = httpclient.InferenceServerClient(kiln_strings.url)

    def request(first):
        inputs = []
        for n, v in (("INPUT0", first), ("INPUT1", "2")):
            t = httpclient.InferInput(n, [1, 16], "BYTES")
            t.set_data_from_numpy(np.array([[v] * 16], dtype=object))
            inputs.append(t)
        return client.infer("string_add_sub", inputs)

    with pytest.raises(InferenceServerException, match="cannot cast the string 'seven'"):
        request("seven")
    # As onnxruntime (stoll): the leading digits count.
    assert as_text(request("40abc").as_numpy("OUTPUT0")).tolist() == [["42"] * 16]
    assert client.is_model_ready("string_add_sub")
