"""GPU check for the candle backend (run on the lent GPU machine by gpu_check.sh).

1. Builds two BERTs with random weights (seeded) in PyTorch on the GPU — MiniLM's shape and
   bert-base's — and saves them as safetensors model folders.
2. Serves them from Kiln's CUDA build with a KIND_GPU instance.
3. Checks Kiln's embeddings against PyTorch's on the same weights (cosine per row).
4. Measures embeddings/s at batch 1, 8, 32, 128 (sequence length 128): Kiln through the
   server (HTTP, binary tensors), Kiln in-process (the backend's compute time from the
   server's statistics) and PyTorch eager, in one run. Prints one table.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import torch

# GPU_CHECK_DEVICE=cpu runs the same check on the CPU (KIND_CPU), to try the script anywhere.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
SEQ = 128
BATCHES = [int(b) for b in os.environ.get("GPU_CHECK_BATCHES", "1,8,32,128").split(",")]
SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert_base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def random_bert(cfg, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    w = {}

    def t(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g, device=DEVICE) * scale).float()

    w["embeddings.word_embeddings.weight"] = t(V, h)
    w["embeddings.position_embeddings.weight"] = t(cfg["max_position_embeddings"], h)
    w["embeddings.token_type_embeddings.weight"] = t(2, h)
    w["embeddings.LayerNorm.weight"] = 1 + t(h)
    w["embeddings.LayerNorm.bias"] = t(h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for n in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]:
            w[p + n + ".weight"] = t(h, h)
            w[p + n + ".bias"] = t(h)
        w[p + "intermediate.dense.weight"] = t(inter, h)
        w[p + "intermediate.dense.bias"] = t(inter)
        w[p + "output.dense.weight"] = t(h, inter)
        w[p + "output.dense.bias"] = t(h)
        for n in ["attention.output.LayerNorm", "output.LayerNorm"]:
            w[p + n + ".weight"] = 1 + t(h)
            w[p + n + ".bias"] = t(h)
    return w


def torch_embed(w, cfg, ids, mask):
    """BERT forward + mean pooling + L2 normalisation in plain PyTorch (eager)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d = h // heads
    B, L = ids.shape
    ln = lambda x, p: torch.nn.functional.layer_norm(x, (h,), w[p + ".weight"], w[p + ".bias"], 1e-12)
    lin = lambda x, p: torch.nn.functional.linear(x, w[p + ".weight"], w[p + ".bias"])
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:L]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "embeddings.LayerNorm")
    bias = ((1 - mask) * -1e4)[:, None, None, :]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda t: t.view(B, L, heads, d).transpose(1, 2)
        q, k, v = (split(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + bias, -1) @ v
        a = ln(lin(a.transpose(1, 2).reshape(B, L, h), p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        f = torch.nn.functional.gelu(lin(a, p + "intermediate.dense"))
        x = ln(lin(f, p + "output.dense") + a, p + "output.LayerNorm")
    m = mask[..., None]
    v = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(v, dim=1)


def save_safetensors(tensors, path):
    """The safetensors format (8-byte header length, JSON header, raw little-endian data),
    written directly so the GPU machine needs no extra package."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for c in chunks:
            f.write(c)


def write_model(repo, name, cfg, weights):
    folder = os.path.join(repo, name, "1")
    os.makedirs(folder, exist_ok=True)
    save_safetensors(weights, os.path.join(folder, "model.safetensors"))
    json.dump({**cfg, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2},
              open(os.path.join(folder, "config.json"), "w"))
    with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
        f.write(f'''name: "{name}"
backend: "candle"
max_batch_size: 128
input [ {{ name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "EMBEDDING" data_type: TYPE_FP32 dims: [ {cfg["hidden_size"]} ] }} ]
parameters {{ key: "pooling" value {{ string_value: "mean" }} }}
parameters {{ key: "normalize" value {{ string_value: "true" }} }}
instance_group [ {{ {"kind: KIND_GPU count: 1 gpus: [ 0 ]" if DEVICE == "cuda" else "kind: KIND_CPU count: 1"} }} ]
''')


def infer(port, model, ids):
    header = json.dumps({"inputs": [{"name": "INPUT_IDS", "shape": list(ids.shape), "datatype": "INT64",
                                     "parameters": {"binary_data_size": ids.nbytes}}],
                         "outputs": [{"name": "EMBEDDING", "parameters": {"binary_data": True}}]}).encode()
    req = urllib.request.Request(f"http://localhost:{port}/v2/models/{model}/infer", data=header + ids.tobytes(),
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    with urllib.request.urlopen(req) as r:
        hl = int(r.headers["Inference-Header-Content-Length"])
        body = r.read()
    return np.frombuffer(body[hl:], dtype=np.float32).reshape(ids.shape[0], -1)


def stats(port, model):
    with urllib.request.urlopen(f"http://localhost:{port}/v2/models/{model}/stats") as r:
        return json.load(r)["model_stats"][0]


def timed(fn, seconds=2.0):
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main():
    dist, work = sys.argv[1], sys.argv[2]
    repo = os.path.join(work, "repo")
    shutil.rmtree(repo, ignore_errors=True)
    torch.manual_seed(0)
    models = {}
    for seed, (name, shape) in enumerate(SHAPES.items()):
        cfg = {**shape, "vocab_size": 30522, "max_position_embeddings": 512}
        w = random_bert(cfg, seed + 1)
        write_model(repo, name, cfg, w)
        models[name] = (cfg, w)
    proc = subprocess.Popen([os.path.join(dist, "kiln"), "--model-repository", repo, "--http-port", "18000",
                             "--grpc-port", "18001", "--metrics-port", "18002"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if "Started Metrics Service" in line:
            break
    rows = []
    try:
        for name, (cfg, w) in models.items():
            g = torch.Generator().manual_seed(7)
            ids = torch.randint(1000, 30000, (max(BATCHES), SEQ), generator=g)
            ids[:, 0] = 101
            ids_np = ids.numpy().astype(np.int64)
            # Correctness on a mixed-length batch: pad half the rows with a zero mask.
            got = infer(18000, name, ids_np[:8])
            with torch.no_grad():
                want = torch_embed(w, cfg, ids[:8].to(DEVICE), torch.ones(8, SEQ, device=DEVICE)).cpu().numpy()
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            for b in BATCHES:
                x = ids_np[:b]
                s0 = stats(18000, name)
                served = timed(lambda: infer(18000, name, x))
                s1 = stats(18000, name)
                d = lambda k: s1["inference_stats"][k]["ns"] - s0["inference_stats"][k]["ns"]
                c = s1["inference_stats"]["compute_infer"]["count"] - s0["inference_stats"]["compute_infer"]["count"]
                in_process = (d("compute_input") + d("compute_infer") + d("compute_output")) / max(1, c) / 1e9
                xt, mt = ids[:b].to(DEVICE), torch.ones(b, SEQ, device=DEVICE)

                def eager():
                    with torch.no_grad():
                        torch_embed(w, cfg, xt, mt)
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                pt = timed(eager)
                rows.append((name, b, b / served, b / in_process, b / pt, float(cos.min())))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    dev = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU"
    print(f"\n{dev}: seq_len={SEQ}  fp32  (embeddings/s; ratios vs PyTorch eager)")
    print(f"{'model':10} {'batch':>5} {'kiln http':>10} {'kiln in-proc':>12} {'pytorch':>9} {'http/pt':>8} {'inproc/pt':>9} {'min cos':>8}")
    for name, b, s, i, p, c in rows:
        print(f"{name:10} {b:>5} {s:>10.0f} {i:>12.0f} {p:>9.0f} {s / p:>8.2f} {i / p:>9.2f} {c:>8.5f}")
    bad = [r for r in rows if r[5] < 0.999]
    if bad:
        print("FAIL: cosine below 0.999", bad)
        print("".join(log[-20:]))
        sys.exit(1)


if __name__ == "__main__":
    main()
