//! Kiln's core: everything between the front ends and the backend libraries.
//!
//! * [`config`] — `config.pbtxt` parsing and Triton's defaults.
//! * [`repository`] — the model repository, model states, load/unload.
//! * [`model`] — a loaded version: validation, instance threads, responses.
//! * [`scheduler`] — default scheduler and dynamic batcher.
//! * [`ensemble`] — `platform: "ensemble"`: pipelines of other models.
//! * [`sequence`] — `sequence_batching`: sequences and their control tensors.
//! * [`warmup`] — `model_warmup` samples run before a version is ready.
//! * [`reshape`] — a tensor's `dims` as clients see it vs `reshape` as the model does.
//! * [`loader`] / `host` — the backend ABI's two sides.
//! * [`server`] — the facade the HTTP and gRPC front ends call.
pub mod access;
pub mod batch_io;
mod bls;
pub mod cache;
pub mod classification;
pub mod config;
pub mod config_rules;
pub mod custom_metrics;
pub mod ensemble;
pub mod error;
pub mod forward;
mod host;
pub mod loader;
pub mod model;
mod model_control;
pub mod rate_limit;
pub mod repository;
pub mod request;
pub mod reshape;
pub mod scheduler;
mod seq_state;
pub mod sequence;
pub mod server;
pub mod shm;
pub mod sink;
pub mod stats;
pub mod trace;
pub mod warmup;

pub use error::{CoreError, CoreResult, ErrorKind};
pub use kiln_sdk::{bytes_elements, DataType};
pub use repository::{ControlMode, RepositoryOptions};
pub use request::{
    element_count, InferRequest, InferResponse, InputTensor, OutputTensor, RequestedOutput,
};
pub use server::{LogHook, LogSettings, Server, ServerOptions};
