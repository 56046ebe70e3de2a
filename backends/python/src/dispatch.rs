//! The reader of a stub's pipe. One thread per stub reads every frame the stub sends and
//! acts on it: responses go to the requests still open (also after `execute` returned, for
//! decoupled models answering from their own threads), cancellation questions and custom
//! metric operations are answered, BLS requests run on threads of their own, and the end
//! of each `execute` is handed to the instance's thread as an [`Event`].
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_sdk::{
    log, model_control, BlsEvent, DataType, Error, ErrorCode, LogLevel, ModelControl, OwnedRequest,
    Parameter, Request, Response, Result,
};
use serde_json::{json, Value};

use crate::frame::{self, Frame};
use crate::stub::{apply_metric, Process, Writer};

/// How the stub ended an `execute` (or the stub itself).
pub enum Event {
    /// `execute` returned.
    Done,
    /// `execute` raised: the message for the batch's requests.
    Failed(String),
    /// `finalize` returned.
    Finalized,
    /// The stub stopped answering; its open requests were failed with this error.
    Gone(Error),
}

/// The requests a stub may still answer, by the handle the stub knows them by.
#[derive(Clone, Default)]
pub struct Open(Arc<Mutex<HashMap<u64, OwnedRequest>>>);

impl Open {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, OwnedRequest>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no request is open.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Adds a request the stub is about to receive.
    pub fn insert(&self, handle: u64, request: OwnedRequest) {
        self.lock().insert(handle, request);
    }

    /// Ends the requests among `handles` still open with `error` (and releases them).
    pub fn fail(&self, handles: impl IntoIterator<Item = u64>, error: &Error) {
        let taken: Vec<OwnedRequest> = {
            let mut open = self.lock();
            handles
                .into_iter()
                .filter_map(|h| open.remove(&h))
                .collect()
        };
        for owned in taken {
            let _ = owned
                .request()
                .response()
                .and_then(|r| r.send_error(error.clone()));
        }
    }

    /// Ends every open request with `error`.
    pub fn fail_all(&self, error: &Error) {
        let handles: Vec<u64> = self.lock().keys().copied().collect();
        self.fail(handles, error);
    }
}

/// The stub's BLS calls (by call id) whose model cancelled them
/// (`ResponseIterator.cancel()`), for their threads to act on at their next response.
type Cancels = Arc<Mutex<HashSet<String>>>;

/// Reads the stub's frames until its pipe closes, then fails what is still open.
pub fn run(mut from_stub: impl std::io::Read, process: Process, open: Open, events: Sender<Event>) {
    let cancels = Cancels::default();
    loop {
        let f = match frame::read(&mut from_stub) {
            Ok(f) => f,
            Err(e) => {
                let error = process.gone(e);
                open.fail_all(&error);
                let _ = events.send(Event::Gone(error));
                return;
            }
        };
        let writer = &process.writer;
        let handle = f.header["request"].as_u64().unwrap_or(u64::MAX);
        let sent = match f.header["op"].as_str() {
            Some("response") => {
                respond(&open, handle, &f);
                Ok(())
            }
            Some("is_cancelled") => {
                let cancelled = open
                    .lock()
                    .get(&handle)
                    .is_some_and(|r| r.request().is_cancelled());
                writer.send(&json!({"op": "cancelled", "cancelled": cancelled}), &[])
            }
            Some("metric") => {
                let reply = match apply_metric(&f.header) {
                    Ok(value) => json!({"op": "metric_value", "value": value}),
                    Err(e) => json!({"op": "metric_value", "error": e.message}),
                };
                writer.send(&reply, &[])
            }
            Some("bls") => {
                // A BLS call blocks until its last response: it gets a thread, so responses
                // of other requests keep flowing meanwhile.
                let (w, cancels) = (writer.clone(), cancels.clone());
                detached("kiln-py-bls", move || {
                    if let Err(e) = bls(&w, &f, &cancels) {
                        let message = format!("python BLS request failed: {}", e.message);
                        log(LogLevel::Error, &message);
                    }
                })
            }
            Some("bls_cancel") => {
                let call = f.header["call"].to_string();
                cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(call);
                Ok(())
            }
            Some("model_control") => {
                // Loads block until done: a thread of their own, as BLS calls.
                let w = writer.clone();
                detached("kiln-py-control", move || {
                    let call = &f.header["call"];
                    let reply = match control(&f.header) {
                        Ok(ready) => json!({"op": "control_result", "call": call, "ready": ready}),
                        Err(e) => json!({"op": "control_result", "call": call, "error": e.message}),
                    };
                    if let Err(e) = w.send(&reply, &[]) {
                        log(LogLevel::Error, &e.message);
                    }
                })
            }
            Some("done") => {
                let _ = events.send(Event::Done);
                Ok(())
            }
            Some("failed") => {
                if let Some(trace) = f.header["trace"].as_str() {
                    log(LogLevel::Error, trace);
                }
                let message = f.header["message"].as_str().unwrap_or("execute failed");
                let _ = events.send(Event::Failed(message.to_string()));
                Ok(())
            }
            Some("ok") => {
                let _ = events.send(Event::Finalized);
                Ok(())
            }
            other => Err(Error::internal(format!(
                "the python stub sent an unexpected frame {other:?}"
            ))),
        };
        if let Err(e) = sent {
            log(LogLevel::Error, &e.message);
        }
    }
}

/// Runs `work` on a thread of its own (it may block until its answer is complete).
fn detached(name: &str, work: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(work)
        .map(|_| ())
        .map_err(|e| Error::internal(format!("cannot start thread {name}: {e}")))
}

/// Runs a `model_control` frame (`pb_utils.load_model`, `unload_model`,
/// `is_model_ready`).
fn control(h: &Value) -> Result<bool> {
    let name = h["model"].as_str().unwrap_or_default();
    let op = match h["action"].as_str() {
        Some("load") => ModelControl::Load {
            config_json: h["config"].as_str().filter(|c| !c.trim().is_empty()),
        },
        Some("unload") => ModelControl::Unload {
            dependents: h["unload_dependents"].as_bool().unwrap_or(false),
        },
        _ => ModelControl::Ready {
            version: h["version"].as_i64().filter(|v| *v >= 0),
        },
    };
    model_control(name, op)
}

/// Delivers a `response` frame to its open request; the request is released after its
/// final response (or after a response that could not be delivered, which ends it).
fn respond(open: &Open, handle: u64, f: &Frame) {
    let mut map = open.lock();
    let Some(owned) = map.get(&handle) else {
        log(
            LogLevel::Warn,
            "the python stub answered a request that is no longer open",
        );
        return;
    };
    let last = f.header["final"].as_bool().unwrap_or(true);
    let delivered = deliver(owned.request(), &f.header, &f.payload);
    if last || delivered.is_err() {
        let owned = map.remove(&handle);
        drop(map);
        if let (Some(owned), Err(e)) = (&owned, delivered) {
            let _ = owned.request().response().and_then(|r| r.send_error(e));
        }
    }
}

/// Kiln's error codes in the order of `TritonError`'s (`TritonError.INTERNAL` is 1, ...).
const TRITON_CODES: [ErrorCode; 8] = [
    ErrorCode::Unknown,
    ErrorCode::Internal,
    ErrorCode::NotFound,
    ErrorCode::InvalidArg,
    ErrorCode::Unavailable,
    ErrorCode::Unsupported,
    ErrorCode::AlreadyExists,
    ErrorCode::Cancelled,
];

/// The `TritonError` code of an error code.
fn triton_code(c: ErrorCode) -> u64 {
    TRITON_CODES.iter().position(|&k| k == c).unwrap_or(1) as u64
}

/// Runs the stub's `bls` frame (a model's `InferenceRequest.exec`) and sends it each
/// response as a `bls_response` frame, the last one `final`. A call the model cancelled
/// (in `cancels`) is cancelled at its next response, which is not sent.
fn bls(writer: &Writer, f: &Frame, cancels: &Cancels) -> Result<()> {
    let h = &f.header;
    // The stub's id for the call, echoed on every reply (calls run in parallel).
    let call_id = h["call"].clone();
    let key = call_id.to_string();
    let cancelled = || {
        let mut set = cancels.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&key)
    };
    let mut inputs = Vec::new();
    let mut at = 0usize;
    let shapes: Vec<Vec<i64>> = h["inputs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    t["shape"]
                        .as_array()
                        .map(|s| s.iter().filter_map(Value::as_i64).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    for (t, shape) in h["inputs"].as_array().into_iter().flatten().zip(&shapes) {
        let size = t["size"].as_u64().unwrap_or(0) as usize;
        let data = f
            .payload
            .get(at..at + size)
            .ok_or_else(|| Error::internal("the python stub sent a short BLS request"))?;
        at += size;
        inputs.push(kiln_sdk::Tensor {
            name: t["name"].as_str().unwrap_or_default(),
            dtype: t["datatype"]
                .as_str()
                .and_then(DataType::from_protocol_name)
                .unwrap_or(DataType::Bytes),
            shape,
            data,
        });
    }
    let outputs: Vec<&str> = h["requested_outputs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // A string correlation id travels as the `sequence_id` parameter, which the host reads
    // as Triton's string sequence id.
    let mut parameters = h["parameters"].as_str().unwrap_or_default().to_string();
    if let Some(text) = h["correlation_id"].as_str() {
        let mut p: serde_json::Map<String, Value> =
            serde_json::from_str(&parameters).unwrap_or_default();
        p.insert("sequence_id".into(), Value::from(text));
        parameters = Value::Object(p).to_string();
    }
    let call = kiln_sdk::InferCall {
        model: h["model"].as_str().unwrap_or_default(),
        version: h["version"].as_i64().filter(|v| *v >= 0),
        id: h["id"].as_str().unwrap_or_default(),
        parameters_json: &parameters,
        inputs: &inputs,
        requested_outputs: &outputs,
        correlation_id: h["correlation_id"].as_u64().unwrap_or(0),
        flags: h["flags"].as_u64().unwrap_or(0) as u32,
        timeout_us: h["timeout_us"].as_u64().unwrap_or(0),
    };
    let mut sent: Result<()> = Ok(());
    let r = kiln_sdk::infer(&call, |event, last| {
        if cancelled() {
            if let Err(e) = kiln_sdk::cancel_infer() {
                log(
                    LogLevel::Warn,
                    &format!("cannot cancel a BLS request: {}", e.message),
                );
            }
            return;
        }
        let mut reply = json!({"op": "bls_response", "call": call_id, "final": last});
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        match event {
            BlsEvent::Response {
                outputs: tensors,
                parameters_json,
            } => {
                reply["parameters"] = json!(parameters_json);
                let outs: Vec<Value> = tensors
                    .into_iter()
                    .map(|t| {
                        let o = json!({"name": t.name, "datatype": t.dtype.protocol_name(), "shape": t.shape, "size": t.data.len()});
                        blobs.push(t.data);
                        o
                    })
                    .collect();
                reply["outputs"] = Value::Array(outs);
            }
            BlsEvent::Error(e) => {
                reply["error"] = json!(e.message);
                reply["code"] = json!(triton_code(e.code));
            }
            BlsEvent::Final => {}
        }
        let refs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        if sent.is_ok() {
            sent = writer.send(&reply, &refs);
        }
    });
    // A cancellation that came after the last response.
    cancelled();
    if let Err(e) = r {
        // The request never started: its error is the one reply.
        let reply = json!({"op": "bls_response", "call": call_id, "final": true, "error": e.message, "code": triton_code(e.code)});
        return writer.send(&reply, &[]);
    }
    sent
}

/// The error code a `TritonError.code()` stands for.
fn code_of(c: u64) -> ErrorCode {
    usize::try_from(c)
        .ok()
        .and_then(|i| TRITON_CODES.get(i).copied())
        .unwrap_or(ErrorCode::Internal)
}

/// Sends one `response` frame of the stub to its request.
pub(crate) fn deliver(request: &Request<'_>, header: &Value, payload: &[u8]) -> Result<()> {
    let last = header["final"].as_bool().unwrap_or(true);
    if let Some(message) = header["error"].as_str() {
        let code = code_of(header["code"].as_u64().unwrap_or(1));
        let e = Error::new(code, message);
        let response = request.response()?;
        // Without the final flag a decoupled model's stream goes on, as in Triton.
        return if last {
            response.send_error(e)
        } else {
            response.send_error_partial(e)
        };
    }
    let Some(outputs) = header["outputs"].as_array() else {
        // The final flag alone.
        return if last { request.complete() } else { Ok(()) };
    };
    let mut response: Response<'_> = request.response()?;
    let mut at = 0usize;
    for o in outputs {
        let name = o["name"].as_str().unwrap_or_default();
        let dtype = o["datatype"]
            .as_str()
            .and_then(DataType::from_protocol_name)
            .ok_or_else(|| Error::internal(format!("output '{name}' has an unknown datatype")))?;
        let shape: Vec<i64> = o["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let size = o["size"].as_u64().unwrap_or(0) as usize;
        let bytes = payload
            .get(at..at + size)
            .ok_or_else(|| Error::internal("the python stub sent a short response"))?;
        at += size;
        response
            .output(name, dtype, &shape, size)?
            .copy_from_slice(bytes);
    }
    for (name, value) in header["parameters"].as_object().into_iter().flatten() {
        let value = match value {
            Value::Bool(b) => Parameter::Bool(*b),
            Value::String(s) => Parameter::Str(s),
            v => match v.as_i64() {
                Some(i) => Parameter::Int(i),
                None => {
                    return Err(Error::invalid_arg(format!(
                        "response parameter '{name}' must be a bool, an int or a str"
                    )))
                }
            },
        };
        response.set_parameter(name, value)?;
    }
    if last {
        response.send()
    } else {
        response.send_partial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triton_error_codes_map_to_kiln_codes() {
        assert_eq!(code_of(3), ErrorCode::InvalidArg);
        assert_eq!(code_of(1), ErrorCode::Internal);
        assert_eq!(code_of(99), ErrorCode::Internal);
        for (i, &c) in TRITON_CODES.iter().enumerate() {
            assert_eq!(triton_code(c), i as u64);
            assert_eq!(code_of(i as u64), c);
        }
    }
}
