//! `cargo xtask build-cuda`: the CUDA variant of the candle backend, built on a machine
//! without a GPU (the recipe of `../shared/design/cuda-build.md`).
//!
//! NVIDIA's CUDA 13.0 wheels from PyPI provide nvcc and the libraries; a link-time-only
//! stub `libcuda.so` stands in for the driver. The result is `target/kiln-cuda/`: the same
//! server and backends as `target/kiln/`, with the candle and onnx backends built with
//! candle's `cuda` feature. Only those libraries link CUDA; the server never does.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, copy, run};

/// Pinned to CUDA 13.0: the GPU machines run driver 580, which rejects PTX from nvcc >= 13.1.
/// nvcc's own dependencies (nvvm, crt) are unpinned upstream, so they are pinned here.
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cublas==13.1.0.3",
    "nvidia-curand==10.4.0.35",
    "nvidia-cuda-nvrtc==13.0.88",
];

/// Backends built with candle's `cuda` feature in the CUDA variant.
const CUDA_BACKENDS: &[&str] = &["candle", "onnx"];

/// H100/H200 (sm_90a).
const COMPUTE_CAP: &str = "90";

/// Creates `<prefix>/cuda` (bin, include, nvvm, lib + stub libcuda) once; returns it.
fn toolchain(root: &Path, prefix: &Path) -> Result<PathBuf> {
    let cuda = prefix.join("cuda");
    let stamp = prefix.join(".kiln-cuda");
    let want = WHEELS.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(cuda);
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let venv = prefix.join("venv");
    run(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
    let py = venv.join("bin/python");
    run(Command::new(&py)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(WHEELS))?;
    let out = Command::new(&py)
        .args([
            "-c",
            "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))",
        ])
        .output()?;
    let nv = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    if !nv.join("bin/nvcc").exists() {
        bail!(
            "nvcc not found under {} after installing the CUDA wheels",
            nv.display()
        );
    }
    let _ = std::fs::remove_dir_all(&cuda);
    std::fs::create_dir_all(cuda.join("lib/stubs"))?;
    for d in ["bin", "include", "nvvm"] {
        std::os::unix::fs::symlink(nv.join(d), cuda.join(d))?;
    }
    for entry in std::fs::read_dir(nv.join("lib"))? {
        let p = entry?.path();
        if let Some(name) = p.file_name() {
            std::os::unix::fs::symlink(&p, cuda.join("lib").join(name))?;
        }
    }
    // Linker names (-lcublas, ...) that the wheels do not ship.
    for (link, target) in [
        ("libcudart.so", "libcudart.so.13"),
        ("libcublas.so", "libcublas.so.13"),
        ("libcublasLt.so", "libcublasLt.so.13"),
        ("libnvrtc.so", "libnvrtc.so.13"),
        ("libcurand.so", "libcurand.so.10"),
    ] {
        let _ = std::fs::remove_file(cuda.join("lib").join(link));
        std::os::unix::fs::symlink(target, cuda.join("lib").join(link))?;
    }
    stub_libcuda(root, prefix, &cuda)?;
    std::fs::write(&stamp, want)?;
    Ok(cuda)
}

/// Builds a link-time-only `libcuda.so` (SONAME libcuda.so.1) exporting every driver entry
/// point cudarc loads, each returning CUDA_ERROR_STUB_LIBRARY. Never shipped or loaded.
fn stub_libcuda(root: &Path, prefix: &Path, cuda: &Path) -> Result<()> {
    run(cargo().current_dir(root).arg("fetch"))?;
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let mut sources: Vec<PathBuf> = Vec::new();
    for reg in std::fs::read_dir(home.join("registry/src"))? {
        for krate in std::fs::read_dir(reg?.path())? {
            let p = krate?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("cudarc-0.19.") {
                sources.push(p.join("src/driver/sys/mod.rs"));
            }
        }
    }
    sources.sort();
    let sys = sources
        .last()
        .context("cudarc 0.19 sources not found after `cargo fetch`")?;
    let text = std::fs::read_to_string(sys)?;
    let mut symbols: Vec<&str> = text
        .split("load::<_F>(\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .filter(|s| s.starts_with("cu"))
        .collect();
    symbols.sort_unstable();
    symbols.dedup();
    if symbols.is_empty() {
        bail!("no driver symbols found in {}", sys.display());
    }
    let c: String = symbols
        .iter()
        .map(|s| format!("int {s}(void){{return 34;}}\n"))
        .collect();
    let src = prefix.join("libcuda_stub.c");
    std::fs::write(&src, c)?;
    run(Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(cuda.join("lib/stubs/libcuda.so"))
        .arg(&src))
}

/// Builds the CUDA candle backend and lays out `target/kiln-cuda/`.
pub fn build_cuda(root: &Path, target: &Path, dist: &Path) -> Result<PathBuf> {
    let cuda = toolchain(root, &target.join("cuda-build"))?;
    let cuda_target = target.join("cuda");
    let path = format!(
        "{}:{}",
        cuda.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(cargo()
        .current_dir(root)
        .env("PATH", path)
        .env("CUDA_ROOT", &cuda)
        .env("CUDARC_CUDA_VERSION", "13000")
        .env("CUDA_COMPUTE_CAP", COMPUTE_CAP)
        .args([
            "build",
            "--release",
            "-p",
            "candle-backend",
            "-p",
            "onnx-backend",
        ])
        .args(["--features", "candle-backend/cuda,onnx-backend/cuda"])
        .arg("--target-dir")
        .arg(&cuda_target))?;
    let out = target.join("kiln-cuda");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("backends"))?;
    copy(&dist.join("kiln"), &out.join("kiln"))?;
    for entry in std::fs::read_dir(dist.join("backends"))? {
        let dir = entry?.path();
        let Some(name) = dir.file_name() else {
            continue;
        };
        if CUDA_BACKENDS.iter().any(|b| name == *b) {
            continue;
        }
        std::fs::create_dir_all(out.join("backends").join(name))?;
        for f in std::fs::read_dir(&dir)? {
            let f = f?.path();
            if let Some(n) = f.file_name() {
                copy(&f, &out.join("backends").join(name).join(n))?;
            }
        }
    }
    let mut stripped = vec![out.join("kiln")];
    for b in CUDA_BACKENDS {
        std::fs::create_dir_all(out.join("backends").join(b))?;
        let file = format!("libkiln_{b}.so");
        let lib = out.join("backends").join(b).join(&file);
        copy(&cuda_target.join("release").join(&file), &lib)?;
        stripped.push(lib);
    }
    // Smaller to carry to a GPU machine (64 MiB there): symbols are not needed to run.
    for f in &stripped {
        let _ = Command::new("strip")
            .arg("--strip-unneeded")
            .arg(f)
            .status();
    }
    eprintln!(
        "laid out {} (candle and onnx backends with CUDA)",
        out.display()
    );
    Ok(out)
}
