//! The facade every front end uses: health, metadata, inference, statistics, repository.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln_proto::inference::ModelConfig;
use serde_json::{json, Map, Value};

use crate::error::{CoreError, CoreResult};
use crate::model::ModelVersion;
use crate::repository::{ControlMode, ModelManager, RepositoryOptions};
use crate::request::{InferRequest, InferResponse, ResponseEvent, ResponseSink, ResponseStream};
use crate::stats::FailReason;

/// Server-wide options.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Repository and backends.
    pub repository: RepositoryOptions,
    /// `--strict-readiness`: ready only when every model is ready.
    pub strict_readiness: bool,
    /// The log settings the server starts with (`--log-info`, `--log-verbose`, ...).
    pub log: LogSettings,
    /// `--id`: the name server metadata reports (Triton's default: "triton").
    pub server_id: String,
    /// Request tracing, from `--trace-config`.
    pub tracer: Arc<crate::trace::Tracer>,
}

/// Triton's log settings (`/v2/logging`), changeable at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Informational messages on.
    pub info: bool,
    /// Warnings on.
    pub warning: bool,
    /// Errors on.
    pub error: bool,
    /// Verbose level (0 = off; 1 = debug; 2 and up = trace).
    pub verbose: u32,
    /// `default` or `ISO8601`.
    pub format: String,
    /// `--log-file` (empty: standard output); fixed once the server runs.
    pub file: String,
}

/// Applies log settings to the process's logger (installed by the binary).
pub type LogHook = Box<dyn Fn(&LogSettings) + Send + Sync>;

/// The inference server core, shared (in an `Arc`) by the front ends.
pub struct Server {
    opts: ServerOptions,
    models: ModelManager,
    shutting_down: AtomicBool,
    shm: crate::shm::SharedMemory,
    log: std::sync::Mutex<(LogSettings, Option<LogHook>)>,
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
    "system_shared_memory",
    "sequence",
    "trace",
    "logging",
];

impl Server {
    /// Creates the server and loads the start-up models.
    pub fn start(opts: ServerOptions) -> Arc<Server> {
        let s = Arc::new(Server {
            models: ModelManager::new(opts.repository.clone()),
            shutting_down: AtomicBool::new(false),
            shm: Default::default(),
            log: std::sync::Mutex::new((opts.log.clone(), None)),
            opts,
        });
        crate::model_control::serve_from(&s);
        s.models.load_startup_models();
        if s.opts.repository.control_mode == ControlMode::Poll {
            let every = std::time::Duration::from_secs(s.opts.repository.poll_secs.max(1));
            let weak = Arc::downgrade(&s);
            let spawned = std::thread::Builder::new()
                .name("repository-poll".into())
                .spawn(move || loop {
                    std::thread::sleep(every);
                    match weak.upgrade() {
                        Some(s) if !s.shutting_down.load(Ordering::Relaxed) => s.models.poll(),
                        _ => return,
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start the repository poller: {e}");
            }
        }
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
        self.models.remove_sent_files();
        self.opts.tracer.flush();
    }

    /// `GET /v2` body.
    pub fn metadata(&self) -> Value {
        json!({"name": self.opts.server_id, "version": SERVER_VERSION, "extensions": EXTENSIONS})
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

    /// Submits a request and returns the stream its responses arrive on (any number of
    /// responses for a decoupled model; the last event is final).
    pub fn infer_stream(&self, request: InferRequest) -> CoreResult<ResponseStream> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(CoreError::unavailable(
                "Server is shutting down and accepts no new requests",
            ));
        }
        let mv = self.model(&request.model_name, request.model_version)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        mv.submit(request, ResponseSink::new(tx))?;
        Ok(rx)
    }

    /// Runs one inference on a model that is not decoupled and waits for its response.
    /// `endpoint` names the caller in the error for decoupled models.
    pub async fn infer(&self, request: InferRequest, endpoint: &str) -> CoreResult<InferResponse> {
        let mv = self.model(&request.model_name, request.model_version)?;
        if mv.shared.is_decoupled() {
            return Err(CoreError::unsupported(format!(
                "{endpoint} doesn't support models with decoupled transaction policy"
            )));
        }
        let mut rx = self.infer_stream(request)?;
        match rx.recv().await {
            Some(ResponseEvent::Response { response, .. }) => Ok(response),
            Some(ResponseEvent::Error(e) | ResponseEvent::StreamError(e)) => Err(e),
            Some(ResponseEvent::Final) | None => Err(CoreError::internal(
                "the model finished the request without a response",
            )),
        }
    }

    /// The model's configuration as the protobuf message.
    pub fn model_config_proto(&self, name: &str, version: Option<i64>) -> CoreResult<ModelConfig> {
        Ok(self.model(name, version)?.shared.config.clone())
    }

    /// Loads (or reloads) a model on a client's request. `params` are the request's
    /// parameters (`config` overrides the model's config.pbtxt with JSON); `files`, the
    /// `file:<version>/<name>` parameters decoded, make up the model's folder. Blocks.
    pub fn repository_load(
        &self,
        name: &str,
        params: &Map<String, Value>,
        files: &[(String, Vec<u8>)],
    ) -> CoreResult<()> {
        self.check_explicit()?;
        let config = match params.get("config") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => Some(v.to_string()),
        };
        self.models.load_files(name, config.as_deref(), files)
    }

    /// Unloads a model on a client's request (with `unload_dependents`, also the models it
    /// runs that nothing else loaded runs). Blocks until its in-flight work is done.
    pub fn repository_unload(&self, name: &str, unload_dependents: bool) -> CoreResult<()> {
        self.check_explicit()?;
        if unload_dependents {
            self.models.unload_with_dependents(name)
        } else {
            self.models.unload(name)
        }
    }

    fn check_explicit(&self) -> CoreResult<()> {
        if self.explicit_control() {
            Ok(())
        } else {
            Err(CoreError::unavailable(
                "explicit model load / unload is not allowed if model control mode is not EXPLICIT (start with --model-control-mode=explicit)",
            ))
        }
    }

    /// Triton's repository index as JSON: every model (only ready versions if
    /// `ready_only`) with its version, state and the reason it is not ready.
    pub fn repository_index(&self, ready_only: bool) -> Value {
        let entries: Vec<Value> = self
            .models
            .index(ready_only)
            .into_iter()
            .map(|e| {
                let mut m = Map::new();
                m.insert("name".into(), json!(e.name));
                if let Some(v) = e.version {
                    m.insert("version".into(), json!(v.to_string()));
                }
                if let Some(s) = e.state {
                    m.insert("state".into(), json!(s));
                }
                if !e.reason.is_empty() {
                    m.insert("reason".into(), json!(e.reason));
                }
                Value::Object(m)
            })
            .collect();
        Value::Array(entries)
    }

    /// Counts a request that could not be decoded as a failure of its model (if the
    /// model exists), as Triton does.
    pub fn record_malformed(&self, name: &str, version: Option<i64>) {
        if let Ok(mv) = self.model(name, version) {
            mv.shared
                .stats
                .record_failure(std::time::Duration::ZERO, FailReason::Other);
        }
    }

    /// Triton's log settings, as the server runs with them.
    pub fn log_settings(&self) -> Value {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let l = &log.0;
        json!({"log_file": l.file, "log_info": l.info, "log_warning": l.warning, "log_error": l.error,
               "log_verbose_level": l.verbose, "log_format": l.format})
    }

    /// Installs what applies log settings to the logger, and applies the current ones.
    pub fn set_log_hook(&self, hook: LogHook) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        hook(&log.0);
        log.1 = Some(hook);
    }

    /// Changes the log settings named in `changes` (Triton's `/v2/logging` POST: `null`
    /// leaves a setting as it is; the log file cannot be changed) and returns them all.
    pub fn update_log_settings(&self, changes: &Map<String, Value>) -> CoreResult<Value> {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = log.0.clone();
        let set = |k: &str| changes.get(k).filter(|v| !v.is_null());
        let boolean = |k: &str, v: &Value| {
            v.as_bool().ok_or_else(|| {
                CoreError::invalid(format!("log setting '{k}' must be a boolean, got {v}"))
            })
        };
        if set("log_file").is_some() {
            return Err(CoreError::unsupported(
                "log file location can not be updated through network protocol",
            ));
        }
        if let Some(v) = set("log_info") {
            next.info = boolean("log_info", v)?;
        }
        if let Some(v) = set("log_warning") {
            next.warning = boolean("log_warning", v)?;
        }
        if let Some(v) = set("log_error") {
            next.error = boolean("log_error", v)?;
        }
        if let Some(v) = set("log_verbose_level") {
            next.verbose = v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    CoreError::invalid(format!(
                        "log setting 'log_verbose_level' must be a non-negative integer, got {v}"
                    ))
                })?;
        }
        if let Some(v) = set("log_format") {
            match v.as_str() {
                Some(f @ ("default" | "ISO8601")) => next.format = f.to_string(),
                _ => {
                    return Err(CoreError::unavailable(format!(
                        "invalid argument for --log_format, got: {}",
                        v.as_str().map_or_else(|| v.to_string(), str::to_string)
                    )))
                }
            }
        }
        if let Some(hook) = &log.1 {
            hook(&next);
        }
        log.0 = next;
        drop(log);
        Ok(self.log_settings())
    }

    /// The trace settings for `model` (the server's when `None` or not set for it).
    pub fn trace_settings(&self, model: Option<&str>) -> Value {
        self.opts.tracer.settings(model)
    }

    /// Updates the trace settings of the server or of one model (Triton's trace extension).
    pub fn update_trace_settings(
        &self,
        model: Option<&str>,
        changes: &Map<String, Value>,
    ) -> CoreResult<Value> {
        if let Some(m) = model {
            if self.models.get(m, None).is_err() {
                return Err(CoreError::not_found(format!(
                    "Request for unknown model : '{m}' is not found"
                )));
            }
        }
        self.opts.tracer.update(model, changes)
    }

    /// The request tracer (front ends sample each inference request with it).
    pub fn tracer(&self) -> &crate::trace::Tracer {
        &self.opts.tracer
    }

    /// The registered system shared-memory regions.
    pub fn shared_memory(&self) -> &crate::shm::SharedMemory {
        &self.shm
    }

    /// Whether load/unload requests are allowed.
    pub fn explicit_control(&self) -> bool {
        self.opts.repository.control_mode == ControlMode::Explicit
    }
}
