//! `EXECUTION_ENV_PATH`: the Python environment a model's stubs run in, as Triton's
//! python backend takes it from the model's `parameters`: a directory, or a `.tar.gz` of
//! one (a conda-pack archive), whose `bin/python3` runs the stubs. `$$TRITON_MODEL_DIRECTORY`
//! in the path stands for the model's folder. Archives are unpacked once, under the
//! system's temporary directory, keyed by their path, size and modification time.
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_sdk::{Error, Result};
use serde_json::Value;

/// The Python that runs the stubs of a model with `config` in `model_dir`: its
/// `EXECUTION_ENV_PATH` environment's, or `default`.
pub fn python_for(config: &Value, model_dir: &Path, default: &str) -> Result<String> {
    let Some(path) = config["parameters"]["EXECUTION_ENV_PATH"]["string_value"].as_str() else {
        return Ok(default.to_string());
    };
    let path = path.replace("$$TRITON_MODEL_DIRECTORY", &model_dir.display().to_string());
    let p = Path::new(&path);
    let root = if p.is_dir() {
        p.to_path_buf()
    } else if p.is_file() && (path.ends_with(".tar.gz") || path.ends_with(".tgz")) {
        unpack(p)?
    } else {
        return Err(Error::invalid_arg(format!(
            "EXECUTION_ENV_PATH '{path}' is neither a directory nor a .tar.gz archive"
        )));
    };
    ["bin/python3", "bin/python"]
        .iter()
        .map(|b| root.join(b))
        .find(|b| b.is_file())
        .map(|b| b.display().to_string())
        .ok_or_else(|| {
            Error::invalid_arg(format!("EXECUTION_ENV_PATH '{path}' has no bin/python3"))
        })
}

/// Unpacks `archive` (once) and returns where. Models load at the same time, so one
/// unpacks while the others that use the archive wait.
fn unpack(archive: &Path) -> Result<PathBuf> {
    static UNPACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UNPACKING.lock().unwrap_or_else(|p| p.into_inner());
    let meta = std::fs::metadata(archive)
        .map_err(|e| Error::internal(format!("cannot read '{}': {e}", archive.display())))?;
    let mut h = std::hash::DefaultHasher::new();
    archive.hash(&mut h);
    meta.len().hash(&mut h);
    meta.modified().ok().hash(&mut h);
    let dir = std::env::temp_dir()
        .join("kiln-python-envs")
        .join(format!("{:016x}", h.finish()));
    let done = dir.join(".kiln-unpacked");
    if done.is_file() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::internal(format!("cannot create '{}': {e}", dir.display())))?;
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(&dir)
        .status()
        .map_err(|e| Error::internal(format!("cannot run tar: {e}")))?;
    if !status.success() {
        return Err(Error::internal(format!(
            "unpacking EXECUTION_ENV_PATH '{}' failed ({status})",
            archive.display()
        )));
    }
    std::fs::write(&done, b"")
        .map_err(|e| Error::internal(format!("cannot write '{}': {e}", done.display())))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn without_the_parameter_the_default_runs() {
        let python = python_for(&json!({}), Path::new("/m"), "python3").unwrap();
        assert_eq!(python, "python3");
    }

    #[test]
    fn a_directory_or_an_archive_names_its_python() {
        let tmp = std::env::temp_dir().join(format!("kiln-env-test-{}", std::process::id()));
        let env = tmp.join("env");
        std::fs::create_dir_all(env.join("bin")).unwrap();
        std::fs::write(env.join("bin/python3"), b"#!/bin/sh\n").unwrap();
        let cfg = |p: &str| json!({"parameters": {"EXECUTION_ENV_PATH": {"string_value": p}}});
        let got = python_for(&cfg("$$TRITON_MODEL_DIRECTORY/env"), &tmp, "python3").unwrap();
        assert_eq!(got, env.join("bin/python3").display().to_string());
        let st = Command::new("tar")
            .args(["-czf", "env.tar.gz", "-C", "env", "."])
            .current_dir(&tmp)
            .status()
            .unwrap();
        assert!(st.success());
        let got = python_for(&cfg("$$TRITON_MODEL_DIRECTORY/env.tar.gz"), &tmp, "python3").unwrap();
        assert!(
            got.ends_with("/bin/python3") && got.contains("kiln-python-envs"),
            "{got}"
        );
        assert!(Path::new(&got).is_file());
        let e = python_for(&cfg("/nonexistent/env"), &tmp, "python3").unwrap_err();
        assert!(e.message.contains("neither a directory"), "{}", e.message);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
