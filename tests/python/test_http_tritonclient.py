"""Kiln against the real tritonclient.http, as Triton users call it."""
import concurrent.futures
import gzip
import json
import os
import zlib

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


@pytest.fixture
def client(kiln):
    return httpclient.InferenceServerClient(url=kiln.url)


def simple_inputs(a, b, dtype="INT32", binary=True):
    i0 = httpclient.InferInput("INPUT0", list(a.shape), dtype)
    i0.set_data_from_numpy(a, binary_data=binary)
    i1 = httpclient.InferInput("INPUT1", list(b.shape), dtype)
    i1.set_data_from_numpy(b, binary_data=binary)
    return [i0, i1]


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    md = client.get_server_metadata()
    assert md["name"] == "triton"
    assert "binary_tensor_data" in md["extensions"] and "classification" in md["extensions"]
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("no_such_model")
    m = client.get_model_metadata("simple")
    assert m["name"] == "simple" and m["versions"] == ["1"]
    assert m["inputs"] == [
        {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
    ]
    cfg = client.get_model_config("simple")
    assert cfg["max_batch_size"] == 8
    assert cfg["input"][0]["data_type"] == "TYPE_INT32" and cfg["input"][0]["dims"] == [16]
    assert "dynamic_batching" in client.get_model_config("simple_dynamic_batch")


@pytest.mark.parametrize("binary", [True, False])
def test_simple_add_sub(client, binary):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), -3, dtype=np.int32)
    outs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary), httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary)]
    r = client.infer("simple", simple_inputs(a, b, binary=binary), outputs=outs, request_id="req-7")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    resp = r.get_response()
    assert resp["model_name"] == "simple" and resp["model_version"] == "1" and resp["id"] == "req-7"


def test_simple_batch_and_wraparound(client):
    a = np.full((8, 16), 2**31 - 1, dtype=np.int32)
    b = np.ones((8, 16), dtype=np.int32)
    r = client.infer("simple", simple_inputs(a, b))
    assert r.as_numpy("OUTPUT0").shape == (8, 16)
    assert (r.as_numpy("OUTPUT0") == -(2**31)).all()


def test_output_subset(client):
    a = np.ones((1, 16), dtype=np.int32)
    r = client.infer("simple", simple_inputs(a, a), outputs=[httpclient.InferRequestedOutput("OUTPUT1")])
    assert r.as_numpy("OUTPUT0") is None
    assert (r.as_numpy("OUTPUT1") == 0).all()


def test_simple_int8_wraps(client):
    a = np.full((1, 16), 127, dtype=np.int8)
    b = np.ones((1, 16), dtype=np.int8)
    r = client.infer("simple_int8", simple_inputs(a, b, "INT8"))
    assert (r.as_numpy("OUTPUT0") == -128).all()
    assert (r.as_numpy("OUTPUT1") == 126).all()


@pytest.mark.parametrize("binary", [True, False])
def test_simple_string(client, binary):
    a = np.array([str(x).encode() for x in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array([b"-5"] * 16, dtype=np.object_).reshape(1, 16)
    r = client.infer("simple_string", simple_inputs(a, b, "BYTES", binary))
    assert [int(x) for x in r.as_numpy("OUTPUT0").flatten()] == [x - 5 for x in range(16)]
    assert [int(x) for x in r.as_numpy("OUTPUT1").flatten()] == [x + 5 for x in range(16)]


def test_simple_string_rejects_non_decimal(client):
    a = np.array([b"12"] * 15 + [b"abc"], dtype=np.object_).reshape(1, 16)
    with pytest.raises(InferenceServerException, match="not a decimal"):
        client.infer("simple_string", simple_inputs(a, a, "BYTES"))


def test_simple_identity_arbitrary_bytes(client):
    data = np.array([[b"", b"\xff\x00\xfe", b"hello", b"x" * 1000]], dtype=np.object_)
    i = httpclient.InferInput("INPUT0", list(data.shape), "BYTES")
    i.set_data_from_numpy(data)
    r = client.infer("simple_identity", [i])
    assert r.as_numpy("OUTPUT0").tolist() == data.tolist()


def test_identity_fp32_shapes(client):
    x = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    i = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    r = client.infer("identity_fp32", [i])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
    # Triton's identity backend attaches these response parameters; they travel in the
    # response's "parameters" object.
    assert r.get_response()["parameters"] == {"param0": "an example string parameter", "param1": 42, "param2": False}


NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
      "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
      "FP32": np.float32, "FP64": np.float64}


@pytest.mark.parametrize("dt", sorted(NP))
def test_identity_all_dtypes(client, dt):
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 2, (2, 5)) if dt == "BOOL" else rng.integers(0, 100, (2, 5))).astype(NP[dt])
    assert np_to_triton_dtype(x.dtype) == dt
    i = httpclient.InferInput(f"INPUT_{dt}", list(x.shape), dt)
    i.set_data_from_numpy(x)
    r = client.infer("identity_all_dtypes", [i], outputs=[httpclient.InferRequestedOutput(f"OUTPUT_{dt}")])
    got = r.as_numpy(f"OUTPUT_{dt}")
    assert got.dtype == x.dtype and got.shape == x.shape
    assert got.tobytes() == x.tobytes()


def raw_infer(kiln, model, header, binary=b"", extra_headers=None):
    body = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(body))}
    headers.update(extra_headers or {})
    return requests.post(f"http://{kiln.url}/v2/models/{model}/infer", data=body + binary, headers=headers)


def test_bf16_and_string_in_one_request(kiln):
    bf16 = np.array([1.0, -2.5, 3.25], dtype=np.float32).view(np.uint32) >> 16
    raw = bf16.astype(np.uint16).tobytes()
    s = b"".join(len(x).to_bytes(4, "little") + x for x in [b"a", b"\x80"])
    hdr = {"inputs": [
        {"name": "INPUT_BF16", "datatype": "BF16", "shape": [1, 3], "parameters": {"binary_data_size": len(raw)}},
        {"name": "INPUT_STRING", "datatype": "BYTES", "shape": [1, 2], "parameters": {"binary_data_size": len(s)}}],
        "outputs": [{"name": "OUTPUT_BF16", "parameters": {"binary_data": True}},
                    {"name": "OUTPUT_STRING", "parameters": {"binary_data": True}}]}
    r = raw_infer(kiln, "identity_all_dtypes", hdr, raw + s)
    assert r.status_code == 200, r.text
    hl = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:hl])
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT_BF16", "OUTPUT_STRING"]
    assert meta["outputs"][0]["datatype"] == "BF16"
    assert r.content[hl:] == raw + s


def test_classification(client):
    a = np.array([[5, 1, 9, 3] + [0] * 12], dtype=np.int32)
    b = np.zeros((1, 16), dtype=np.int32)
    r = client.infer("simple", simple_inputs(a, b), outputs=[httpclient.InferRequestedOutput("OUTPUT0", class_count=2)])
    got = r.as_numpy("OUTPUT0")
    assert got.shape == (1, 2)
    assert [x.decode() for x in got.flatten()] == ["9:2", "5:0"]


@pytest.mark.parametrize("algo", ["gzip", "deflate"])
def test_compression(client, algo):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    r = client.infer("simple", simple_inputs(a, a), request_compression_algorithm=algo, response_compression_algorithm=algo)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * a)


def test_response_is_compressed_on_the_wire(kiln):
    hdr = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    body = gzip.compress(json.dumps(hdr).encode())
    r = requests.post(f"http://{kiln.url}/v2/models/identity_fp32/infer", data=body,
                      headers={"Content-Encoding": "gzip", "Accept-Encoding": "deflate"}, stream=True)
    raw = r.raw.read(decode_content=False)
    assert r.headers["Content-Encoding"] == "deflate"
    assert json.loads(zlib.decompress(raw))["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]


def test_only_inference_responses_are_compressed(kiln):
    """As tritonserver: metadata, config, statistics and errors stay plain JSON whatever the
    client accepts (tritonclient's aio client turns off decompression and parses them as is)."""
    accept = {"Accept-Encoding": "gzip, deflate"}
    for path in ["/v2", "/v2/models/simple", "/v2/models/simple/config", "/v2/models/simple/stats"]:
        r = requests.get(f"http://{kiln.url}{path}", headers=accept, stream=True)
        assert "Content-Encoding" not in r.headers, path
        json.loads(r.raw.read(decode_content=False))
    bad = {"inputs": [{"name": "NOPE", "datatype": "FP32", "shape": [1], "data": [1]}]}
    r = requests.post(f"http://{kiln.url}/v2/models/identity_fp32/infer", json=bad, headers=accept, stream=True)
    assert r.status_code == 400 and "Content-Encoding" not in r.headers
    assert "error" in json.loads(r.raw.read(decode_content=False))


def test_aio_client(kiln):
    import asyncio

    import tritonclient.http.aio as aioclient

    async def run():
        c = aioclient.InferenceServerClient(url=kiln.url)
        try:
            assert await c.is_server_live() and await c.is_model_ready("simple")
            assert (await c.get_server_metadata())["name"] == "triton"
            assert (await c.get_model_metadata("simple"))["versions"] == ["1"]
            assert (await c.get_model_config("simple"))["max_batch_size"] == 8
            a = np.arange(16, dtype=np.int32).reshape(1, 16)
            ins = [aioclient.InferInput("INPUT0", [1, 16], "INT32"), aioclient.InferInput("INPUT1", [1, 16], "INT32")]
            ins[0].set_data_from_numpy(a)
            ins[1].set_data_from_numpy(2 * a, binary_data=False)
            results = await asyncio.gather(*[
                c.infer("simple", ins, response_compression_algorithm=algo) for algo in [None, "gzip", "deflate"] * 4
            ])
            for r in results:
                np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 3 * a)
                np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), -a)
            stats = await c.get_inference_statistics("simple")
            assert stats["model_stats"][0]["inference_count"] >= 12
            with pytest.raises(InferenceServerException, match="unknown model"):
                await c.infer("no_such_model", ins)
        finally:
            await c.close()

    asyncio.run(run())


@pytest.mark.parametrize("case,inputs,message", [
    ("dtype", lambda a: simple_inputs(a.astype(np.float32), a.astype(np.float32), "FP32"), "data-type"),
    ("shape", lambda a: simple_inputs(a[:, :15].copy(), a[:, :15].copy()), "unexpected shape"),
    ("batch", lambda a: simple_inputs(np.ones((9, 16), np.int32), np.ones((9, 16), np.int32)), "batch-size must be <= 8"),
    ("missing", lambda a: simple_inputs(a, a)[:1], "missing required input"),
])
def test_validation_errors(client, case, inputs, message):
    a = np.ones((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException, match=message) as e:
        client.infer("simple", inputs(a))
    assert e.value.status() == "400"


def test_unknown_output_model_and_version(client):
    a = np.ones((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException, match="unexpected inference output"):
        client.infer("simple", simple_inputs(a, a), outputs=[httpclient.InferRequestedOutput("OUTPUT9")])
    with pytest.raises(InferenceServerException) as e:
        client.infer("no_such_model", simple_inputs(a, a))
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", simple_inputs(a, a), model_version="7")
    assert e.value.status() == "404"


def test_raw_protocol_errors(kiln):
    base = {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16]}
    good = np.ones(16, np.int32).tobytes()
    # byte size mismatch
    hdr = {"inputs": [dict(base, parameters={"binary_data_size": 60}), dict(base, name="INPUT1", parameters={"binary_data_size": 64})]}
    r = raw_infer(kiln, "simple", hdr, good[:60] + good)
    assert r.status_code == 400 and "byte size" in r.json()["error"]
    # header length beyond the body
    r = requests.post(f"http://{kiln.url}/v2/models/simple/infer", data=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert r.status_code == 400 and "exceeds" in r.json()["error"]
    # BYTES element length overflowing the tensor
    bad = (1000).to_bytes(4, "little") + b"abc"
    hdr = {"inputs": [{"name": "INPUT0", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(bad)}}]}
    r = raw_infer(kiln, "simple_identity", hdr, bad)
    assert r.status_code == 400 and "exceeds" in r.json()["error"]
    # extra input, malformed JSON, unknown model
    hdr = {"inputs": [dict(base, data=list(range(16))), dict(base, name="INPUT1", data=[0] * 16), dict(base, name="EXTRA", data=[0] * 16)]}
    r = requests.post(f"http://{kiln.url}/v2/models/simple/infer", json=hdr)
    assert r.status_code == 400 and "unexpected inference input 'EXTRA'" in r.json()["error"]
    r = requests.post(f"http://{kiln.url}/v2/models/simple/infer", data=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = requests.get(f"http://{kiln.url}/v2/models/nope/config")
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_shapes_claiming_more_elements_than_sent_are_refused(kiln):
    """A shape whose element count is huge (2^36: the server must not size a buffer by it)
    or wraps 64 bits (2^32 · 2^32, which a wrapping product calls 0) with no data: 400
    each, and the server stays up."""
    for shape in ([1, 1 << 36], [1 << 32, 1 << 32], [3, (1 << 63) - 1]):
        hdr = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "data": []}]}
        r = requests.post(f"http://{kiln.url}/v2/models/identity_fp32/infer", json=hdr)
        assert r.status_code == 400, (shape, r.text)
        hdr = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": 0}}]}
        r = raw_infer(kiln, "identity_fp32", hdr)
        assert r.status_code == 400, (shape, r.text)
    r = requests.get(f"http://{kiln.url}/v2/health/live")
    assert r.status_code == 200


def test_nested_json_data(kiln):
    hdr = {"inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [2, 16], "data": [list(range(16)), list(range(16))]},
        {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [1] * 32}],
        "outputs": [{"name": "OUTPUT0"}]}
    r = requests.post(f"http://{kiln.url}/v2/models/simple/infer", json=hdr)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 16] and out["data"][:3] == [1, 2, 3]


def test_statistics_count_exactly(client):
    before = client.get_inference_statistics("identity_fp32")["model_stats"][0]
    x = np.ones((2, 3), np.float32)
    i = httpclient.InferInput("INPUT0", [2, 3], "FP32")
    i.set_data_from_numpy(x)
    for _ in range(3):
        client.infer("identity_fp32", [i])
    after = client.get_inference_statistics("identity_fp32")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 6
    assert after["execution_count"] - before["execution_count"] == 3
    s = after["inference_stats"]
    assert s["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    for k in ["queue", "compute_input", "compute_infer", "compute_output"]:
        assert s[k]["count"] == s["success"]["count"]
    assert s["success"]["ns"] >= s["compute_infer"]["ns"] > 0
    all_stats = client.get_inference_statistics()
    assert {m["name"] for m in all_stats["model_stats"]} >= {"simple", "identity_fp32"}


def test_statistics_split_compute_into_input_infer_and_output(client):
    """A backend that marks its compute phase (the ONNX executor's graph run) gets Triton's
    three-way split: time before it is compute_input, after it compute_output."""
    def phases():
        s = client.get_inference_statistics("simple")["model_stats"][0]
        return {k: s["inference_stats"][k]["ns"] for k in ["compute_input", "compute_infer", "compute_output", "success"]}
    before = phases()
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    for _ in range(5):
        client.infer("simple", simple_inputs(a, a))
    after = phases()
    d = {k: after[k] - before[k] for k in after}
    assert d["compute_input"] > 0 and d["compute_infer"] > 0 and d["compute_output"] > 0
    assert d["compute_input"] + d["compute_infer"] + d["compute_output"] <= d["success"]
    batch = client.get_inference_statistics("simple")["model_stats"][0]["batch_stats"][0]
    assert batch["compute_input"]["ns"] > 0 and batch["compute_output"]["ns"] > 0


def test_dynamic_batching_merges_concurrent_requests(kiln):
    client = httpclient.InferenceServerClient(url=kiln.url, concurrency=8)
    before = client.get_inference_statistics("simple_dynamic_batch")["model_stats"][0]
    reqs = []
    for k in range(8):
        a = np.full((1, 16), k, np.int32)
        b = np.full((1, 16), 100, np.int32)
        reqs.append((k, client.async_infer("simple_dynamic_batch", simple_inputs(a, b))))
    for k, r in reqs:
        res = r.get_result()
        assert (res.as_numpy("OUTPUT0") == k + 100).all() and (res.as_numpy("OUTPUT1") == k - 100).all()
    after = client.get_inference_statistics("simple_dynamic_batch")["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 8
    assert executions < inferences, (executions, inferences)
    assert any(b["batch_size"] > 1 for b in after["batch_stats"])


def test_repository_index(client):
    idx = client.get_model_repository_index()
    names = {m["name"]: m for m in idx}
    for n in ["simple", "simple_int8", "simple_string", "simple_identity", "identity_fp32", "identity_all_dtypes", "simple_dynamic_batch"]:
        assert names[n]["state"] == "READY" and names[n]["version"] == "1"
    with pytest.raises(InferenceServerException, match="not allowed"):
        client.load_model("simple")


def test_explicit_mode(kiln_explicit):
    c = httpclient.InferenceServerClient(url=kiln_explicit.url)
    assert c.is_model_ready("simple")
    assert not c.is_model_ready("simple_int8")
    c.load_model("simple_int8")
    assert c.is_model_ready("simple_int8")
    c.unload_model("simple_int8")
    assert not c.is_model_ready("simple_int8")
    state = {m["name"]: m for m in c.get_model_repository_index()}["simple_int8"]
    assert state["state"] == "UNAVAILABLE" and state["reason"] == "unloaded"
    r = requests.post(f"http://{kiln_explicit.url}/v2/models/simple/infer", data=b"x" * 5000)
    assert r.status_code == 413 and "maximum input size" in r.json()["error"]


def test_concurrent_clients_all_correct(kiln):
    def one(k):
        c = httpclient.InferenceServerClient(url=kiln.url)
        a = np.full((1, 16), k, np.int32)
        r = c.infer("simple", simple_inputs(a, a))
        return (r.as_numpy("OUTPUT0") == 2 * k).all()
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        assert all(ex.map(one, range(64)))


def test_settings_and_shared_memory_status(client):
    assert client.get_log_settings()["log_info"] is True
    assert client.get_trace_settings()["trace_level"] == ["OFF"]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException, match="Unable to open shared memory region"):
        client.register_system_shared_memory("r", "/kiln_no_such_object", 64)
    with pytest.raises(InferenceServerException, match="Unable to find system shared memory region"):
        client.get_system_shared_memory_status("r")
    # No GPU shared memory in this server: nothing registered, registering is refused.
    assert client.get_cuda_shared_memory_status() == []


def test_log_settings_change_at_run_time(kiln):
    """POST /v2/logging changes the settings (and the server's log filter) as Triton does."""
    client = httpclient.InferenceServerClient(url=kiln.url)
    before = client.get_log_settings()
    try:
        got = client.update_log_settings({"log_verbose_level": 1, "log_info": False})
        assert got["log_verbose_level"] == 1 and got["log_info"] is False
        assert got["log_warning"] is True and got["log_format"] == "default"
        assert client.get_log_settings() == got
        with pytest.raises(InferenceServerException, match="log file location can not be updated"):
            client.update_log_settings({"log_file": "/tmp/x.log"})
        with pytest.raises(InferenceServerException, match="invalid argument for --log_format"):
            client.update_log_settings({"log_format": "json"})
        with pytest.raises(InferenceServerException, match="must be a boolean"):
            client.update_log_settings({"log_error": 3})
        assert client.get_log_settings() == got  # failed updates change nothing
    finally:
        client.update_log_settings({k: before[k] for k in before if k != "log_file"})
    assert client.get_log_settings() == before


def test_system_shared_memory_inputs_and_outputs(client):
    """The flow of Triton's simple_http_shm_client: inputs read from and outputs written
    to client-created POSIX shared memory, registered by name."""
    client.unregister_system_shared_memory()
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    n = a.nbytes
    tag = os.getpid()
    inp = shm.create_shared_memory_region("kiln_in", f"/kiln_in_{tag}", 2 * n)
    out = shm.create_shared_memory_region("kiln_out", f"/kiln_out_{tag}", 2 * n)
    try:
        shm.set_shared_memory_region(inp, [a, b])
        client.register_system_shared_memory("input_data", f"/kiln_in_{tag}", 2 * n)
        client.register_system_shared_memory("output_data", f"/kiln_out_{tag}", 2 * n)
        with pytest.raises(InferenceServerException, match="already in manager"):
            client.register_system_shared_memory("input_data", f"/kiln_in_{tag}", n)
        assert client.get_system_shared_memory_status("input_data") == [
            {"name": "input_data", "key": f"/kiln_in_{tag}", "offset": 0, "byte_size": 2 * n}]
        assert sorted(r["name"] for r in client.get_system_shared_memory_status()) == [
            "input_data", "output_data"]

        def run(out0_size=n):
            i0 = httpclient.InferInput("INPUT0", [1, 16], "INT32")
            i0.set_shared_memory("input_data", n)
            i1 = httpclient.InferInput("INPUT1", [1, 16], "INT32")
            i1.set_shared_memory("input_data", n, offset=n)
            o0 = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
            o0.set_shared_memory("output_data", out0_size)
            o1 = httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)
            o1.set_shared_memory("output_data", n, offset=n)
            return client.infer("simple", [i0, i1], outputs=[o0, o1])

        r = run()
        o = r.get_output("OUTPUT0")
        # No data in the response for an output in shared memory (JSON or binary asked).
        assert o["shape"] == [1, 16] and o["datatype"] == "INT32" and "data" not in o
        assert "binary_data_size" not in o.get("parameters", {})
        assert "data" not in r.get_output("OUTPUT1")
        assert (shm.get_contents_as_numpy(out, np.int32, [1, 16]) == a + b).all()
        assert (shm.get_contents_as_numpy(out, np.int32, [1, 16], offset=n) == a - b).all()
        # New input values in the same region give new results.
        shm.set_shared_memory_region(inp, [b])
        run()
        assert (shm.get_contents_as_numpy(out, np.int32, [1, 16]) == 2 * b).all()
        with pytest.raises(InferenceServerException, match="should be at least 64 bytes"):
            run(out0_size=8)
        i0 = httpclient.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_shared_memory("no_region", n)
        i1 = httpclient.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_data_from_numpy(b)
        with pytest.raises(InferenceServerException, match="Unable to find shared memory region"):
            client.infer("simple", [i0, i1])
        i0.set_shared_memory("input_data", n, offset=2 * n)
        with pytest.raises(InferenceServerException, match="Invalid offset"):
            client.infer("simple", [i0, i1])
        client.unregister_system_shared_memory("input_data")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["output_data"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inp)
        shm.destroy_shared_memory_region(out)