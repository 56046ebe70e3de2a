"""Triton's ensemble models (`platform: "ensemble"`) with the real tritonclient: a
pipeline over the repository's `simple` (ONNX) and `simple_string` models, in a temporary
repository beside a broken ensemble that must not take the others down."""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import REPO, Kiln

TENSOR = 'name: "{}" data_type: {} dims: [ 16 ]'


def step(model, inputs, outputs, version=-1):
    maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items()]
    maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items()]
    return f'{{ model_name: "{model}" model_version: {version} {" ".join(maps)} }}'


def ensemble_config(name, inputs, outputs, steps, dtype="TYPE_INT32", max_batch_size=8):
    tensors = lambda names: ", ".join("{ " + TENSOR.format(n, dtype) + " }" for n in names)
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
            f"input [ {tensors(inputs)} ]\noutput [ {tensors(outputs)} ]\n"
            f"ensemble_scheduling {{ step [ {', '.join(steps)} ] }}\n")


# chain: s = A + B, d = A - B (step 1); TWICE_A = s + d, TWICE_B = s - d (step 2, after
# step 1); DOUBLE = A + A (step 3, independent of the others, pinned to version 1).
CHAIN = ensemble_config("chain", ["A", "B"], ["TWICE_A", "TWICE_B", "DOUBLE"], [
    step("simple", {"INPUT0": "A", "INPUT1": "B"}, {"OUTPUT0": "s", "OUTPUT1": "d"}),
    step("simple", {"INPUT0": "s", "INPUT1": "d"}, {"OUTPUT0": "TWICE_A", "OUTPUT1": "TWICE_B"}),
    step("simple", {"INPUT0": "A", "INPUT1": "A"}, {"OUTPUT0": "DOUBLE"}, version=1),
])
TEXT = ensemble_config("text", ["X", "Y"], ["SUM"], [
    step("simple_string", {"INPUT0": "X", "INPUT1": "Y"}, {"OUTPUT0": "SUM"}),
], dtype="TYPE_STRING")
# Reads a tensor nothing writes.
BROKEN = ensemble_config("broken", ["A", "B"], ["OUT"], [
    step("simple", {"INPUT0": "A", "INPUT1": "nowhere"}, {"OUTPUT0": "OUT"}),
])

# Larger batches than its composing model takes.
TOO_BIG = ensemble_config("too_big", ["A", "B"], ["OUT"], [
    step("simple", {"INPUT0": "A", "INPUT1": "B"}, {"OUTPUT0": "OUT"}),
], max_batch_size=16)


# A decoupled step (repeat_int32: one response per element of IN) followed by one that is
# not (an identity): the steps after the decoupled one run once per response, and each
# of those answers the client.
IDENT = ('name: "ident"\nbackend: "identity"\nmax_batch_size: 0\n'
         'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
         'output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]\n')
STREAMED = ('name: "streamed"\nplatform: "ensemble"\nmax_batch_size: 0\n'
            'model_transaction_policy { decoupled: true }\n'
            'input [ { name: "IN" data_type: TYPE_INT32 dims: [ -1 ] } ]\n'
            'output [ { name: "VALUE" data_type: TYPE_INT32 dims: [ -1 ] }, '
            '{ name: "INDEX" data_type: TYPE_UINT32 dims: [ 1 ] } ]\n'
            'ensemble_scheduling { step [ '
            + step("repeat_int32", {"IN": "IN"}, {"OUT": "one", "IDX": "INDEX"}) + ", "
            + step("ident", {"INPUT0": "one"}, {"OUTPUT0": "VALUE"}) + " ] }\n")


# The same with at most one request in flight at each step (Triton's newer field name).
GATED = STREAMED.replace('name: "streamed"', 'name: "gated"').replace(
    "ensemble_scheduling { ", "ensemble_scheduling { max_inflight_requests: 1 ")


def make_repo():
    repo = tempfile.mkdtemp()
    for m in ["simple", "simple_string", "repeat_int32"]:
        shutil.copytree(os.path.join(REPO, m), os.path.join(repo, m))
    for name, text in [("chain", CHAIN), ("text", TEXT), ("broken", BROKEN), ("too_big", TOO_BIG),
                       ("ident", IDENT), ("streamed", STREAMED), ("gated", GATED)]:
        os.makedirs(os.path.join(repo, name, "1"))
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(text)
    return repo


@pytest.fixture(scope="module")
def served():
    repo = make_repo()
    k = Kiln(repo=repo)
    yield k
    k.stop()
    shutil.rmtree(repo, ignore_errors=True)


def inputs(module, **arrays):
    """tritonclient inputs named and filled from `arrays` (INT32, or BYTES for objects)."""
    out = []
    for name, a in arrays.items():
        t = module.InferInput(name, list(a.shape), "BYTES" if a.dtype == object else "INT32")
        t.set_data_from_numpy(a)
        out.append(t)
    return out


def ab(batch=3):
    a = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16) - 20
    b = (np.arange(batch * 16, dtype=np.int32).reshape(batch, 16) * 7) % 11
    return a, b


def test_http_runs_every_step_in_order(served):
    c = httpclient.InferenceServerClient(url=served.url)
    a, b = ab()
    r = c.infer("chain", inputs(httpclient, A=a, B=b))
    np.testing.assert_array_equal(r.as_numpy("TWICE_A"), 2 * a)
    np.testing.assert_array_equal(r.as_numpy("TWICE_B"), 2 * b)
    np.testing.assert_array_equal(r.as_numpy("DOUBLE"), 2 * a)
    assert r.get_response()["model_name"] == "chain"


def test_grpc_answers_only_the_requested_outputs(served):
    c = grpcclient.InferenceServerClient(url=served.grpc_url)
    a, b = ab(2)
    r = c.infer("chain", inputs(grpcclient, A=a, B=b), outputs=[grpcclient.InferRequestedOutput("TWICE_B")])
    names = [o.name for o in r.get_response().outputs]
    assert names == ["TWICE_B"]
    np.testing.assert_array_equal(r.as_numpy("TWICE_B"), 2 * b)


def test_metadata_config_and_statistics(served):
    c = httpclient.InferenceServerClient(url=served.url)
    md = c.get_model_metadata("chain")
    assert md["platform"] == "ensemble"
    assert [i["name"] for i in md["inputs"]] == ["A", "B"]
    assert md["inputs"][0]["shape"] == [-1, 16]
    cfg = c.get_model_config("chain")
    steps = cfg["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["simple"] * 3
    assert steps[1]["input_map"] == {"INPUT0": "s", "INPUT1": "d"}
    before = c.get_inference_statistics("simple")["model_stats"][0]["inference_stats"]["success"]["count"]
    ens_before = c.get_inference_statistics("chain")["model_stats"][0]["inference_stats"]["success"]["count"]
    a, b = ab(1)
    c.infer("chain", inputs(httpclient, A=a, B=b))
    after = c.get_inference_statistics("simple")["model_stats"][0]["inference_stats"]["success"]["count"]
    ens_after = c.get_inference_statistics("chain")["model_stats"][0]["inference_stats"]["success"]["count"]
    # One ensemble request: one success for it, three for the composing model.
    assert ens_after - ens_before == 1
    assert after - before == 3


def test_a_bad_request_and_a_failing_step_are_errors(served):
    c = httpclient.InferenceServerClient(url=served.url)
    # Wrong shape: refused by the ensemble's own config, like any model's.
    a = np.zeros((1, 15), np.int32)
    with pytest.raises(InferenceServerException) as e:
        c.infer("chain", inputs(httpclient, A=a, B=a))
    assert "unexpected shape" in str(e.value)
    # A composing model's error reaches the client.
    x = np.array([[str(i).encode() for i in range(16)]], dtype=object)
    y = x.copy()
    y[0, 3] = b"three"
    with pytest.raises(InferenceServerException) as e:
        c.infer("text", inputs(httpclient, X=x, Y=y))
    assert "three" in str(e.value)
    # The same ensemble answers a good request.
    r = c.infer("text", inputs(httpclient, X=x, Y=x))
    assert [v.decode() for v in r.as_numpy("SUM")[0]] == [str(2 * i) for i in range(16)]


def test_a_broken_ensemble_fails_alone_and_says_why(served):
    index = requests.post(f"http://{served.url}/v2/repository/index").json()
    states = {m["name"]: m for m in index}
    assert states["chain"]["state"] == "READY"
    assert states["broken"]["state"] == "UNAVAILABLE"
    assert "'nowhere'" in states["broken"]["reason"]
    assert "no ensemble input or earlier step provides" in states["broken"]["reason"]
    assert states["too_big"]["state"] == "UNAVAILABLE"
    assert "only allows maximum batch size to be 8" in states["too_big"]["reason"]


def test_loading_an_ensemble_loads_its_composing_models_and_unload_dependents_unloads_them():
    repo = make_repo()
    os.makedirs(os.path.join(repo, "chain2", "1"))
    with open(os.path.join(repo, "chain2", "config.pbtxt"), "w") as f:
        f.write(CHAIN.replace('name: "chain"', 'name: "chain2"'))
    k = Kiln("--model-control-mode", "explicit", repo=repo)
    try:
        c = httpclient.InferenceServerClient(url=k.url)
        assert not c.is_model_ready("simple")
        c.load_model("chain")
        assert c.is_model_ready("chain") and c.is_model_ready("simple")
        # Unloading an ensemble leaves its composing models; with unload_dependents they
        # go too, unless another loaded ensemble still runs them.
        c.load_model("chain2")
        c.unload_model("chain", unload_dependents=True)
        assert not c.is_model_ready("chain") and c.is_model_ready("simple")
        c.unload_model("chain2")
        assert not c.is_model_ready("chain2") and c.is_model_ready("simple")
        c.load_model("chain")
        g = grpcclient.InferenceServerClient(url=k.grpc_url)
        g.unload_model("chain", unload_dependents=True)
        assert not c.is_model_ready("chain") and not c.is_model_ready("simple")
        r = requests.post(f"http://{k.url}/v2/repository/models/chain/unload",
                          json={"parameters": {"unload_dependents": "yes"}}, timeout=10)
        assert r.status_code == 400 and "unload_dependents" in r.json()["error"]
    finally:
        k.stop()
        shutil.rmtree(repo, ignore_errors=True)


def test_perf_analyzer_measures_the_ensemble_and_its_composing_model(served):
    pa = shutil.which("perf_analyzer", path=os.path.dirname(sys.executable))
    assert pa, "perf_analyzer missing from the venv (cargo xtask test installs tritonclient==2.41.1)"
    for url, proto in [(served.url, "http"), (served.grpc_url, "grpc")]:
        cmd = [pa, "-m", "chain", "-u", url, "-i", proto, "-b", "2", "--measurement-interval", "500",
               "--stability-percentage", "100", "--max-trials", "4"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out
        assert "Throughput:" in out, out
        # perf_analyzer reads the steps from the config and reports the composing model.
        composing = out.split("Composing models:")[1]
        assert "simple" in composing, out


def test_grpc_stream_answers_each_ensemble_request(served):
    import queue
    c = grpcclient.InferenceServerClient(url=served.grpc_url)
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    a, b = ab(2)
    try:
        for i in range(3):
            c.async_stream_infer("chain", inputs(grpcclient, A=a + i, B=b), request_id=str(i))
        seen = set()
        for _ in range(3):
            result, error = answers.get(timeout=30)
            assert error is None, error
            i = int(result.get_response().id)
            seen.add(i)
            np.testing.assert_array_equal(result.as_numpy("TWICE_A"), 2 * (a + i))
        assert seen == {0, 1, 2}
    finally:
        c.stop_stream()


@pytest.mark.parametrize("model", ["streamed", "gated"])
def test_a_decoupled_step_streams_one_ensemble_response_per_response(served, model):
    import queue
    c = grpcclient.InferenceServerClient(url=served.grpc_url)
    answers = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    values = np.array([4, 5, 6, 7], np.int32)
    try:
        c.async_stream_infer(model, inputs(grpcclient, IN=values), request_id="s",
                             enable_empty_final_response=True)
        got = {}
        while True:
            result, error = answers.get(timeout=30)
            assert error is None, error
            params = result.get_response().parameters
            if result.as_numpy("VALUE") is None:
                assert params["triton_final_response"].bool_param
                break
            got[int(result.as_numpy("INDEX")[0])] = result.as_numpy("VALUE").tolist()
        assert got == {i: [int(v)] for i, v in enumerate(values)}
    finally:
        c.stop_stream()
    # HTTP cannot take several responses, as with Triton.
    with pytest.raises(InferenceServerException) as e:
        httpclient.InferenceServerClient(url=served.url).infer(model, inputs(httpclient, IN=values))
    assert "decoupled" in str(e.value)
