"""Triton's request tracing with the real tritonclient: `--trace-config` at start, the trace
extension (`update_trace_settings`/`get_trace_settings`, server-wide and per model, over
HTTP and gRPC), and the JSON trace file in Triton's format."""
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln

ORDER = ["REQUEST_START", "QUEUE_START", "COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START",
         "COMPUTE_END", "REQUEST_END"]


def infer(c, module):
    ins = []
    for n in ("INPUT0", "INPUT1"):
        i = module.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
        ins.append(i)
    return c.infer("simple", ins, request_id="r-1")


def traces(path):
    """The trace file as {id: (head, {stamp: ns})}; a trace is written once the request is
    released, which may be just after the client has its response."""
    deadline = time.time() + 10
    while True:
        try:
            objects = json.load(open(path))
            break
        except (OSError, ValueError):
            if time.time() > deadline:
                raise
            time.sleep(0.02)
    out = {}
    for obj in objects:
        head, stamps = out.setdefault(obj["id"], ({}, {}))
        if "model_name" in obj:
            head.update(obj)
        for t in obj.get("timestamps", []):
            stamps[t["name"]] = t["ns"]
    return out


@pytest.fixture()
def tmp():
    d = tempfile.mkdtemp()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_tracing_is_off_by_default_and_listed_as_an_extension():
    k = Kiln()
    try:
        c = httpclient.InferenceServerClient(url=k.url)
        s = c.get_trace_settings()
        assert s["trace_level"] == ["OFF"] and s["trace_rate"] == "1000" and s["trace_count"] == "-1"
        assert {"trace", "sequence", "logging"} <= set(c.get_server_metadata()["extensions"])
    finally:
        k.stop()


def test_timestamps_are_written_every_log_frequency_traces(tmp):
    path = os.path.join(tmp, "trace.json")
    k = Kiln("--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1",
             "--trace-config", f"triton,file={path}", "--trace-config", "triton,log-frequency=2")
    try:
        h = httpclient.InferenceServerClient(url=k.url)
        g = grpcclient.InferenceServerClient(url=k.grpc_url)
        infer(h, httpclient)
        assert not os.path.exists(path + ".0"), "one trace is below the log frequency"
        infer(g, grpcclient)
        got = traces(path + ".0")
        assert len(got) == 2
        (h_head, h_stamps), (g_head, g_stamps) = [got[i] for i in sorted(got)]
        for head, stamps in ((h_head, h_stamps), (g_head, g_stamps)):
            assert head["model_name"] == "simple" and head["model_version"] == 1
            assert head["request_id"] == "r-1"
            ns = [stamps[n] for n in ORDER]
            assert ns == sorted(ns), stamps
            assert stamps["INFER_RESPONSE_COMPLETE"] >= stamps["COMPUTE_START"]
        assert h_stamps["HTTP_RECV_START"] <= h_stamps["HTTP_RECV_END"] <= h_stamps["REQUEST_START"]
        # The response may leave before the request is released (as in Triton).
        assert h_stamps["INFER_RESPONSE_COMPLETE"] <= h_stamps["HTTP_SEND_START"] <= h_stamps["HTTP_SEND_END"]
        assert g_stamps["GRPC_WAITREAD_END"] <= g_stamps["REQUEST_START"]
        assert g_stamps["INFER_RESPONSE_COMPLETE"] <= g_stamps["GRPC_SEND_START"] <= g_stamps["GRPC_SEND_END"]
    finally:
        k.stop()


def test_settings_per_model_over_grpc_and_http(tmp):
    path = os.path.join(tmp, "trace.json")
    k = Kiln("--trace-config", "level=TIMESTAMPS", "--trace-config", "rate=1",
             "--trace-config", f"triton,file={path}")
    try:
        g = grpcclient.InferenceServerClient(url=k.grpc_url)
        h = httpclient.InferenceServerClient(url=k.url)
        s = g.update_trace_settings(model_name="simple", settings={"trace_rate": "3"}, as_json=True)["settings"]
        assert s["trace_rate"]["value"] == ["3"]
        assert s["trace_level"]["value"] == ["TIMESTAMPS"], "copied from the server's settings"
        assert h.get_trace_settings(model_name="simple")["trace_rate"] == "3"
        assert h.get_trace_settings()["trace_rate"] == "1"
        # A null restores the server's value; no settings drop the model's own.
        assert h.update_trace_settings(model_name="simple", settings={"trace_rate": None})["trace_rate"] == "1"
        h.update_trace_settings(model_name="simple", settings={"trace_count": "1"})
        for _ in range(3):
            infer(h, httpclient)
        assert h.get_trace_settings(model_name="simple")["trace_count"] == "0"
        h.update_trace_settings(model_name="simple", settings={})
        assert h.get_trace_settings(model_name="simple")["trace_count"] == "-1"
        with pytest.raises(InferenceServerException) as e:
            h.update_trace_settings(settings={"trace_level": ["LOUD"]})
        assert "unsupported trace level" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            g.update_trace_settings(settings={"trace_rate": "often"})
        assert "trace_rate" in str(e.value)
        with pytest.raises(InferenceServerException):
            h.update_trace_settings(model_name="no_such_model", settings={"trace_rate": "2"})
        off = h.update_trace_settings(settings={"trace_level": ["OFF"]})
        assert off["trace_level"] == ["OFF"]
        infer(h, httpclient)
    finally:
        k.stop()
    # Written at shutdown (log_frequency 0): only the one trace the model's count allowed.
    got = traces(path)
    assert len(got) == 1, got


def test_tensors_level_records_inputs_and_outputs(tmp):
    path = os.path.join(tmp, "trace.json")
    k = Kiln("--trace-config", "level=TENSORS", "--trace-config", "rate=1",
             "--trace-config", f"triton,file={path}", "--trace-config", "triton,log-frequency=1")
    try:
        infer(httpclient.InferenceServerClient(url=k.url), httpclient)
        deadline = time.time() + 10
        while not os.path.exists(path + ".0"):
            assert time.time() < deadline, "no trace written"
            time.sleep(0.02)
        traces(path + ".0")  # waits for a whole file
        objects = json.load(open(path + ".0"))
        tensors = {(o["activity"], o["tensor"]["name"]): o["tensor"] for o in objects if "activity" in o}
        assert not any("timestamps" in o for o in objects), "TIMESTAMPS is not among the levels"
        x = tensors[("TENSOR_QUEUE_INPUT", "INPUT0")]
        assert (x["dtype"], x["shape"]) == ("INT32", "1,16")
        assert x["data"] == ",".join(str(i) for i in range(16))
        out = tensors[("TENSOR_BACKEND_OUTPUT", "OUTPUT0")]
        assert out["data"] == ",".join(str(2 * i) for i in range(16))
    finally:
        k.stop()


def test_a_bad_trace_config_stops_the_server(tmp):
    from conftest import refused_start
    assert "unsupported trace level" in refused_start("--trace-config", "level=LOUD")
