"""Triton's example `simple_sequence` and `simple_dyna_sequence` models (in
`model_repository/`) driven the way tritonclient's sequence example clients drive them:
sequences interleaved on one gRPC stream, one of them named by a string (UUID) sequence id,
and the synchronous HTTP form. Each output is INPUT + START (plus, for the dyna model, the
correlation id at END), so a request that lost its sequence's flags shows."""
import queue
import uuid
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Kiln

VALUES = [11, 7, 5, 3, 2, 0, 1]


@pytest.fixture(scope="module")
def served():
    k = Kiln()
    yield k
    k.stop()


def request(module, value):
    i = module.InferInput("INPUT", [1, 1], "INT32")
    i.set_data_from_numpy(np.full((1, 1), value, np.int32))
    return [i], [module.InferRequestedOutput("OUTPUT")]


def stream(served, model, sequences):
    """Sends every sequence's values interleaved on one gRPC stream, as the example clients
    do; returns {(str(sequence id), step): output}."""
    results = queue.Queue()
    steps = len(next(iter(sequences.values())))
    with grpcclient.InferenceServerClient(url=served.grpc_url) as c:
        c.start_stream(callback=partial(lambda q, result, error: q.put(error or result), results))
        for step in range(steps):
            for sid, values in sequences.items():
                inputs, outputs = request(grpcclient, values[step])
                c.async_stream_infer(model, inputs, outputs=outputs, request_id=f"{sid}_{step}",
                                     sequence_id=sid, sequence_start=step == 0, sequence_end=step == steps - 1)
        got = {}
        for _ in range(len(sequences) * steps):
            r = results.get(timeout=30)
            assert not isinstance(r, InferenceServerException), r
            sid, step = r.get_response().id.rsplit("_", 1)
            got[(sid, int(step))] = int(r.as_numpy("OUTPUT")[0, 0])
        c.stop_stream()
    return got


def test_interleaved_sequences_on_one_stream_with_a_string_id(served):
    sequences = {1000: [0] + VALUES, 1001: [100] + [-v for v in VALUES], str(uuid.uuid4()): [20] + [-v for v in VALUES]}
    got = stream(served, "simple_sequence", sequences)
    for sid, values in sequences.items():
        want = [v + (1 if step == 0 else 0) for step, v in enumerate(values)]
        assert [got[(str(sid), step)] for step in range(len(values))] == want, sid


def test_sync_http_sequence_and_its_errors(served):
    c = httpclient.InferenceServerClient(url=served.url)
    sid = "seq-" + uuid.uuid4().hex
    outs = []
    for step, v in enumerate([5, 6, 7]):
        inputs, outputs = request(httpclient, v)
        r = c.infer("simple_sequence", inputs, outputs=outputs, sequence_id=sid, sequence_start=step == 0,
                    sequence_end=step == 2)
        outs.append(int(r.as_numpy("OUTPUT")[0, 0]))
    assert outs == [6, 6, 7]
    # The string id "77" and the number 77 are different sequences.
    inputs, outputs = request(httpclient, 1)
    c.infer("simple_sequence", inputs, outputs=outputs, sequence_id=77, sequence_start=True)
    with pytest.raises(InferenceServerException) as e:
        c.infer("simple_sequence", inputs, outputs=outputs, sequence_id="77")
    assert "sequence 77" in str(e.value) and "START" in str(e.value)
    c.infer("simple_sequence", inputs, outputs=outputs, sequence_id=77, sequence_end=True)


def test_dyna_sequences_see_their_correlation_id_at_the_end(served):
    """As `simple_grpc_sequence_stream_infer_client.py -d`: the oldest-strategy model batches
    the two sequences' requests together and adds each one's id to its last output."""
    sequences = {1000: [0] + VALUES, 1001: [100] + [-v for v in VALUES]}
    got = {(int(sid), step): v for (sid, step), v in stream(served, "simple_dyna_sequence", sequences).items()}
    for sid, values in sequences.items():
        last = len(values) - 1
        want = [v + (step == 0) + (sid if step == last else 0) for step, v in enumerate(values)]
        assert [got[(sid, step)] for step in range(len(values))] == want, sid


def slot_repo(idle_us):
    """A copy of simple_sequence with one batch slot (max_batch_size 1) and `idle_us` of
    sequence idle time."""
    import os
    import re
    import shutil
    import tempfile
    from conftest import REPO
    d = tempfile.mkdtemp()
    shutil.copytree(os.path.join(REPO, "simple_sequence"), os.path.join(d, "one_slot"))
    path = os.path.join(d, "one_slot", "config.pbtxt")
    cfg = open(path).read().replace('name: "simple_sequence"', 'name: "one_slot"')
    cfg = re.sub(r"max_batch_size: \d+", "max_batch_size: 1", cfg)
    cfg = cfg.replace("sequence_batching {", f"sequence_batching {{\n  max_sequence_idle_microseconds: {idle_us}", 1)
    open(path, "w").write(cfg)
    return d


def infer_seq(kiln, sid, value, start=False, end=False):
    with httpclient.InferenceServerClient(kiln.url, network_timeout=60) as c:
        inputs, outputs = request(httpclient, value)
        r = c.infer("one_slot", inputs, outputs=outputs, sequence_id=sid, sequence_start=start, sequence_end=end)
        return int(r.as_numpy("OUTPUT")[0, 0])


def wait_pending(kiln, model, n):
    """Waits until `model` has `n` queued requests (nv_inference_pending_request_count)."""
    import re
    import time
    import requests
    deadline = time.time() + 30
    while time.time() < deadline:
        text = requests.get(kiln.metrics_url, timeout=10).text
        m = re.search(r'nv_inference_pending_request_count\{model="%s",version="1"\} (\d+)' % model, text)
        if m and int(m.group(1)) == n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{model} never had {n} queued requests")


def test_a_sequence_beyond_the_slots_waits_for_one_to_end():
    import shutil
    import threading
    repo = slot_repo(60_000_000)
    kiln = Kiln(repo=repo)
    try:
        done = []
        assert infer_seq(kiln, 1, 5, start=True) == 6
        later = threading.Thread(target=lambda: done.append(("seq 2", infer_seq(kiln, 2, 10, start=True))))
        later.start()
        wait_pending(kiln, "one_slot", 1)
        # Sequence 1 holds the only slot: sequence 2 waits in the backlog, and sequence 1's
        # own requests still run.
        assert infer_seq(kiln, 1, 7) == 7
        assert not done
        # Only sequence 1's END frees the slot (the two answers then race to the client).
        assert infer_seq(kiln, 1, 3, end=True) == 3
        later.join(timeout=30)
        assert done == [("seq 2", 11)]
    finally:
        kiln.stop()
        shutil.rmtree(repo, ignore_errors=True)


def test_an_idle_sequence_gives_up_its_slot():
    import shutil
    repo = slot_repo(300_000)
    kiln = Kiln(repo=repo)
    try:
        assert infer_seq(kiln, 1, 5, start=True) == 6
        # Sequence 1 sends nothing more: after 0.3 s its slot goes to sequence 2 ...
        assert infer_seq(kiln, 2, 10, start=True) == 11
        # ... and sequence 1 is over: its next request must start it again.
        with pytest.raises(InferenceServerException, match="must specify the START flag"):
            infer_seq(kiln, 1, 7)
    finally:
        kiln.stop()
        shutil.rmtree(repo, ignore_errors=True)
