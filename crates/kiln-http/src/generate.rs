//! Triton's generate extension: `POST v2/models/<m>[/versions/<v>]/generate` and
//! `.../generate_stream`.
//!
//! The request is one flat JSON object. A member named like a model input becomes that
//! input (a value or a 1-D array, shaped to fit the input's dims); any other member is a
//! request parameter (string, number or boolean). The members of `parameters` are read
//! the same way. Each response is one flat JSON object: `model_name`, `model_version`,
//! `id` and every output, a one-element output as a plain value. `generate` answers with
//! exactly one response; `generate_stream` sends each response as a server-sent event
//! (`data: {...}\n\n`) as soon as the model produces it.
use std::fmt;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::request::ResponseEvent;
use kiln_core::{CoreError, DataType, InferRequest, InferResponse, InputTensor};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{json, Value};

use crate::body::ChunkedBody;
use crate::json_tensor::{bytes_to_json, json_to_bytes};
use crate::routes::{error, error_status, json_resp, read_body, State};

/// The key whose members are read as more request members.
const PARAMETERS: &str = "parameters";

/// The members of a JSON object in document order, repeated keys kept (Triton reports a
/// repeated input, where a map would keep only the last).
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// A model input as the model's metadata describes it.
struct InputSpec {
    name: String,
    dtype: DataType,
    /// Full shape, `-1` for a variable dimension (the batch dimension included).
    shape: Vec<i64>,
}

/// The inputs of the model a request names, from its metadata.
fn input_specs(metadata: &Value) -> Vec<InputSpec> {
    let inputs = metadata.get("inputs").and_then(Value::as_array);
    inputs
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some(InputSpec {
                name: i.get("name")?.as_str()?.to_string(),
                dtype: DataType::from_protocol_name(i.get("datatype")?.as_str()?)?,
                shape: i
                    .get("shape")?
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_i64)
                    .collect(),
            })
        })
        .collect()
}

/// The shape `count` elements take for an input of `dims`: the fixed dimensions take
/// their share, the innermost variable dimension the rest, other variable ones 1.
fn fit_shape(name: &str, dims: &[i64], count: usize) -> Result<Vec<i64>, CoreError> {
    let cannot = || {
        CoreError::invalid(format!(
            "The schema can not convert input '{name}' to tensor with proper shape"
        ))
    };
    let mut left = count as i64;
    for &d in dims.iter().filter(|&&d| d != -1) {
        if d == 0 {
            if left != 0 {
                return Err(cannot());
            }
        } else if left % d != 0 {
            return Err(cannot());
        } else {
            left /= d;
        }
    }
    let mut shape = dims.to_vec();
    for d in shape.iter_mut().rev().filter(|d| **d == -1) {
        *d = left;
        left = 1;
    }
    if left != 1 && !(left == 0 && dims.contains(&0)) {
        return Err(cannot());
    }
    Ok(shape)
}

/// A request parameter from a member that names no input.
fn parameter(name: &str, v: &Value) -> Result<Value, CoreError> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(CoreError::invalid(format!(
            "parameter '{name}' has invalid type. It should be either 'int', 'bool', or 'string'."
        ))),
    }
}

/// Reads the members of one object (the request, or its `parameters`) into `req`.
fn read_members(
    req: &mut InferRequest,
    inputs: &[InputSpec],
    members: &[(String, Value)],
    nested: bool,
) -> Result<(), CoreError> {
    for (name, value) in members {
        if name == PARAMETERS && !nested {
            if inputs.iter().any(|i| i.name == PARAMETERS) {
                return Err(CoreError::invalid(
                    "Keyword 'parameters' for nested schema also given as input tensor name",
                ));
            }
            let Value::Object(m) = value else {
                return Err(CoreError::invalid(
                    "Expected JSON object for keyword: 'parameters'",
                ));
            };
            let inner: Vec<(String, Value)> =
                m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            read_members(req, inputs, &inner, true).map_err(|e| CoreError {
                message: format!("Converting keyword: 'parameters': {}", e.message),
                ..e
            })?;
            continue;
        }
        let Some(spec) = inputs.iter().find(|i| &i.name == name) else {
            req.parameters.insert(name.clone(), parameter(name, value)?);
            continue;
        };
        if req.inputs.iter().any(|t| &t.name == name) {
            return Err(CoreError::invalid(format!(
                "input '{name}' already exists in request"
            )));
        }
        let count = match value {
            Value::Array(a) => a.len(),
            _ => 1,
        };
        let shape = fit_shape(name, &spec.shape, count)?;
        let data = json_to_bytes(name, spec.dtype, value, count).map_err(CoreError::invalid)?;
        req.inputs.push(InputTensor {
            name: name.clone(),
            dtype: spec.dtype,
            shape,
            data: Bytes::from(data),
        });
    }
    Ok(())
}

/// Decodes a generate request for a model with the given `metadata` (KServe v2 JSON).
pub fn decode(
    model: &str,
    version: Option<i64>,
    metadata: &Value,
    body: &[u8],
) -> Result<InferRequest, CoreError> {
    let Members(members) = serde_json::from_slice(body)
        .map_err(|e| CoreError::invalid(format!("failed to parse the request JSON: {e}")))?;
    let mut req = InferRequest::new(model);
    req.model_version = version;
    if let Some((_, id)) = members.iter().find(|(k, _)| k == "id") {
        req.id = id
            .as_str()
            .ok_or_else(|| CoreError::invalid("Unable to parse 'id': it must be a string"))?
            .to_string();
    }
    read_members(&mut req, &input_specs(metadata), &members, false)?;
    Ok(req)
}

/// One response as the flat generate object: the outputs (one-element ones as plain
/// values) and the response parameters.
pub fn encode(resp: InferResponse) -> Result<Value, CoreError> {
    let mut top = crate::infer::response_header(resp.model_name, resp.model_version, resp.id);
    for o in resp.outputs {
        let data = bytes_to_json(&o.name, o.dtype, &o.data).map_err(CoreError::invalid)?;
        let value = match data {
            Value::Array(mut a) if o.shape.iter().product::<i64>() == 1 && a.len() == 1 => {
                a.swap_remove(0)
            }
            other => other,
        };
        top.insert(o.name, value);
    }
    // Response parameters are members too, as in Triton (an output of the same name wins).
    for (k, v) in resp.parameters {
        top.entry(k).or_insert(v);
    }
    Ok(Value::Object(top))
}

/// One server-sent event carrying `v`.
fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The event for a response or an error; none for a bare final flag.
fn sse(ev: ResponseEvent) -> Option<Bytes> {
    let body = match ev {
        ResponseEvent::Response { response, .. } => {
            encode(response).unwrap_or_else(|e| json!({ "error": e.message }))
        }
        ResponseEvent::Error(e) | ResponseEvent::StreamError(e) => json!({ "error": e.message }),
        ResponseEvent::Final => return None,
    };
    Some(event(&body))
}

const SINGLE: &str = "generate expects model to produce exactly 1 response, use generate stream for model that generates various number of responses";

/// Serves one generate (`streaming` false) or generate_stream request.
pub async fn handle(
    state: &State,
    req: Request<Incoming>,
    model: String,
    version: Option<i64>,
    streaming: bool,
) -> Response<ChunkedBody> {
    let trace = state.server.tracer().sample(&model);
    let stamp = |t: &Option<std::sync::Arc<kiln_core::trace::Trace>>, name| {
        if let Some(t) = t {
            t.stamp(name);
        }
    };
    stamp(&trace, "HTTP_RECV_START");
    let (_, body) = match read_body(state, req).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    stamp(&trace, "HTTP_RECV_END");
    let request = state
        .server
        .model_metadata(&model, version)
        .and_then(|meta| decode(&model, version, &meta, &body));
    let mut request = match request {
        Ok(r) => r,
        Err(e) => {
            if e.kind != kiln_core::ErrorKind::NotFound {
                state.server.record_malformed(&model, version);
            }
            return error(&e);
        }
    };
    request.trace = trace.clone();
    let mut rx = match state.server.infer_stream(request) {
        Ok(rx) => rx,
        Err(e) => return error(&e),
    };
    if !streaming {
        let mut answers = Vec::new();
        while let Some(ev) = rx.recv().await {
            let last = ev.is_final();
            match ev {
                ResponseEvent::Response { response, .. } => answers.push(encode(response)),
                ResponseEvent::Error(e) | ResponseEvent::StreamError(e) => answers.push(Err(e)),
                ResponseEvent::Final => {}
            }
            if last {
                break;
            }
        }
        stamp(&trace, "HTTP_SEND_START");
        let r = match answers.pop() {
            Some(Ok(v)) if answers.is_empty() => json_resp(StatusCode::OK, &v),
            Some(Err(e)) if answers.is_empty() => error(&e),
            _ => error_status(StatusCode::INTERNAL_SERVER_ERROR, SINGLE),
        };
        stamp(&trace, "HTTP_SEND_END");
        return r;
    }
    // The first response (or error) decides the status; later errors travel as events.
    let first = rx.recv().await.unwrap_or_else(|| {
        ResponseEvent::Error(CoreError::internal("the request ended without a response"))
    });
    let status = match &first {
        ResponseEvent::Error(e) => {
            StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::BAD_REQUEST)
        }
        _ => StatusCode::OK,
    };
    stamp(&trace, "HTTP_SEND_START");
    let (tx, body_rx) = tokio::sync::mpsc::unbounded_channel();
    let done = first.is_final();
    if let Some(b) = sse(first) {
        let _ = tx.send(b);
    }
    if done {
        stamp(&trace, "HTTP_SEND_END");
    } else {
        tokio::spawn(async move {
            // Dropping `rx` when the client has gone tells the model to stop.
            while let Some(ev) = rx.recv().await {
                let last = ev.is_final();
                if let Some(b) = sse(ev) {
                    if tx.send(b).is_err() {
                        break;
                    }
                }
                if last {
                    break;
                }
            }
            stamp(&trace, "HTTP_SEND_END");
        });
    }
    let mut r = Response::new(ChunkedBody::streaming(body_rx));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Value {
        json!({"inputs": [
            {"name": "PROMPT", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "STREAM", "datatype": "BOOL", "shape": [1]},
            {"name": "PAIR", "datatype": "INT32", "shape": [-1, 2]},
        ]})
    }

    fn dec(body: &str) -> Result<InferRequest, CoreError> {
        decode("m", None, &meta(), body.as_bytes())
    }

    #[test]
    fn members_become_inputs_or_parameters() {
        let r = dec(r#"{"PROMPT": "hi", "STREAM": true, "temperature": 0.5,
                        "parameters": {"PAIR": [1, 2, 3, 4], "max_tokens": 7}}"#)
        .unwrap();
        let names: Vec<_> = r.inputs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["PROMPT", "STREAM", "PAIR"]);
        assert_eq!(r.inputs[0].shape, [1, 1]);
        assert_eq!(&r.inputs[0].data[..], b"\x02\x00\x00\x00hi");
        assert_eq!(r.inputs[1].shape, [1]);
        assert_eq!(r.inputs[2].shape, [2, 2]);
        assert_eq!(r.parameters["temperature"], json!(0.5));
        assert_eq!(r.parameters["max_tokens"], json!(7));
    }

    #[test]
    fn errors_name_the_first_bad_member_in_document_order() {
        let e = dec(r#"{"PROMPT": 1, "STREAM": 2}"#).unwrap_err();
        assert!(e.message.contains("non-string as string"), "{}", e.message);
        let e = dec(r#"{"STREAM": 2, "PROMPT": 1}"#).unwrap_err();
        assert!(
            e.message.contains("non-boolean as boolean"),
            "{}",
            e.message
        );
        let e = dec(r#"{"PROMPT": "a", "STREAM": true, "PROMPT": "b"}"#).unwrap_err();
        assert_eq!(e.message, "input 'PROMPT' already exists in request");
        let e = dec(r#"{"PAIR": [1, 2, 3]}"#).unwrap_err();
        assert!(
            e.message.contains("can not convert input 'PAIR'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn parameters_must_be_flat_values() {
        let e = dec(r#"{"P": {"a": 1}}"#).unwrap_err();
        assert!(e.message.starts_with("parameter 'P' has invalid type"));
        let e = dec(r#"{"parameters": 1}"#).unwrap_err();
        assert!(e
            .message
            .contains("Expected JSON object for keyword: 'parameters'"));
        let e = dec(r#"{"parameters": {"nested": {"twice": 1}}}"#).unwrap_err();
        assert!(e
            .message
            .starts_with("Converting keyword: 'parameters': parameter 'nested' has invalid type."));
    }

    #[test]
    fn fit_shape_spreads_elements_over_variable_dims() {
        assert_eq!(fit_shape("x", &[-1, 16], 16).unwrap(), [1, 16]);
        assert_eq!(fit_shape("x", &[-1, -1], 3).unwrap(), [1, 3]);
        assert_eq!(fit_shape("x", &[-1], 0).unwrap(), [0]);
        assert!(fit_shape("x", &[4], 3).is_err());
        assert!(fit_shape("x", &[2, 2], 2).is_err());
    }

    #[test]
    fn one_element_outputs_are_plain_values() {
        let resp = InferResponse {
            model_name: "m".into(),
            model_version: 3,
            id: "r1".into(),
            outputs: vec![
                kiln_core::OutputTensor {
                    name: "TEXT".into(),
                    dtype: DataType::Bytes,
                    shape: vec![1, 1],
                    data: Bytes::from_static(b"\x02\x00\x00\x00ok"),
                    in_shared_memory: false,
                },
                kiln_core::OutputTensor {
                    name: "IDS".into(),
                    dtype: DataType::Int32,
                    shape: vec![2],
                    data: Bytes::from_static(&[1, 0, 0, 0, 2, 0, 0, 0]),
                    in_shared_memory: false,
                },
            ],
            parameters: [
                ("param1".to_string(), json!(42)),
                ("TEXT".to_string(), json!("p")),
            ]
            .into_iter()
            .collect(),
        };
        // Response parameters are members beside the outputs; an output of the same name wins.
        assert_eq!(
            encode(resp).unwrap(),
            json!({"model_name": "m", "model_version": "3", "id": "r1", "TEXT": "ok", "IDS": [1, 2], "param1": 42})
        );
    }
}
