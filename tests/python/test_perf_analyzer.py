"""Triton's own perf_analyzer (from the tritonclient 2.41.1 wheel) runs against Kiln."""
import os
import shutil
import subprocess
import sys

import pytest


def perf_analyzer():
    return shutil.which("perf_analyzer", path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("protocol", ["http", "grpc", "grpc-streaming", "http-shm", "grpc-shm"])
@pytest.mark.parametrize("model,shape", [("identity_fp32", "INPUT0:16"), ("simple", None)])
def test_perf_analyzer_measures_without_errors(kiln, model, shape, protocol):
    pa = perf_analyzer()
    assert pa, "perf_analyzer missing from the venv (cargo xtask test installs tritonclient==2.41.1)"
    url, proto = (kiln.url, "http") if protocol.startswith("http") else (kiln.grpc_url, "grpc")
    cmd = [pa, "-m", model, "-u", url, "-i", proto, "--concurrency-range", "1:2",
           "--measurement-interval", "500", "--stability-percentage", "100", "--max-trials", "4"]
    if shape:
        cmd += ["--shape", shape]
    if protocol == "grpc-streaming":
        cmd += ["--streaming"]
    if protocol.endswith("-shm"):
        # Inputs and outputs through registered system shared memory regions.
        cmd += ["--shared-memory", "system", "--output-shared-memory-size", "1024"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Throughput:" in out and "infer/sec" in out, out


@pytest.mark.parametrize("model", ["simple_sequence", "simple_dyna_sequence"])
@pytest.mark.parametrize("protocol", ["http", "grpc-streaming"])
def test_perf_analyzer_drives_sequence_models(kiln, model, protocol):
    """perf_analyzer's sequence mode: concurrent sequences with START/END flags and ids;
    any request Kiln refused (a lost START, a wrong id) would fail the run."""
    pa = perf_analyzer()
    assert pa, "perf_analyzer missing from the venv (cargo xtask test installs tritonclient==2.41.1)"
    url, proto = (kiln.url, "http") if protocol == "http" else (kiln.grpc_url, "grpc")
    cmd = [pa, "-m", model, "-u", url, "-i", proto, "--concurrency-range", "3", "--sequence-length", "6",
           "--measurement-interval", "500", "--stability-percentage", "100", "--max-trials", "4"]
    if protocol == "grpc-streaming":
        cmd += ["--streaming"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Throughput:" in out and "infer/sec" in out, out
