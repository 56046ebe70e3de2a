//! URL routing and the handlers of every endpoint.
use base64::Engine as _;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use kiln_core::request::parse_version;
use kiln_core::{CoreError, Server};
use serde_json::{json, Value};

use crate::body::ChunkedBody;
use crate::compress::{self, Coding};
use crate::{generate, infer, HttpOptions};

/// Shared handler state.
pub struct State {
    pub server: Arc<Server>,
    pub opts: HttpOptions,
}

type Resp = Response<ChunkedBody>;

const HEADER_LEN: &str = "inference-header-content-length";

fn respond(status: StatusCode, content_type: Option<&'static str>, chunks: Vec<Bytes>) -> Resp {
    let mut r = Response::new(ChunkedBody::new(chunks));
    *r.status_mut() = status;
    if let Some(ct) = content_type {
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    r
}

pub(crate) fn json_resp(status: StatusCode, v: &Value) -> Resp {
    respond(
        status,
        Some("application/json"),
        vec![Bytes::from(v.to_string())],
    )
}

fn empty(status: StatusCode) -> Resp {
    respond(status, None, vec![])
}

/// `{"error": "..."}` with the status Triton uses for the error's kind.
pub(crate) fn error(e: &CoreError) -> Resp {
    let status = StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    json_resp(status, &json!({ "error": e.message }))
}

pub(crate) fn error_status(status: StatusCode, msg: impl Into<String>) -> Resp {
    json_resp(status, &json!({ "error": msg.into() }))
}

/// Reads and (if needed) decompresses the request body, enforcing the size limit.
pub(crate) async fn read_body(
    state: &State,
    req: Request<Incoming>,
) -> Result<(http::request::Parts, Bytes), Resp> {
    let (parts, body) = req.into_parts();
    let limit = state.opts.max_input_size;
    let too_large = || {
        error_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the maximum input size of {limit} bytes (see --http-max-input-size)"),
        )
    };
    if let Some(len) = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(too_large())
        }
        Err(e) => {
            return Err(error_status(
                StatusCode::BAD_REQUEST,
                format!("failed to read request body: {e}"),
            ))
        }
    };
    let coding = parts
        .headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match Coding::from_header(coding) {
        Ok(None) => Ok((parts, bytes)),
        Ok(Some(c)) => match compress::decompress(c, &bytes, limit) {
            Ok(v) => Ok((parts, Bytes::from(v))),
            Err(m) if m.contains("maximum input size") => {
                Err(error_status(StatusCode::PAYLOAD_TOO_LARGE, m))
            }
            Err(m) => Err(error_status(StatusCode::BAD_REQUEST, m)),
        },
        Err(m) => Err(error_status(StatusCode::BAD_REQUEST, m)),
    }
}

fn body_json(body: &[u8]) -> Result<Value, CoreError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| CoreError::invalid(format!("failed to parse the request JSON: {e}")))
}

/// The metrics endpoint: `GET /metrics` in Prometheus' text format.
pub async fn metrics(
    server: Arc<Server>,
    cpu: Arc<kiln_metrics::CpuSampler>,
    opts: Arc<kiln_metrics::MetricsOptions>,
    req: Request<Incoming>,
) -> Resp {
    if req.method() != Method::GET || req.uri().path().trim_end_matches('/') != "/metrics" {
        return error_status(
            StatusCode::NOT_FOUND,
            "the metrics endpoint is GET /metrics",
        );
    }
    match tokio::task::spawn_blocking(move || kiln_metrics::render(&server, &cpu, &opts)).await {
        Ok(Ok(text)) => respond(
            StatusCode::OK,
            Some(kiln_metrics::CONTENT_TYPE),
            vec![Bytes::from(text)],
        ),
        Ok(Err(e)) => error_status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error_status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The API group (`--http-restricted-api`) a request belongs to.
fn api_of(segs: &[&str]) -> Option<kiln_core::access::Api> {
    use kiln_core::access::Api;
    Some(match segs {
        ["v2", "health", ..] => Api::Health,
        ["v2"] => Api::Metadata,
        ["v2", "logging"] => Api::Logging,
        ["v2", "trace", ..] => Api::Trace,
        ["v2", "repository", ..] => Api::ModelRepository,
        ["v2", "systemsharedmemory" | "cudasharedmemory", ..] => Api::SharedMemory,
        ["v2", "models", "stats"] => Api::Statistics,
        ["v2", "models", _, rest @ ..] => {
            let tail = match rest {
                ["versions", _, tail @ ..] => tail,
                tail => tail,
            };
            match tail {
                [] => Api::Metadata,
                ["ready"] => Api::Health,
                ["config"] => Api::ModelConfig,
                ["stats"] => Api::Statistics,
                ["infer" | "generate" | "generate_stream"] => Api::Inference,
                ["trace", ..] => Api::Trace,
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// Routes one request.
pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let accept = req
        .headers()
        .get(ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    if let Some(api) = api_of(&segs) {
        let headers = req.headers();
        let header = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if let Err(message) = state.opts.restricted.check(api, header) {
            return error_status(StatusCode::FORBIDDEN, message);
        }
    }
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["v2", "health", "live"]) => empty(if state.server.is_live() {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        }),
        (Method::GET, ["v2", "health", "ready"]) => empty(if state.server.is_ready() {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        }),
        (Method::GET, ["v2"]) => json_resp(StatusCode::OK, &state.server.metadata()),
        (Method::GET, ["v2", "models", "stats"]) => result(state.server.statistics(None, None)),
        (Method::POST, ["v2", "repository", "index"]) => repository_index(&state, req).await,
        (Method::GET, ["v2", "logging"]) => json_resp(StatusCode::OK, &state.server.log_settings()),
        (Method::GET, ["v2", "trace", "setting"]) => {
            json_resp(StatusCode::OK, &state.server.trace_settings(None))
        }
        (Method::GET, ["v2", "models", model, "trace", "setting"]) => {
            json_resp(StatusCode::OK, &state.server.trace_settings(Some(model)))
        }
        (Method::POST, ["v2", "logging"]) => {
            let body = match read_body(&state, req).await {
                Ok((_, b)) => b,
                Err(r) => return r,
            };
            let changes = body_json(&body).and_then(|v| match v {
                Value::Object(m) => Ok(m),
                v => Err(CoreError::invalid(format!(
                    "log settings must be a JSON object, got {v}"
                ))),
            });
            match changes.and_then(|m| state.server.update_log_settings(&m)) {
                Ok(v) => json_resp(StatusCode::OK, &v),
                Err(e) => error_status(StatusCode::BAD_REQUEST, e.message),
            }
        }
        (Method::POST, ["v2", "trace", "setting"]) => update_trace(&state, req, None).await,
        (Method::POST, ["v2", "models", model, "trace", "setting"]) => {
            let model = model.to_string();
            update_trace(&state, req, Some(model)).await
        }
        (_, ["v2", kind @ ("systemsharedmemory" | "cudasharedmemory"), rest @ ..]) => {
            let (region, action) = match rest {
                [action] => (None, *action),
                ["region", name, action] => (Some(name.to_string()), *action),
                _ => {
                    return error_status(StatusCode::NOT_FOUND, format!("unknown endpoint {path}"))
                }
            };
            let want = if action == "status" {
                Method::GET
            } else {
                Method::POST
            };
            if !matches!(action, "status" | "register" | "unregister")
                || (action == "register" && region.is_none())
            {
                return error_status(StatusCode::NOT_FOUND, format!("unknown endpoint {path}"));
            }
            if method != want {
                return error_status(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
            }
            let (kind, action) = (kind.to_string(), action.to_string());
            shared_memory(&state, req, &kind, region, &action).await
        }
        (Method::POST, ["v2", "repository", "models", model, action @ ("load" | "unload")]) => {
            let (model, action) = (model.to_string(), action.to_string());
            repository_control(&state, req, model, &action).await
        }
        (_, ["v2", "models", model, rest @ ..]) => {
            let (version, tail) = match rest {
                ["versions", v, tail @ ..] => (parse_version(v), tail),
                tail => (Ok(None), tail),
            };
            let version = match version {
                Ok(v) => v,
                Err(e) => return error(&e),
            };
            let model = model.to_string();
            match (method, tail) {
                (Method::GET, []) => result(state.server.model_metadata(&model, version)),
                (Method::GET, ["ready"]) => empty(if state.server.model_ready(&model, version) {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                }),
                (Method::GET, ["config"]) => result(state.server.model_config(&model, version)),
                (Method::GET, ["stats"]) => result(state.server.statistics(Some(&model), version)),
                (Method::POST, ["infer"]) => {
                    // Only inference responses are compressed, as in tritonserver:
                    // clients (tritonclient's aio one) read every other body as plain JSON.
                    let resp = infer(&state, req, model, version).await;
                    maybe_compress(resp, accept.as_deref())
                }
                (Method::POST, [kind @ ("generate" | "generate_stream")]) => {
                    // Not compressed, as in tritonserver (a stream could not be).
                    return generate::handle(&state, req, model, version, *kind != "generate")
                        .await;
                }
                (_, [] | ["ready"] | ["config"] | ["stats"] | ["infer"])
                | (_, ["generate" | "generate_stream"]) => error_status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("method not allowed for {path}"),
                ),
                _ => error_status(StatusCode::NOT_FOUND, format!("unknown endpoint {path}")),
            }
        }
        _ => error_status(
            StatusCode::NOT_FOUND,
            format!("unknown endpoint {} {path}", req.method()),
        ),
    }
}

fn result(r: Result<Value, CoreError>) -> Resp {
    match r {
        Ok(v) => json_resp(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

/// Compresses a successful, non-streaming body in a coding the client accepts.
fn maybe_compress(resp: Resp, accept: Option<&str>) -> Resp {
    let Some(coding) = accept.and_then(Coding::negotiate) else {
        return resp;
    };
    if resp.body().is_streaming() || !resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let raw = body.concat();
    if raw.is_empty() {
        return Response::from_parts(parts, ChunkedBody::default());
    }
    let z = compress::compress(coding, &raw);
    parts
        .headers
        .insert(CONTENT_ENCODING, HeaderValue::from_static(coding.name()));
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, ChunkedBody::new(vec![Bytes::from(z)]))
}

async fn infer(state: &State, req: Request<Incoming>, model: String, version: Option<i64>) -> Resp {
    let trace = state.server.tracer().sample(&model);
    let stamp = |name| {
        if let Some(t) = &trace {
            t.stamp(name);
        }
    };
    stamp("HTTP_RECV_START");
    let (parts, body) = match read_body(state, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    stamp("HTTP_RECV_END");
    let header_len = match parts.headers.get(HEADER_LEN) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => {
                return error(&CoreError::invalid(
                    "Inference-Header-Content-Length must be a non-negative integer",
                ))
            }
        },
    };
    let shm = state.server.shared_memory();
    let decoded = infer::decode(&model, version, body, header_len, shm).and_then(|(mut r, enc)| {
        if let Some(f) = &state.opts.header_forward {
            let headers = parts
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)));
            f.apply(&mut r, headers)?;
        }
        Ok((r, enc))
    });
    let (mut request, enc) = match decoded {
        Ok(x) => x,
        Err(e) => {
            state.server.record_malformed(&model, version);
            return error(&e);
        }
    };
    request.trace = trace.clone();
    let response = match state.server.infer(request, "HTTP end point").await {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    // (The body leaves after this handler returns; SEND_END marks the response handed over.)
    stamp("HTTP_SEND_START");
    let r = match infer::encode(response, &enc) {
        Ok(encoded) => {
            if encoded.binary.is_empty() {
                respond(
                    StatusCode::OK,
                    Some("application/json"),
                    vec![Bytes::from(encoded.header)],
                )
            } else {
                let hl = encoded.header.len();
                let mut chunks = vec![Bytes::from(encoded.header)];
                chunks.extend(encoded.binary);
                let mut r = respond(StatusCode::OK, Some("application/octet-stream"), chunks);
                r.headers_mut().insert(HEADER_LEN, HeaderValue::from(hl));
                r
            }
        }
        Err(e) => error(&e),
    };
    stamp("HTTP_SEND_END");
    r
}

/// `POST v2[/models/<model>]/trace/setting`: Triton's trace extension.
async fn update_trace(state: &State, req: Request<Incoming>, model: Option<String>) -> Resp {
    let body = match read_body(state, req).await {
        Ok((_, b)) => b,
        Err(r) => return r,
    };
    let changes = if body.is_empty() {
        Ok(serde_json::Map::new())
    } else {
        body_json(&body).and_then(|v| match v {
            Value::Object(m) => Ok(m),
            v => Err(CoreError::invalid(format!(
                "trace settings must be a JSON object, got {v}"
            ))),
        })
    };
    match changes.and_then(|m| state.server.update_trace_settings(model.as_deref(), &m)) {
        Ok(v) => json_resp(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

async fn repository_index(state: &State, req: Request<Incoming>) -> Resp {
    let (_, body) = match read_body(state, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let ready_only = match body_json(&body) {
        Ok(v) => v.get("ready").and_then(Value::as_bool).unwrap_or(false),
        Err(e) => return error(&e),
    };
    json_resp(StatusCode::OK, &state.server.repository_index(ready_only))
}

/// The shared-memory endpoints. Every failure is a 400, as in Triton. CUDA regions cannot
/// be registered (no GPU shared memory in this server), so their status is always empty.
async fn shared_memory(
    state: &State,
    req: Request<Incoming>,
    kind: &str,
    region: Option<String>,
    action: &str,
) -> Resp {
    let shm = state.server.shared_memory();
    let cuda = kind == "cudasharedmemory";
    let r = match (action, cuda) {
        ("status", false) => shm
            .status(region.as_deref())
            .map(|v| Some(Value::Array(v.iter().map(|r| r.to_json()).collect()))),
        ("status", true) => match &region {
            None => Ok(Some(json!([]))),
            Some(n) => Err(CoreError::not_found(format!(
                "Unable to find cuda shared memory region: '{n}'"
            ))),
        },
        ("register", true) => Err(CoreError::invalid(format!(
            "failed to register CUDA shared memory region: '{}', GPUs not supported",
            region.as_deref().unwrap_or_default()
        ))),
        ("register", false) => {
            let body = match read_body(state, req).await {
                Ok((_, b)) => b,
                Err(r) => return r,
            };
            let name = region.as_deref().unwrap_or_default();
            body_json(&body)
                .and_then(|v| register_request(&v))
                .and_then(|(key, offset, size)| shm.register(name, &key, offset, size))
                .map(|()| None)
        }
        (_, false) => {
            shm.unregister(region.as_deref());
            Ok(None)
        }
        (_, true) => Ok(None),
    };
    match r {
        Ok(Some(v)) => json_resp(StatusCode::OK, &v),
        Ok(None) => empty(StatusCode::OK),
        Err(e) => error_status(StatusCode::BAD_REQUEST, e.message),
    }
}

/// `{"key", "offset", "byte_size"}` of a register request (offset optional).
fn register_request(v: &Value) -> Result<(String, u64, u64), CoreError> {
    let key = match v.get("key") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(CoreError::invalid("'key' must be a string")),
        None => {
            return Err(CoreError::invalid(
                "Shared memory register request has no 'key' field",
            ))
        }
    };
    let number = |field: &str| {
        v.get(field).map(|n| {
            n.as_u64().ok_or_else(|| {
                CoreError::invalid(format!("'{field}' must be a non-negative integer"))
            })
        })
    };
    let offset = number("offset").transpose()?.unwrap_or(0);
    let size = number("byte_size").transpose()?.ok_or_else(|| {
        CoreError::invalid("Shared memory register request has no 'byte_size' field")
    })?;
    Ok((key, offset, size))
}

async fn repository_control(
    state: &State,
    req: Request<Incoming>,
    model: String,
    action: &str,
) -> Resp {
    let (_, body) = match read_body(state, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let params = match body_json(&body) {
        Ok(v) => v.get("parameters").cloned().unwrap_or(json!({})),
        Err(e) => return error(&e),
    };
    let mut params = params.as_object().cloned().unwrap_or_default();
    // `file:<path>` parameters carry the model's files, base64-encoded.
    let mut files = Vec::new();
    for key in params.keys().cloned().collect::<Vec<_>>() {
        let Some(path) = key.strip_prefix("file:") else {
            continue;
        };
        let bytes = params.remove(&key).and_then(|v| {
            v.as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        });
        match bytes {
            Some(b) => files.push((path.to_string(), b)),
            None => {
                return error(&CoreError::invalid(format!(
                "failed to load '{model}': parameter '{key}' must be the file's content in base64"
            )))
            }
        }
    }
    let server = state.server.clone();
    let r = if action == "load" {
        tokio::task::spawn_blocking(move || server.repository_load(&model, &params, &files)).await
    } else {
        let dependents = match params.get("unload_dependents") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return error(&CoreError::invalid(format!(
                    "Unable to parse 'unload_dependents': expected a boolean, got {v}"
                )))
            }
        };
        tokio::task::spawn_blocking(move || server.repository_unload(&model, dependents)).await
    };
    match r {
        Ok(Ok(())) => empty(StatusCode::OK),
        Ok(Err(e)) => error(&e),
        Err(e) => error(&CoreError::internal(format!(
            "model {action} task failed: {e}"
        ))),
    }
}
