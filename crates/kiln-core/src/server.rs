//! The facade every front end uses: health, metadata, inference, statistics, repository.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{CoreError, CoreResult};
use crate::model::ModelVersion;
use crate::repository::{ControlMode, ModelManager, RepositoryOptions};
use crate::request::{InferRequest, InferResponse, ResponseEvent};

/// Server-wide options.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Repository and backends.
    pub repository: RepositoryOptions,
    /// `--strict-readiness`: ready only when every model is ready.
    pub strict_readiness: bool,
}

/// The inference server core, shared (in an `Arc`) by the front ends.
pub struct Server {
    opts: ServerOptions,
    models: ModelManager,
    shutting_down: AtomicBool,
}

/// Name reported by `GET /v2` (tritonclient examples check for "triton").
pub const SERVER_NAME: &str = "triton";
/// Kiln's version.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Protocol extensions Kiln implements.
pub const EXTENSIONS: &[&str] = &[
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
];

impl Server {
    /// Creates the server and loads the start-up models.
    pub fn start(opts: ServerOptions) -> Arc<Server> {
        let s = Arc::new(Server {
            models: ModelManager::new(opts.repository.clone()),
            opts,
            shutting_down: AtomicBool::new(false),
        });
        s.models.load_startup_models();
        s
    }

    /// The model manager.
    pub fn models(&self) -> &ModelManager {
        &self.models
    }

    /// Liveness.
    pub fn is_live(&self) -> bool {
        true
    }

    /// Readiness (not while shutting down; with strict readiness, all models ready).
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
            && (!self.opts.strict_readiness || self.models.all_ready())
    }

    /// Marks the server as shutting down (readiness turns false).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// Finishes queued work and unloads every model.
    pub fn shutdown(&self) {
        self.begin_shutdown();
        self.models.unload_all();
    }

    /// `GET /v2` body.
    pub fn metadata(&self) -> Value {
        json!({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})
    }

    /// Whether a model (version) is ready.
    pub fn model_ready(&self, name: &str, version: Option<i64>) -> bool {
        self.models.get(name, version).is_ok()
    }

    /// The model version a request goes to.
    pub fn model(&self, name: &str, version: Option<i64>) -> CoreResult<Arc<ModelVersion>> {
        self.models.get(name, version)
    }

    /// Model metadata (KServe v2).
    pub fn model_metadata(&self, name: &str, version: Option<i64>) -> CoreResult<Value> {
        let mv = self.model(name, version)?;
        let s = &mv.shared;
        let versions: Vec<String> = match version {
            Some(v) => vec![v.to_string()],
            None => self
                .models
                .versions(name)
                .into_iter()
                .filter(|(_, st)| matches!(st, crate::repository::VersionState::Ready(_)))
                .map(|(v, _)| v.to_string())
                .collect(),
        };
        let tensor = |t: &crate::model::TensorSpec| {
            let mut shape = t.dims.clone();
            if s.max_batch_size > 0 {
                shape.insert(0, -1);
            }
            json!({"name": t.name, "datatype": t.dtype.protocol_name(), "shape": shape})
        };
        let platform = if s.config.platform.is_empty() {
            &s.config.backend
        } else {
            &s.config.platform
        };
        Ok(json!({
            "name": s.name,
            "versions": versions,
            "platform": platform,
            "inputs": s.inputs.iter().map(tensor).collect::<Vec<_>>(),
            "outputs": s.outputs.iter().map(tensor).collect::<Vec<_>>(),
        }))
    }

    /// Model config in Triton's JSON form.
    pub fn model_config(&self, name: &str, version: Option<i64>) -> CoreResult<Value> {
        Ok(self.model(name, version)?.shared.config_json.clone())
    }

    /// Statistics for one model (all ready versions, or one), or every model.
    pub fn statistics(&self, name: Option<&str>, version: Option<i64>) -> CoreResult<Value> {
        let list: Vec<Arc<ModelVersion>> = match name {
            Some(n) => match version {
                Some(v) => vec![self.model(n, Some(v))?],
                None => {
                    let vs: Vec<_> = self
                        .models
                        .ready_versions()
                        .into_iter()
                        .filter(|m| m.shared.name == n)
                        .collect();
                    if vs.is_empty() {
                        self.model(n, None)?;
                    }
                    vs
                }
            },
            None => self.models.ready_versions(),
        };
        let stats: Vec<Value> = list
            .iter()
            .map(|m| m.shared.stats.to_json(&m.shared.name, m.shared.version))
            .collect();
        Ok(json!({"model_stats": stats}))
    }

    /// Runs one (non-decoupled) inference and waits for its final response.
    pub async fn infer(&self, request: InferRequest) -> CoreResult<InferResponse> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(CoreError::unavailable(
                "Server is shutting down and accepts no new requests",
            ));
        }
        let mv = self.model(&request.model_name, request.model_version)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        mv.submit(request, tx)?;
        let mut last_response = None;
        while let Some(ev) = rx.recv().await {
            match ev {
                ResponseEvent::Response { response, last } => {
                    if last {
                        return Ok(response);
                    }
                    last_response = Some(response);
                }
                ResponseEvent::Error(e) => return Err(e),
                ResponseEvent::Final => break,
            }
        }
        last_response
            .ok_or_else(|| CoreError::internal("the model finished the request without a response"))
    }

    /// Whether load/unload requests are allowed.
    pub fn explicit_control(&self) -> bool {
        self.opts.repository.control_mode == ControlMode::Explicit
    }
}
