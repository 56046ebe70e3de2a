"""tritonserver command lines run Kiln unchanged: several model repositories, poll mode,
configs without auto-complete, the server id, log settings and log file, and tuning flags
that are accepted (those asking for what Kiln cannot do stop it with a reason)."""
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import DIST, REPO, Kiln, refused_start

SIMPLE = os.path.join(REPO, "simple")


def copy_simple(repo, name, config=True):
    d = os.path.join(repo, name)
    shutil.copytree(SIMPLE, d)
    if config:
        text = open(os.path.join(d, "config.pbtxt")).read().replace('name: "simple"', f'name: "{name}"')
        open(os.path.join(d, "config.pbtxt"), "w").write(text)
    else:
        os.remove(os.path.join(d, "config.pbtxt"))


def add(c, model, a=2, b=1):
    ins = []
    for n, v in (("INPUT0", a), ("INPUT1", b)):
        i = httpclient.InferInput(n, [1, 16], "INT32")
        i.set_data_from_numpy(np.full((1, 16), v, np.int32))
        ins.append(i)
    return c.infer(model, ins).as_numpy("OUTPUT0")


@pytest.fixture()
def repos():
    ds = [tempfile.mkdtemp(), tempfile.mkdtemp()]
    yield ds
    for d in ds:
        shutil.rmtree(d, ignore_errors=True)


def test_models_from_several_repositories_and_the_server_id(repos):
    copy_simple(repos[0], "first")
    copy_simple(repos[1], "second")
    k = Kiln("--model-repository", repos[1], "--id", "kiln-a", repo=repos[0])
    try:
        c = httpclient.InferenceServerClient(url=k.url)
        assert c.get_server_metadata()["name"] == "kiln-a"
        names = {m["name"] for m in c.get_model_repository_index()}
        assert names == {"first", "second"}
        assert add(c, "second")[0, 0] == 3
    finally:
        k.stop()


def test_poll_mode_follows_the_repository(repos):
    repo = repos[0]
    copy_simple(repo, "a")
    k = Kiln("--model-control-mode=poll", "--repository-poll-secs=1", repo=repo)
    try:
        c = httpclient.InferenceServerClient(url=k.url)
        assert c.is_model_ready("a")
        with pytest.raises(InferenceServerException):
            c.load_model("a")
        copy_simple(repo, "b")
        shutil.rmtree(os.path.join(repo, "a"))

        def wait(cond):
            deadline = time.time() + 15
            while not cond():
                assert time.time() < deadline, "the poller did not catch up"
                time.sleep(0.2)

        wait(lambda: c.is_model_ready("b"))
        wait(lambda: "a" not in {m["name"] for m in c.get_model_repository_index()})
        assert not c.is_model_ready("a")
        # A changed config is loaded again: here, a version policy that serves version 1
        # under a second version folder.
        cfg = os.path.join(repo, "b", "config.pbtxt")
        shutil.copytree(os.path.join(repo, "b", "1"), os.path.join(repo, "b", "2"))
        wait(lambda: c.is_model_ready("b", "2"))
        assert not c.is_model_ready("b", "1")
        open(cfg, "a").write("version_policy: { all { } }\n")
        wait(lambda: c.is_model_ready("b", "1"))
        assert add(c, "b")[0, 0] == 3
    finally:
        k.stop()


def test_without_auto_complete_a_config_must_be_whole(repos):
    copy_simple(repos[0], "bare", config=False)
    for flags, ready in (((), True), (("--disable-auto-complete-config",), False),
                         (("--strict-model-config=true",), False), (("--strict-model-config=false",), True)):
        k = Kiln(*flags, repo=repos[0])
        try:
            c = httpclient.InferenceServerClient(url=k.url)
            assert c.is_model_ready("bare") == ready, flags
        finally:
            k.stop()


def test_log_settings_and_file_from_flags(repos):
    copy_simple(repos[0], "m")
    log = os.path.join(repos[1], "kiln.log")
    # The start-up lines go to the file: the HTTP port is read from there.
    p = subprocess.Popen([os.path.join(DIST, "kiln"), "--model-repository", repos[0], "--http-port", "0",
                          "--grpc-port", "0", "--metrics-port", "0", "--log-file", log, "--log-info=false",
                          "--log-warning=true", "--log-verbose=1", "--pinned-memory-pool-byte-size=268435456",
                          "--cuda-memory-pool-byte-size=0:67108864", "--exit-on-error=false",
                          "--backend-config=onnxruntime,default-max-batch-size=8"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        port = None
        while port is None:
            m = re.search(r"Started HTTPService at \S+:(\d+)", open(log).read() if os.path.exists(log) else "")
            port = m and m.group(1)
            assert time.time() < deadline and p.poll() is None, "kiln did not start"
            time.sleep(0.1)
        s = requests.get(f"http://localhost:{port}/v2/logging").json()
        assert (s["log_file"], s["log_info"], s["log_verbose_level"]) == (log, False, 1)
    finally:
        p.terminate()
        out = p.communicate(timeout=30)[0]
    text = open(log).read()
    assert "pinned-memory-pool-byte-size" in text, "the accepted tuning flags are listed in the log"
    assert "Started HTTPService" not in out


def test_model_config_name_picks_configs_name_pbtxt(repos):
    """tritonserver's `--model-config-name=<n>`: a model's `configs/<n>.pbtxt` where it has
    one, else its `config.pbtxt`."""
    copy_simple(repos[0], "tuned")
    copy_simple(repos[0], "plain")
    base = open(os.path.join(repos[0], "tuned", "config.pbtxt")).read()
    os.makedirs(os.path.join(repos[0], "tuned", "configs"))
    for n, mbs in (("h100", 2), ("v100", 3)):
        with open(os.path.join(repos[0], "tuned", "configs", f"{n}.pbtxt"), "w") as f:
            f.write(base.replace("max_batch_size: 8", f"max_batch_size: {mbs}"))
    for flag, tuned in ((("--model-config-name=h100",), 2), (("--model-config-name=v100",), 3),
                        (("--model-config-name=h200",), 8), ((), 8)):
        k = Kiln(*flag, repo=repos[0])
        try:
            c = httpclient.InferenceServerClient(url=k.url)
            assert c.get_model_config("tuned")["max_batch_size"] == tuned, flag
            assert c.get_model_config("plain")["max_batch_size"] == 8
            assert (add(c, "tuned") == 3).all()
        finally:
            k.stop()
    assert "--model-config-name" in refused_start("--model-config-name=", repo=repos[0])
    assert "--model-config-name" in refused_start("--model-config-name=a b", repo=repos[0])


@pytest.mark.parametrize("flag,why", [("--grpc-use-ssl=true", "--grpc-server-cert"),
                                      ("--model-namespacing=true", "namespace"),
                                      ("--log-format=fancy", "log-format"),
                                      ("--http-restricted-api=everything:k=v", "unknown API")])
def test_flags_asking_for_what_kiln_cannot_do_stop_it(flag, why):
    assert why in refused_start(flag)


@pytest.mark.parametrize("flags,mbs,dims", [((), 4, [16]),
                                            (("--backend-config=onnxruntime,default-max-batch-size=0",), 0, [-1, 16]),
                                            (("--backend-config=default-max-batch-size=2",), 2, [16])])
def test_backend_config_reaches_the_onnx_backend(repos, flags, mbs, dims):
    """Triton's `default-max-batch-size`: what auto-complete gives a graph that can batch."""
    copy_simple(repos[0], "bare", config=False)
    k = Kiln(*flags, repo=repos[0])
    try:
        c = httpclient.InferenceServerClient(url=k.url)
        cfg = c.get_model_config("bare")
        assert int(cfg.get("max_batch_size", 0)) == mbs
        assert [int(d) for d in cfg["input"][0]["dims"]] == dims
    finally:
        k.stop()


def test_a_backend_setting_the_backend_refuses_fails_its_models_only(repos):
    copy_simple(repos[0], "bare", config=False)
    os.makedirs(os.path.join(repos[0], "ident", "1"))
    open(os.path.join(repos[0], "ident", "config.pbtxt"), "w").write(
        'backend: "identity"\nmax_batch_size: 0\ninput [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    k = Kiln("--backend-config=onnxruntime,default-max-batch-size=lots", repo=repos[0])
    try:
        index = {m["name"]: m for m in requests.post(f"http://{k.url}/v2/repository/index").json()}
        assert index["bare"]["state"] == "UNAVAILABLE"
        assert "default-max-batch-size" in index["bare"]["reason"]
        assert index["ident"]["state"] == "READY"
    finally:
        k.stop()


def test_restricted_apis_need_their_header():
    """`--http-restricted-api` / `--grpc-restricted-protocol`, as tritonserver: the listed API
    groups answer only requests that carry the header (for gRPC `triton-grpc-protocol-<key>`),
    and the others stay open."""
    import tritonclient.grpc as grpcclient
    k = Kiln("--http-restricted-api=model-repository,statistics:admin-key=secret",
             "--grpc-restricted-protocol=model-repository,statistics:admin-key=secret")
    try:
        h = httpclient.InferenceServerClient(url=k.url)
        g = grpcclient.InferenceServerClient(url=k.grpc_url)
        assert add(h, "simple")[0, 0] == 3, "inference is not restricted"
        assert h.is_server_ready() and g.is_server_ready()
        with pytest.raises(InferenceServerException) as e:
            h.get_inference_statistics("simple")
        assert "restricted" in str(e.value) and "admin-key" in str(e.value)
        r = requests.post(f"http://{k.url}/v2/repository/index", headers={"admin-key": "wrong"})
        assert r.status_code == 403
        stats = h.get_inference_statistics("simple", headers={"admin-key": "secret"})
        assert stats["model_stats"][0]["name"] == "simple"
        with pytest.raises(InferenceServerException) as e:
            g.get_model_repository_index()
        assert "triton-grpc-protocol-admin-key" in str(e.value)
        index = g.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": "secret"}, as_json=True)
        assert any(m["name"] == "simple" for m in index["models"])
        assert g.get_model_config("simple").config.name == "simple", "model-config is not in the group"
    finally:
        k.stop()


def test_exit_timeout_abandons_a_request_still_running(tmp_path):
    """--exit-timeout-secs bounds shutdown as Triton's does: with an execute that runs for
    a minute in flight, SIGTERM stops the server within the timeout (plus a margin), not
    when the execute ends."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "repeat_int32"), repo / "repeat_int32")
    k = Kiln("--exit-timeout-secs", "2", repo=str(repo))
    body = {"IN": [1], "DELAY": [60000], "WAIT": [60000]}

    def long_request():
        try:
            requests.post(f"http://{k.url}/v2/models/repeat_int32/generate_stream", json=body,
                          headers={"Accept": "text/event-stream"}, timeout=90)
        except requests.RequestException:
            pass

    threading.Thread(target=long_request, daemon=True).start()
    time.sleep(1.5)
    started = time.time()
    k.proc.terminate()
    try:
        k.proc.wait(timeout=25)
    finally:
        if k.proc.poll() is None:
            k.proc.kill()
    assert time.time() - started < 25
