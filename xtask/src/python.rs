//! The Python side of the test suite: a venv with the real tritonclient (and the
//! perf_analyzer binary its 2.41.1 wheel ships), installed on first use.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Result};

use crate::run;

/// Pinned so the suite is reproducible; 2.41.1's manylinux wheel carries perf_analyzer.
const PACKAGES: &[&str] = &[
    "tritonclient[http,grpc]==2.41.1",
    "numpy<2.3",
    "pytest==8.3.4",
    "requests==2.32.3",
    // The reference parser for Prometheus' text format, used to read /metrics.
    "prometheus-client==0.21.1",
    // The bench's reference for the onnx backend (same model files, same machine).
    "onnxruntime==1.20.1",
    // perf_analyzer links libcudart.so.12 (unused on CPU); this wheel provides it.
    "nvidia-cuda-runtime-cu12==12.4.127",
];

/// Creates `.venv` with the pinned packages if it is missing or incomplete; returns its path.
pub fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join(".venv");
    let stamp = venv.join(".kiln-packages");
    let want = PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        run(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin").join("pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(PACKAGES))?;
        std::fs::write(&stamp, want)?;
    }
    ensure_libb64()?;
    Ok(venv)
}

/// Installs a Debian package when `present` is false: with apt-get when running as root,
/// otherwise fails with the command to run.
fn ensure_apt(package: &str, why: &str, present: bool) -> Result<()> {
    if present {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if !is_root {
        bail!("{why} needs {package}: run `sudo apt-get install -y {package}`");
    }
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// perf_analyzer needs Debian's libb64.
fn ensure_libb64() -> Result<()> {
    let have = [
        "/usr/lib/x86_64-linux-gnu/libb64.so.0d",
        "/usr/lib/libb64.so.0d",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    ensure_apt("libb64-0d", "perf_analyzer", have)
}

/// candle-onnx compiles ONNX's .proto with `protoc` at build time (unless `PROTOC` names one).
pub fn ensure_protoc() -> Result<()> {
    let have = std::env::var_os("PROTOC").is_some()
        || Command::new("protoc").arg("--version").output().is_ok();
    ensure_apt(
        "protobuf-compiler",
        "the onnx backend's build (candle-onnx)",
        have,
    )
}

/// LD_LIBRARY_PATH that lets perf_analyzer find libcudart.so.12 from the venv.
pub fn perf_analyzer_lib_path(venv: &Path) -> String {
    let mut dirs: Vec<String> = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/nvidia/cuda_runtime/lib"))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
        dirs.push(old);
    }
    dirs.join(":")
}
