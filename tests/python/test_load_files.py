"""Triton's model load with an override (`load_model(name, config=..., files=...)`): the files
sent with the request become the model's folder, over HTTP (base64) and gRPC (bytes), for a
model the repository does not have; a later load without files goes back to the repository."""
import json
import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import REPO, Kiln

ONNX = open(os.path.join(REPO, "simple", "1", "model.onnx"), "rb").read()


def config(name):
    return json.dumps({
        "name": name, "backend": "onnxruntime", "max_batch_size": 8,
        "input": [{"name": f"INPUT{i}", "data_type": "TYPE_INT32", "dims": [16]} for i in (0, 1)],
        "output": [{"name": f"OUTPUT{i}", "data_type": "TYPE_INT32", "dims": [16]} for i in (0, 1)],
    })


def add(c, module, model):
    ins = []
    for n, v in (("INPUT0", 5), ("INPUT1", 2)):
        i = module.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.full((1, 16), v, np.int32))
        ins.append(i)
    r = c.infer(model, ins)
    return int(r.as_numpy("OUTPUT0")[0, 0]), int(r.as_numpy("OUTPUT1")[0, 0])


@pytest.fixture(scope="module")
def served():
    k = Kiln("--model-control-mode=explicit")
    yield k
    k.stop()


@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_a_model_loads_from_the_files_sent(served, module):
    c = module.InferenceServerClient(url=served.url if module is httpclient else served.grpc_url)
    name = f"sent_{module.__name__.split('.')[-1]}"
    c.load_model(name, config=config(name), files={"file:1/model.onnx": ONNX})
    assert c.is_model_ready(name)
    assert add(c, module, name) == (7, 3)
    # Version 2 from new files replaces the folder.
    c.load_model(name, config=config(name), files={"file:2/model.onnx": ONNX})
    assert c.is_model_ready(name, "2") and not c.is_model_ready(name, "1")


def test_load_without_files_goes_back_to_the_repository_and_bad_requests_fail(served):
    c = httpclient.InferenceServerClient(url=served.url)
    c.load_model("simple", config=config("simple"), files={"file:3/model.onnx": ONNX})
    assert c.is_model_ready("simple", "3")
    c.load_model("simple")
    assert c.is_model_ready("simple", "1") and not c.is_model_ready("simple", "3")
    with pytest.raises(InferenceServerException) as e:
        c.load_model("nofig", files={"file:1/model.onnx": ONNX})
    assert "'config'" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        c.load_model("escape", config=config("escape"), files={"file:../1/model.onnx": ONNX})
    assert "relative" in str(e.value)
    with pytest.raises(InferenceServerException):
        c.load_model("broken", config=config("broken"), files={"file:1/model.onnx": b"not onnx"})
    assert not c.is_model_ready("broken")
