"""The rate limiter (`--rate-limit=execution_count`): model instances run only while the
resources their `rate_limiter` asks for are free, across models."""
import json
import os
import shutil
import tempfile
import threading

import pytest
import requests

from conftest import Kiln

REPEAT = """
name: "{name}"
backend: "repeat"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "IN" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "DELAY" data_type: TYPE_UINT32 dims: [ -1 ] optional: true }},
  {{ name: "WAIT" data_type: TYPE_UINT32 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "OUT" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "IDX" data_type: TYPE_UINT32 dims: [ 1 ] }}
]
instance_group [ {{ count: 1 kind: KIND_CPU
  rate_limiter {{ resources [ {{ name: "R" count: {count} }} ] priority: 1 }} }} ]
"""


@pytest.fixture(scope="module")
def repo():
    d = tempfile.mkdtemp()
    for name, count in [("limited_a", 1), ("limited_b", 1), ("greedy", 2)]:
        os.makedirs(os.path.join(d, name, "1"))
        with open(os.path.join(d, name, "config.pbtxt"), "w") as f:
            f.write(REPEAT.format(name=name, count=count))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def stream(kiln, model, log, lock):
    """Runs one generate_stream request, appending (model, OUT) to `log` per event. Its
    execution (WAIT) lasts past its last response."""
    r = requests.post(f"http://{kiln.url}/v2/models/{model}/generate_stream",
                      data=json.dumps({"IN": [1, 2, 3], "DELAY": [150, 150, 150], "WAIT": 650}),
                      stream=True, timeout=60)
    for line in r.iter_lines():
        if line.startswith(b"data: "):
            with lock:
                log.append((model, json.loads(line[6:])["OUT"]))


def run_both(kiln):
    log, lock = [], threading.Lock()
    threads = [threading.Thread(target=stream, args=(kiln, m, log, lock))
               for m in ("limited_a", "limited_b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return log


def test_one_copy_of_a_resource_runs_one_instance_at_a_time(repo):
    kiln = Kiln("--rate-limit=execution_count", "--rate-limit-resource=R:1", "--strict-readiness=false",
                repo=repo)
    try:
        log = run_both(kiln)
        assert len(log) == 6
        # Each model's execution holds R until it returns, so one model's three responses
        # all come before the other's first.
        models = [m for m, _ in log]
        assert models in (["limited_a"] * 3 + ["limited_b"] * 3, ["limited_b"] * 3 + ["limited_a"] * 3), log
        # The instance asking for more copies than exist cannot load; the others serve.
        index = requests.post(f"http://{kiln.url}/v2/repository/index", timeout=10).json()
        greedy = next(m for m in index if m["name"] == "greedy")
        assert greedy["state"] == "UNAVAILABLE"
        assert ('Resource count for "R" is limited to 1 which will prevent scheduling of one or more '
                'model instances, the minimum required count is 2') in greedy["reason"]
    finally:
        kiln.stop()


def test_default_copies_let_both_models_run(repo):
    # Without --rate-limit-resource, R has as many copies as the largest request (2, from
    # "greedy"), so the two one-copy instances run side by side.
    kiln = Kiln("--rate-limit=execution_count", repo=repo)
    try:
        models = [m for m, _ in run_both(kiln)]
        assert sorted(models) == ["limited_a"] * 3 + ["limited_b"] * 3
        assert models not in (["limited_a"] * 3 + ["limited_b"] * 3, ["limited_b"] * 3 + ["limited_a"] * 3)
    finally:
        kiln.stop()


def test_bad_rate_limit_flags_stop_the_start(repo):
    from conftest import refused_start
    assert "rate-limit-resource" in refused_start("--rate-limit=execution_count",
                                                  "--rate-limit-resource=R", repo=repo)
    assert "rate-limit" in refused_start("--rate-limit=sometimes", repo=repo)
