"""Prometheus metrics on --metrics-port, read with the reference text-format parser."""
import concurrent.futures
import json

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException


def scrape(url):
    r = requests.get(url, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    types = {}
    for fam in text_string_to_metric_families(r.text):
        types[fam.name] = fam.type
        for s in fam.samples:
            # The parser reports counter samples as <family>_total; key by family name.
            out[(fam.name, tuple(sorted(s.labels.items())))] = s.value
    return out, types


def value(m, name, model, reason=None, version="1"):
    labels = {"model": model, "version": version}
    if reason:
        labels["reason"] = reason
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def simple_inputs(mod, a):
    ins = [mod.InferInput("INPUT0", list(a.shape), "INT32"), mod.InferInput("INPUT1", list(a.shape), "INT32")]
    for i in ins:
        i.set_data_from_numpy(a)
    return ins


def test_triton_names_types_and_host_gauges(kiln):
    m, types = scrape(kiln.metrics_url)
    for name in ["nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
                 "nv_inference_compute_output_duration_us"]:
        assert types.get(name) == "counter", (name, types.get(name))
        assert (name, (("model", "simple"), ("version", "1"))) in m or name == "nv_inference_request_failure"
    assert types["nv_inference_pending_request_count"] == "gauge"
    for reason in ["REJECTED", "CANCELED", "BACKEND", "OTHER"]:
        assert (("nv_inference_request_failure",
                 (("model", "simple"), ("reason", reason), ("version", "1"))) in m)
    # Each ready version's load time; the pinned pool gauges are there (0: Kiln keeps no
    # pinned pool, as Triton on a host without a GPU).
    assert types["nv_model_load_duration_secs"] == "gauge"
    assert 0.0 < value(m, "nv_model_load_duration_secs", "simple") < 60.0
    assert m[("nv_pinned_memory_pool_total_bytes", ())] == m[("nv_pinned_memory_pool_used_bytes", ())] == 0.0
    assert 0.0 <= m[("nv_cpu_utilization", ())] <= 1.0
    assert m[("nv_cpu_memory_total_bytes", ())] >= m[("nv_cpu_memory_used_bytes", ())] > 0
    r = requests.get(kiln.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert r.status_code == 404


def test_counters_move_by_exactly_what_was_sent(kiln):
    before, _ = scrape(kiln.metrics_url)
    h = httpclient.InferenceServerClient(url=kiln.url)
    g = grpcclient.InferenceServerClient(url=kiln.grpc_url)
    a3 = np.ones((3, 16), dtype=np.int32)
    for _ in range(2):
        h.infer("simple", simple_inputs(httpclient, a3))
    g.infer("simple", simple_inputs(grpcclient, np.ones((1, 16), dtype=np.int32)))
    bad = np.ones((1, 4), dtype=np.int32)
    with pytest.raises(InferenceServerException):
        h.infer("simple", simple_inputs(httpclient, bad))
    with pytest.raises(InferenceServerException):
        g.infer("simple", simple_inputs(grpcclient, bad))
    after, _ = scrape(kiln.metrics_url)

    def d(name, reason=None):
        return value(after, name, "simple", reason) - value(before, name, "simple", reason)
    assert d("nv_inference_request_success") == 3
    assert d("nv_inference_count") == 7
    assert d("nv_inference_exec_count") == 3
    assert d("nv_inference_request_failure", "OTHER") == 2
    assert d("nv_inference_request_failure", "REJECTED") == 0
    assert d("nv_inference_request_duration_us") >= d("nv_inference_compute_infer_duration_us") > 0
    # The metrics agree with the statistics extension.
    stats = h.get_inference_statistics("simple")["model_stats"][0]
    assert value(after, "nv_inference_request_success", "simple") == stats["inference_stats"]["success"]["count"]
    assert value(after, "nv_inference_count", "simple") == stats["inference_count"]


def test_rejected_requests_count_as_failures_not_successes(kiln_explicit):
    h = httpclient.InferenceServerClient(url=kiln_explicit.url)
    cfg = {"name": "identity_fp32", "backend": "identity", "max_batch_size": 1,
           "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
           "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
           "dynamic_batching": {"default_queue_policy": {"max_queue_size": 1}},
           "parameters": {"execute_delay_ms": {"string_value": "300"}}}
    h.load_model("identity_fp32", config=json.dumps(cfg))
    before, _ = scrape(kiln_explicit.metrics_url)

    def one(_):
        c = httpclient.InferenceServerClient(url=kiln_explicit.url)
        i = httpclient.InferInput("INPUT0", [1, 2], "FP32")
        i.set_data_from_numpy(np.ones((1, 2), dtype=np.float32))
        try:
            c.infer("identity_fp32", [i])
            return "ok"
        except InferenceServerException as e:
            return e.status()
    with concurrent.futures.ThreadPoolExecutor(5) as ex:
        results = list(ex.map(one, range(5)))
    after, _ = scrape(kiln_explicit.metrics_url)
    h.unload_model("identity_fp32")
    ok, rejected = results.count("ok"), results.count("503")
    assert ok + rejected == 5 and rejected >= 1, results

    def d(name, reason=None):
        return value(after, name, "identity_fp32", reason) - value(before, name, "identity_fp32", reason)
    assert d("nv_inference_request_success") == ok
    assert d("nv_inference_request_failure", "REJECTED") == rejected


def test_first_response_histogram_is_opt_in(kiln):
    _, types = scrape(kiln.metrics_url)
    assert "nv_inference_first_response_histogram_ms" not in types
    from conftest import Kiln
    k = Kiln("--metrics-config", "histogram_latencies=true")
    try:
        h = httpclient.InferenceServerClient(url=k.url)
        for _ in range(3):
            h.infer("simple", simple_inputs(httpclient, np.ones((1, 16), dtype=np.int32)))
        text = requests.get(k.metrics_url, timeout=10).text
        fam = next(f for f in text_string_to_metric_families(text)
                   if f.name == "nv_inference_first_response_histogram_ms")
        assert fam.type == "histogram"
        s = {(x.name, x.labels.get("le")): x.value for x in fam.samples if x.labels.get("model") == "simple"}
        assert s[("nv_inference_first_response_histogram_ms_count", None)] == 3
        assert s[("nv_inference_first_response_histogram_ms_bucket", "+Inf")] == 3
        # Cumulative buckets at Triton's default bounds; requests this fast land in the first.
        assert s[("nv_inference_first_response_histogram_ms_bucket", "100")] == 3
        assert 0 < s[("nv_inference_first_response_histogram_ms_sum", None)] < 300
    finally:
        k.stop()


def test_latency_summaries_and_counters_follow_metrics_config(kiln):
    _, types = scrape(kiln.metrics_url)
    assert "nv_inference_request_summary_us" not in types
    assert types["nv_inference_request_duration_us"] == "counter"
    from conftest import Kiln
    k = Kiln("--metrics-config", "summary_latencies=true", "--metrics-config", "counter_latencies=false",
             "--metrics-config", "summary_quantiles=0.5:0.05,0.99:0.001")
    try:
        h = httpclient.InferenceServerClient(url=k.url)
        for _ in range(5):
            h.infer("simple", simple_inputs(httpclient, np.ones((1, 16), dtype=np.int32)))
        text = requests.get(k.metrics_url, timeout=10).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert "nv_inference_request_duration_us" not in fams
        assert "nv_inference_count" in fams, "the other counters stay"
        for name in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
            fam = fams[f"nv_inference_{name}_summary_us"]
            assert fam.type == "summary"
            s = {(x.name, x.labels.get("quantile")): x.value for x in fam.samples if x.labels.get("model") == "simple"}
            assert s[(f"nv_inference_{name}_summary_us_count", None)] == 5
            assert set(q for _, q in s if q) == {"0.5", "0.99"}
            assert s[(f"nv_inference_{name}_summary_us", "0.5")] <= s[(f"nv_inference_{name}_summary_us", "0.99")]
        req = {x.labels.get("quantile"): x.value for x in fams["nv_inference_request_summary_us"].samples
               if x.labels.get("model") == "simple"}
        total = next(x.value for x in fams["nv_inference_request_summary_us"].samples
                     if x.labels.get("model") == "simple" and x.name.endswith("_sum"))
        # The median request is at most the total of the five, and more than nothing.
        assert 0 < req["0.5"] <= total
    finally:
        k.stop()
