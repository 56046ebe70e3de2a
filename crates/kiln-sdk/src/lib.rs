//! Safe Rust SDK for Kiln backends.
//!
//! A backend implements three traits — [`Backend`] → [`Model`] → [`Instance`] — and exports
//! them with [`export_backend!`]. The SDK turns them into the C ABI of `kiln-abi`: every call
//! from the host runs inside `catch_unwind`, so a panic becomes an `INTERNAL` error, never
//! unwinding into the host. An instance that panicked is dropped and created anew before
//! its next batch.
//!
//! ```ignore
//! struct MyBackend;
//! impl kiln_sdk::Backend for MyBackend { /* ... */ }
//! kiln_sdk::export_backend!(MyBackend);
//! ```

mod batch_io;
mod bls;
mod compute;
mod control;
mod dtype;
mod error;
mod host;
mod metrics;
mod request;
mod trampoline;

pub use batch_io::{full_dims, BatchInput, BatchInputKind, BatchIo, BatchOutput};
pub use bls::{cancel_infer, infer, infer_all, BlsEvent, InferCall, OwnedTensor};
pub use compute::compute;
pub use control::{model_control, ModelControl};
pub use dtype::{bytes_elements, push_bytes_element, DataType};
pub use error::{Error, ErrorCode, Result};
pub use host::{log, LogLevel};
pub use kiln_abi as abi;
pub use metrics::{metric, MetricKind, MetricOp, MetricSeries};
pub use request::{batch_rows, concat_batch, OwnedRequest, Parameter, Request, Response, Tensor};

/// Facts about a model, from its config and repository.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Model name.
    pub name: String,
    /// Version being loaded.
    pub version: i64,
    /// `<repository>/<model>` directory.
    pub repository_path: std::path::PathBuf,
    /// The full model configuration in Triton's JSON form.
    pub config_json: String,
}

impl ModelInfo {
    /// Directory of the version being loaded (`<repository>/<model>/<version>`).
    pub fn version_path(&self) -> std::path::PathBuf {
        self.repository_path.join(self.version.to_string())
    }
}

/// Where an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    /// On the CPU.
    Cpu,
    /// On the GPU with this device id.
    Gpu(i32),
    /// Wherever the model decides.
    Model,
}

/// Facts about an instance.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// Instance name, e.g. `simple_0_0`.
    pub name: String,
    /// Device placement.
    pub kind: InstanceKind,
    /// Index of the instance within the model.
    pub index: u32,
}

/// The backend as a whole: created once per process when its library is first loaded.
pub trait Backend: Send + Sync + Sized + 'static {
    /// The per-model state.
    type Model: Model;
    /// Called once, at `backend_init`.
    fn initialize() -> Result<Self>;
    /// Loads one version of one model.
    fn load_model(&self, info: &ModelInfo) -> Result<Self::Model>;

    /// Triton's auto-complete: given the config so far (`info.config_json`, possibly only
    /// name and backend, when the folder has no config.pbtxt), return the completed config
    /// in Triton's JSON form, or `None` to keep it. Fill only what is missing. The default
    /// completes nothing.
    fn autocomplete(&self, info: &ModelInfo) -> Result<Option<String>> {
        let _ = info;
        Ok(None)
    }

    /// The server's settings for this backend (tritonserver's `--backend-config`), as
    /// Triton's backend config JSON: `{"cmdline": {"<setting>": "<value>", ...}}`. Called
    /// at most once, after `initialize` and before any model loads. The default ignores
    /// them, as Triton backends ignore settings they do not know.
    fn configure(&self, config_json: &str) -> Result<()> {
        let _ = config_json;
        Ok(())
    }
}

/// A loaded model version, shared by its instances.
pub trait Model: Send + Sync + Sized + 'static {
    /// The per-instance state.
    type Instance: Instance;
    /// Creates one instance; each runs on its own host thread.
    fn new_instance(&self, info: &InstanceInfo) -> Result<Self::Instance>;
}

/// One model instance. `execute` is never called concurrently on the same instance.
pub trait Instance: Send + Sized + 'static {
    /// Answers one request by writing its outputs into `response`.
    fn infer(&mut self, request: &Request<'_>, response: &mut Response) -> Result<()>;

    /// Runs a batch of requests. The default answers each with [`Instance::infer`]; an
    /// error fails only that request. Override to run the batch as one computation
    /// (see [`Request::gather`] and [`Response::scatter_from`]). Every request that has
    /// no final response when this returns is answered by the SDK with an error.
    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        infer_each(self, requests)
    }
}

/// Answers each request with [`Instance::infer`]; an error fails only that request.
/// This is the default `execute`; overrides that do extra work per batch call it too.
pub fn infer_each<I: Instance>(instance: &mut I, requests: &[Request<'_>]) -> Result<()> {
    for request in requests {
        let mut response = request.response()?;
        match instance.infer(request, &mut response) {
            Ok(()) => response.send()?,
            Err(e) => response.send_error(e)?,
        }
    }
    Ok(())
}

#[doc(hidden)]
pub mod __private {
    pub use crate::trampoline::*;
}

/// Exports a [`Backend`] type as a Kiln backend library (`kiln_backend_entry`).
#[macro_export]
macro_rules! export_backend {
    ($backend:ty) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn kiln_backend_entry() -> *const $crate::abi::KilnBackendApi {
            static API: $crate::abi::KilnBackendApi = $crate::abi::KilnBackendApi {
                header: $crate::abi::KilnApiHeader::for_table::<$crate::abi::KilnBackendApi>(),
                name: $crate::abi::KilnStr::from_str(env!("CARGO_PKG_NAME")),
                backend_init: $crate::__private::backend_init::<$backend>,
                backend_fini: $crate::__private::backend_fini::<$backend>,
                model_init: $crate::__private::model_init::<$backend>,
                model_fini: $crate::__private::model_fini::<$backend>,
                instance_init: $crate::__private::instance_init::<$backend>,
                instance_fini: $crate::__private::instance_fini::<$backend>,
                instance_execute: $crate::__private::instance_execute::<$backend>,
                model_autocomplete: Some($crate::__private::model_autocomplete::<$backend>),
                backend_configure: Some($crate::__private::backend_configure::<$backend>),
            };
            &API
        }
    };
}
