"""`sequence_batching` with the real tritonclient: sequence ids and flags are checked as
Triton checks them, and the model receives the control tensors its config asks for. The
model is the `identity` backend, which echoes `INPUT_<x>` as `OUTPUT_<x>`, so the control
tensors (named `INPUT_START`, ...) come back to the client."""
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln


def config(name, idle_us, extra=""):
    return f'''name: "{name}"
backend: "identity"
max_batch_size: 4
input [ {{ name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [
  {{ name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "OUTPUT_START" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "OUTPUT_END" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "OUTPUT_READY" data_type: TYPE_BOOL dims: [ 1 ] }},
  {{ name: "OUTPUT_CORRID" data_type: TYPE_UINT64 dims: [ 1 ] }}
]
sequence_batching {{
  {idle_us}
  control_input [
    {{ name: "INPUT_START" control [ {{ kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "INPUT_END" control [ {{ kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "INPUT_READY" control [ {{ kind: CONTROL_SEQUENCE_READY bool_false_true: [ false, true ] }} ] }},
    {{ name: "INPUT_CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
  {extra}
}}
'''


MODELS = {
    # Triton's default idle time (1 s).
    "seq": config("seq", ""),
    "seq_short": config("seq_short", "max_sequence_idle_microseconds: 100000"),
    # An implicit state whose initial_state file is missing (working state: test_sequence_state.py).
    "seq_state": config("seq_state", "", 'state [ { input_name: "INPUT_S" output_name: "OUTPUT_S" '
                        'data_type: TYPE_INT32 dims: [ 1 ] initial_state { data_type: TYPE_INT32 '
                        'dims: [ 1 ] data_file: "missing.bin" name: "i" } } ]'),
    # Warm-up samples run as one-request sequences.
    "seq_warm": config("seq_warm", "") + 'model_warmup [ { name: "w" batch_size: 2 inputs { key: "INPUT0" '
                                          'value: { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true } } } ]\n',
}


@pytest.fixture(scope="module")
def served():
    repo = tempfile.mkdtemp()
    for name, text in MODELS.items():
        os.makedirs(os.path.join(repo, name, "1"))
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(text)
    k = Kiln(repo=repo)
    yield k
    k.stop()
    shutil.rmtree(repo, ignore_errors=True)


def send(client, module, model, value, batch=1, **sequence):
    x = np.full((batch, 1), value, np.int32)
    i = module.InferInput("INPUT0", [batch, 1], "INT32")
    i.set_data_from_numpy(x)
    outs = ["OUTPUT0", "OUTPUT_START", "OUTPUT_END", "OUTPUT_READY", "OUTPUT_CORRID"]
    r = client.infer(model, [i], outputs=[module.InferRequestedOutput(o) for o in outs], **sequence)
    return {o: r.as_numpy(o) for o in outs}


@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_control_tensors_follow_the_sequence_flags(served, module):
    c = module.InferenceServerClient(url=served.url if module is httpclient else served.grpc_url)
    sid = 42 if module is httpclient else 43
    steps = [dict(sequence_start=True), {}, dict(sequence_end=True)]
    for n, flags in enumerate(steps):
        r = send(c, module, "seq", 10 + n, sequence_id=sid, **flags)
        np.testing.assert_array_equal(r["OUTPUT0"], [[10 + n]])
        assert r["OUTPUT_START"].tolist() == [[int(n == 0)]]
        assert r["OUTPUT_END"].tolist() == [[float(n == 2)]]
        assert r["OUTPUT_READY"].tolist() == [[True]]
        assert r["OUTPUT_CORRID"].tolist() == [[sid]]
        assert r["OUTPUT_CORRID"].dtype == np.uint64
    # As Triton: a sequence request carries one item.
    with pytest.raises(InferenceServerException) as e:
        send(c, module, "seq", 1, batch=2, sequence_id=sid + 100, sequence_start=True)
    assert "must specify batch-size 1 due to requirements of sequence batcher" in str(e.value)


def test_requests_outside_a_started_sequence_are_refused(served):
    c = httpclient.InferenceServerClient(url=served.url)
    with pytest.raises(InferenceServerException) as e:
        send(c, httpclient, "seq", 1)
    assert "must specify a non-zero or non-empty correlation ID" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        send(c, httpclient, "seq", 1, sequence_id=7)
    assert "sequence 7" in str(e.value) and "must specify the START flag" in str(e.value)
    # After END the sequence is gone: the next request must start it again.
    send(c, httpclient, "seq", 1, sequence_id=8, sequence_start=True)
    send(c, httpclient, "seq", 1, sequence_id=8, sequence_end=True)
    with pytest.raises(InferenceServerException) as e:
        send(c, httpclient, "seq", 1, sequence_id=8)
    assert "must specify the START flag" in str(e.value)
    # The failures are counted, the successes too.
    stats = c.get_inference_statistics("seq")["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] >= 3


def test_an_idle_sequence_is_released(served):
    c = httpclient.InferenceServerClient(url=served.url)
    send(c, httpclient, "seq_short", 1, sequence_id=9, sequence_start=True)
    send(c, httpclient, "seq_short", 2, sequence_id=9)
    time.sleep(0.3)  # beyond max_sequence_idle_microseconds (0.1 s)
    with pytest.raises(InferenceServerException) as e:
        send(c, httpclient, "seq_short", 3, sequence_id=9)
    assert "must specify the START flag" in str(e.value)


def test_config_shows_triton_defaults_and_a_missing_initial_state_fails_the_load(served):
    c = httpclient.InferenceServerClient(url=served.url)
    sb = c.get_model_config("seq")["sequence_batching"]
    assert int(sb["max_sequence_idle_microseconds"]) == 1000000
    assert "direct" in sb
    assert [ci["name"] for ci in sb["control_input"]][:2] == ["INPUT_START", "INPUT_END"]
    index = {m["name"]: m for m in requests.post(f"http://{served.url}/v2/repository/index").json()}
    assert index["seq"]["state"] == "READY"
    assert index["seq_warm"]["state"] == "READY", index["seq_warm"]
    assert index["seq_state"]["state"] == "UNAVAILABLE"
    assert "initial state file" in index["seq_state"]["reason"]
    assert "missing.bin" in index["seq_state"]["reason"]
