"""Triton's response cache with the real tritonclient: `--cache-config local,size=N` on the
server and `response_cache { enable: true }` in a model's config. A repeated request is
answered without running the model (statistics: a success and a cache hit, but no new
inference or execution), and the per-model cache counters appear in /metrics."""
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import REPO, Kiln, refused_start

SIMPLE = open(os.path.join(REPO, "simple", "config.pbtxt")).read()


@pytest.fixture(scope="module")
def repo():
    d = tempfile.mkdtemp()
    for name, cached in (("cached", True), ("uncached", False)):
        os.makedirs(os.path.join(d, name, "1"))
        shutil.copy(os.path.join(REPO, "simple", "1", "model.onnx"), os.path.join(d, name, "1"))
        text = SIMPLE.replace('name: "simple"', f'name: "{name}"')
        if cached:
            text += "response_cache { enable: true }\n"
        with open(os.path.join(d, name, "config.pbtxt"), "w") as f:
            f.write(text)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def served(repo):
    k = Kiln("--cache-config", "local,size=1048576", repo=repo)
    yield k
    k.stop()


def infer(c, module, model, a, b, outputs=None):
    ins = []
    for n, v in (("INPUT0", a), ("INPUT1", b)):
        i = module.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.full((1, 16), v, np.int32))
        ins.append(i)
    wanted = None if outputs is None else [module.InferRequestedOutput(o) for o in outputs]
    return c.infer(model, ins, outputs=wanted)


def stats(c, model):
    """(executions, successes, cache hits, cache misses) once they have settled: a request's
    success is counted when its execution has returned, which may be just after the client
    has its response."""
    def read():
        s = c.get_inference_statistics(model)["model_stats"][0]
        i = s["inference_stats"]
        return (int(s["execution_count"]), int(i["success"]["count"]), int(i["cache_hit"]["count"]),
                int(i["cache_miss"]["count"]))
    last = read()
    for _ in range(40):
        time.sleep(0.05)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_a_repeated_request_is_answered_from_the_cache(served):
    c = httpclient.InferenceServerClient(url=served.url)
    g = grpcclient.InferenceServerClient(url=served.grpc_url)
    first = infer(c, httpclient, "cached", 3, 1)
    assert stats(c, "cached") == (1, 1, 0, 1)
    again = infer(c, httpclient, "cached", 3, 1)
    np.testing.assert_array_equal(again.as_numpy("OUTPUT0"), first.as_numpy("OUTPUT0"))
    np.testing.assert_array_equal(again.as_numpy("OUTPUT1"), np.full((1, 16), 2))
    # gRPC hits the same entry.
    r = infer(g, grpcclient, "cached", 3, 1)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), np.full((1, 16), 4))
    assert stats(c, "cached") == (1, 3, 2, 1)
    # Other inputs miss; asking for one output is its own entry and returns only it.
    r = infer(c, httpclient, "cached", 5, 1)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), np.full((1, 16), 6))
    r = infer(c, httpclient, "cached", 3, 1, outputs=["OUTPUT1"])
    assert r.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), np.full((1, 16), 2))
    assert stats(c, "cached") == (3, 5, 2, 3)
    s = c.get_inference_statistics("cached")["model_stats"][0]
    assert int(s["inference_count"]) == 3
    assert int(s["inference_stats"]["cache_hit"]["ns"]) > 0


def test_a_model_that_does_not_enable_the_cache_always_runs(served):
    c = httpclient.InferenceServerClient(url=served.url)
    for _ in range(2):
        infer(c, httpclient, "uncached", 3, 1)
    assert stats(c, "uncached") == (2, 2, 0, 0)


def test_cache_counters_in_metrics(served):
    c = httpclient.InferenceServerClient(url=served.url)
    infer(c, httpclient, "cached", 7, 7)
    infer(c, httpclient, "cached", 7, 7)
    text = requests.get(served.metrics_url).text
    lines = {l.split(" ")[0]: float(l.split(" ")[1]) for l in text.splitlines() if l and not l.startswith("#")}
    hits = lines['nv_cache_num_hits_per_model{model="cached",version="1"}']
    misses = lines['nv_cache_num_misses_per_model{model="cached",version="1"}']
    _, _, want_hits, want_misses = stats(c, "cached")
    assert (hits, misses) == (want_hits, want_misses) and hits >= 1
    assert 'nv_cache_hit_duration_per_model{model="cached",version="1"}' in lines
    assert not any('model="uncached"' in k for k in lines if k.startswith("nv_cache_"))


def test_without_a_server_cache_the_model_config_alone_caches_nothing(repo):
    k = Kiln(repo=repo)
    try:
        c = httpclient.InferenceServerClient(url=k.url)
        for _ in range(2):
            infer(c, httpclient, "cached", 3, 1)
        assert stats(c, "cached") == (2, 2, 0, 0)
        assert "nv_cache_num_hits_per_model" not in requests.get(k.metrics_url).text
    finally:
        k.stop()


def test_an_unknown_cache_stops_the_server_with_a_reason(repo):
    assert "cache 'redis' is not available" in refused_start("--cache-config", "redis,host=x", repo=repo)
