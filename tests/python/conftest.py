"""Starts the kiln binary laid out by `cargo xtask build` for the tritonclient suite."""
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

DIST = os.environ.get("KILN_DIST", os.path.join(os.path.dirname(__file__), "..", "..", "target", "kiln"))
REPO = os.environ.get("KILN_REPO", os.path.join(os.path.dirname(__file__), "..", "..", "model_repository"))


class Kiln:
    def __init__(self, *args, repo=REPO):
        self.proc = subprocess.Popen(
            [os.path.join(DIST, "kiln"), "--model-repository", repo, "--http-port", "0",
             "--grpc-port", "0", "--metrics-port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        ports = {}
        deadline = time.time() + 30
        # What it prints (its log), for tests that look for a line.
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"Started (HTTPService|GRPCInferenceService|Metrics Service) at \S+:(\d+)", line)
            if m:
                ports[m.group(1)] = int(m.group(2))
            if len(ports) == 3 or time.time() > deadline:
                break
        assert len(ports) == 3, f"kiln did not start: {ports}"
        self.port = ports["HTTPService"]
        self.grpc_port = ports["GRPCInferenceService"]
        self.metrics_port = ports["Metrics Service"]
        threading.Thread(target=lambda: [self.lines.append(line) for line in self.proc.stdout],
                         daemon=True).start()
        self.url = f"localhost:{self.port}"
        self.grpc_url = f"localhost:{self.grpc_port}"
        self.metrics_url = f"http://localhost:{self.metrics_port}/metrics"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def refused_start(*args, repo=REPO):
    """Runs kiln with `args`, which must stop it at start; returns what it printed."""
    p = subprocess.run([os.path.join(DIST, "kiln"), "--model-repository", repo, "--http-port", "0",
                        "--grpc-port", "0", "--metrics-port", "0", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, "kiln started"
    return p.stdout + p.stderr


def as_text(a):
    """BYTES values as str (tritonclient returns bytes objects; onnxruntime str)."""
    import numpy as np
    return np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])(a)


@contextlib.contextmanager
def serving_onnx(path, name="m", max_batch_size=4):
    """Kiln serving the ONNX file at `path` as the Triton folder `name/1/model.onnx` with a
    two-line config (`backend: "onnxruntime"`, `max_batch_size`), in a temporary repository."""
    repo = tempfile.mkdtemp()
    try:
        os.makedirs(os.path.join(repo, name, "1"))
        shutil.copy(path, os.path.join(repo, name, "1", "model.onnx"))
        with open(os.path.join(repo, name, "config.pbtxt"), "w") as f:
            f.write(f'backend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n')
        k = Kiln(repo=repo)
        try:
            yield k
        finally:
            k.stop()
    finally:
        shutil.rmtree(repo, ignore_errors=True)


@pytest.fixture(scope="session")
def kiln():
    k = Kiln()
    yield k
    k.stop()


@pytest.fixture(scope="session")
def kiln_explicit():
    k = Kiln("--model-control-mode", "explicit", "--load-model", "simple", "--http-max-input-size", "4096")
    yield k
    k.stop()
