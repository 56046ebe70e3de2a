//! The `python` backend: runs Triton Python models (`backend: "python"`, a `model.py`
//! defining `TritonPythonModel`) unchanged.
//!
//! As in Triton, each instance runs in its own stub process: a Python interpreter
//! (`KILN_PYTHON`, default `python3`; it needs numpy) running `stub.py`, which provides
//! the `triton_python_backend_utils` module, imports the model, calls `initialize(args)`,
//! `execute(requests)` per batch and `finalize()` at unload. Tensors travel between the
//! backend and the stub over the stub's stdin/stdout (`frame.rs`). Decoupled models send
//! through `request.get_response_sender()`. BLS (`InferenceRequest(...).exec()`, also
//! `decoupled=True` and `async_exec`) runs through the host's `infer` while the stub
//! waits. A stub that dies fails the requests it held and is started again for the next
//! batch. `auto_complete_config` completes the config before the model loads, and a model's
//! `EXECUTION_ENV_PATH` (`env.rs`) picks the Python its stubs run on. Not yet: DLPack tensors.
mod env;
mod frame;
mod stub;

use std::path::PathBuf;

use kiln_sdk::{
    export_backend, log, Backend, BlsEvent, DataType, Error, ErrorCode, Instance, InstanceInfo,
    InstanceKind, LogLevel, Model, ModelInfo, Parameter, Request, Response, Result,
};
use serde_json::{json, Value};

use stub::Stub;

/// The backend: which Python runs the stubs.
pub struct PythonBackend {
    python: String,
}

/// A model: its `model.py` and how to start its stubs.
pub struct PythonModel {
    python: String,
    info: ModelInfo,
    model_file: PathBuf,
    decoupled: bool,
}

/// An instance: its stub process, and the frame that (re)starts it.
pub struct PythonInstance {
    python: String,
    init: Value,
    decoupled: bool,
    stub: Option<Stub>,
}

impl Backend for PythonBackend {
    type Model = PythonModel;

    fn initialize() -> Result<Self> {
        Ok(PythonBackend {
            python: std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into()),
        })
    }

    /// Triton's `auto_complete_config`: the model's static method, when it has one, may
    /// add inputs, outputs, `max_batch_size`, dynamic batching or the transaction policy.
    fn autocomplete(&self, info: &ModelInfo) -> Result<Option<String>> {
        let config: Value = serde_json::from_str(&info.config_json)
            .map_err(|e| Error::internal(format!("bad config JSON: {e}")))?;
        let model_file = model_file(info, &config);
        if !model_file.is_file() {
            return Ok(None); // load_model reports the missing file
        }
        let request = json!({
            "op": "autocomplete",
            "model_file": model_file.display().to_string(),
            "model_dir": info.version_path().display().to_string(),
            "config": info.config_json,
        });
        let python = env::python_for(&config, &info.repository_path, &self.python)?;
        let reply = Stub::once(&python, &request).map_err(|e| {
            Error::invalid_arg(format!(
                "auto_complete_config of '{}' failed: {}",
                info.name, e.message
            ))
        })?;
        Ok(match &reply["config"] {
            Value::Null => None,
            c => Some(c.to_string()),
        })
    }

    fn load_model(&self, info: &ModelInfo) -> Result<PythonModel> {
        let config: Value = serde_json::from_str(&info.config_json)
            .map_err(|e| Error::internal(format!("bad config JSON: {e}")))?;
        let model_file = model_file(info, &config);
        if !model_file.is_file() {
            return Err(Error::new(
                ErrorCode::NotFound,
                format!("python model file '{}' not found", model_file.display()),
            ));
        }
        Ok(PythonModel {
            python: env::python_for(&config, &info.repository_path, &self.python)?,
            info: info.clone(),
            model_file,
            decoupled: config["model_transaction_policy"]["decoupled"]
                .as_bool()
                .unwrap_or(false),
        })
    }
}

/// The model's file: `default_model_filename` (default `model.py`) in the version folder.
fn model_file(info: &ModelInfo, config: &Value) -> PathBuf {
    let file = match config["default_model_filename"].as_str() {
        Some(f) if !f.is_empty() => f,
        _ => "model.py",
    };
    info.version_path().join(file)
}

impl Model for PythonModel {
    type Instance = PythonInstance;

    fn new_instance(&self, info: &InstanceInfo) -> Result<PythonInstance> {
        let (kind, device) = match info.kind {
            InstanceKind::Cpu => ("CPU", 0),
            InstanceKind::Gpu(d) => ("GPU", d),
            InstanceKind::Model => ("MODEL", 0),
        };
        let repository = self.info.repository_path.display().to_string();
        let init = json!({
            "op": "init",
            "model_file": self.model_file.display().to_string(),
            "model_dir": self.info.version_path().display().to_string(),
            "decoupled": self.decoupled,
            "args": {
                "model_config": self.info.config_json,
                "model_instance_kind": kind,
                "model_instance_name": info.name,
                "model_instance_device_id": device.to_string(),
                "model_repository": repository,
                "model_version": self.info.version.to_string(),
                "model_name": self.info.name,
            },
        });
        let stub = Stub::start(&self.python, &init).map_err(|e| {
            Error::internal(format!(
                "instance '{}' failed to initialize its python model: {}",
                info.name, e.message
            ))
        })?;
        Ok(PythonInstance {
            python: self.python.clone(),
            init,
            decoupled: self.decoupled,
            stub: Some(stub),
        })
    }
}

/// The `execute` frame for `requests`, and the input bytes that follow it.
fn execute_frame<'a>(requests: &[Request<'a>]) -> (Value, Vec<&'a [u8]>) {
    let mut blobs = Vec::new();
    let specs: Vec<Value> = requests
        .iter()
        .map(|r| {
            let inputs: Vec<Value> = r
                .inputs()
                .map(|t| {
                    blobs.push(t.data);
                    json!({
                        "name": t.name,
                        "datatype": t.dtype.protocol_name(),
                        "shape": t.shape,
                        "size": t.data.len(),
                    })
                })
                .collect();
            json!({
                "id": r.id(),
                "correlation_id": r.correlation_id(),
                "flags": r.flags(),
                "parameters": serde_json::from_str::<Value>(r.parameters_json()).unwrap_or(json!({})),
                "inputs": inputs,
                "requested_outputs": r.requested_outputs(),
            })
        })
        .collect();
    (json!({"op": "execute", "requests": specs}), blobs)
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
/// response as a `bls_response` frame, the last one `final`.
fn bls(stub: &mut Stub, f: &frame::Frame) -> Result<()> {
    let h = &f.header;
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
    let call = kiln_sdk::InferCall {
        model: h["model"].as_str().unwrap_or_default(),
        version: h["version"].as_i64().filter(|v| *v >= 0),
        id: h["id"].as_str().unwrap_or_default(),
        parameters_json: h["parameters"].as_str().unwrap_or_default(),
        inputs: &inputs,
        requested_outputs: &outputs,
        correlation_id: h["correlation_id"].as_u64().unwrap_or(0),
        flags: h["flags"].as_u64().unwrap_or(0) as u32,
        timeout_us: h["timeout_us"].as_u64().unwrap_or(0),
    };
    let mut sent: Result<()> = Ok(());
    let r = kiln_sdk::infer(&call, |event, last| {
        let mut reply = json!({"op": "bls_response", "final": last});
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        match event {
            BlsEvent::Response(tensors) => {
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
            sent = stub.send(&reply, &refs);
        }
    });
    if let Err(e) = r {
        // The request never started: its error is the one reply.
        let reply = json!({"op": "bls_response", "final": true, "error": e.message, "code": triton_code(e.code)});
        return stub.send(&reply, &[]);
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
fn deliver(request: &Request<'_>, header: &Value, payload: &[u8]) -> Result<()> {
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

impl PythonInstance {
    fn run(&mut self, requests: &[Request<'_>], finished: &mut [bool]) -> Result<()> {
        if self.stub.is_none() {
            self.stub = Some(Stub::start(&self.python, &self.init)?);
        }
        let Some(stub) = self.stub.as_mut() else {
            return Err(Error::internal("the python stub is not running"));
        };
        let (header, blobs) = execute_frame(requests);
        stub.send(&header, &blobs)?;
        let mut returned = false;
        loop {
            if returned && finished.iter().all(|&f| f) {
                return Ok(());
            }
            let f = stub.recv()?;
            match f.header["op"].as_str() {
                Some("response") => {
                    let i = f.header["request"].as_u64().unwrap_or(u64::MAX) as usize;
                    let (Some(request), Some(done)) = (requests.get(i), finished.get_mut(i)) else {
                        return Err(Error::internal(
                            "the python stub answered an unknown request",
                        ));
                    };
                    if *done {
                        continue;
                    }
                    if f.header["final"].as_bool().unwrap_or(true) {
                        *done = true;
                    }
                    deliver(request, &f.header, &f.payload)?;
                }
                Some("bls") => bls(stub, &f)?,
                Some("is_cancelled") => {
                    let i = f.header["request"].as_u64().unwrap_or(u64::MAX) as usize;
                    let cancelled = match (requests.get(i), finished.get(i)) {
                        (Some(r), Some(false)) => r.is_cancelled(),
                        _ => false,
                    };
                    stub.send(&json!({"op": "cancelled", "cancelled": cancelled}), &[])?;
                }
                Some("done") => {
                    returned = true;
                    if !self.decoupled {
                        return Ok(());
                    }
                }
                Some("failed") => {
                    let message = f.header["message"].as_str().unwrap_or("execute failed");
                    if let Some(trace) = f.header["trace"].as_str() {
                        log(LogLevel::Error, trace);
                    }
                    return Err(Error::internal(format!(
                        "Failed to process the request(s) for model instance, message: {message}"
                    )));
                }
                other => {
                    return Err(Error::internal(format!(
                        "the python stub sent an unexpected frame {other:?}"
                    )))
                }
            }
        }
    }
}

impl Instance for PythonInstance {
    fn infer(&mut self, _request: &Request<'_>, _response: &mut Response) -> Result<()> {
        Err(Error::internal(
            "the python backend answers through execute",
        ))
    }

    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        let mut finished = vec![false; requests.len()];
        let outcome = self.run(requests, &mut finished);
        if let Err(e) = &outcome {
            if e.message.contains("stub process stopped answering") {
                // Started again for the next batch.
                self.stub = None;
            }
        }
        let unanswered = |message: String| {
            for (r, _) in requests.iter().zip(&finished).filter(|(_, &f)| !f) {
                if let Ok(resp) = r.response() {
                    let _ = resp.send_error(Error::internal(message.clone()));
                }
            }
        };
        match outcome {
            Err(e) => unanswered(e.message),
            Ok(()) => unanswered("the python model returned no response for the request".into()),
        }
        Ok(())
    }
}

impl Drop for PythonInstance {
    fn drop(&mut self) {
        if let Some(stub) = self.stub.take() {
            stub.stop();
        }
    }
}

export_backend!(PythonBackend);

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
