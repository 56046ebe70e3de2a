"""Kiln against the real tritonclient.grpc (sync and aio) and raw protobuf stubs."""
import asyncio
import concurrent.futures
import json
import os
import queue
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException


@pytest.fixture
def client(kiln):
    return grpcclient.InferenceServerClient(url=kiln.grpc_url)


@pytest.fixture
def stub(kiln):
    ch = grpc.insecure_channel(kiln.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(ch)
    ch.close()


def simple_inputs(a, b, dtype="INT32"):
    i0 = grpcclient.InferInput("INPUT0", list(a.shape), dtype)
    i0.set_data_from_numpy(a)
    i1 = grpcclient.InferInput("INPUT1", list(b.shape), dtype)
    i1.set_data_from_numpy(b)
    return [i0, i1]


def status_of(excinfo):
    return excinfo.value.status()


def test_health_metadata_config(client):
    assert client.is_server_live() and client.is_server_ready()
    md = client.get_server_metadata()
    assert md.name == "triton" and "classification" in md.extensions
    assert client.is_model_ready("simple") and client.is_model_ready("simple", "1")
    assert not client.is_model_ready("simple", "2")
    assert not client.is_model_ready("no_such_model")
    m = client.get_model_metadata("simple")
    assert m.name == "simple" and list(m.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [
        ("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    cfg = client.get_model_config("simple").config
    assert cfg.name == "simple" and cfg.max_batch_size == 8
    assert cfg.input[0].data_type == 8 and list(cfg.input[0].dims) == [16]  # TYPE_INT32
    j = client.get_model_config("simple_dynamic_batch", as_json=True)["config"]
    assert list(j["dynamic_batching"]["preferred_batch_size"]) == [4, 8]


def test_simple_add_sub_and_id(client):
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 5, dtype=np.int32)
    r = client.infer("simple", simple_inputs(a, b), request_id="g-1")
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
    resp = r.get_response()
    assert resp.model_name == "simple" and resp.model_version == "1" and resp.id == "g-1"
    # One raw_output_contents entry per output, in output order.
    assert [o.name for o in resp.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert len(resp.raw_output_contents) == 2


def test_response_parameters(client):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    i = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    r = client.infer("identity_fp32", [i])
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), x)
    p = r.get_response().parameters
    assert p["param0"].string_param == "an example string parameter"
    assert p["param1"].int64_param == 42 and p["param2"].WhichOneof("parameter_choice") == "bool_param"
    assert not p["param2"].bool_param


def test_output_subset_and_classification(client):
    a = np.array([[3, 9, 1, 4] + [0] * 12], dtype=np.int32)
    b = np.zeros((1, 16), dtype=np.int32)
    outs = [grpcclient.InferRequestedOutput("OUTPUT1")]
    r = client.infer("simple", simple_inputs(a, b), outputs=outs)
    assert r.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a)
    outs = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)]
    r = client.infer("simple", simple_inputs(a, b), outputs=outs)
    assert [x.decode() for x in r.as_numpy("OUTPUT0").reshape(-1)] == ["9:1", "4:3"]


def test_strings_raw_bytes_framing(client):
    a = np.array([[str(i) for i in range(16)]], dtype=np.object_)
    b = np.array([["1"] * 16], dtype=np.object_)
    r = client.infer("simple_string", simple_inputs(a, b, "BYTES"))
    assert [int(x) for x in r.as_numpy("OUTPUT0").reshape(-1)] == [i + 1 for i in range(16)]
    blobs = np.array([[b"\x00\xff", b"", b"x" * 1000]], dtype=np.object_)
    i = grpcclient.InferInput("INPUT0", [1, 3], "BYTES")
    i.set_data_from_numpy(blobs)
    r = client.infer("simple_identity", [i])
    assert list(r.as_numpy("OUTPUT0").reshape(-1)) == [b"\x00\xff", b"", b"x" * 1000]


@pytest.mark.parametrize("dt,np_dt", [("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16),
                                      ("UINT32", np.uint32), ("UINT64", np.uint64), ("INT8", np.int8),
                                      ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
                                      ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)])
def test_all_dtypes_raw(client, dt, np_dt):
    x = (np.arange(6) % 2 == 0) if np_dt is np.bool_ else np.arange(6).astype(np_dt) - (0 if dt.startswith("U") else 2)
    x = x.reshape(1, 6).astype(np_dt)
    i = grpcclient.InferInput(f"INPUT_{dt}", [1, 6], dt)
    i.set_data_from_numpy(x)
    r = client.infer("identity_all_dtypes", [i], outputs=[grpcclient.InferRequestedOutput(f"OUTPUT_{dt}")])
    out = r.as_numpy(f"OUTPUT_{dt}")
    assert out.dtype == np_dt
    np.testing.assert_array_equal(out, x)


TYPED = [
    ("BOOL", "bool_contents", [True, False, True], np.bool_),
    ("INT8", "int_contents", [-128, 0, 127], np.int8),
    ("INT16", "int_contents", [-300, 0, 300], np.int16),
    ("INT32", "int_contents", [-70000, 1, 70000], np.int32),
    ("INT64", "int64_contents", [-(2**40), 0, 2**40], np.int64),
    ("UINT8", "uint_contents", [0, 1, 255], np.uint8),
    ("UINT16", "uint_contents", [0, 1, 65535], np.uint16),
    ("UINT32", "uint_contents", [0, 1, 2**32 - 1], np.uint32),
    ("UINT64", "uint64_contents", [0, 1, 2**64 - 1], np.uint64),
    ("FP32", "fp32_contents", [0.5, -1.25, 3.0], np.float32),
    ("FP64", "fp64_contents", [0.1, -2.5, 1e300], np.float64),
]


@pytest.mark.parametrize("dt,field,values,np_dt", TYPED)
def test_typed_contents_through_raw_stub(stub, dt, field, values, np_dt):
    req = service_pb2.ModelInferRequest(model_name="identity_all_dtypes", id="typed")
    t = req.inputs.add(name=f"INPUT_{dt}", datatype=dt, shape=[1, 3])
    getattr(t.contents, field).extend(values)
    req.outputs.add(name=f"OUTPUT_{dt}")
    resp = stub.ModelInfer(req)
    assert resp.id == "typed" and resp.outputs[0].datatype == dt and list(resp.outputs[0].shape) == [1, 3]
    got = np.frombuffer(resp.raw_output_contents[0], dtype=np_dt)
    np.testing.assert_array_equal(got, np.array(values, dtype=np_dt))


def test_typed_bytes_contents_and_errors(stub):
    req = service_pb2.ModelInferRequest(model_name="simple_identity")
    t = req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    t.contents.bytes_contents.extend([b"ab", b"\x00"])
    resp = stub.ModelInfer(req)
    assert resp.raw_output_contents[0] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00\x00"
    # Element count that does not match the shape.
    req = service_pb2.ModelInferRequest(model_name="identity_all_dtypes")
    t = req.inputs.add(name="INPUT_INT32", datatype="INT32", shape=[1, 4])
    t.contents.int_contents.extend([1, 2])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected number of elements" in e.value.details()
    # FP16 has no typed field.
    req = service_pb2.ModelInferRequest(model_name="identity_all_dtypes")
    req.inputs.add(name="INPUT_FP16", datatype="FP16", shape=[1, 1])
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in e.value.details()
    # raw_input_contents must have one entry per input.
    req = service_pb2.ModelInferRequest(model_name="simple")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    req.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    req.raw_input_contents.append(bytes(64))
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in e.value.details()


def test_shapes_claiming_more_elements_than_sent_are_refused(stub):
    """Typed contents and raw contents under a shape whose element count is huge or wraps
    64 bits: INVALID_ARGUMENT, and the server serves the next request."""
    for shape in ([1, 1 << 36], [1 << 32, 1 << 32]):
        req = service_pb2.ModelInferRequest(model_name="identity_all_dtypes")
        req.inputs.add(name="INPUT_INT32", datatype="INT32", shape=shape)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, e.value.details())
        req = service_pb2.ModelInferRequest(model_name="identity_all_dtypes")
        req.inputs.add(name="INPUT_INT32", datatype="INT32", shape=shape)
        req.raw_input_contents.append(b"")
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, e.value.details())
    req = service_pb2.ModelInferRequest(model_name="identity_all_dtypes")
    t = req.inputs.add(name="INPUT_INT32", datatype="INT32", shape=[1, 2])
    t.contents.int_contents.extend([7, 8])
    req.outputs.add(name="OUTPUT_INT32")
    assert np.frombuffer(stub.ModelInfer(req).raw_output_contents[0], np.int32).tolist() == [7, 8]


def test_status_codes(client):
    a = np.zeros((1, 16), dtype=np.int32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("no_such_model", simple_inputs(a, a))
    assert status_of(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", simple_inputs(a, a), model_version="7")
    assert status_of(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model")
    assert status_of(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("no_such_model")
    assert status_of(e) == "StatusCode.NOT_FOUND"
    bad = np.zeros((1, 15), dtype=np.int32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", simple_inputs(bad, bad))
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", simple_inputs(a.astype(np.float32), a.astype(np.float32), "FP32"))
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        client.infer("simple", simple_inputs(a, a), outputs=[grpcclient.InferRequestedOutput("NOPE")])
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
    i = grpcclient.InferInput("IN", [2], "INT32")
    i.set_data_from_numpy(np.array([1, 2], dtype=np.int32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("repeat_int32", [i])
    assert status_of(e) == "StatusCode.UNIMPLEMENTED"
    assert "decoupled" in e.value.message()


def test_statistics_count_exactly(client):
    before = client.get_inference_statistics("simple").model_stats[0]
    a = np.zeros((3, 16), dtype=np.int32)
    for _ in range(4):
        client.infer("simple", simple_inputs(a, a))
    with pytest.raises(InferenceServerException):
        client.infer("simple", simple_inputs(a[:, :3], a[:, :3]))
    after = client.get_inference_statistics("simple").model_stats[0]
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 4
    s0, s1 = before.inference_stats, after.inference_stats
    assert s1.success.count - s0.success.count == 4
    assert s1.fail.count - s0.fail.count == 1
    names = {m.name for m in client.get_inference_statistics().model_stats}
    assert {"simple", "identity_fp32"} <= names
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("no_such_model")
    assert status_of(e) == "StatusCode.NOT_FOUND"


def test_repository_index(client):
    idx = client.get_model_repository_index()
    by_name = {m.name: m for m in idx.models}
    assert by_name["simple"].state == "READY" and by_name["simple"].version == "1"
    assert "repeat_int32" in by_name


def test_explicit_load_unload_and_queue_full(kiln_explicit):
    c = grpcclient.InferenceServerClient(url=kiln_explicit.grpc_url)
    assert not c.is_model_ready("identity_fp32")
    cfg = {"name": "identity_fp32", "backend": "identity", "max_batch_size": 1,
           "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
           "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
           "dynamic_batching": {"default_queue_policy": {"max_queue_size": 1}},
           "parameters": {"execute_delay_ms": {"string_value": "400"}}}
    c.load_model("identity_fp32", config=json.dumps(cfg))
    assert c.is_model_ready("identity_fp32")
    x = np.ones((1, 4), dtype=np.float32)

    def one(_):
        cl = grpcclient.InferenceServerClient(url=kiln_explicit.grpc_url)
        i = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        i.set_data_from_numpy(x)
        try:
            cl.infer("identity_fp32", [i])
            return "ok"
        except InferenceServerException as e:
            return e.status()
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, range(6)))
    # One executes, at most one waits in the queue of size 1 (none, if the instance had not
    # taken the first request off the queue when the rest arrived), the rest are rejected
    # at once.
    assert 1 <= results.count("ok") <= 2, results
    assert results.count("StatusCode.UNAVAILABLE") == 6 - results.count("ok"), results
    c.unload_model("identity_fp32")
    assert not c.is_model_ready("identity_fp32")
    with pytest.raises(InferenceServerException) as e:
        c.load_model("no_such_model")
    assert "no_such_model" in e.value.message()


def test_load_refused_without_explicit_mode(client):
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("simple")
    assert status_of(e) == "StatusCode.UNAVAILABLE"
    assert client.is_model_ready("simple")


def test_stream_with_bad_request_in_the_middle(client):
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    n = 20
    for k in range(n):
        if k == 10:
            bad = np.zeros((1, 3), dtype=np.int32)
            client.async_stream_infer("simple", simple_inputs(bad, bad), request_id="bad")
        else:
            client.async_stream_infer("simple", simple_inputs(a, a * k), request_id=str(k))
    got, errors = {}, []
    for _ in range(n):
        result, error = results.get(timeout=10)
        if error is not None:
            errors.append(str(error))
        else:
            got[result.get_response().id] = result.as_numpy("OUTPUT0")
    client.stop_stream()
    assert len(errors) == 1 and "INPUT0" in errors[0], errors
    assert len(got) == n - 1
    for k, v in got.items():
        np.testing.assert_array_equal(v, a + a * int(k))


def test_decoupled_stream(client):
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    values = np.array([7, 8, 9, 10], dtype=np.int32)
    i = grpcclient.InferInput("IN", [4], "INT32")
    i.set_data_from_numpy(values)
    client.async_stream_infer("repeat_int32", [i], request_id="rep", enable_empty_final_response=True)
    seen = []
    while True:
        result, error = results.get(timeout=10)
        assert error is None, error
        resp = result.get_response()
        assert resp.id == "rep"
        if resp.parameters["triton_final_response"].bool_param:
            assert len(resp.outputs) == 0
            break
        seen.append((int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])))
    assert seen == [(7, 0), (8, 1), (9, 2), (10, 3)]
    # Without the empty final response only the 2 data responses arrive.
    j = grpcclient.InferInput("IN", [2], "INT32")
    j.set_data_from_numpy(values[:2])
    client.async_stream_infer("repeat_int32", [j], request_id="rep2")
    for _ in range(2):
        result, error = results.get(timeout=10)
        assert error is None and not result.get_response().parameters["triton_final_response"].bool_param
    time.sleep(0.3)
    assert results.empty()
    client.stop_stream()


def test_custom_repeat_example_and_interleaved_streams(client):
    """Triton's simple_grpc_custom_repeat example (IN, DELAY and WAIT), then two requests on
    one stream: with WAIT 0 the single instance hands each request to a response thread and
    takes the next, so the second request's response overtakes the first's later one."""
    assert len(client.get_model_config("repeat_int32").config.instance_group) == 1
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))

    def send(rid, values, delays, wait):
        ins = [grpcclient.InferInput("IN", [len(values)], "INT32"),
               grpcclient.InferInput("DELAY", [len(delays)], "UINT32"),
               grpcclient.InferInput("WAIT", [1], "UINT32")]
        ins[0].set_data_from_numpy(np.array(values, np.int32))
        ins[1].set_data_from_numpy(np.array(delays, np.uint32))
        ins[2].set_data_from_numpy(np.array([wait], np.uint32))
        outs = [grpcclient.InferRequestedOutput("OUT"), grpcclient.InferRequestedOutput("IDX")]
        client.async_stream_infer("repeat_int32", ins, request_id=rid, outputs=outs)

    def take(n):
        got = []
        for _ in range(n):
            result, error = results.get(timeout=10)
            assert error is None, error
            got.append((result.get_response().id, int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0])))
        return got

    send("0", [4, 2, 0, 1], [1, 2, 3, 4], 5)
    assert take(4) == [("0", 4, 0), ("0", 2, 1), ("0", 0, 2), ("0", 1, 3)]
    send("a", [10, 11], [0, 1500], 0)
    send("b", [20], [300], 0)
    assert take(3) == [("a", 10, 0), ("b", 20, 0), ("a", 11, 1)]
    client.stop_stream()


def test_triton_grpc_error_header_ends_the_stream_with_a_status(client):
    """With the header triton_grpc_error: true, the first error ends the stream with its
    gRPC status (Triton 24.08+), instead of travelling as an error message in it."""
    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)),
                        headers={"triton_grpc_error": "true"})

    def send(values, delays):
        ins = [grpcclient.InferInput("IN", [len(values)], "INT32"),
               grpcclient.InferInput("DELAY", [len(delays)], "UINT32")]
        ins[0].set_data_from_numpy(np.array(values, np.int32))
        ins[1].set_data_from_numpy(np.array(delays, np.uint32))
        client.async_stream_infer("repeat_int32", ins)

    send([5], [0])
    result, error = results.get(timeout=10)
    assert error is None and int(result.as_numpy("OUT")[0]) == 5
    send([1, 2], [0])  # DELAY does not match IN
    result, error = results.get(timeout=10)
    assert result is None and str(error.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "expected IN and DELAY shape to match" in error.message()
    try:
        send([6], [0])
    except InferenceServerException:
        pass  # the client may already know the stream is closed
    time.sleep(0.5)
    assert results.empty()
    client.stop_stream()


def test_aio_client_and_stream(kiln):
    async def main():
        c = aioclient.InferenceServerClient(url=kiln.grpc_url)
        assert await c.is_server_ready()
        a = np.ones((1, 16), dtype=np.int32)
        ins = [aioclient.InferInput("INPUT0", [1, 16], "INT32"), aioclient.InferInput("INPUT1", [1, 16], "INT32")]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(a * 2)
        r = await c.infer("simple", ins)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a * 3)

        async def requests():
            for k in range(3):
                i = aioclient.InferInput("IN", [k + 1], "INT32")
                i.set_data_from_numpy(np.arange(k + 1, dtype=np.int32))
                yield {"model_name": "repeat_int32", "inputs": [i], "request_id": f"s{k}"}
        count = {}
        async for result, error in c.stream_infer(requests()):
            assert error is None, error
            rid = result.get_response().id
            count[rid] = count.get(rid, 0) + 1
        await c.close()
        return count
    assert asyncio.run(main()) == {"s0": 1, "s1": 2, "s2": 3}


def test_large_tensor_64mib(kiln):
    opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
    ch = grpc.insecure_channel(kiln.grpc_url, options=opts)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    x = np.random.default_rng(1).random(16 * 1024 * 1024, dtype=np.float32).reshape(1, -1)  # 64 MiB
    req = service_pb2.ModelInferRequest(model_name="identity_fp32")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    resp = stub.ModelInfer(req)
    assert resp.raw_output_contents[0] == x.tobytes()
    ch.close()
    # tritonclient itself (its channel allows INT32_MAX messages) works too.
    c = grpcclient.InferenceServerClient(url=kiln.grpc_url)
    i = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("identity_fp32", [i]).as_numpy("OUTPUT0"), x)


@pytest.mark.parametrize("algo", ["gzip", "deflate"])
def test_compressed_requests(client, algo):
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    r = client.infer("simple", simple_inputs(a, a), compression_algorithm=algo)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a * 2)


def test_keepalive_client(kiln):
    ka = grpcclient.KeepAliveOptions(keepalive_time_ms=1000, keepalive_timeout_ms=500,
                                     keepalive_permit_without_calls=True, http2_max_pings_without_data=0)
    c = grpcclient.InferenceServerClient(url=kiln.grpc_url, keepalive_options=ka)
    assert c.is_server_live()
    time.sleep(2.5)
    assert c.is_server_ready()


def test_settings_and_shared_memory(client):
    log = client.get_log_settings(as_json=True)["settings"]
    assert log["log_info"]["bool_param"] is True
    trace = client.get_trace_settings(as_json=True)["settings"]
    assert trace["trace_level"]["value"] == ["OFF"]
    client.unregister_system_shared_memory()
    assert len(client.get_system_shared_memory_status().regions) == 0
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory("r", "/kiln_no_such_object", 64)
    assert "Unable to open shared memory region" in str(e.value)
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status("r")
    assert status_of(e) == "StatusCode.NOT_FOUND"
    assert len(client.get_cuda_shared_memory_status().regions) == 0


def test_log_settings_update(client):
    before = client.get_log_settings(as_json=True)["settings"]
    try:
        got = client.update_log_settings({"log_verbose_level": 2}, as_json=True)["settings"]
        assert got["log_verbose_level"]["uint32_param"] == 2
        assert got["log_info"]["bool_param"] is True
        with pytest.raises(InferenceServerException) as e:
            client.update_log_settings({"log_file": "x.log"})
        assert status_of(e) == "StatusCode.UNIMPLEMENTED"
    finally:
        client.update_log_settings({"log_verbose_level": 0})
    assert client.get_log_settings(as_json=True)["settings"] == before


def test_system_shared_memory_mixed_with_raw_tensors(client):
    """INPUT0 and OUTPUT0 in shared memory, INPUT1 and OUTPUT1 in the message: the raw
    contents then hold only the tensors not in shared memory (as tritonclient sends them)."""
    client.unregister_system_shared_memory()
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, dtype=np.int32)
    n = a.nbytes
    key_in, key_out = f"/kiln_gin_{os.getpid()}", f"/kiln_gout_{os.getpid()}"
    inp = shm.create_shared_memory_region("gin", key_in, n)
    out = shm.create_shared_memory_region("gout", key_out, n)
    try:
        shm.set_shared_memory_region(inp, [a])
        client.register_system_shared_memory("in", key_in, n)
        client.register_system_shared_memory("out", key_out, n)
        with pytest.raises(InferenceServerException) as e:
            client.register_system_shared_memory("in", key_in, n)
        assert status_of(e) == "StatusCode.ALREADY_EXISTS"
        st = client.get_system_shared_memory_status("in").regions["in"]
        assert (st.key, st.offset, st.byte_size) == (key_in, 0, n)
        i0 = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        i0.set_shared_memory("in", n)
        i1 = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
        i1.set_data_from_numpy(b)
        o0 = grpcclient.InferRequestedOutput("OUTPUT0")
        o0.set_shared_memory("out", n)
        o1 = grpcclient.InferRequestedOutput("OUTPUT1")
        r = client.infer("simple", [i0, i1], outputs=[o0, o1])
        assert (r.as_numpy("OUTPUT1") == a - b).all()
        assert list(r.get_output("OUTPUT0").shape) == [1, 16]
        assert (shm.get_contents_as_numpy(out, np.int32, [1, 16]) == a + b).all()
        o0.set_shared_memory("out", n, offset=4)
        with pytest.raises(InferenceServerException) as e:
            client.infer("simple", [i0, i1], outputs=[o0, o1])
        assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
        assert "Invalid offset + byte size" in str(e.value)
        client.unregister_system_shared_memory("in")
        assert list(client.get_system_shared_memory_status().regions) == ["out"]
    finally:
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(inp)
        shm.destroy_shared_memory_region(out)


def test_grpc_health_service(kiln):
    """grpc.health.v1.Health/Check answers SERVING (status = 1, encoded as bytes 08 01)."""
    ch = grpc.insecure_channel(kiln.grpc_url)
    check = ch.unary_unary("/grpc.health.v1.Health/Check",
                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
    assert check(b"") == b"\x08\x01"
    ch.close()


def test_sigterm_finishes_in_flight_grpc_requests():
    from conftest import Kiln
    k = Kiln("--model-control-mode", "explicit")
    try:
        c = grpcclient.InferenceServerClient(url=k.grpc_url)
        cfg = {"name": "identity_fp32", "backend": "identity", "max_batch_size": 1,
               "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
               "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
               "parameters": {"execute_delay_ms": {"string_value": "500"}}}
        c.load_model("identity_fp32", config=json.dumps(cfg))
        x = np.full((1, 3), 2.5, dtype=np.float32)
        i = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
        i.set_data_from_numpy(x)
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(c.infer, "identity_fp32", [i])
            time.sleep(0.2)
            k.proc.terminate()
            np.testing.assert_array_equal(fut.result(timeout=20).as_numpy("OUTPUT0"), x)
        assert k.proc.wait(timeout=30) == 0
    finally:
        k.stop()
