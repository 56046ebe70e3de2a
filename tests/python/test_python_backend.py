"""The python backend: Triton Python models (model.py with TritonPythonModel) served
unchanged, from tests/python_models/, with the real tritonclient."""
import json
import os
import queue
import sys
import time
from functools import partial

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln

MODELS = os.path.join(os.path.dirname(__file__), "..", "python_models")


# The stubs run on this Python, which has numpy.
os.environ["KILN_PYTHON"] = sys.executable


@pytest.fixture(scope="module")
def kiln():
    k = Kiln("--strict-readiness=false", repo=MODELS)
    yield k
    k.stop()


@pytest.fixture
def client(kiln):
    with httpclient.InferenceServerClient(kiln.url) as c:
        yield c


def test_add_sub(client):
    a = np.arange(4, dtype=np.float32)
    b = np.full(4, 0.5, np.float32)
    ins = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    r = client.infer("add_sub", ins)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    # Requested outputs are filtered by the core.
    r = client.infer("add_sub", ins, outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert r.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)


def test_strings_batching_and_parameters(kiln):
    results = queue.Queue()
    with grpcclient.InferenceServerClient(kiln.grpc_url) as c:
        for i in range(4):
            t = grpcclient.InferInput("TEXT", [1, 2], "BYTES")
            t.set_data_from_numpy(np.array([[f"word{i}".encode(), b"x\x00y"]], dtype=np.object_))
            c.async_infer("text_batch", [t], partial(lambda q, result, error: q.put(error or result), results),
                          parameters={"n": i})
        got = [results.get(timeout=30) for _ in range(4)]
    batched = []
    for r in got:
        assert not isinstance(r, InferenceServerException), r
        upper = r.as_numpy("UPPER")
        i = int(upper[0, 0].decode()[-1])
        assert upper.tolist() == [[f"WORD{i}".encode(), b"X\x00Y"]]
        assert r.as_numpy("PARAMS")[0, 0] == ('{"n": %d}' % i).encode()
        # InferenceResponse(parameters=...) reaches the client as response parameters.
        p = r.get_response().parameters
        assert (p["rows"].int64_param, p["model"].string_param, p["upper"].bool_param) == (1, "text_batch", True)
        batched.append(int(r.as_numpy("BATCHED")[0, 0]))
    # The dynamic batcher put several requests into one execute call.
    assert max(batched) > 1, batched


def test_decoupled_model_streams_from_a_thread(kiln):
    results = queue.Queue()
    with grpcclient.InferenceServerClient(kiln.grpc_url) as c:
        c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), results))
        t = grpcclient.InferInput("IN", [3], "INT32")
        t.set_data_from_numpy(np.array([7, 8, 9], np.int32))
        c.async_stream_infer("py_repeat", [t], request_id="ok", enable_empty_final_response=True)
        outs = []
        while True:
            r = results.get(timeout=30)
            assert not isinstance(r, InferenceServerException), r
            if r.get_response().parameters["triton_final_response"].bool_param:
                break
            outs.append(int(r.as_numpy("OUT")[0]))
        assert outs == [7, 8, 9]
        # An error response without the final flag does not end the stream (as in Triton).
        t.set_data_from_numpy(np.array([5, 99, 6], np.int32))
        c.async_stream_infer("py_repeat", [t], request_id="gap")
        got = [results.get(timeout=30) for _ in range(3)]
        assert int(got[0].as_numpy("OUT")[0]) == 5
        assert got[0].get_response().parameters["index"].int64_param == 0
        assert isinstance(got[1], InferenceServerException) and "element 1 is 99" in got[1].message()
        assert int(got[2].as_numpy("OUT")[0]) == 6
        assert got[2].get_response().parameters["index"].int64_param == 2
        t.set_data_from_numpy(np.array([1, -2, 3], np.int32))
        c.async_stream_infer("py_repeat", [t], request_id="bad")
        first, second = results.get(timeout=30), results.get(timeout=30)
        assert int(first.as_numpy("OUT")[0]) == 1
        assert isinstance(second, InferenceServerException) and "negative value -2" in second.message()
        c.stop_stream()
    # The generate extension streams it too.
    r = requests.post(f"http://{kiln.url}/v2/models/py_repeat/generate_stream", json={"IN": [4, 5]}, timeout=30)
    assert r.text.count("data: ") == 2 and '"OUT":5' in r.text


def test_decoupled_requests_stream_concurrently_on_one_instance(kiln):
    """A decoupled model's execute returns before its responses are sent (here: an async
    execute, run in the background as in Triton), so its one instance takes the next
    request meanwhile: the second request's response overtakes the first's later one."""
    results = queue.Queue()
    with grpcclient.InferenceServerClient(kiln.grpc_url) as c:
        c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), results))

        def send(rid, values, delays):
            ins = [grpcclient.InferInput("IN", [len(values)], "INT32"),
                   grpcclient.InferInput("DELAY_MS", [len(delays)], "INT32")]
            ins[0].set_data_from_numpy(np.array(values, np.int32))
            ins[1].set_data_from_numpy(np.array(delays, np.int32))
            c.async_stream_infer("py_async_stream", ins, request_id=rid)

        send("a", [10, 11], [0, 1500])
        send("b", [20], [300])
        got = []
        for _ in range(3):
            r = results.get(timeout=30)
            assert not isinstance(r, InferenceServerException), r
            got.append((r.get_response().id, int(r.as_numpy("OUT")[0])))
        c.stop_stream()
    assert got == [("a", 10), ("b", 20), ("a", 11)]


def control(client, action, model, config=None):
    names = ["ACTION", "MODEL"] + (["CONFIG"] if config is not None else [])
    values = [action, model] + ([config] if config is not None else [])
    ins = []
    for n, v in zip(names, values):
        t = httpclient.InferInput(n, [1], "BYTES")
        t.set_data_from_numpy(np.array([v.encode()], dtype=np.object_))
        ins.append(t)
    return client.infer("py_model_control", ins).as_numpy("RESULT")[0].decode()


def test_model_management_from_python():
    """pb_utils.load_model / unload_model / is_model_ready, in explicit model control mode
    (and refused, with Triton's message, outside it)."""
    k = Kiln("--model-control-mode=explicit", "--load-model=py_model_control", repo=MODELS)
    try:
        with httpclient.InferenceServerClient(k.url) as c:
            assert "not available while the model initializes" in control(c, "init_result", "")
            assert control(c, "ready", "add_sub") == "False"
            assert control(c, "load", "add_sub") == "ok"
            assert c.is_model_ready("add_sub") and control(c, "ready", "add_sub") == "True"
            a = np.ones(4, np.float32)
            ins = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
            ins[0].set_data_from_numpy(a)
            ins[1].set_data_from_numpy(a)
            np.testing.assert_array_equal(c.infer("add_sub", ins).as_numpy("OUTPUT0"), a * 2)
            assert control(c, "unload", "add_sub") == "ok"
            assert not c.is_model_ready("add_sub") and control(c, "ready", "add_sub") == "False"
            # A config given with the load replaces config.pbtxt.
            config = {"backend": "python", "max_batch_size": 0,
                      "input": [{"name": f"INPUT{i}", "data_type": "TYPE_FP32", "dims": [4]} for i in (0, 1)],
                      "output": [{"name": f"OUTPUT{i}", "data_type": "TYPE_FP32", "dims": [4]} for i in (0, 1)],
                      "instance_group": [{"count": 2, "kind": "KIND_CPU"}]}
            assert control(c, "load_config", "add_sub", json.dumps(config)) == "ok"
            groups = c.get_model_config("add_sub")["instance_group"]
            assert sum(g["count"] for g in groups) == 2
            assert control(c, "load", "no_such_model").startswith("error: ")
    finally:
        k.stop()


def test_model_management_needs_explicit_mode(client):
    assert "model control mode is not EXPLICIT" in control(client, "load", "add_sub")
    assert control(client, "ready", "add_sub") == "True"


@pytest.mark.parametrize("model", ["py_seq_echo", "py_seq"])
def test_string_sequence_ids_reach_the_model_as_strings(client, model):
    """request.correlation_id() is the string a client gave as sequence_id (a number for a
    numeric one), also through BLS (py_seq forwards it to py_seq_echo)."""
    def run(seq, start, end):
        t = httpclient.InferInput("IN", [1, 1], "INT32")
        t.set_data_from_numpy(np.array([[1]], np.int32))
        r = client.infer(model, [t], sequence_id=seq, sequence_start=start, sequence_end=end)
        return r.as_numpy("CORR")[0, 0].decode()

    assert run("session-a", True, False) == "str:session-a"
    assert run(17, True, True) == "int:17"
    assert run("session-a", False, True) == "str:session-a"


def test_dlpack_and_writable_inputs(client):
    x = np.array([[0.5, -1.0, 3.0]], np.float32)
    n = np.array([[1, 2, 3]], np.int64)
    ins = [httpclient.InferInput("IN", list(x.shape), "FP32"), httpclient.InferInput("IN2", list(n.shape), "INT64")]
    ins[0].set_data_from_numpy(x)
    ins[1].set_data_from_numpy(n)
    r = client.infer("py_dlpack", ins)
    np.testing.assert_array_equal(r.as_numpy("SHARED"), x)
    np.testing.assert_array_equal(r.as_numpy("DOUBLED"), x * 2)
    np.testing.assert_array_equal(r.as_numpy("TRIPLED"), n * 3)


def test_model_errors_fail_only_their_requests(client):
    def run(mode, **kw):
        t = httpclient.InferInput("MODE", [1], "INT32")
        t.set_data_from_numpy(np.array([mode], np.int32))
        return client.infer("py_errors", [t], **kw)

    assert run(5).as_numpy("ECHO")[0] == 5
    with pytest.raises(InferenceServerException, match="mode 1 is refused") as e:
        run(1)
    assert e.value.status() == "400"
    with pytest.raises(InferenceServerException, match="ValueError: mode 2 raises"):
        run(2)
    # A stub that dies fails its request; the next batch gets a new stub.
    with pytest.raises(InferenceServerException, match="stub process stopped answering"):
        run(3)
    assert run(6).as_numpy("ECHO")[0] == 6
    # request.timeout() is what the client set (µs); trace() is there for BLS calls.
    assert run(7, timeout=5_000_000).as_numpy("ECHO")[0] == 5_000_000
    # Rescheduling needs an iterative sequence model: the request ends with that reason.
    with pytest.raises(InferenceServerException, match="iterative_sequence") as e:
        run(4)
    assert e.value.status() == "501"


def test_failing_initialize_leaves_the_model_unavailable(client):
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["add_sub"]["state"] == "READY"
    bad = index["py_bad_init"]
    assert bad["state"] == "UNAVAILABLE"
    assert "RuntimeError: cannot open the weights file" in bad["reason"]


def test_bls_calls_other_models(client):
    def add_sub_count():
        return client.get_inference_statistics("add_sub")["model_stats"][0]["inference_count"]

    before = add_sub_count()
    x = np.array([1, 2, 3, 4], np.float32)
    t = httpclient.InferInput("X", [4], "FP32")
    t.set_data_from_numpy(x)
    r = client.infer("py_bls", [t])
    np.testing.assert_array_equal(r.as_numpy("SUM"), x + x)
    # The decoupled model's three responses, collected through exec(decoupled=True).
    assert r.as_numpy("STREAMED").tolist() == [3, 1, 4]
    # Each response's parameters (py_repeat's "index") reach the caller: response.parameters().
    assert r.as_numpy("STREAMED_INDEX").tolist() == [0, 1, 2]
    assert b"Request for unknown model: 'no_such_model' is not found" in r.as_numpy("MISSING")[0]
    # The composing model's own statistics count the BLS request.
    assert add_sub_count() == before + 1


def test_auto_complete_config_fills_a_bare_config(client):
    config = client.get_model_config("py_autocomplete")
    assert config["max_batch_size"] == 4
    assert "dynamic_batching" in config
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("A", "TYPE_INT32", [-1])]
    assert [o["name"] for o in config["output"]] == ["DOUBLED"]
    t = httpclient.InferInput("A", [2, 3], "INT32")
    t.set_data_from_numpy(np.arange(6, dtype=np.int32).reshape(2, 3))
    r = client.infer("py_autocomplete", [t])
    assert r.as_numpy("DOUBLED").tolist() == [[0, 2, 4], [6, 8, 10]]


ENV_MODEL = """
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pb_utils.Logger.log_warn("py_env runs on " + sys.executable)

    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "PYTHON", np.array([sys.executable.encode()], dtype=np.object_))]) for _ in requests]
"""


def test_execution_env_path_picks_the_python(tmp_path):
    import shutil
    import subprocess
    import time
    # An environment made from this venv: its pyvenv.cfg, its python and its packages.
    venv = os.path.dirname(os.path.dirname(sys.executable))
    for name, env in [("py_env_dir", "$$TRITON_MODEL_DIRECTORY/env"),
                      ("py_env_tar", "$$TRITON_MODEL_DIRECTORY/env.tar.gz")]:
        model = tmp_path / name
        (model / "1").mkdir(parents=True)
        (model / "1" / "model.py").write_text(ENV_MODEL)
        (model / "config.pbtxt").write_text(
            f'backend: "python"\n'
            f'input [ {{ name: "X" data_type: TYPE_INT32 dims: [ 1 ] }} ]\n'
            f'output [ {{ name: "PYTHON" data_type: TYPE_STRING dims: [ 1 ] }} ]\n'
            f'parameters {{ key: "EXECUTION_ENV_PATH" value: {{ string_value: "{env}" }} }}\n')
        (model / "env" / "bin").mkdir(parents=True)
        shutil.copy(os.path.join(venv, "pyvenv.cfg"), model / "env")
        os.symlink(os.path.realpath(sys.executable), model / "env" / "bin" / "python3")
        os.symlink(os.path.join(venv, "lib"), model / "env" / "lib")
        if name == "py_env_tar":
            subprocess.run(["tar", "-czf", str(model / "env.tar.gz"), "-C", str(model / "env"), "."], check=True)
            shutil.rmtree(model / "env")
    saved = os.environ.get("KILN_PYTHON")
    os.environ["KILN_PYTHON"] = "/nonexistent/python"  # only the environments can run them
    try:
        kiln = Kiln(repo=str(tmp_path))
    finally:
        os.environ["KILN_PYTHON"] = saved or sys.executable
    try:
        with httpclient.InferenceServerClient(kiln.url) as c:
            t = httpclient.InferInput("X", [1], "INT32")
            t.set_data_from_numpy(np.array([1], np.int32))
            direct = c.infer("py_env_dir", [t]).as_numpy("PYTHON")[0].decode()
            assert direct == str(tmp_path / "py_env_dir" / "env" / "bin" / "python3")
            unpacked = c.infer("py_env_tar", [t]).as_numpy("PYTHON")[0].decode()
            assert "kiln-python-envs" in unpacked and unpacked.endswith("/bin/python3")
        # pb_utils.Logger writes to the server's log at its level.
        deadline = time.time() + 10
        while time.time() < deadline and not any("py_env runs on" in line for line in kiln.lines):
            time.sleep(0.05)
        warn = [line for line in kiln.lines if "py_env runs on " + direct in line]
        assert warn and "WARN" in warn[0], kiln.lines[-20:]
    finally:
        kiln.stop()


def test_a_streaming_model_sees_its_client_go_away(kiln):
    import json
    import time
    r = requests.post(f"http://{kiln.url}/v2/models/py_ticker/generate_stream", json={"START": 100},
                      stream=True, timeout=30)
    lines = r.iter_lines()
    ticks = [json.loads(next(line for line in lines if line)[6:])["TICK"] for _ in range(3)]
    assert ticks == [100, 101, 102]
    r.close()
    deadline = time.time() + 20
    while time.time() < deadline and not any("py_ticker cancelled after" in line for line in kiln.lines):
        time.sleep(0.05)
    assert any("py_ticker cancelled after" in line for line in kiln.lines)
    assert not any("py_ticker ran to the end" in line for line in kiln.lines)


def test_custom_metrics_reach_the_metrics_port(kiln, client):
    from prometheus_client.parser import text_string_to_metric_families
    seen = []
    for v in (0.5, 5.0, 50.0):
        t = httpclient.InferInput("V", [1], "FP32")
        t.set_data_from_numpy(np.array([v], np.float32))
        seen.append(float(client.infer("py_metrics", [t]).as_numpy("SEEN")[0]))
    assert seen == [1.0, 2.0, 3.0]
    text = requests.get(kiln.metrics_url, timeout=10).text
    assert 'py_model_requests{model="py_metrics",version="1"} 3' in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    labels = (("model", "py_metrics"), ("version", "1"))
    # (The parser names a counter's sample with `_total`; the server serves it as named.)
    assert samples[("py_model_requests_total", labels)] == 3
    assert samples[("py_model_last_value", labels)] == 50.0
    assert samples[("py_model_values_bucket", tuple(sorted(labels + (("le", "1"),))))] == 1
    assert samples[("py_model_values_bucket", tuple(sorted(labels + (("le", "10"),))))] == 2
    assert samples[("py_model_values_count", labels)] == 3
    assert samples[("py_model_values_sum", labels)] == 55.5


@pytest.mark.parametrize("model,protocol", [("add_sub", "grpc"), ("text_batch", "http"), ("py_repeat", "grpc-streaming")])
def test_perf_analyzer_drives_python_models(kiln, model, protocol):
    import shutil
    import subprocess
    pa = shutil.which("perf_analyzer", path=os.path.dirname(sys.executable))
    assert pa, "perf_analyzer missing from the venv (cargo xtask test installs tritonclient==2.41.1)"
    url, proto = (kiln.url, "http") if protocol == "http" else (kiln.grpc_url, "grpc")
    # Stability is not what is tested here (the machine is shared): any steady run passes.
    cmd = [pa, "-m", model, "-u", url, "-i", proto, "--concurrency-range", "4",
           "--measurement-interval", "500", "--stability-percentage", "1000", "--max-trials", "10"]
    cmd += {"text_batch": ["--shape", "TEXT:2"], "py_repeat": ["--streaming", "--shape", "IN:3", "--input-data", "zero"]}.get(model, [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Throughput:" in out and "infer/sec" in out, out


def test_forwarded_headers_reach_the_model_as_parameters():
    import json
    os.environ.setdefault("KILN_PYTHON", sys.executable)
    kiln = Kiln("--strict-readiness=false", "--http-header-forward-pattern", "my_.*",
                "--grpc-header-forward-pattern", "my_.*", repo=MODELS)
    headers = {"my_header_1": "my_value_1", "header_2": "value_2"}
    try:
        got = []
        for module, url in ((httpclient, kiln.url), (grpcclient, kiln.grpc_url)):
            with module.InferenceServerClient(url) as c:
                t = module.InferInput("TEXT", [1, 1], "BYTES")
                t.set_data_from_numpy(np.array([[b"a"]], dtype=np.object_))
                r = c.infer("text_batch", [t], headers=dict(headers), parameters={"p": 1})
                got.append(json.loads(r.as_numpy("PARAMS")[0, 0]))
        assert got == [{"p": 1, "my_header_1": "my_value_1"}] * 2
    finally:
        kiln.stop()


def test_triton_parameter_keys_are_reserved(kiln):
    body = {"inputs": [{"name": "MODE", "shape": [1], "datatype": "INT32", "data": [5]}],
            "parameters": {"triton_enable_empty_final_response": True}}
    r = requests.post(f"http://{kiln.url}/v2/models/py_errors/infer", json=body, timeout=30)
    assert r.status_code == 400
    assert "parameter keys starting with 'triton_' are reserved for Triton usage" in r.json()["error"]


def test_bls_stream_cancel_reaches_the_called_model(kiln, client):
    """ResponseIterator.cancel(): the caller's iterator ends, and the called decoupled model
    (py_ticker, which would tick 400 times) sees is_cancelled() and stops early."""
    def seen(start):
        return [line for line in kiln.lines if f"py_ticker cancelled after" in line and f"from {start}" in line]
    t = httpclient.InferInput("START", [1], "INT32")
    t.set_data_from_numpy(np.array([7000], np.int32))
    r = client.infer("py_bls_cancel", [t])
    np.testing.assert_array_equal(r.as_numpy("TICKS"), [7000, 7001, 7002])
    deadline = time.time() + 20
    while time.time() < deadline and not seen(7000):
        time.sleep(0.05)
    assert seen(7000), "py_ticker did not see the cancellation"


RENDEZVOUS = """import os
import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        repo = os.path.dirname(args["model_repository"])
        mine, other = args["model_name"], {"meet_a": "meet_b", "meet_b": "meet_a"}[args["model_name"]]
        open(os.path.join(repo, mine + ".started"), "w").close()
        deadline = time.time() + float(os.environ.get("MEET_WAIT", "30"))
        while not os.path.exists(os.path.join(repo, other + ".started")):
            if time.time() > deadline:
                raise RuntimeError(other + " never started loading while " + mine + " was loading")
            time.sleep(0.05)

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "X")]) for r in requests]
"""


@pytest.mark.parametrize("threads,both_load", [(4, True), (1, False)])
def test_models_load_at_the_same_time(tmp_path, threads, both_load):
    """--model-load-thread-count (Triton's default 4): two models whose initialize each waits
    for the other to begin loading both load; loading one at a time, the first gives up."""
    for name in ("meet_a", "meet_b"):
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.py").write_text(RENDEZVOUS)
        (tmp_path / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\n'
            'input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
            'output [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n')
    os.environ["MEET_WAIT"] = "30" if both_load else "2"
    try:
        k = Kiln("--strict-readiness=false", f"--model-load-thread-count={threads}", repo=str(tmp_path))
    finally:
        del os.environ["MEET_WAIT"]
    try:
        with httpclient.InferenceServerClient(k.url) as c:
            ready = [c.is_model_ready(n) for n in ("meet_a", "meet_b")]
            if both_load:
                assert ready == [True, True]
            else:
                assert sorted(ready) == [False, True]
                index = {m["name"]: m for m in c.get_model_repository_index()}
                assert any("never started loading" in m.get("reason", "") for m in index.values())
    finally:
        k.stop()
