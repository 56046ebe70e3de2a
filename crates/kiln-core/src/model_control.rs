//! Model management for backends (ABI 1.4's host `model_control`): Triton's API behind the
//! python backend's `pb_utils.load_model`, `unload_model` and `is_model_ready`. Loads and
//! unloads go through the same server calls as the repository extension's, so they need
//! `--model-control-mode=explicit` as there.
use std::sync::{Arc, Mutex, OnceLock, Weak};

use kiln_abi::{self as abi, KilnError, KilnStr};
use serde_json::{Map, Value};

use crate::error::CoreError;
use crate::host::owned_str;
use crate::server::Server;

/// The server in this process (the latest started).
static SERVER: OnceLock<Mutex<Weak<Server>>> = OnceLock::new();

/// Makes `server` the one backends' model control requests go to.
pub(crate) fn serve_from(server: &Arc<Server>) {
    let slot = SERVER.get_or_init(|| Mutex::new(Weak::new()));
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(server);
}

fn server() -> Result<Arc<Server>, CoreError> {
    SERVER
        .get()
        .and_then(|s| s.lock().unwrap_or_else(|p| p.into_inner()).upgrade())
        .ok_or_else(|| CoreError::unavailable("model control: the server is not running"))
}

/// Runs one operation; returns readiness for `KILN_MODEL_READY`.
fn control(op: u32, name: &str, version: i64, config: &str) -> Result<bool, CoreError> {
    let server = server()?;
    match op {
        abi::KILN_MODEL_READY => Ok(server.model_ready(name, (version >= 0).then_some(version))),
        abi::KILN_MODEL_LOAD => {
            let mut params = Map::new();
            if !config.trim().is_empty() {
                params.insert("config".into(), Value::String(config.to_string()));
            }
            server.repository_load(name, &params, &[])?;
            Ok(true)
        }
        abi::KILN_MODEL_UNLOAD | abi::KILN_MODEL_UNLOAD_DEPENDENTS => {
            server.repository_unload(name, op == abi::KILN_MODEL_UNLOAD_DEPENDENTS)?;
            Ok(false)
        }
        _ => Err(CoreError::invalid(format!(
            "model control: unknown operation {op}"
        ))),
    }
}

/// `KilnHostApi::model_control`.
pub(crate) unsafe extern "C" fn h_model_control(
    op: u32,
    name: KilnStr,
    version: i64,
    config_json: KilnStr,
    ready: *mut bool,
) -> *mut KilnError {
    if op != abi::KILN_MODEL_READY && tokio::runtime::Handle::try_current().is_ok() {
        return crate::host::new_error(&CoreError::internal(
            "model_control must be called from a model instance's thread",
        ));
    }
    let (name, config) = (owned_str(&name), owned_str(&config_json));
    let outcome = std::panic::catch_unwind(|| control(op, &name, version, &config));
    match outcome {
        Ok(Ok(r)) => {
            if !ready.is_null() {
                // SAFETY: non-null out pointer from the caller.
                unsafe { *ready = r };
            }
            std::ptr::null_mut()
        }
        Ok(Err(e)) => crate::host::new_error(&e),
        Err(_) => {
            crate::host::new_error(&CoreError::internal("model control panicked in the host"))
        }
    }
}
