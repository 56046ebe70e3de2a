//! Finds and opens backend libraries (`libkiln_<backend>.so`), checks the ABI handshake and
//! runs `backend_init` once per library. Libraries are never unloaded while the server runs.
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_abi::{self as abi, KilnBackendApi};
use thiserror::Error;

use crate::host;

/// Why a backend library could not be used.
#[derive(Debug, Error)]
pub enum LoadError {
    /// No library file found.
    #[error("unable to find backend library 'libkiln_{backend}.so' for backend '{backend}'; searched: {searched}")]
    NotFound { backend: String, searched: String },
    /// `dlopen` failed (not ELF, missing dependency, ...).
    #[error("failed to open backend library '{path}': {reason}")]
    Open { path: String, reason: String },
    /// The library is not a Kiln backend.
    #[error("'{path}' is not a Kiln backend: {reason}")]
    NotKiln { path: String, reason: String },
    /// ABI version mismatch.
    #[error("backend library '{path}' was built for Kiln backend ABI {major}.{minor}, but this server speaks ABI {host_major}.{host_minor}")]
    Version {
        path: String,
        major: u32,
        minor: u32,
        host_major: u32,
        host_minor: u32,
    },
    /// `backend_init` failed.
    #[error("backend '{path}' failed to initialize: {reason}")]
    Init { path: String, reason: String },
}

/// An opened, initialized backend library.
pub struct BackendLibrary {
    /// File it was loaded from.
    pub path: PathBuf,
    /// Its function table.
    pub api: &'static KilnBackendApi,
    /// State returned by `backend_init`.
    pub state: *mut c_void,
}

impl BackendLibrary {
    /// The ABI 1.1 `model_autocomplete` hook, when the library's table has it.
    pub fn autocomplete_fn(
        &self,
    ) -> Option<
        unsafe extern "C" fn(
            *mut c_void,
            *const abi::KilnModelInfo,
            *mut c_void,
            unsafe extern "C" fn(*mut c_void, abi::KilnStr),
        ) -> *mut abi::KilnError,
    > {
        let h = self.api.header;
        if h.abi_minor < 1 || (h.struct_size as usize) < abi::KILN_BACKEND_API_SIZE_1_1 {
            return None;
        }
        self.api.model_autocomplete
    }

    /// The ABI 1.2 `backend_configure` hook, when the library's table has it.
    fn configure_fn(
        &self,
    ) -> Option<unsafe extern "C" fn(*mut c_void, abi::KilnStr) -> *mut abi::KilnError> {
        let h = self.api.header;
        if h.abi_minor < 2 || (h.struct_size as usize) < std::mem::size_of::<KilnBackendApi>() {
            return None;
        }
        self.api.backend_configure
    }
}

// SAFETY: the backend state is only passed back to the backend, which must be thread-safe
// for the calls the ABI allows from several threads (model/instance init on host threads).
unsafe impl Send for BackendLibrary {}
unsafe impl Sync for BackendLibrary {}

/// Maps Triton backend / platform names to Kiln backend library names.
pub fn library_name(backend: &str) -> &str {
    match backend {
        "onnxruntime" | "onnxruntime_onnx" => "onnx",
        other => other,
    }
}

/// Candidate paths in Triton's search order: version dir, model dir, backend directory.
pub fn candidates(
    backend: &str,
    model_dir: &Path,
    version: i64,
    backend_dir: &Path,
) -> Vec<PathBuf> {
    let lib = library_name(backend);
    let file = format!("libkiln_{lib}.so");
    vec![
        model_dir.join(version.to_string()).join(&file),
        model_dir.join(&file),
        backend_dir.join(lib).join(&file),
    ]
}

static LIBRARIES: OnceLock<Mutex<HashMap<PathBuf, Arc<BackendLibrary>>>> = OnceLock::new();

/// One `--backend-config` setting: the backend it is for (`None`: every backend), the
/// setting and its value.
pub type BackendSetting = (Option<String>, String, String);

static BACKEND_CONFIG: OnceLock<Vec<BackendSetting>> = OnceLock::new();

/// Sets the server's backend settings (once, before any backend is opened); each backend
/// gets those for its name (Triton's names map as `library_name` maps them) and the global
/// ones, through `backend_configure`.
pub fn set_backend_config(settings: Vec<BackendSetting>) {
    let _ = BACKEND_CONFIG.set(settings);
}

/// Parses tritonserver's `--backend-config <backend>,<setting>=<value>` (or
/// `<setting>=<value>` for every backend).
pub fn parse_backend_setting(text: &str) -> Result<BackendSetting, String> {
    let (backend, kv) = match text.split_once(',') {
        Some((b, kv)) if !b.contains('=') => (Some(b.to_string()), kv),
        _ => (None, text),
    };
    let (k, v) = kv.split_once('=').ok_or_else(|| {
        format!("--backend-config expects [<backend>,]<setting>=<value>, got '{text}'")
    })?;
    Ok((backend, k.to_string(), v.to_string()))
}

/// The backend config JSON for library `lib`, when any setting applies to it.
fn backend_config_json(lib: &str) -> Option<String> {
    let settings = BACKEND_CONFIG.get()?;
    let mut cmdline = serde_json::Map::new();
    // Global settings first, so a backend's own win.
    for global in [true, false] {
        for (b, k, v) in settings {
            let applies = match b {
                None => global,
                Some(b) => !global && library_name(b) == lib,
            };
            if applies {
                cmdline.insert(k.clone(), serde_json::Value::from(v.clone()));
            }
        }
    }
    (!cmdline.is_empty()).then(|| serde_json::json!({ "cmdline": cmdline }).to_string())
}

/// Finds the library for `backend` and opens it (once per path).
pub fn find_and_open(
    backend: &str,
    model_dir: &Path,
    version: i64,
    backend_dir: &Path,
) -> Result<Arc<BackendLibrary>, LoadError> {
    let cands = candidates(backend, model_dir, version, backend_dir);
    let Some(path) = cands.iter().find(|p| p.is_file()) else {
        return Err(LoadError::NotFound {
            backend: library_name(backend).to_string(),
            searched: cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.clone());
    let mut libs = LIBRARIES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(l) = libs.get(&path) {
        return Ok(l.clone());
    }
    let lib = Arc::new(open(&path)?);
    libs.insert(path, lib.clone());
    Ok(lib)
}

fn open(path: &Path) -> Result<BackendLibrary, LoadError> {
    let p = path.display().to_string();
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: loading a library runs its initializers; backends are trusted code chosen by
    // the operator through the model repository, as in Triton.
    let lib = unsafe { libloading::os::unix::Library::open(Some(path), flags) }.map_err(|e| {
        LoadError::Open {
            path: p.clone(),
            reason: e.to_string(),
        }
    })?;
    // SAFETY: symbol type matches the ABI's entry signature.
    let entry = match unsafe { lib.get::<abi::KilnBackendEntryFn>(abi::ENTRY_SYMBOL) } {
        Ok(sym) => *sym,
        Err(_) => {
            // SAFETY: only probing for the symbol's presence.
            let triton =
                unsafe { lib.get::<*const c_void>(b"TRITONBACKEND_ModelInstanceExecute\0") }
                    .is_ok();
            let reason = if triton {
                "it is a Triton C++ backend (exports TRITONBACKEND_ModelInstanceExecute); Kiln loads backends built with the Kiln SDK or kiln_backend.h".to_string()
            } else {
                "it does not export 'kiln_backend_entry'".to_string()
            };
            return Err(LoadError::NotKiln { path: p, reason });
        }
    };
    // SAFETY: the entry point only returns a pointer to a static table.
    let api_ptr = unsafe { entry() };
    // SAFETY: a non-null table from the library, which is never unloaded.
    let Some(api) = (unsafe { api_ptr.as_ref() }) else {
        return Err(LoadError::NotKiln {
            path: p,
            reason: "kiln_backend_entry returned null".into(),
        });
    };
    let h = api.header;
    if h.magic != abi::KILN_ABI_MAGIC {
        return Err(LoadError::NotKiln {
            path: p,
            reason: format!("bad magic 0x{:016x}", h.magic),
        });
    }
    if h.abi_major != abi::KILN_ABI_MAJOR || h.abi_minor > abi::KILN_ABI_MINOR {
        return Err(LoadError::Version {
            path: p,
            major: h.abi_major,
            minor: h.abi_minor,
            host_major: abi::KILN_ABI_MAJOR,
            host_minor: abi::KILN_ABI_MINOR,
        });
    }
    if (h.struct_size as usize) < abi::KILN_BACKEND_API_SIZE_1_0 {
        return Err(LoadError::NotKiln {
            path: p,
            reason: format!(
                "function table of {} bytes is smaller than ABI 1.0's",
                h.struct_size
            ),
        });
    }
    let mut state = std::ptr::null_mut();
    // SAFETY: ABI call with the host's static table.
    let e = unsafe { (api.backend_init)(&host::HOST_API, &mut state) };
    if let Some(e) = host::take_error(e) {
        return Err(LoadError::Init {
            path: p,
            reason: e.message,
        });
    }
    // Never dlclose: backends may leave threads or TLS destructors behind (Triton's policy too).
    std::mem::forget(lib);
    let library = BackendLibrary {
        path: path.to_path_buf(),
        api,
        state,
    };
    let name = path
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.strip_prefix("libkiln_"))
        .and_then(|f| f.strip_suffix(".so"))
        .unwrap_or("");
    if let (Some(json), Some(configure)) = (backend_config_json(name), library.configure_fn()) {
        // SAFETY: ABI call on the state backend_init made; the string outlives the call.
        let e = unsafe { configure(state, abi::KilnStr::from_str(&json)) };
        if let Some(e) = host::take_error(e) {
            return Err(LoadError::Init {
                path: p,
                reason: format!("backend settings refused: {}", e.message),
            });
        }
    }
    Ok(library)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_settings_parse_as_tritonserver_writes_them() {
        let s = |t: &str| parse_backend_setting(t);
        assert_eq!(
            s("onnxruntime,default-max-batch-size=8"),
            Ok((
                Some("onnxruntime".into()),
                "default-max-batch-size".into(),
                "8".into()
            ))
        );
        assert_eq!(
            s("default-max-batch-size=2"),
            Ok((None, "default-max-batch-size".into(), "2".into()))
        );
        // A value may itself hold commas.
        assert_eq!(
            s("python,shm-region-prefix-name=a,b"),
            Ok((
                Some("python".into()),
                "shm-region-prefix-name".into(),
                "a,b".into()
            ))
        );
        assert!(s("onnxruntime,nothing").is_err());
    }
}
