"""Dynamic batcher queue policy end to end: priorities and request timeouts."""
import json
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CFG = {"name": "identity_fp32", "backend": "identity", "max_batch_size": 1,
       "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
       "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
       "instance_group": [{"kind": "KIND_CPU", "count": 1}],
       "dynamic_batching": {"priority_levels": 2, "default_priority_level": 2,
                            "default_queue_policy": {"allow_timeout_override": True}},
       "parameters": {"execute_delay_ms": {"string_value": "300"}}}


@pytest.fixture
def slow_model(kiln_explicit):
    c = httpclient.InferenceServerClient(url=kiln_explicit.url)
    c.load_model("identity_fp32", config=json.dumps(CFG))
    yield kiln_explicit
    c.unload_model("identity_fp32")


def call(url, tag, done, **kw):
    c = httpclient.InferenceServerClient(url=url)
    i = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    i.set_data_from_numpy(np.array([[tag]], dtype=np.float32))
    try:
        r = c.infer("identity_fp32", [i], **kw)
        done.append((tag, float(r.as_numpy("OUTPUT0")[0, 0])))
    except InferenceServerException as e:
        done.append((tag, e))


def test_higher_priority_runs_first(slow_model):
    done = []
    busy = threading.Thread(target=call, args=(slow_model.url, 0, done))
    busy.start()
    time.sleep(0.1)  # the instance is now executing request 0 for 300 ms
    low = threading.Thread(target=call, args=(slow_model.url, 2, done), kwargs={"priority": 2})
    low.start()
    time.sleep(0.05)
    high = threading.Thread(target=call, args=(slow_model.url, 1, done), kwargs={"priority": 1})
    high.start()
    for t in (busy, low, high):
        t.join()
    assert [tag for tag, _ in done] == [0, 1, 2], done


def test_request_timeout_rejects_with_unavailable(slow_model):
    done = []
    busy = threading.Thread(target=call, args=(slow_model.url, 0, done))
    busy.start()
    time.sleep(0.1)
    call(slow_model.url, 1, done, timeout=20_000)  # 20 ms in the queue at most
    busy.join()
    by_tag = dict(done)
    assert by_tag[0] == 0.0
    e = by_tag[1]
    assert isinstance(e, InferenceServerException) and e.status() == "503" and "timeout" in e.message()
    stats = httpclient.InferenceServerClient(url=slow_model.url).get_inference_statistics("identity_fp32")
    assert stats["model_stats"][0]["inference_stats"]["fail"]["count"] >= 1
