//! Model management from a backend (ABI 1.4's host `model_control`): Triton's model
//! loading API, as the python backend's `pb_utils.load_model` uses it.
use kiln_abi::{self as abi, KilnStr};

use crate::error::{Error, Result};
use crate::host;

/// What to do with a model of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelControl<'a> {
    /// Load (or reload) the model; `config_json`, when given, replaces its configuration.
    Load { config_json: Option<&'a str> },
    /// Unload the model; with `dependents`, also the models it runs that no other loaded
    /// model runs (an ensemble's composing models).
    Unload { dependents: bool },
    /// Whether the version (`None`: any) is ready.
    Ready { version: Option<i64> },
}

/// Applies `op` to model `name`; returns whether it is ready (for `Ready`; `Load` gives
/// true and `Unload` false once done). Load and unload need the server's explicit model
/// control mode and block: call them from `execute` (an instance's thread).
pub fn model_control(name: &str, op: ModelControl<'_>) -> Result<bool> {
    let h = host::get()?;
    if (h.header.struct_size as usize) <= std::mem::offset_of!(abi::KilnHostApi, model_control) {
        return Err(Error::unsupported(
            "this server's host API predates model control (ABI 1.4)",
        ));
    }
    let (code, version, config) = match op {
        ModelControl::Load { config_json } => (abi::KILN_MODEL_LOAD, -1, config_json.unwrap_or("")),
        ModelControl::Unload { dependents: false } => (abi::KILN_MODEL_UNLOAD, -1, ""),
        ModelControl::Unload { dependents: true } => (abi::KILN_MODEL_UNLOAD_DEPENDENTS, -1, ""),
        ModelControl::Ready { version } => (abi::KILN_MODEL_READY, version.unwrap_or(-1), ""),
    };
    let mut ready = false;
    // SAFETY: the strings are borrowed for the call; `ready` is a valid out pointer.
    host::check(unsafe {
        (h.model_control)(
            code,
            KilnStr::from_str(name),
            version,
            KilnStr::from_str(config),
            &mut ready,
        )
    })?;
    Ok(ready)
}
