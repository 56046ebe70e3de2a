//! `inference.GRPCInferenceService` on the core's [`Server`].
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;

use kiln_core::access::Api;
use kiln_core::request::ResponseEvent;
use kiln_core::{CoreError, Server};
use kiln_proto::inference::{self as pb, log_settings_response, trace_setting_response};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{from_json, status};
use crate::generated::grpc_inference_service_server::GrpcInferenceService;
use crate::tensor::{self, bool_param, parse_version};

/// Responses buffered per stream before the model's senders wait for the client.
const STREAM_BUFFER: usize = 256;

/// The service; cheap to clone.
#[derive(Clone)]
pub struct Inference {
    server: Arc<Server>,
    /// `--grpc-restricted-protocol`: API groups that need a header.
    restricted: Arc<kiln_core::access::Restrictions>,
    /// `--grpc-header-forward-pattern`.
    forward: Option<Arc<kiln_core::forward::HeaderForward>>,
}

impl Inference {
    /// Restricts API groups to requests carrying their header (`--grpc-restricted-protocol`).
    pub fn restricted(mut self, restricted: kiln_core::access::Restrictions) -> Self {
        self.restricted = Arc::new(restricted);
        self
    }

    /// Passes request metadata matching `forward` to the model as parameters.
    pub fn forward_headers(mut self, forward: Option<kiln_core::forward::HeaderForward>) -> Self {
        self.forward = forward.map(Arc::new);
        self
    }

    /// The metadata to forward (nothing without a pattern).
    fn forwarded<T>(&self, r: &Request<T>) -> Vec<(String, String)> {
        if self.forward.is_none() {
            return Vec::new();
        }
        r.metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_string(), v.to_str().ok()?.to_string()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect()
    }

    /// Decodes a request and adds its forwarded `headers` as parameters.
    fn decode(
        &self,
        msg: pb::ModelInferRequest,
        headers: &[(String, String)],
    ) -> Result<(kiln_core::InferRequest, tensor::StreamOptions), kiln_core::CoreError> {
        let (mut req, opts) = tensor::decode(msg, self.server.shared_memory())?;
        if let Some(f) = &self.forward {
            f.apply(
                &mut req,
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )?;
        }
        Ok((req, opts))
    }

    /// Refuses a request to a restricted `api` without its header, as Triton does.
    fn allow<T>(&self, api: Api, r: &Request<T>) -> Result<(), Status> {
        let header = |k: &str| {
            r.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        self.restricted
            .check(api, header)
            .map_err(Status::unavailable)
    }

    /// Wraps the core.
    pub fn new(server: Arc<Server>) -> Self {
        Inference {
            server,
            restricted: Default::default(),
            forward: None,
        }
    }
}

type GrpcResult<T> = Result<Response<T>, Status>;

fn ok<T>(v: T) -> GrpcResult<T> {
    Ok(Response::new(v))
}

fn version(v: &str) -> Result<Option<i64>, Status> {
    parse_version(v).map_err(status)
}

/// Repository parameters as the JSON object the core takes.
fn repository_params(p: &HashMap<String, pb::ModelRepositoryParameter>) -> Map<String, Value> {
    use pb::model_repository_parameter::ParameterChoice as C;
    p.iter()
        .map(|(k, v)| {
            let j = match &v.parameter_choice {
                Some(C::BoolParam(b)) => json!(b),
                Some(C::Int64Param(i)) => json!(i),
                Some(C::StringParam(s)) => json!(s),
                Some(C::BytesParam(b)) => json!(String::from_utf8_lossy(b)),
                None => Value::Null,
            };
            (k.clone(), j)
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("task failed: {e}")))?
        .map_err(status)
}

/// One stream response from a core event; `None` for a bare final flag nobody asked for.
fn stream_response(
    ev: ResponseEvent,
    head: &pb::ModelInferResponse,
    empty_final: bool,
) -> Option<pb::ModelStreamInferResponse> {
    let final_param = |r: &mut pb::ModelInferResponse, last: bool| {
        r.parameters
            .insert("triton_final_response".into(), bool_param(last));
    };
    match ev {
        ResponseEvent::Response { response, last } => {
            let mut r = tensor::encode(response);
            final_param(&mut r, last);
            Some(pb::ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(r),
            })
        }
        ResponseEvent::Error(e) | ResponseEvent::StreamError(e) => {
            Some(pb::ModelStreamInferResponse {
                error_message: e.message,
                infer_response: Some(head.clone()),
            })
        }
        ResponseEvent::Final if empty_final => {
            let mut r = head.clone();
            final_param(&mut r, true);
            Some(pb::ModelStreamInferResponse {
                error_message: String::new(),
                infer_response: Some(r),
            })
        }
        ResponseEvent::Final => None,
    }
}

type Out = mpsc::Sender<Result<pb::ModelStreamInferResponse, Status>>;

/// How a stream reports errors: in the stream (Triton's default), or, when the client
/// started it with the header `triton_grpc_error: true`, as the gRPC status that ends it.
#[derive(Clone, Default)]
struct ErrorMode {
    /// `triton_grpc_error` was asked for.
    as_status: bool,
    /// An error ended the stream (only with `as_status`).
    ended: Arc<AtomicBool>,
}

impl ErrorMode {
    fn of<T>(r: &Request<T>) -> Self {
        let as_status = r
            .metadata()
            .get("triton_grpc_error")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        ErrorMode {
            as_status,
            ended: Arc::default(),
        }
    }

    /// What to send for `ev`; `None` for nothing.
    fn item(
        &self,
        ev: ResponseEvent,
        head: &pb::ModelInferResponse,
        empty_final: bool,
    ) -> Option<Result<pb::ModelStreamInferResponse, Status>> {
        match ev {
            ResponseEvent::Error(e) | ResponseEvent::StreamError(e) if self.as_status => {
                self.ended.store(true, AtomicOrdering::SeqCst);
                Some(Err(status(e)))
            }
            ev => stream_response(ev, head, empty_final).map(Ok),
        }
    }

    fn ended(&self) -> bool {
        self.ended.load(AtomicOrdering::SeqCst)
    }
}

impl Inference {
    /// Starts one request of a stream; its responses are forwarded to `out` by a task.
    async fn stream_one(
        &self,
        msg: pb::ModelInferRequest,
        headers: &[(String, String)],
        out: &Out,
        errors: &ErrorMode,
    ) {
        let head = pb::ModelInferResponse {
            model_name: msg.model_name.clone(),
            model_version: msg.model_version.clone(),
            id: msg.id.clone(),
            ..Default::default()
        };
        let (name, ver) = (msg.model_name.clone(), msg.model_version.clone());
        let started = self.decode(msg, headers).and_then(|(req, opts)| {
            Ok((self.server.infer_stream(req)?, opts.empty_final_response))
        });
        let (mut events, empty_final) = match started {
            Ok(x) => x,
            Err(e) => {
                if e.kind == kiln_core::ErrorKind::InvalidArg {
                    self.server
                        .record_malformed(&name, parse_version(&ver).ok().flatten());
                }
                if let Some(item) = errors.item(ResponseEvent::Error(e), &head, false) {
                    let _ = out.send(item).await;
                }
                return;
            }
        };
        let out = out.clone();
        let errors = errors.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    // The client went away: dropping `events` marks the request cancelled.
                    _ = out.closed() => return,
                };
                let Some(ev) = ev else { return };
                let last = ev.is_final();
                if errors.ended() {
                    return;
                }
                if let Some(item) = errors.item(ev, &head, empty_final) {
                    if out.send(item).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
            }
        });
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        r: Request<pb::ServerLiveRequest>,
    ) -> GrpcResult<pb::ServerLiveResponse> {
        self.allow(Api::Health, &r)?;
        ok(pb::ServerLiveResponse {
            live: self.server.is_live(),
        })
    }

    async fn server_ready(
        &self,
        r: Request<pb::ServerReadyRequest>,
    ) -> GrpcResult<pb::ServerReadyResponse> {
        self.allow(Api::Health, &r)?;
        ok(pb::ServerReadyResponse {
            ready: self.server.is_ready(),
        })
    }

    async fn model_ready(
        &self,
        r: Request<pb::ModelReadyRequest>,
    ) -> GrpcResult<pb::ModelReadyResponse> {
        self.allow(Api::Health, &r)?;
        let r = r.into_inner();
        let v = version(&r.version)?;
        ok(pb::ModelReadyResponse {
            ready: self.server.model_ready(&r.name, v),
        })
    }

    async fn server_metadata(
        &self,
        r: Request<pb::ServerMetadataRequest>,
    ) -> GrpcResult<pb::ServerMetadataResponse> {
        self.allow(Api::Metadata, &r)?;
        ok(from_json(
            "inference.ServerMetadataResponse",
            &self.server.metadata(),
        )?)
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> GrpcResult<pb::ModelMetadataResponse> {
        self.allow(Api::Metadata, &r)?;
        let r = r.into_inner();
        let m = self
            .server
            .model_metadata(&r.name, version(&r.version)?)
            .map_err(status)?;
        ok(from_json("inference.ModelMetadataResponse", &m)?)
    }

    async fn model_infer(
        &self,
        r: Request<pb::ModelInferRequest>,
    ) -> GrpcResult<pb::ModelInferResponse> {
        self.allow(Api::Inference, &r)?;
        let headers = self.forwarded(&r);
        let msg = r.into_inner();
        let trace = self.server.tracer().sample(&msg.model_name);
        if let Some(t) = &trace {
            // The message has been read by the time the handler runs.
            t.stamp("GRPC_WAITREAD_START");
            t.stamp("GRPC_WAITREAD_END");
        }
        let (name, ver) = (msg.model_name.clone(), msg.model_version.clone());
        let mut req = match self.decode(msg, &headers) {
            Ok((req, _)) => req,
            Err(e) => {
                self.server
                    .record_malformed(&name, parse_version(&ver).ok().flatten());
                return Err(status(e));
            }
        };
        req.trace = trace.clone();
        let resp = self
            .server
            .infer(req, "ModelInfer RPC")
            .await
            .map_err(status)?;
        if let Some(t) = &trace {
            t.stamp("GRPC_SEND_START");
        }
        let encoded = tensor::encode(resp);
        if let Some(t) = &trace {
            t.stamp("GRPC_SEND_END");
        }
        ok(encoded)
    }

    type ModelStreamInferStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>,
    >;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<pb::ModelInferRequest>>,
    ) -> GrpcResult<Self::ModelStreamInferStream> {
        self.allow(Api::Inference, &r)?;
        let headers = self.forwarded(&r);
        let errors = ErrorMode::of(&r);
        let mut incoming = r.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            while !errors.ended() {
                match incoming.message().await {
                    Ok(Some(msg)) => this.stream_one(msg, &headers, &tx, &errors).await,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!("inference stream ended: {e}");
                        break;
                    }
                }
            }
            // `tx` drops here; the response stream ends once every request has answered.
        });
        ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> GrpcResult<pb::ModelConfigResponse> {
        self.allow(Api::ModelConfig, &r)?;
        let r = r.into_inner();
        let config = self
            .server
            .model_config_proto(&r.name, version(&r.version)?)
            .map_err(status)?;
        ok(pb::ModelConfigResponse {
            config: Some(config),
        })
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> GrpcResult<pb::ModelStatisticsResponse> {
        self.allow(Api::Statistics, &r)?;
        let r = r.into_inner();
        let name = (!r.name.is_empty()).then_some(r.name.as_str());
        let stats = self
            .server
            .statistics(name, version(&r.version)?)
            .map_err(status)?;
        ok(from_json("inference.ModelStatisticsResponse", &stats)?)
    }

    async fn repository_index(
        &self,
        r: Request<pb::RepositoryIndexRequest>,
    ) -> GrpcResult<pb::RepositoryIndexResponse> {
        self.allow(Api::ModelRepository, &r)?;
        let index = self.server.repository_index(r.into_inner().ready);
        ok(from_json(
            "inference.RepositoryIndexResponse",
            &json!({ "models": index }),
        )?)
    }

    async fn repository_model_load(
        &self,
        r: Request<pb::RepositoryModelLoadRequest>,
    ) -> GrpcResult<pb::RepositoryModelLoadResponse> {
        self.allow(Api::ModelRepository, &r)?;
        use pb::model_repository_parameter::ParameterChoice as C;
        let mut r = r.into_inner();
        // `file:<path>` parameters carry the model's files as bytes.
        let mut files = Vec::new();
        for key in r.parameters.keys().cloned().collect::<Vec<_>>() {
            let Some(path) = key.strip_prefix("file:") else {
                continue;
            };
            match r.parameters.remove(&key).and_then(|p| p.parameter_choice) {
                Some(C::BytesParam(b)) => files.push((path.to_string(), b.to_vec())),
                _ => {
                    return Err(status(CoreError::invalid(format!(
                        "failed to load '{}': parameter '{key}' must hold the file's bytes",
                        r.model_name
                    ))))
                }
            }
        }
        let params = repository_params(&r.parameters);
        let server = self.server.clone();
        blocking(move || server.repository_load(&r.model_name, &params, &files)).await?;
        ok(pb::RepositoryModelLoadResponse {})
    }

    async fn repository_model_unload(
        &self,
        r: Request<pb::RepositoryModelUnloadRequest>,
    ) -> GrpcResult<pb::RepositoryModelUnloadResponse> {
        self.allow(Api::ModelRepository, &r)?;
        let r = r.into_inner();
        use pb::model_repository_parameter::ParameterChoice as C;
        let dependents =
            match r
                .parameters
                .get("unload_dependents")
                .map(|p| &p.parameter_choice)
            {
                None => false,
                Some(Some(C::BoolParam(b))) => *b,
                Some(_) => return Err(Status::invalid_argument(
                    "invalid value type for 'unload_dependents' parameter, expected bool_param.",
                )),
            };
        let server = self.server.clone();
        blocking(move || server.repository_unload(&r.model_name, dependents)).await?;
        ok(pb::RepositoryModelUnloadResponse {})
    }

    async fn system_shared_memory_status(
        &self,
        r: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> GrpcResult<pb::SystemSharedMemoryStatusResponse> {
        self.allow(Api::SharedMemory, &r)?;
        let name = r.into_inner().name;
        let regions = self
            .server
            .shared_memory()
            .status((!name.is_empty()).then_some(name.as_str()))
            .map_err(status)?
            .into_iter()
            .map(|r| {
                let st = pb::system_shared_memory_status_response::RegionStatus {
                    name: r.name.clone(),
                    key: r.key,
                    offset: r.offset,
                    byte_size: r.byte_size,
                };
                (r.name, st)
            })
            .collect();
        ok(pb::SystemSharedMemoryStatusResponse { regions })
    }

    async fn system_shared_memory_register(
        &self,
        r: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> GrpcResult<pb::SystemSharedMemoryRegisterResponse> {
        self.allow(Api::SharedMemory, &r)?;
        let r = r.into_inner();
        if r.name.is_empty() {
            return Err(status(CoreError::invalid(
                "'region name' is necessary to register system shared memory region",
            )));
        }
        self.server
            .shared_memory()
            .register(&r.name, &r.key, r.offset, r.byte_size)
            .map_err(status)?;
        ok(pb::SystemSharedMemoryRegisterResponse {})
    }

    async fn system_shared_memory_unregister(
        &self,
        r: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<pb::SystemSharedMemoryUnregisterResponse> {
        self.allow(Api::SharedMemory, &r)?;
        let name = r.into_inner().name;
        let name = (!name.is_empty()).then_some(name.as_str());
        self.server.shared_memory().unregister(name);
        ok(pb::SystemSharedMemoryUnregisterResponse {})
    }

    async fn cuda_shared_memory_status(
        &self,
        r: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> GrpcResult<pb::CudaSharedMemoryStatusResponse> {
        self.allow(Api::SharedMemory, &r)?;
        let name = r.into_inner().name;
        if !name.is_empty() {
            return Err(status(CoreError::not_found(format!(
                "Unable to find cuda shared memory region: '{name}'"
            ))));
        }
        ok(pb::CudaSharedMemoryStatusResponse::default())
    }

    async fn cuda_shared_memory_register(
        &self,
        r: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> GrpcResult<pb::CudaSharedMemoryRegisterResponse> {
        self.allow(Api::SharedMemory, &r)?;
        Err(status(CoreError::invalid(format!(
            "failed to register CUDA shared memory region: '{}', GPUs not supported",
            r.into_inner().name
        ))))
    }

    async fn cuda_shared_memory_unregister(
        &self,
        r: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> GrpcResult<pb::CudaSharedMemoryUnregisterResponse> {
        self.allow(Api::SharedMemory, &r)?;
        ok(pb::CudaSharedMemoryUnregisterResponse {})
    }

    async fn trace_setting(
        &self,
        r: Request<pb::TraceSettingRequest>,
    ) -> GrpcResult<pb::TraceSettingResponse> {
        self.allow(Api::Trace, &r)?;
        let r = r.into_inner();
        let model = (!r.model_name.is_empty()).then_some(r.model_name.as_str());
        let current = if r.settings.is_empty() && model.is_none() {
            self.server.trace_settings(None)
        } else {
            // An empty value list clears the setting (JSON null in the HTTP protocol).
            let changes: serde_json::Map<String, Value> = r
                .settings
                .into_iter()
                .map(|(k, v)| {
                    let value = match &v.value[..] {
                        [] => Value::Null,
                        [one] if k != "trace_level" => Value::from(one.clone()),
                        many => Value::from(many.to_vec()),
                    };
                    (k, value)
                })
                .collect();
            self.server
                .update_trace_settings(model, &changes)
                .map_err(status)?
        };
        let settings = current
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let value = match v {
                    Value::Array(a) => a.iter().map(json_text).collect(),
                    v => vec![json_text(v)],
                };
                (k.clone(), trace_setting_response::SettingValue { value })
            })
            .collect();
        ok(pb::TraceSettingResponse { settings })
    }

    async fn log_settings(
        &self,
        r: Request<pb::LogSettingsRequest>,
    ) -> GrpcResult<pb::LogSettingsResponse> {
        self.allow(Api::Logging, &r)?;
        use log_settings_response::{setting_value::ParameterChoice as C, SettingValue};
        use pb::log_settings_request::setting_value::ParameterChoice as In;
        let changes: serde_json::Map<String, Value> = r
            .into_inner()
            .settings
            .into_iter()
            .map(|(k, v)| {
                let v = match v.parameter_choice {
                    Some(In::BoolParam(b)) => Value::Bool(b),
                    Some(In::Uint32Param(n)) => Value::from(n),
                    Some(In::StringParam(s)) => Value::String(s),
                    None => Value::Null,
                };
                (k, v)
            })
            .collect();
        let current = if changes.is_empty() {
            self.server.log_settings()
        } else {
            self.server.update_log_settings(&changes).map_err(status)?
        };
        let settings = current
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let choice = match v {
                    Value::Bool(b) => C::BoolParam(*b),
                    Value::Number(n) => C::Uint32Param(n.as_u64().unwrap_or(0) as u32),
                    v => C::StringParam(json_text(v)),
                };
                (
                    k.clone(),
                    SettingValue {
                        parameter_choice: Some(choice),
                    },
                )
            })
            .collect();
        ok(pb::LogSettingsResponse { settings })
    }
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}
