"""Compares builds of the onnx executor on one model, each against onnxruntime in the same
rounds: `ab_builds.py <model.onnx> <batch> <iterations> <rounds> <bench_plan> [<bench_plan> ...]`
(`SEQ=128` for a sequence model). Each round times onnxruntime, then every build (copies
of `target/release/examples/bench_plan` made before and after a change), so machine drift
falls on all of them; the ratios printed are medians over the rounds. This machine's speed
moves by ±10 % within minutes, and one build against another (not against onnxruntime)
moves with the layout of its code by a few percent: judge a change by the whole model in
interleaved rounds, not by one timing."""
import os
import subprocess
import sys

import numpy as np

from onnx_vs_ort import ort_median, ort_session


def main():
    path, batch, iters, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    builds = sys.argv[5:]
    seq = int(os.environ.get("SEQ", "1"))
    session = ort_session(path, batch, seq)
    ratios = {b: [] for b in builds}
    orts = []
    for _ in range(rounds):
        o = ort_median(session, iters)
        orts.append(o)
        for b in builds:
            run = subprocess.run([b, path, str(iters), str(batch), str(seq)], capture_output=True, text=True, check=True)
            ratios[b].append(float(run.stdout.strip()) / o)
    print(f"onnxruntime median {np.median(orts):.2f} ms")
    for b in builds:
        rs = " ".join(f"{r:.3f}" for r in ratios[b])
        print(f"{b:30} kiln/ort median {np.median(ratios[b]):.3f}  rounds {rs}")


if __name__ == "__main__":
    main()
