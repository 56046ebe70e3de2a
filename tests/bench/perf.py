"""cargo xtask bench: Triton's perf_analyzer against Kiln, one server, one run.

Prints throughput, p50/p99 latency and Kiln's CPU time per inference (utime+stime from
/proc over the measurement, divided by the inferences the server counted) per model and
concurrency, and the dynamic batcher's effect at concurrency 16."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import requests

DIST = os.environ["KILN_DIST"]
REPO = os.environ["KILN_REPO"]
TICK = os.sysconf("SC_CLK_TCK")


def start():
    """Starts kiln; returns the process and its HTTP and gRPC ports."""
    p = subprocess.Popen([os.path.join(DIST, "kiln"), "--model-repository", REPO, "--http-port", "0",
                          "--grpc-port", "0", "--metrics-port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ports = {}
    for line in p.stdout:
        m = re.search(r"Started (HTTPService|GRPCInferenceService) at \S+:(\d+)", line)
        if m:
            ports[m.group(1)] = int(m.group(2))
        if len(ports) == 2:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, ports["HTTPService"], ports["GRPCInferenceService"]
    raise SystemExit("kiln did not start")


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def inferences(port, model):
    s = requests.get(f"http://localhost:{port}/v2/models/{model}/stats").json()["model_stats"][0]
    return s["inference_count"]


def run(pa, port, pid, model, conc, shape=None, seconds_ms=3000, proto="http", stats_port=None, input_data=None,
        shm_bytes=0):
    """One perf_analyzer measurement; `stats_port` is the HTTP port for the stats reads;
    `shm_bytes` > 0 sends tensors through system shared memory (outputs up to that size)."""
    stats_port = stats_port or port
    out = tempfile.mktemp(suffix=".csv")
    cmd = [pa, "-m", model, "-u", f"localhost:{port}", "-i", proto, "--concurrency-range", f"{conc}:{conc}",
           "--measurement-interval", str(seconds_ms), "-f", out, "--percentile", "99"]
    if shape:
        cmd += ["--shape", shape]
    if shm_bytes:
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", str(shm_bytes)]
    if shm_bytes or (shape and shape.endswith(":262144")):
        # 1 MiB tensors on a shared 2-core machine: accept the median of a few windows.
        cmd += ["--stability-percentage", "50", "--max-trials", "6"]
    if input_data:
        # Embedding requests take tens of ms: accept the median of a few windows.
        cmd += ["--input-data", input_data, "--stability-percentage", "50", "--max-trials", "6"]
    c0, n0 = cpu_seconds(pid), inferences(stats_port, model)
    p = subprocess.run(cmd, capture_output=True, text=True)
    c1, n1 = cpu_seconds(pid), inferences(stats_port, model)
    if p.returncode != 0:
        return {"error": (p.stdout + p.stderr)[-400:]}
    row = next(csv.DictReader(open(out)))
    os.unlink(out)
    # perf_analyzer's CSV: p50/p99 client latency in usec.
    return {
        "thr": float(row["Inferences/Second"]),
        "p50": float(row["p50 latency"]) / 1000,
        "p99": float(row["p99 latency"]) / 1000,
        "cpu_us": (c1 - c0) * 1e6 / max(1, n1 - n0),
    }


def main():
    pa = shutil.which("perf_analyzer", path=os.path.dirname(sys.executable))
    if not pa:
        raise SystemExit("perf_analyzer not found in the venv")
    proc, port, grpc_port = start()
    try:
        print(f"{'model':22} {'proto':8} {'conc':>4} {'infer/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/inf':>10}")
        results = {}
        plan = [("identity_fp32", "INPUT0:16", p, c) for p in ("http", "grpc") for c in (1, 4, 16)]
        plan += [("simple", None, p, c) for p in ("http", "grpc") for c in (1, 4, 16)]
        plan += [("simple_dynamic_batch", None, "http", 16)]
        # 1 MiB tensors in the request body vs through system shared memory.
        big = "INPUT0:262144"
        plan += [("identity_fp32", big, p, 1) for p in ("http", "grpc", "http-shm", "grpc-shm")]
        for model, shape, proto, c in plan:
            shm = (1 << 20) if proto.endswith("-shm") else 0
            wire = proto.removesuffix("-shm")
            r = run(pa, grpc_port if wire == "grpc" else port, proc.pid, model, c, shape,
                    proto=wire, stats_port=port, shm_bytes=shm)
            label = f"{model}[{shape.split(':')[1]}]" if shape == big else model
            results[(label, proto, c)] = r
            if "error" in r:
                print(f"{label:22} {proto:8} {c:>4} ERROR {r['error']}")
            else:
                print(f"{label:22} {proto:8} {c:>4} {r['thr']:>10.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['cpu_us']:>10.1f}")
        a, b = results.get(("simple_dynamic_batch", "http", 16), {}), results.get(("simple", "http", 16), {})
        if "thr" in a and "thr" in b:
            print(f"dynamic batcher at c16: {a['thr'] / b['thr']:.2f}x throughput of simple "
                  f"(simple_dynamic_batch has max_queue_delay 100 ms, preferred [4, 8])")
        embeddings(pa, port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# Typical short sentences for the embedding row (the same list for Kiln and sentence-transformers).
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
    "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.", "The quick brown fox jumps over the lazy dog.",
    "Triton Inference Server serves models over HTTP and gRPC.", "Kiln is an inference server written in Rust.",
    "What is the capital of France? Paris is the capital and most populous city of France.",
    "Sentences are passed as a list of string.", "This framework generates embeddings for each input sentence",
    "Numbers like 3.14159 and dates like 2026-11-26 appear in text.",
]

# sentence-transformers on this CPU with the same threads, in its own venv (torch is large).
ST_SCRIPT = r"""
import json, sys, time, torch
from sentence_transformers import SentenceTransformer
folder, sentences = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
m = SentenceTransformer(folder, device="cpu")
batch = sentences * 4
m.encode(batch, batch_size=16)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 5:
    m.encode(batch, batch_size=16)
    n += len(batch)
print(n / (time.perf_counter() - t0))
"""


def sentence_transformers_python():
    """A Python with sentence-transformers: $KILN_ST_PYTHON, or target/st-venv (created once)."""
    py = os.environ.get("KILN_ST_PYTHON")
    if py:
        return py
    venv = os.path.join(os.path.dirname(DIST), "st-venv")
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        print("installing sentence-transformers into target/st-venv for the embedding comparison ...")
        if subprocess.run([sys.executable, "-m", "venv", venv]).returncode != 0:
            return None
        if subprocess.run([py, "-m", "pip", "install", "-q", "sentence-transformers"]).returncode != 0:
            return None
    return py


def embeddings(pa, port, pid):
    """all_minilm_l6_v2 at c16 (dynamic batching) vs sentence-transformers on the same CPU."""
    folder = os.path.join(REPO, "all_minilm_l6_v2", "1")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        print("all_minilm_l6_v2: weights missing (cargo xtask fetch-models); embedding row skipped")
        return
    data = tempfile.mktemp(suffix=".json")
    with open(data, "w") as f:
        json.dump({"data": [{"TEXT": {"content": [s], "shape": [1]}} for s in SENTENCES]}, f)
    r = run(pa, port, pid, "all_minilm_l6_v2", 16, input_data=data, seconds_ms=5000)
    os.unlink(data)
    if "error" in r:
        print(f"all_minilm_l6_v2 http 16 ERROR {r['error']}")
        return
    print(f"{'all_minilm_l6_v2':22} {'http':8} {16:>4} {r['thr']:>10.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['cpu_us']:>10.1f}")
    py = sentence_transformers_python()
    out = subprocess.run([py, "-c", ST_SCRIPT, folder, json.dumps(SENTENCES)], capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}) if py else None
    if not out or out.returncode != 0:
        print("sentence-transformers could not run; comparison skipped", (out.stderr[-300:] if out else ""))
        return
    st = float(out.stdout.strip().splitlines()[-1])
    print(f"embeddings/s on this CPU: Kiln (HTTP, c16, dynamic batching) {r['thr']:.0f}, "
          f"sentence-transformers (in-process, batch 16) {st:.0f}: Kiln/ST = {r['thr'] / st:.2f}")


if __name__ == "__main__":
    main()
