"""The onnx backend with Triton-style ONNX model folders (models from the ONNX project's
node tests, which `cargo xtask test` fetches into $KILN_ONNX_TESTS)."""
import os
import shutil
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from conftest import REPO, Kiln, as_text, serving_onnx

NODE = os.path.join(os.environ.get("KILN_ONNX_TESTS", ""), "node")
MODELS = os.path.join(os.path.dirname(__file__), "..", "onnx_models")
pytestmark = pytest.mark.skipif(not os.path.isdir(NODE), reason="KILN_ONNX_TESTS not set (cargo xtask test sets it)")


def folder(repo, name, test, config):
    os.makedirs(repo / name / "1")
    shutil.copy(os.path.join(NODE, test, "model.onnx"), repo / name / "1" / "model.onnx")
    (repo / name / "config.pbtxt").write_text(config)


def infer_inputs(feeds, mod=httpclient):
    """`mod.InferInput`s holding the arrays of `feeds` (name → numpy array)."""
    from tritonclient.utils import np_to_triton_dtype
    ins = []
    for name, v in feeds.items():
        i = mod.InferInput(name, list(v.shape), np_to_triton_dtype(v.dtype))
        i.set_data_from_numpy(v)
        ins.append(i)
    return ins


def ort_outputs(model_file, feeds):
    """onnxruntime's outputs, by name, for `feeds` on `tests/onnx_models/<model_file>`."""
    import onnxruntime as ort
    s = ort.InferenceSession(os.path.join(MODELS, model_file))
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def model_folder(repo, name, model):
    """`repo/name/1/model.onnx` copied from the ONNX file `model`, with no config."""
    os.makedirs(repo / name / "1")
    shutil.copy(model, repo / name / "1" / "model.onnx")


@pytest.fixture(scope="module")
def onnx_kiln(tmp_path_factory):
    repo = tmp_path_factory.mktemp("onnx_repo")
    fp32 = 'data_type: TYPE_FP32 dims: [ 3, 4, 5 ]'
    folder(repo, "add", "test_add",
           f'platform: "onnxruntime_onnx"\ninput [ {{ name: "x" {fp32} }}, {{ name: "y" {fp32} }} ]\n'
           f'output [ {{ name: "sum" {fp32} }} ]\n')
    folder(repo, "softmax", "test_softmax_axis_1",
           f'backend: "onnxruntime"\ninput [ {{ name: "x" {fp32} }} ]\noutput [ {{ name: "y" {fp32} }} ]\n')
    # Bernoulli (random sampling) is not implemented: the load fails naming the operator.
    folder(repo, "bernoulli", "test_bernoulli",
           'backend: "onnx"\ninput [ { name: "x" data_type: TYPE_FP64 dims: [ 10 ] } ]\n'
           'output [ { name: "y" data_type: TYPE_FP64 dims: [ 10 ] } ]\n')
    # Resize (nearest, scales as an input) serves.
    folder(repo, "resize", "test_resize_upsample_scales_nearest",
           'backend: "onnx"\ninput [ { name: "X" data_type: TYPE_FP32 dims: [ 1, 1, 2, 2 ] }, '
           '{ name: "scales" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
           'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1, 1, 4, 6 ] } ]\n')
    # A config naming a tensor the graph does not have.
    folder(repo, "wrong_name", "test_add",
           f'backend: "onnx"\ninput [ {{ name: "x" {fp32} }}, {{ name: "z" {fp32} }} ]\n'
           f'output [ {{ name: "sum" {fp32} }} ]\n')
    # A thread count that is not a number.
    folder(repo, "threads_bad", "test_add",
           f'backend: "onnx"\ninput [ {{ name: "x" {fp32} }}, {{ name: "y" {fp32} }} ]\n'
           f'output [ {{ name: "sum" {fp32} }} ]\n'
           'parameters { key: "intra_op_thread_count" value: { string_value: "many" } }\n')
    # Triton-style folders with only the model file, and with a partial config.
    simple = os.path.join(REPO, "simple", "1", "model.onnx")
    model_folder(repo, "auto", simple)
    model_folder(repo, "partial", simple)
    (repo / "partial" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 2\n')
    # Weights in an external data file beside model.onnx.
    shutil.copytree(os.path.join(MODELS, "external_add"), repo / "external" / "1")
    (repo / "external" / "config.pbtxt").write_text('backend: "onnxruntime"\nmax_batch_size: 2\n')
    # default_model_filename naming a folder: its model.onnx is read (as Triton does; like
    # Triton, only with a config naming the backend).
    os.makedirs(repo / "in_folder" / "1" / "model.onnx")
    shutil.copy(simple, repo / "in_folder" / "1" / "model.onnx" / "model.onnx")
    (repo / "in_folder" / "config.pbtxt").write_text('backend: "onnxruntime"\n')
    # A graph whose first dimension is fixed, configured with batching.
    folder(repo, "fixed_batch", "test_add",
           'backend: "onnxruntime"\nmax_batch_size: 2\n'
           'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4, 5 ] }, { name: "y" data_type: TYPE_FP32 dims: [ 4, 5 ] } ]\n'
           'output [ { name: "sum" data_type: TYPE_FP32 dims: [ 4, 5 ] } ]\n')
    # A graph with a scalar output, without a config.
    model_folder(repo, "scalar", os.path.join(MODELS, "scalar_sum.onnx"))
    # Identity over every type, without a config.
    model_folder(repo, "identity_types", os.path.join(MODELS, "identity_all_types.onnx"))
    # ai.onnx.ml preprocessing, without a config.
    model_folder(repo, "ml", os.path.join(MODELS, "ml_preprocess.onnx"))
    model_folder(repo, "ms_attention", os.path.join(MODELS, "ms_attention.onnx"))
    model_folder(repo, "ms_contrib", os.path.join(MODELS, "ms_contrib.onnx"))
    model_folder(repo, "ml_features", os.path.join(MODELS, "ml_features.onnx"))
    model_folder(repo, "ml_trees", os.path.join(MODELS, "ml_trees.onnx"))
    model_folder(repo, "ml_linear", os.path.join(MODELS, "ml_linear.onnx"))
    model_folder(repo, "text", os.path.join(MODELS, "text_pipeline.onnx"))
    model_folder(repo, "seq", os.path.join(MODELS, "seq_pipeline.onnx"))
    model_folder(repo, "scan", os.path.join(MODELS, "scan_rows.onnx"))
    (repo / "text" / "config.pbtxt").write_text('backend: "onnxruntime"\nmax_batch_size: 8\n')
    # model_warmup: zeros and random data (batch 4, twice), data files; and a sample
    # whose shape the model refuses, which fails the load.
    warm = ('platform: "onnxruntime_onnx"\nmax_batch_size: 8\nmodel_warmup [\n'
            '{ name: "zeros" batch_size: 4 count: 2\n'
            '  inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 16 ] zero_data: true } }\n'
            '  inputs { key: "INPUT1" value: { data_type: TYPE_INT32 dims: [ 16 ] random_data: true } } },\n'
            '{ name: "file" batch_size: 1\n'
            '  inputs { key: "INPUT0" value: { data_type: TYPE_INT32 dims: [ 16 ] input_data_file: "in.bin" } }\n'
            '  inputs { key: "INPUT1" value: { data_type: TYPE_INT32 dims: [ 16 ] input_data_file: "in.bin" } } }\n]\n')
    for name, text in (("warm", warm), ("warm_bad", warm.replace("dims: [ 16 ] zero", "dims: [ 8 ] zero"))):
        model_folder(repo, name, simple)
        (repo / name / "config.pbtxt").write_text(text)
        os.makedirs(repo / name / "warmup")
        (repo / name / "warmup" / "in.bin").write_bytes(np.arange(16, dtype=np.int32).tobytes())
    # Outputs whose size the request decides (Expand to a requested shape, an outer sum),
    # on a pool of two threads (whose run waits on its helper threads).
    model_folder(repo, "sized", os.path.join(MODELS, "sized_by_request.onnx"))
    (repo / "sized" / "config.pbtxt").write_text(
        'backend: "onnxruntime"\n'
        'parameters { key: "intra_op_thread_count" value: { string_value: "2" } }\n')
    # A config that leaves out a graph input, and one with a wrong type.
    folder(repo, "missing_input", "test_add",
           f'backend: "onnx"\ninput [ {{ name: "x" {fp32} }} ]\noutput [ {{ name: "sum" {fp32} }} ]\n')
    folder(repo, "wrong_type", "test_add",
           f'backend: "onnx"\ninput [ {{ name: "x" {fp32} }}, {{ name: "y" data_type: TYPE_INT32 dims: [ 3, 4, 5 ] }} ]\n'
           f'output [ {{ name: "sum" {fp32} }} ]\n')
    k = Kiln("--strict-readiness", "false", repo=str(repo))
    yield k
    k.stop()


def index(k):
    return {e["name"]: e for e in requests.post(f"http://{k.url}/v2/repository/index", json={}).json()}


def test_triton_onnx_folders_serve(onnx_kiln):
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.random.default_rng(0).random((3, 4, 5), dtype=np.float32)
    y = np.random.default_rng(1).random((3, 4, 5), dtype=np.float32)
    ins = [httpclient.InferInput("x", [3, 4, 5], "FP32"), httpclient.InferInput("y", [3, 4, 5], "FP32")]
    ins[0].set_data_from_numpy(x)
    ins[1].set_data_from_numpy(y)
    np.testing.assert_allclose(c.infer("add", ins).as_numpy("sum"), x + y, rtol=1e-6)
    assert c.get_model_metadata("add")["platform"] == "onnxruntime_onnx"
    i = httpclient.InferInput("x", [3, 4, 5], "FP32")
    i.set_data_from_numpy(x)
    got = c.infer("softmax", [i]).as_numpy("y")
    want = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_unsupported_operator_fails_the_load_by_name(onnx_kiln):
    e = index(onnx_kiln)["bernoulli"]
    assert e["state"] == "UNAVAILABLE" and "Bernoulli" in e["reason"], e


def test_resize_upsamples_nearest(onnx_kiln):
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.array([[[[1, 2], [3, 4]]]], np.float32)
    ins = [httpclient.InferInput("X", [1, 1, 2, 2], "FP32"), httpclient.InferInput("scales", [4], "FP32")]
    ins[0].set_data_from_numpy(x)
    ins[1].set_data_from_numpy(np.array([1, 1, 2, 3], np.float32))
    got = c.infer("resize", ins).as_numpy("Y")
    np.testing.assert_array_equal(got, x.repeat(2, axis=2).repeat(3, axis=3))


def test_config_tensor_not_in_graph_is_named(onnx_kiln):
    e = index(onnx_kiln)["wrong_name"]
    assert e["state"] == "UNAVAILABLE" and "'z'" in e["reason"], e
    assert index(onnx_kiln)["add"]["state"] == "READY"


def simple_inputs(a, b):
    ins = [httpclient.InferInput("INPUT0", list(a.shape), "INT32"), httpclient.InferInput("INPUT1", list(b.shape), "INT32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins


def test_folder_without_config_is_auto_completed(onnx_kiln):
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    cfg = c.get_model_config("auto")
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 4
    assert "dynamic_batching" in cfg
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [
        ("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])]
    assert [t["name"] for t in cfg["output"]] == ["OUTPUT0", "OUTPUT1"]
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    r = c.infer("auto", simple_inputs(a, a))
    np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), 2 * a)


def test_partial_config_keeps_what_it_says(onnx_kiln):
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    cfg = c.get_model_config("partial")
    # As Triton: a max_batch_size above 1 on a batchable graph turns dynamic batching on.
    assert cfg["max_batch_size"] == 2 and "dynamic_batching" in cfg
    assert [t["dims"] for t in cfg["input"]] == [[16], [16]]
    a = np.ones((3, 16), dtype=np.int32)
    with pytest.raises(Exception):
        c.infer("partial", simple_inputs(a, a))  # batch 3 > max_batch_size 2


def test_external_data_is_read_from_beside_the_model(onnx_kiln):
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = c.infer("external", infer_inputs({"X": x})).as_numpy("Y")
    want = ort_outputs(os.path.join("external_add", "model.onnx"), {"X": x})["Y"]
    np.testing.assert_array_equal(want, x + np.array([1, 2, 3, 4], np.float32))
    np.testing.assert_array_equal(got, want)


def test_model_file_name_may_be_a_folder(onnx_kiln):
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    # Triton's normalization: an onnxruntime model's platform and default model file.
    cfg = c.get_model_config("in_folder")
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["default_model_filename"] == "model.onnx"
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    np.testing.assert_array_equal(c.infer("in_folder", simple_inputs(a, a)).as_numpy("OUTPUT1"), 0 * a)


def test_batching_a_graph_with_a_fixed_first_dimension_fails_the_load(onnx_kiln):
    e = index(onnx_kiln)["fixed_batch"]
    assert e["state"] == "UNAVAILABLE", e
    assert "tensor 'x'" in e["reason"] and "the first dimension must be -1" in e["reason"], e


def test_config_graph_mismatches_fail_the_load_with_tritons_messages(onnx_kiln):
    e = index(onnx_kiln)["missing_input"]
    assert e["state"] == "UNAVAILABLE", e
    assert "configuration expects 1 inputs, model provides 2" in e["reason"], e
    e = index(onnx_kiln)["wrong_type"]
    assert e["state"] == "UNAVAILABLE", e
    assert "configuration expects datatype TYPE_INT32 for input 'y', model provides TYPE_FP32" in e["reason"], e


def test_scalar_output_has_the_config_dims(onnx_kiln):
    """As Triton: auto-complete declares the scalar as dims [1], and the response has them."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    cfg = c.get_model_config("scalar")
    assert cfg.get("max_batch_size", 0) == 0 and cfg["output"][0]["dims"] == [1]
    x = np.array([1.5, 2.0, -4.0, 8.25], np.float32)
    got = c.infer("scalar", infer_inputs({"X": x})).as_numpy("Y")
    want = ort_outputs("scalar_sum.onnx", {"X": x})["Y"]
    assert want.shape == () and got.shape == (1,)
    np.testing.assert_array_equal(got, want.reshape(1))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_identity_keeps_every_type_bit_for_bit(onnx_kiln, protocol):
    """Every Triton type through an ONNX Identity: extreme values come back unchanged."""
    import tritonclient.grpc as grpcclient
    mod = httpclient if protocol == "http" else grpcclient
    c = mod.InferenceServerClient(url=onnx_kiln.url if protocol == "http" else onnx_kiln.grpc_url)
    rng = np.random.default_rng(11)
    shape = (2, 5)

    def ints(dt):
        info = np.iinfo(dt)
        v = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        v.flat[0], v.flat[1] = info.min, info.max
        return v

    values = {
        "BOOL": rng.random(shape) > 0.5,
        "UINT8": ints(np.uint8), "UINT16": ints(np.uint16), "UINT32": ints(np.uint32),
        "UINT64": ints(np.uint64), "INT8": ints(np.int8), "INT16": ints(np.int16),
        "INT32": ints(np.int32), "INT64": ints(np.int64),
        "FP16": rng.standard_normal(shape).astype(np.float16),
        "FP32": np.array([np.inf, -np.inf, 3.4e38, -1e-45, 0.5] * 2, np.float32).reshape(shape),
        "FP64": rng.standard_normal(shape) * 1e300,
        "STRING": np.array([b"", b"\x00\xff", b"x", "\u00fc".encode(), b"y" * 300] * 2, dtype=object).reshape(shape),
    }
    inputs = []
    for t, v in values.items():
        i = mod.InferInput(f"INPUT_{t}", list(shape), "BYTES" if t == "STRING" else t)
        i.set_data_from_numpy(v)
        inputs.append(i)
    # BF16 (numpy has none): tritonclient sends float32 values truncated to BF16; these are
    # exactly representable, so they come back equal.
    bf16 = (ints(np.uint16).astype(np.uint32) << 16).view(np.float32)
    bf16[np.isnan(bf16)] = 1.0
    i = mod.InferInput("INPUT_BF16", list(shape), "BF16")
    i.set_data_from_numpy(bf16)
    inputs.append(i)
    values_out = dict(values, BF16=bf16)
    outputs = [mod.InferRequestedOutput(f"OUTPUT_{t}") for t in values_out]
    r = c.infer("identity_types", inputs, outputs=outputs)
    for t, v in values_out.items():
        got = r.as_numpy(f"OUTPUT_{t}")
        assert got.shape == shape, t
        if t == "STRING":
            assert got.tolist() == v.tolist()
        else:
            assert got.dtype == v.dtype, t
            assert got.tobytes() == v.tobytes(), t


def test_onnx_ml_preprocessing_matches_onnxruntime(onnx_kiln):
    """Scaler, Normalizer (L1, L2, MAX; a zero row, an all-negative row) and LabelEncoder
    (INT64 ids to names, with a default) against onnxruntime on the same file."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.array([[1, 2, 3], [4, -5, 6.5], [0.5, 1.5, 4], [-2, -3, 10]], np.float32)
    ids = np.array([0, 2, 7, 1], np.int64)
    # Auto-complete batches the graph; CLASS ([batch] in the graph) is dims [1] + reshape [].
    r = c.infer("ml", infer_inputs({"X": x, "CLASS": ids.reshape(4, 1)}))
    want = ort_outputs("ml_preprocess.onnx", {"X": x, "CLASS": ids})
    for name in ("SCALED", "L1", "L2", "MAX"):
        np.testing.assert_allclose(r.as_numpy(name), want[name], rtol=1e-6, atol=0, err_msg=name)
    assert [v.decode() for v in r.as_numpy("LABEL").ravel()] == want["LABEL"].tolist() == \
        ["setosa", "virginica", "unknown", "versicolor"]


def test_onnx_ml_linear_models_match_onnxruntime(onnx_kiln):
    """LinearClassifier (string and int labels, binary, SOFTMAX / LOGISTIC) and
    LinearRegressor (SOFTMAX_ZERO, PROBIT, none) against onnxruntime on the same file."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.random.default_rng(0).uniform(-5, 5, (4, 4)).astype(np.float32)
    r = c.infer("ml_linear", infer_inputs({"X": x}))
    want = ort_outputs("ml_linear.onnx", {"X": x})
    for name, w in want.items():
        got = r.as_numpy(name)
        if name.startswith("LABEL"):
            # [batch] in the graph: dims [1] with an empty reshape, as Triton auto-completes.
            got = got.reshape(-1)
            if name == "LABEL_S":
                got = np.array([v.decode() for v in got], dtype=object)
            assert got.tolist() == w.tolist(), name
        else:
            np.testing.assert_allclose(got, w, rtol=2e-5, atol=1e-6, err_msg=name)
    # The binary classifier picks both labels, so both branches ran.
    assert set(want["LABEL_B"].tolist()) == {3, 7}


def test_onnx_ml_tree_ensembles_match_onnxruntime(onnx_kiln):
    """TreeEnsembleRegressor (SUM, AVERAGE, base values, targets no tree scores) and
    TreeEnsembleClassifier
    (XGBoost-style binary margins with LOGISTIC, a random forest's class-1 probabilities
    with string labels, three classes with SOFTMAX, two weighted classes) against
    onnxruntime, on rows that hit every leaf, thresholds exactly and a missing value."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    rng = np.random.default_rng(4)
    fixed = np.array([[0.5, -0.3, 1.0], [0.6, -0.2, np.nan], [-1, -1, 0], [2, 0, 2]], np.float32)
    x = np.concatenate([fixed, rng.standard_normal((12, 3)).astype(np.float32)])
    want = ort_outputs("ml_trees.onnx", {"X": x})
    for lo in range(0, len(x), 4):  # max_batch_size 4 (auto-complete)
        r = c.infer("ml_trees", infer_inputs({"X": x[lo:lo + 4]}))
        for name, w in want.items():
            w = w[lo:lo + 4]
            got = r.as_numpy(name)
            if name.startswith("LABEL"):
                got = got.reshape(-1)
                if name == "LABEL_R":
                    got = np.array([v.decode() for v in got], dtype=object)
                assert got.tolist() == w.tolist(), (name, lo)
            else:
                np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=f"{name} rows {lo}")
    # Both labels of each binary classifier occur, so both branches ran.
    assert set(want["LABEL_X"].tolist()) == {0, 1} and set(want["LABEL_R"].tolist()) == {"no", "yes"}


def test_onnx_ml_feature_preparation_matches_onnxruntime(onnx_kiln):
    """Imputer (NaN), OneHotEncoder (string and int categories, unknown values),
    CategoryMapper (strings to ids and back, defaults) and FeatureVectorizer against
    onnxruntime on the same file."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    feeds = {
        "NUM": np.array([[1, np.nan], [np.nan, np.nan], [3, 4]], np.float32),
        "CITY": np.array([["tokyo"], ["rome"], ["lima"]], dtype=object),
        "CODE": np.array([[20], [10], [7]], np.int64),
    }
    r = c.infer("ml_features", infer_inputs(feeds))
    want = ort_outputs("ml_features.onnx", feeds)
    for name, w in want.items():
        got = r.as_numpy(name)
        assert got.shape == w.shape, name
        if name == "CODE_NAME":
            assert as_text(got).tolist() == w.tolist() == [["twenty"], ["ten"], ["other"]]
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)


def test_text_pipeline_matches_onnxruntime(onnx_kiln):
    """A scikit-learn-style text pipeline (StringNormalizer, onnxruntime's Tokenizer by
    separators with marks and by token pattern, TfIdfVectorizer over unigrams and bigrams)
    and ONNX 20's RegexFullMatch, StringConcat and StringSplit, over HTTP and gRPC, against
    onnxruntime on the same file; a text that is not UTF-8 fails only its request."""
    import tritonclient.grpc as grpcclient
    texts = np.array([["The apple is GOOD, apple pie!"], ["Banana split? Is it good?"], [""],
                      ["cherry  cherry x"], ["\u00dcn\u00efcode \u00c9COLE and a Stra\u00dfe"]], dtype=object)
    want = ort_outputs("text_pipeline.onnx", {"TEXT": texts})
    # Every operator did something: unigrams and bigrams counted, a question found.
    assert want["TFIDF"][0].tolist() == [3.0, 0, 0, 1.0, 0.5, 3.0, 0, 4.0]
    assert want["IS_QUESTION"].tolist() == [False, True, False, False, False]
    http = httpclient.InferenceServerClient(url=onnx_kiln.url)
    grpc = grpcclient.InferenceServerClient(url=onnx_kiln.grpc_url)
    for client, mod in ((http, httpclient), (grpc, grpcclient)):
        r = client.infer("text", infer_inputs({"TEXT": texts}, mod))
        for name, w in want.items():
            got = r.as_numpy(name)
            if w.ndim == 1:
                # A [batch] output is served as dims [1] (auto-complete's reshape), as Triton does.
                assert got.shape == (len(w), 1), (name, got.shape)
                got = got[:, 0]
            assert got.shape == w.shape, (name, got.shape, w.shape)
            if w.dtype == object:
                assert as_text(got).tolist() == w.tolist(), name
            else:
                np.testing.assert_array_equal(got, w, err_msg=name)
    bad = httpclient.InferInput("TEXT", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    with pytest.raises(Exception, match="UTF-8"):
        http.infer("text", [bad])
    assert http.infer("text", infer_inputs({"TEXT": texts[:1]})).as_numpy("TFIDF")[0].tolist() == want["TFIDF"][0].tolist()


def test_onnxruntime_contrib_operators_match_onnxruntime(onnx_kiln):
    """com.microsoft SkipLayerNormalization (and its sum output), BiasGelu, FastGelu, Gelu,
    QuickGelu, FusedMatMul, SkipSimplifiedLayerNormalization and SimplifiedLayerNormalization
    (RMSNorm), as onnxruntime's transformer optimizer writes them,
    against onnxruntime on the same file."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    rng = np.random.default_rng(8)
    feeds = {n: rng.standard_normal((3, 4, 8)).astype(np.float32) for n in ("X", "S")}
    r = c.infer("ms_contrib", infer_inputs(feeds))
    want = ort_outputs("ms_contrib.onnx", feeds)
    for name, w in want.items():
        np.testing.assert_allclose(r.as_numpy(name), w, rtol=1e-5, atol=2e-6, err_msg=name)


def test_onnxruntime_attention_and_embedding_match_onnxruntime(onnx_kiln):
    """com.microsoft EmbedLayerNormalization (with its mask index) and Attention with a 0/1
    mask, with key lengths and unidirectional, against onnxruntime on the same file."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    rng = np.random.default_rng(1)
    feeds = {
        "IDS": rng.integers(0, 50, (3, 6)).astype(np.int32),
        "SEG": rng.integers(0, 2, (3, 6)).astype(np.int32),
        "MASK": np.array([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]], np.int32),
    }
    r = c.infer("ms_attention", infer_inputs(feeds))
    want = ort_outputs("ms_attention.onnx", feeds)
    np.testing.assert_array_equal(r.as_numpy("MASK_INDEX").reshape(-1), want["MASK_INDEX"])
    for name in ("EMB", "ATT", "ATT_LEN", "ATT_CAUSAL"):
        np.testing.assert_allclose(r.as_numpy(name), want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # The masks matter: masked and unmasked attention differ.
    assert np.abs(want["ATT"] - want["ATT_CAUSAL"]).max() > 1e-2


def test_bad_thread_count_fails_the_load_by_name(onnx_kiln):
    e = index(onnx_kiln)["threads_bad"]
    assert e["state"] == "UNAVAILABLE" and "intra_op_thread_count" in e["reason"], e


def onnx_threads(pid):
    """Names of the server's threads that belong to onnx instances' CPU pools."""
    names = []
    for t in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{t}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if n.startswith("kiln-onnx-"))


def test_intra_op_thread_count_sizes_each_instance_pool(tmp_path):
    fp32 = 'data_type: TYPE_FP32 dims: [ 3, 4, 5 ]'
    folder(tmp_path, "add3", "test_add",
           f'backend: "onnxruntime"\ninput [ {{ name: "x" {fp32} }}, {{ name: "y" {fp32} }} ]\n'
           f'output [ {{ name: "sum" {fp32} }} ]\n'
           'instance_group [ { count: 2 kind: KIND_CPU } ]\n'
           'parameters { key: "intra_op_thread_count" value: { string_value: "3" } }\n')
    k = Kiln(repo=str(tmp_path))
    try:
        # Two instances with three threads each (a pool's threads start on their own, so a
        # busy machine may name them a moment after the server is up).
        want = ["kiln-onnx-0"] * 2 + ["kiln-onnx-1"] * 2 + ["kiln-onnx-2"] * 2
        deadline = time.time() + 10
        while onnx_threads(k.proc.pid) != want and time.time() < deadline:
            time.sleep(0.05)
        assert onnx_threads(k.proc.pid) == want
        c = httpclient.InferenceServerClient(url=k.url)
        x = np.ones((3, 4, 5), np.float32)
        ins = [httpclient.InferInput("x", [3, 4, 5], "FP32"), httpclient.InferInput("y", [3, 4, 5], "FP32")]
        ins[0].set_data_from_numpy(x)
        ins[1].set_data_from_numpy(2 * x)
        np.testing.assert_array_equal(c.infer("add3", ins).as_numpy("sum"), 3 * x)
    finally:
        k.stop()


def random_light(name):
    return os.path.join(os.environ.get("KILN_BENCH_MODELS", ""), f"light_{name}_random_dynbatch.onnx")


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_image_model_with_random_weights_matches_onnxruntime(name):
    """ResNet-50 and DenseNet-121 with seeded random weights (`make_bench_models`), served as
    a Triton folder: their logits against onnxruntime's on the same file, one image (where
    DenseNet's feature chains are written into one buffer: append.rs) and a batch of three."""
    path = random_light(name)
    if not os.path.isfile(path):
        pytest.skip("KILN_BENCH_MODELS not set (cargo xtask test writes it)")
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    with serving_onnx(path, name) as k:
        client = httpclient.InferenceServerClient(k.url)
        rng = np.random.default_rng(7)
        for batch in (1, 3):
            x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
            inp = httpclient.InferInput(name_in, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            got = client.infer(name, [inp]).as_numpy(name_out)
            want = session.run(None, {name_in: x})[0]
            scale = np.abs(want).max()
            # Logits that differ by class and by image: a wrong convolution shows.
            assert want.std(axis=1).min() > 0.05 * scale
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
            assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def test_bert_encoder_with_padding_matches_onnxruntime():
    """The BERT encoder of `make_bench_models` (MiniLM's shape, seeded random weights; its
    attention runs as one fused node per layer) served as a Triton folder: hidden states
    against onnxruntime's for two sentences, the second padded (attention mask 0 on its
    last positions), at a short and a longer sequence."""
    path = os.path.join(os.environ.get("KILN_BENCH_MODELS", ""), "bert_minilm.onnx")
    if not os.path.isfile(path):
        pytest.skip("KILN_BENCH_MODELS not set (cargo xtask test writes it)")
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with serving_onnx(path, "bert") as k:
        client = httpclient.InferenceServerClient(k.url)
        rng = np.random.default_rng(3)
        for seq in (9, 40):
            ids = rng.integers(0, 30522, (2, seq)).astype(np.int64)
            mask = np.ones((2, seq), np.int64)
            mask[1, seq // 2:] = 0
            feeds = {"input_ids": ids, "attention_mask": mask}
            got = client.infer("bert", infer_inputs(feeds)).as_numpy("last_hidden_state")
            want = session.run(["last_hidden_state"], feeds)[0]
            # The padded sentence's first half differs from what it would be unpadded.
            unpadded = session.run(["last_hidden_state"], {**feeds, "attention_mask": np.ones_like(mask)})[0]
            assert np.abs(unpadded[1, : seq // 2] - want[1, : seq // 2]).max() > 1e-3
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_model_warmup_runs_before_ready_and_a_failing_sample_fails_the_load(onnx_kiln):
    """model_warmup samples (zero, random and file data) run before the model is ready and
    are not counted in its statistics; a sample the model refuses fails the load, naming
    the sample, while other models serve."""
    models = index(onnx_kiln)
    assert models["warm"]["state"] == "READY"
    assert models["warm_bad"]["state"] == "UNAVAILABLE"
    assert "warm-up sample 'zeros'" in models["warm_bad"]["reason"], models["warm_bad"]
    stats = requests.get(f"http://{onnx_kiln.url}/v2/models/warm/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 0 and stats["execution_count"] == 0, stats
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    ins = [httpclient.InferInput("INPUT0", [1, 16], "INT32"), httpclient.InferInput("INPUT1", [1, 16], "INT32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(a)
    np.testing.assert_array_equal(c.infer("warm", ins).as_numpy("OUTPUT0"), 2 * a)
    stats = requests.get(f"http://{onnx_kiln.url}/v2/models/warm/stats").json()["model_stats"][0]
    assert stats["inference_count"] == 1, stats


def test_sequences_inside_a_graph_match_onnxruntime(onnx_kiln):
    """SplitToSequence, SequenceErase, SequenceMap (a body per item), SequenceAt,
    SequenceInsert, ConcatFromSequence and SequenceLength inside a served graph (no config:
    LEN has no batch dimension, so the model does not batch), against onnxruntime."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.random.default_rng(3).standard_normal((3, 6)).astype(np.float32)
    r = c.infer("seq", infer_inputs({"X": x}))
    want = ort_outputs("seq_pipeline.onnx", {"X": x})
    y, n = want["Y"], want["LEN"]
    # The first piece as is, then the first two squared.
    np.testing.assert_allclose(y, np.concatenate([x[:, :2], x[:, :4] ** 2], axis=1), rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("Y"), y, rtol=1e-6)
    assert r.as_numpy("LEN").tolist() == n.tolist() == [3]


def test_scan_directions_and_axes_match_onnxruntime(onnx_kiln):
    """Scan reading one input forwards and one backwards, writing its scan output along
    axis 1 in reverse, against onnxruntime (and the arithmetic it stands for)."""
    c = httpclient.InferenceServerClient(url=onnx_kiln.url)
    x = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    r = c.infer("scan", infer_inputs({"X": x}))
    want = ort_outputs("scan_rows.onnx", {"X": x})
    final, y = want["FINAL"], want["Y"]
    np.testing.assert_allclose(final, x.sum(0), rtol=1e-5)
    np.testing.assert_allclose(y, (x * x[::-1]).T[:, ::-1], rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("FINAL"), final, rtol=1e-6)
    np.testing.assert_allclose(r.as_numpy("Y"), y, rtol=1e-6)


def test_outputs_too_large_for_memory_fail_the_request_not_the_model(onnx_kiln):
    """An Expand to a shape the request gives, and an outer sum of two request-sized
    inputs, asking for more memory than any machine has: each request fails with the size
    named (as onnxruntime fails such a run), and the same model then serves a normal one."""
    c = httpclient.InferenceServerClient(onnx_kiln.url, network_timeout=120)

    def run(shape, a, b):
        feeds = {"X": np.array([1.5], np.float32), "SHAPE": np.array(shape, np.int64), "A": a, "B": b}
        return c.infer("sized", infer_inputs(feeds))

    small = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))
    for shape, (a, b), what in (
        ([1 << 31, 1 << 31], small, "[2147483648, 2147483648]"),
        ([1 << 40, 1 << 40], small, "[1099511627776, 1099511627776]"),
        ([1, 1], (np.zeros((1 << 20, 1), np.float32), np.zeros((1, 1 << 20), np.float32)), "[1048576, 1048576]"),
    ):
        with pytest.raises(Exception) as e:
            run(shape, a, b)
        msg = str(e.value)
        assert what in msg and "memory" in msg, msg
    a = np.arange(2, dtype=np.float32).reshape(2, 1)
    b = np.arange(3, dtype=np.float32).reshape(1, 3) * 10
    r = run([2, 3], a, b)
    np.testing.assert_array_equal(r.as_numpy("Y"), np.full((2, 3), 1.5, np.float32))
    np.testing.assert_array_equal(r.as_numpy("Z"), a + b)
    assert c.is_server_live() and c.is_model_ready("sized")
