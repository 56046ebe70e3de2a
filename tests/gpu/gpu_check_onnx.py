"""GPU check for the onnx backend (run on the lent GPU machine by gpu_check.sh).

1. ONNX's nine light models (ResNet-50, DenseNet-121, Inception v1/v2, VGG-19, ...) served
   with a KIND_GPU instance and a config of nothing but that instance group (the rest
   auto-completed from the graph): outputs against ONNX's reference outputs.
2. ResNet-50 and DenseNet-121 with random weights and a BERT encoder (MiniLM's shape),
   written on this machine by the carried `make_bench_models`, served twice (KIND_GPU and
   KIND_CPU, max_batch_size 8): the GPU's outputs against the CPU's (the CPU executor is
   checked against onnxruntime in `cargo xtask test`), and median latency at batch 1 and 8
   (BERT: sequence 128), server-side compute time from the statistics extension.
3. Every node that fell back to the CPU on the GPU instances (the server log's warnings).

Usage: gpu_check_onnx.py <kiln dist> <carry dir> <work dir>; prints one table; exits 1 on a
failed check.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

PORT = 18100
# GPU_CHECK_DEVICE=cpu serves the "gpu" models on the CPU too, to try the script anywhere.
GPU_KIND = "KIND_CPU" if os.environ.get("GPU_CHECK_DEVICE") == "cpu" else "KIND_GPU"
ONNX_TO_NP = {1: np.float32, 6: np.int32, 7: np.int64, 11: np.float64, 9: np.bool_}
KIND_NP = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}


def varint(buf, i):
    v, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, i


def read_tensor_proto(path):
    """An ONNX TensorProto file (dims, data_type, float_data / raw_data) as a numpy array,
    parsed directly so the GPU machine needs no onnx package."""
    buf = open(path, "rb").read()
    dims, dtype, floats, raw, i = [], 1, [], None, 0
    while i < len(buf):
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(buf, i)
            if field == 1:
                dims.append(v)
            elif field == 2:
                dtype = v
        elif wire == 2:
            n, i = varint(buf, i)
            chunk = buf[i:i + n]
            i += n
            if field == 1:  # packed dims
                j = 0
                while j < len(chunk):
                    v, j = varint(chunk, j)
                    dims.append(v)
            elif field == 4:
                floats.extend(struct.unpack(f"<{len(chunk) // 4}f", chunk))
            elif field == 9:
                raw = chunk
        elif wire == 5:
            if field == 4:
                floats.append(struct.unpack("<f", buf[i:i + 4])[0])
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(f"{path}: unexpected wire type {wire}")
    np_type = ONNX_TO_NP[dtype]
    data = np.frombuffer(raw, dtype=np_type) if raw is not None else np.array(floats, dtype=np_type)
    return data.reshape(dims)


def infer(model, inputs):
    """One binary-tensor inference over HTTP; returns {output name: array}."""
    spec, blobs = [], []
    for name, a in inputs.items():
        kind = {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32"}[a.dtype.type]
        spec.append({"name": name, "shape": list(a.shape), "datatype": kind,
                     "parameters": {"binary_data_size": a.nbytes}})
        blobs.append(np.ascontiguousarray(a).tobytes())
    header = json.dumps({"inputs": spec, "parameters": {"binary_data_output": True}}).encode()
    req = urllib.request.Request(f"http://localhost:{PORT}/v2/models/{model}/infer",
                                 data=header + b"".join(blobs),
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    with urllib.request.urlopen(req, timeout=300) as r:
        hl = int(r.headers["Inference-Header-Content-Length"])
        body = r.read()
    meta, offset, out = json.loads(body[:hl]), hl, {}
    for o in meta["outputs"]:
        n = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(body[offset:offset + n], dtype=KIND_NP[o["datatype"]]).reshape(o["shape"])
        offset += n
    return out


def get(path):
    with urllib.request.urlopen(f"http://localhost:{PORT}{path}", timeout=60) as r:
        return json.load(r)


def write_model(repo, name, model_path, kind, max_batch=None):
    folder = os.path.join(repo, name)
    os.makedirs(os.path.join(folder, "1"), exist_ok=True)
    shutil.copy(model_path, os.path.join(folder, "1", "model.onnx"))
    group = "kind: KIND_GPU count: 1 gpus: [ 0 ]" if kind == "gpu" and GPU_KIND == "KIND_GPU" else "kind: KIND_CPU count: 1"
    with open(os.path.join(folder, "config.pbtxt"), "w") as f:
        f.write('backend: "onnxruntime"\n')
        if max_batch:
            f.write(f"max_batch_size: {max_batch}\n")
        f.write(f"instance_group [ {{ {group} }} ]\n")


def bench_inputs(meta, batch, rng):
    """Random inputs for one of the bench models (ids for BERT, images otherwise)."""
    x = {}
    for i in meta["inputs"]:
        if i["datatype"] == "INT64":
            shape = [batch, 128]
            x[i["name"]] = (rng.integers(1000, 30000, shape) if "ids" in i["name"]
                            else np.ones(shape)).astype(np.int64)
        else:
            x[i["name"]] = rng.standard_normal([batch, *[d if d > 0 else 1 for d in i["shape"][1:]]]).astype(np.float32)
    return x


def timed(fn, seconds=2.0, at_most=200):
    fn()
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end and len(times) < at_most:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


def compute_ms(model, run):
    """`run()`'s result, and the server's mean compute time (input + infer + output, ms)
    over the requests it made."""
    s0 = get(f"/v2/models/{model}/stats")["model_stats"][0]["inference_stats"]
    result = run()
    s1 = get(f"/v2/models/{model}/stats")["model_stats"][0]["inference_stats"]
    ns = sum(s1[k]["ns"] - s0[k]["ns"] for k in ("compute_input", "compute_infer", "compute_output"))
    n = s1["compute_infer"]["count"] - s0["compute_infer"]["count"]
    return result, ns / max(1, n) / 1e6


def main():
    dist, carry, work = sys.argv[1], sys.argv[2], sys.argv[3]
    models_dir = os.path.join(work, "onnx_models")
    light = [os.path.join(carry, "light", f"light_{n}.onnx") for n in ("resnet50", "densenet121")]
    subprocess.run([os.path.join(carry, "make_bench_models"), models_dir, *light], check=True,
                   stdout=subprocess.DEVNULL)
    repo = os.path.join(work, "onnx_repo")
    shutil.rmtree(repo, ignore_errors=True)
    light_names = sorted(f[:-5] for f in os.listdir(os.path.join(carry, "light")) if f.endswith(".onnx"))
    for n in light_names:
        write_model(repo, n, os.path.join(carry, "light", n + ".onnx"), "gpu")
    bench = {"resnet50": "light_resnet50_random_dynbatch.onnx",
             "densenet121": "light_densenet121_random_dynbatch.onnx", "bert_minilm": "bert_minilm.onnx"}
    for n, f in bench.items():
        for kind in ("gpu", "cpu"):
            write_model(repo, f"{n}_{kind}", os.path.join(models_dir, f), kind, max_batch=8)
    log_path = os.path.join(work, "onnx_server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen([os.path.join(dist, "kiln"), "--model-repository", repo, "--http-port", str(PORT),
                             "--grpc-port", str(PORT + 1), "--metrics-port", str(PORT + 2)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    failures, rows = [], []
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://localhost:{PORT}/v2/health/live", timeout=10):
                    break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            raise RuntimeError("the server did not start")
        # Wait for every model to leave LOADING.
        for _ in range(600):
            index = json.load(urllib.request.urlopen(urllib.request.Request(
                f"http://localhost:{PORT}/v2/repository/index", data=b"{}", method="POST"), timeout=60))
            if all(m.get("state") in ("READY", "UNAVAILABLE") for m in index):
                break
            time.sleep(0.5)
        states = {m["name"]: m for m in index}
        print(f"\nonnx backend on the GPU: {len(states)} models")
        print(f"{'model':28} {'state':8} {'max |err|':>10} {'tolerance':>10}  result")
        for n in light_names:
            st = states.get(n, {})
            if st.get("state") != "READY":
                failures.append(n)
                print(f"{n:28} {st.get('state', '?'):8} {'':>10} {'':>10}  FAIL {st.get('reason', '')}")
                continue
            meta = get(f"/v2/models/{n}")
            inputs = {}
            for i in meta["inputs"]:
                dims = [d if d > 0 else 1 for d in i["shape"]]
                count = int(np.prod(dims))
                inputs[i["name"]] = (np.arange(count, dtype=np.float32) / count).reshape(dims)
            try:
                got = infer(n, inputs)
                want = read_tensor_proto(os.path.join(carry, "light", f"{n}_output_0.pb"))
                g = got[meta["outputs"][0]["name"]].astype(np.float64).reshape(want.shape)
                err = float(np.abs(g - want).max())
                tol = float((1e-7 + 1e-3 * np.abs(want)).min())
                ok = bool(np.all(np.abs(g - want) <= 1e-7 + 1e-3 * np.abs(want)))
            except Exception as e:  # noqa: BLE001 - report and go on
                err, tol, ok = float("nan"), float("nan"), False
                print(f"{n}: {e}")
            if not ok:
                failures.append(n)
            print(f"{n:28} {'READY':8} {err:>10.2e} {tol:>10.2e}  {'ok' if ok else 'FAIL'}")

        rng = np.random.default_rng(3)
        print(f"\n{'model':12} {'batch':>5} {'gpu ms':>8} {'cpu ms':>8} {'gpu srv':>8} {'cpu srv':>8} "
              f"{'cpu/gpu':>7} {'rel err':>9}")
        for n in bench:
            ready = [states.get(f"{n}_{k}", {}).get("state") == "READY" for k in ("gpu", "cpu")]
            if not all(ready):
                failures.append(n)
                for k in ("gpu", "cpu"):
                    st = states.get(f"{n}_{k}", {})
                    print(f"{n}_{k}: {st.get('state')} {st.get('reason', '')}")
                continue
            meta = get(f"/v2/models/{n}_gpu")
            for batch in (1, 8):
                x = bench_inputs(meta, batch, rng)
                try:
                    g, c = infer(f"{n}_gpu", x), infer(f"{n}_cpu", x)
                    rel = max(float(np.abs(g[k] - c[k]).max() / max(1e-12, np.abs(c[k]).max())) for k in c)
                    times = {}
                    for k in ("gpu", "cpu"):
                        model = f"{n}_{k}"
                        (client_s, _), srv = compute_ms(model, lambda: timed(lambda: infer(model, x)))
                        times[k] = (client_s * 1e3, srv)
                except Exception as e:  # noqa: BLE001 - report and go on
                    failures.append(f"{n} b{batch}")
                    print(f"{n} batch {batch}: {e}")
                    continue
                if not rel < 1e-3:
                    failures.append(f"{n} b{batch} rel {rel:.2e}")
                (gm, gs), (cm, cs) = times["gpu"], times["cpu"]
                print(f"{n:12} {batch:>5} {gm:>8.2f} {cm:>8.2f} {gs:>8.2f} {cs:>8.2f} {cm / gm:>7.2f} {rel:>9.2e}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    # "onnx: node 'name' (Op) runs on the CPU: ..." once per node: counted per operator.
    fell_back = {}
    for line in open(log_path):
        if "runs on the CPU" in line and "' (" in line:
            why = line.split("' (", 1)[1].strip()
            op = why.split(")", 1)[0]
            fell_back.setdefault(op, [0, why[:220]])[0] += 1
    print(f"\nnodes that fell back to the CPU on the GPU: {sum(v[0] for v in fell_back.values())}")
    for op, (count, why) in sorted(fell_back.items()):
        print(f"  {count:4} x ({why}")
    if failures:
        print("FAIL:", failures)
        print("".join(open(log_path).readlines()[-30:]))
        sys.exit(1)


if __name__ == "__main__":
    main()
