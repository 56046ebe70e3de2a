"""Triton's generate extension (`/generate`, `/generate_stream`), driven with plain HTTP as
LLM clients and Triton's own generate_endpoint_test do."""
import json

import pytest
import requests

from conftest import Kiln


@pytest.fixture(scope="module")
def kiln():
    k = Kiln()
    yield k
    k.stop()


def url(kiln, model, route):
    return f"http://{kiln.url}/v2/models/{model}/{route}"


def post(kiln, model, route, body, **kw):
    data = body if isinstance(body, str) else json.dumps(body)
    headers = {"Accept": "text/event-stream"} if route == "generate_stream" else {}
    return requests.post(url(kiln, model, route), data=data, headers=headers, timeout=60, **kw)


def events(r):
    """The JSON objects of a server-sent event body; every chunk must be `data: ...\\n\\n`."""
    assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    body = r.content.decode()
    assert body == "" or body.endswith("\n\n"), body
    out = []
    for chunk in filter(None, body.split("\n\n")):
        assert chunk.startswith("data: "), chunk
        out.append(json.loads(chunk[len("data: "):]))
    return out


def expect_error(r, status, message):
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert message in r.json()["error"], r.json()


def test_generate_text_in_text_out(kiln):
    r = post(kiln, "simple_identity", "generate", {"INPUT0": "hello world", "id": "q7"})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/json"
    # The identity backend's response parameters are members too, as in Triton.
    assert r.json() == {"model_name": "simple_identity", "model_version": "1", "id": "q7",
                        "OUTPUT0": "hello world", "param0": "an example string parameter",
                        "param1": 42, "param2": False}
    # A list fills the variable dimension; several elements stay a list.
    r = post(kiln, "simple_identity", "generate", {"INPUT0": ["a", "b", "c"]})
    assert r.json()["OUTPUT0"] == ["a", "b", "c"]


def test_generate_numbers_are_shaped_to_the_inputs_dims(kiln):
    a, b = list(range(16)), [3] * 16
    r = post(kiln, "simple", "generate", {"INPUT0": a, "INPUT1": b})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["OUTPUT0"] == [x + 3 for x in a]
    assert out["OUTPUT1"] == [x - 3 for x in a]
    # The same inputs may come inside "parameters".
    r = post(kiln, "simple", "generate", {"INPUT0": a, "parameters": {"INPUT1": b, "temperature": 0.1}})
    assert r.json()["OUTPUT0"] == [x + 3 for x in a]
    expect_error(post(kiln, "simple", "generate", {"INPUT0": a[:5], "INPUT1": b}), 400,
                 "The schema can not convert input 'INPUT0' to tensor with proper shape")


def test_generate_stream_sends_one_event_per_response(kiln):
    r = post(kiln, "repeat_int32", "generate_stream", {"IN": [4, 5, 6], "DELAY": [0, 20, 20]})
    assert r.status_code == 200, r.text
    got = events(r)
    assert [(e["OUT"], e["IDX"]) for e in got] == [(4, 0), (5, 1), (6, 2)]
    assert all(e["model_name"] == "repeat_int32" and e["model_version"] == "1" for e in got)
    # A model that is not decoupled answers with one event.
    r = post(kiln, "simple_identity", "generate_stream", {"INPUT0": "x"})
    assert [e["OUTPUT0"] for e in events(r)] == ["x"]


def test_generate_needs_exactly_one_response(kiln):
    r = post(kiln, "repeat_int32", "generate", {"IN": [9]})
    assert r.status_code == 200, r.text
    assert r.json()["OUT"] == 9
    for n in (0, 2):
        expect_error(post(kiln, "repeat_int32", "generate", {"IN": list(range(n))}), 500,
                     "generate expects model to produce exactly 1 response")
    # Zero responses are a valid, empty stream.
    r = post(kiln, "repeat_int32", "generate_stream", {"IN": []})
    assert r.status_code == 200 and events(r) == []


def test_model_errors_on_the_stream(kiln):
    # The backend fails the request as its first response: the status tells, the body is
    # still one event.
    r = post(kiln, "repeat_int32", "generate_stream", {"IN": [1, 2], "DELAY": [1]})
    assert r.status_code == 400
    assert [e.keys() for e in events(r)] == [{"error"}]
    assert "expected IN and DELAY shape to match, got [2] and [1]" in events(r)[0]["error"]
    expect_error(post(kiln, "repeat_int32", "generate", {"IN": [1, 2], "DELAY": [1]}), 400,
                 "expected IN and DELAY shape to match")


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_request_errors_are_json(kiln, route):
    a = list(range(16))
    cases = [
        ({}, "expected 2 inputs but got 0"),
        ({"abc": 123}, "expected 2 inputs but got 0"),
        ({"INPUT0": a, "other": "param"}, "expected 2 inputs but got 1"),
        ({"INPUT0": ["x"] * 16, "INPUT1": a}, "attempt to access JSON non-signed-integer as signed-integer"),
        ({"INPUT0": a, "INPUT1": a, "P": {"x": 1}}, "parameter 'P' has invalid type"),
        ({"INPUT0": a, "INPUT1": a, "parameters": 1}, "Expected JSON object for keyword: 'parameters'"),
        ({"INPUT0": a, "INPUT1": a, "parameters": {"nested": {"twice": 1}}},
         "Converting keyword: 'parameters': parameter 'nested' has invalid type."),
        ('{"INPUT0": %s, "INPUT1": %s, "INPUT0": %s}' % (a, a, a), "input 'INPUT0' already exists in request"),
        ("not json", "failed to parse the request JSON"),
    ]
    for body, message in cases:
        expect_error(post(kiln, "simple", route, body), 400, message)
    # Inputs are read in document order: the first bad one is reported.
    expect_error(post(kiln, "identity_all_dtypes", route, {"INPUT_STRING": 1, "INPUT_BOOL": 2}), 400,
                 "non-string as string")
    expect_error(post(kiln, "identity_all_dtypes", route, {"INPUT_BOOL": 2, "INPUT_STRING": 1}), 400,
                 "non-boolean as boolean")
    expect_error(post(kiln, "no_such_model", route, {"x": 1}), 404, "no_such_model")
    r = requests.get(url(kiln, "simple", route), timeout=10)
    assert r.status_code == 405


def test_closing_the_stream_early_leaves_the_server_serving(kiln):
    r = post(kiln, "repeat_int32", "generate_stream", {"IN": [1, 2, 3], "DELAY": [0, 3000, 3000]},
             stream=True)
    first = next(r.iter_lines())
    assert first.startswith(b"data: ") and json.loads(first[6:])["OUT"] == 1
    r.close()
    assert requests.get(f"http://{kiln.url}/v2/health/live", timeout=10).status_code == 200
    r = post(kiln, "simple_identity", "generate", {"INPUT0": "still here"})
    assert r.json()["OUTPUT0"] == "still here"
