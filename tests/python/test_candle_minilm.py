"""The candle backend serving all-MiniLM-L6-v2: embeddings match sentence-transformers'."""
import concurrent.futures
import json
import os
import shutil

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import REPO, Kiln

MODEL = "all_minilm_l6_v2"
REF = json.load(open(os.path.join(os.path.dirname(__file__), "..", "reference", "minilm_reference.json")))


def texts_input(mod, sentences):
    a = np.array([[s.encode()] for s in sentences], dtype=np.object_)
    i = mod.InferInput("TEXT", list(a.shape), "BYTES")
    i.set_data_from_numpy(a)
    return i


def cosines(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


@pytest.fixture
def client(kiln):
    c = httpclient.InferenceServerClient(url=kiln.url)
    assert c.is_model_ready(MODEL), "all_minilm_l6_v2 is not loaded: run `cargo xtask fetch-models`"
    return c


def test_config_and_metadata(client):
    cfg = client.get_model_config(MODEL)
    assert cfg["backend"] == "candle" and cfg["max_batch_size"] == 64
    md = client.get_model_metadata(MODEL)
    assert {"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 384]} in md["outputs"]


def test_batch_matches_sentence_transformers(client):
    r = client.infer(MODEL, [texts_input(httpclient, REF["sentences"])])
    emb = r.as_numpy("EMBEDDING")
    assert emb.shape == (len(REF["sentences"]), 384)
    cos = cosines(emb, REF["embeddings"])
    assert cos.min() >= 0.999, list(zip(REF["sentences"], cos))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # normalised


def test_concurrent_single_sentences_over_grpc(kiln, client):
    def one(k):
        c = grpcclient.InferenceServerClient(url=kiln.grpc_url)
        r = c.infer(MODEL, [texts_input(grpcclient, [REF["sentences"][k]])])
        return r.as_numpy("EMBEDDING")[0]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, range(len(REF["sentences"]))))
    assert cosines(got, REF["embeddings"]).min() >= 0.999


def test_token_ids_input_equals_text_input(client):
    # "hello" is [CLS] hello [SEP] = 101 7592 102 in the model's vocabulary.
    by_text = client.infer(MODEL, [texts_input(httpclient, ["hello"])]).as_numpy("EMBEDDING")
    ids = httpclient.InferInput("INPUT_IDS", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([[101, 7592, 102]], dtype=np.int64))
    by_ids = client.infer(MODEL, [ids]).as_numpy("EMBEDDING")
    np.testing.assert_allclose(by_ids, by_text, atol=1e-5)
    # Padding with a zero mask does not change the embedding.
    ids = httpclient.InferInput("INPUT_IDS", [1, 5], "INT64")
    ids.set_data_from_numpy(np.array([[101, 7592, 102, 0, 0]], dtype=np.int64))
    mask = httpclient.InferInput("ATTENTION_MASK", [1, 5], "INT64")
    mask.set_data_from_numpy(np.array([[1, 1, 1, 0, 0]], dtype=np.int64))
    np.testing.assert_allclose(client.infer(MODEL, [ids, mask]).as_numpy("EMBEDDING"), by_text, atol=1e-5)


def test_bad_input_fails_alone(client):
    ids = httpclient.InferInput("INPUT_IDS", [1, 2], "INT64")
    ids.set_data_from_numpy(np.array([[101, 10**9]], dtype=np.int64))
    with pytest.raises(Exception) as e:
        client.infer(MODEL, [ids])
    assert "INPUT_IDS" in str(e.value)
    assert client.infer(MODEL, [texts_input(httpclient, ["still fine"])]).as_numpy("EMBEDDING").shape == (1, 384)


def test_missing_weights_fail_the_load_with_instructions(tmp_path):
    repo = tmp_path / "repo"
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, MODEL, "config.pbtxt"), repo / MODEL / "config.pbtxt")
    shutil.copytree(os.path.join(REPO, "simple"), repo / "simple")
    k = Kiln("--strict-readiness", "false", repo=str(repo))
    try:
        idx = requests.post(f"http://{k.url}/v2/repository/index", json={}).json()
        entry = next(e for e in idx if e["name"] == MODEL)
        assert entry["state"] == "UNAVAILABLE"
        assert "model.safetensors" in entry["reason"] and "cargo xtask fetch-models" in entry["reason"]
        assert httpclient.InferenceServerClient(url=k.url).is_model_ready("simple")
    finally:
        k.stop()


def test_kind_gpu_without_a_gpu_fails_the_load_clearly(kiln_explicit):
    c = httpclient.InferenceServerClient(url=kiln_explicit.url)
    cfg = {"name": MODEL, "backend": "candle", "max_batch_size": 8,
           "input": [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]}],
           "output": [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": [384]}],
           "instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [0]}]}
    if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception) as e:
        c.load_model(MODEL, config=json.dumps(cfg))
    msg = str(e.value)
    assert "GPU" in msg, msg
    assert not c.is_model_ready(MODEL)
