"""Implicit sequence state (`sequence_batching { state [...] }`) with the real tritonclient,
on ONNX accumulators of the kind Triton's QA generates (`gen_qa_implicit_models.py`): the
model reads INPUT_STATE and writes OUTPUT_STATE, and the server carries the value from one
request of a sequence to the next. `state_start` restarts the sum on START (its control
input); `state_sum` always adds, from an `initial_state`."""
import os
import shutil
import tempfile

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln

MODELS_DIR = os.path.join(os.path.dirname(__file__), "..", "onnx_models")

STATE = '''state [ {{ input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_INT32 dims: [ 1 ]
  {initial} }} ]'''
START = ('control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START '
         'int32_false_true: [ 0, 1 ] } ] } ]')


def config(name, sequence, outputs=("OUTPUT",), instances=1):
    out = ", ".join(f'{{ name: "{o}" data_type: TYPE_INT32 dims: [ 1 ] }}' for o in outputs)
    return f'''name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ {{ name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] }} ]
output [ {out} ]
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
sequence_batching {{ {sequence} }}
'''


FILE_INIT = 'initial_state { data_type: TYPE_INT32 dims: [ 1 ] data_file: "init.bin" name: "from file" }'
ZERO_INIT = 'initial_state { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "zeros" }'

MODELS = {
    # (onnx file, config, initial state file bytes or None)
    "acc": ("state_start.onnx", config("acc", START + STATE.format(initial=""), instances=2), None),
    "acc_debug": ("state_start.onnx",
                  config("acc_debug", START + STATE.format(initial=""), ("OUTPUT", "OUTPUT_STATE")), None),
    "acc_file": ("state_sum.onnx", config("acc_file", STATE.format(initial=FILE_INIT)),
                 np.int32([100]).tobytes()),
    "acc_zero": ("state_sum.onnx", config("acc_zero", STATE.format(initial=ZERO_INIT)), None),
    # A file of the wrong size fails this model's load only.
    "acc_short": ("state_sum.onnx", config("acc_short", STATE.format(initial=FILE_INIT)), b"\0\0"),
}


@pytest.fixture(scope="module")
def served():
    repo = tempfile.mkdtemp()
    for name, (onnx, text, init) in MODELS.items():
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copy(os.path.join(MODELS_DIR, onnx), os.path.join(repo, name, "1", "model.onnx"))
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(text)
        if init is not None:
            os.makedirs(os.path.join(repo, name, "initial_state"))
            with open(os.path.join(repo, name, "initial_state", "init.bin"), "wb") as f:
                f.write(init)
    k = Kiln(repo=repo)
    yield k
    k.stop()
    shutil.rmtree(repo, ignore_errors=True)


def client(module, served):
    return module.InferenceServerClient(url=served.url if module is httpclient else served.grpc_url)


def send(c, module, model, value, outputs=None, **sequence):
    i = module.InferInput("INPUT", [1, 1], "INT32")
    i.set_data_from_numpy(np.int32([[value]]))
    wanted = None if outputs is None else [module.InferRequestedOutput(o) for o in outputs]
    return c.infer(model, [i], outputs=wanted, **sequence)


@pytest.mark.parametrize("module", [httpclient, grpcclient])
def test_each_sequence_carries_its_own_running_sum(served, module):
    c = client(module, served)
    a, b = (11, 12) if module is httpclient else (21, 22)
    # Two interleaved sequences over two instances.
    got = {a: [], b: []}
    steps = [(a, 1, dict(sequence_start=True)), (b, 100, dict(sequence_start=True)),
             (a, 2, {}), (b, 200, {}), (a, 3, {}), (a, 4, dict(sequence_end=True)),
             (b, 300, dict(sequence_end=True))]
    for sid, value, flags in steps:
        r = send(c, module, "acc", value, sequence_id=sid, **flags)
        got[sid].append(int(r.as_numpy("OUTPUT")[0, 0]))
        # The state output is not a configured output, so the client does not see it.
        assert r.as_numpy("OUTPUT_STATE") is None
    assert got[a] == [1, 3, 6, 10]
    assert got[b] == [100, 300, 600]
    # The same id starts again from nothing after its END.
    r = send(c, module, "acc", 5, sequence_id=a, sequence_start=True)
    assert int(r.as_numpy("OUTPUT")[0, 0]) == 5
    send(c, module, "acc", 0, sequence_id=a, sequence_end=True)


def test_a_start_resets_a_live_sequence(served):
    c = client(httpclient, served)
    assert int(send(c, httpclient, "acc", 7, sequence_id=31, sequence_start=True).as_numpy("OUTPUT")[0, 0]) == 7
    assert int(send(c, httpclient, "acc", 7, sequence_id=31).as_numpy("OUTPUT")[0, 0]) == 14
    assert int(send(c, httpclient, "acc", 2, sequence_id=31, sequence_start=True).as_numpy("OUTPUT")[0, 0]) == 2
    send(c, httpclient, "acc", 0, sequence_id=31, sequence_end=True)


def test_state_output_is_returned_when_the_config_lists_it(served):
    c = client(grpcclient, served)
    r = send(c, grpcclient, "acc_debug", 4, sequence_id=41, sequence_start=True)
    assert int(r.as_numpy("OUTPUT_STATE")[0, 0]) == 4
    r = send(c, grpcclient, "acc_debug", 5, outputs=["OUTPUT_STATE"], sequence_id=41, sequence_end=True)
    assert int(r.as_numpy("OUTPUT_STATE")[0, 0]) == 9
    assert r.as_numpy("OUTPUT") is None
    # Where the config does not list it, asking for it is an error.
    with pytest.raises(InferenceServerException) as e:
        send(c, grpcclient, "acc", 1, outputs=["OUTPUT_STATE"], sequence_id=42, sequence_start=True)
    assert "unexpected inference output 'OUTPUT_STATE'" in str(e.value)


@pytest.mark.parametrize("model,first", [("acc_file", 100), ("acc_zero", 0)])
def test_initial_state_starts_each_sequence(served, model, first):
    c = client(httpclient, served)
    for sid in (51, 52):
        got = [int(send(c, httpclient, model, v, sequence_id=sid, **flags).as_numpy("OUTPUT")[0, 0])
               for v, flags in ((1, dict(sequence_start=True)), (2, {}), (3, dict(sequence_end=True)))]
        assert got == [first + 1, first + 3, first + 6]


def test_a_client_cannot_send_the_state_input_and_a_bad_initial_state_fails_its_load(served):
    c = client(httpclient, served)
    i = httpclient.InferInput("INPUT", [1, 1], "INT32")
    i.set_data_from_numpy(np.int32([[1]]))
    s = httpclient.InferInput("INPUT_STATE", [1, 1], "INT32")
    s.set_data_from_numpy(np.int32([[1]]))
    with pytest.raises(InferenceServerException) as e:
        c.infer("acc", [i, s], sequence_id=61, sequence_start=True)
    assert "INPUT_STATE" in str(e.value)
    index = {m["name"]: m for m in requests.post(f"http://{served.url}/v2/repository/index").json()}
    assert index["acc_short"]["state"] == "UNAVAILABLE"
    assert "holds 2 bytes" in index["acc_short"]["reason"]
    assert all(index[m]["state"] == "READY" for m in ("acc", "acc_debug", "acc_file", "acc_zero"))


def test_concurrent_sequences_keep_their_own_state_when_batched_together(served):
    """Many sequences at once: their requests may share executions (one request per
    sequence per batch), and each sum must still be its own."""
    from concurrent.futures import ThreadPoolExecutor

    def run(sid):
        c = client(grpcclient, served)
        got = []
        for step in range(12):
            flags = dict(sequence_start=step == 0, sequence_end=step == 11)
            got.append(int(send(c, grpcclient, "acc", sid, sequence_id=sid, **flags).as_numpy("OUTPUT")[0, 0]))
        return got

    before = client(httpclient, served).get_inference_statistics("acc")["model_stats"][0]
    ids = list(range(101, 117))
    with ThreadPoolExecutor(len(ids)) as pool:
        results = dict(zip(ids, pool.map(run, ids)))
    for sid, got in results.items():
        assert got == [sid * (n + 1) for n in range(12)], sid
    after = client(httpclient, served).get_inference_statistics("acc")["model_stats"][0]
    assert int(after["inference_count"]) - int(before["inference_count"]) == 12 * len(ids)
    print("executions for", 12 * len(ids), "requests:",
          int(after["execution_count"]) - int(before["execution_count"]))
