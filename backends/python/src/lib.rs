//! The `python` backend: runs Triton Python models (`backend: "python"`, a `model.py`
//! defining `TritonPythonModel`) unchanged.
//!
//! As in Triton, each instance runs in its own stub process: a Python interpreter
//! (`KILN_PYTHON`, default `python3`; it needs numpy) running `stub.py`, which provides
//! the `triton_python_backend_utils` module, imports the model, calls `initialize(args)`,
//! `execute(requests)` per batch and `finalize()` at unload. Tensors travel between the
//! backend and the stub over the stub's stdin/stdout (`frame.rs`); a reader thread per stub
//! (`dispatch.rs`) takes every frame the stub sends. Decoupled models send through
//! `request.get_response_sender()`, also after `execute` returned: the instance then runs
//! the next batch while earlier requests stream. BLS (`InferenceRequest(...).exec()`, also
//! `decoupled=True` and `async_exec`) runs through the host's `infer` while the stub
//! waits. A stub that dies fails the requests it held and is started again for the next
//! batch. `auto_complete_config` completes the config before the model loads, and a model's
//! `EXECUTION_ENV_PATH` (`env.rs`) picks the Python its stubs run on.
mod dispatch;
mod env;
mod frame;
mod stub;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_sdk::{
    export_backend, Backend, Error, ErrorCode, Instance, InstanceInfo, InstanceKind, Model,
    ModelInfo, Request, Response, Result,
};
use serde_json::{json, Value};

use dispatch::Event;
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

/// An instance: its stub process, the frame that (re)starts it, and the handle the next
/// request is known to the stub by.
pub struct PythonInstance {
    python: String,
    init: Value,
    decoupled: bool,
    stub: Option<Stub>,
    next_handle: u64,
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
            next_handle: 0,
        })
    }
}

/// The `execute` frame for `requests` (known to the stub by `handles`), and the input
/// bytes that follow it.
fn execute_frame<'a>(requests: &[Request<'a>], handles: &[u64]) -> (Value, Vec<&'a [u8]>) {
    let mut blobs = Vec::new();
    let specs: Vec<Value> = requests
        .iter()
        .zip(handles)
        .map(|(r, handle)| {
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
                "handle": handle,
                "id": r.id(),
                // A string sequence id reaches the model as the string, as in Triton.
                "correlation_id": r.correlation_id_text().map_or(json!(r.correlation_id()), Value::from),
                "flags": r.flags(),
                "timeout": r.timeout_us(),
                "parameters": serde_json::from_str::<Value>(r.parameters_json()).unwrap_or(json!({})),
                "inputs": inputs,
                "requested_outputs": r.requested_outputs(),
            })
        })
        .collect();
    (json!({"op": "execute", "requests": specs}), blobs)
}

impl PythonInstance {
    /// The running stub, started (again) if it is not running.
    fn stub(&mut self) -> Result<&Stub> {
        if self.stub.as_ref().is_some_and(Stub::exited) {
            self.stub = None;
        }
        match &mut self.stub {
            Some(stub) => Ok(stub),
            slot => Ok(slot.insert(Stub::start(&self.python, &self.init)?)),
        }
    }
}

impl Instance for PythonInstance {
    fn infer(&mut self, _request: &Request<'_>, _response: &mut Response) -> Result<()> {
        Err(Error::internal(
            "the python backend answers through execute",
        ))
    }

    /// Hands the batch to the stub and waits until its `execute` returns. The requests are
    /// kept: responses reach them through the stub's reader thread, also after this returns
    /// for a decoupled model (which may answer later from its own threads, as in Triton);
    /// a model that is not decoupled must have answered each request by then.
    fn execute(&mut self, requests: &[Request<'_>]) -> Result<()> {
        let first = self.next_handle;
        self.next_handle += requests.len() as u64;
        let handles: Vec<u64> = (first..self.next_handle).collect();
        let decoupled = self.decoupled;
        let name = self.init["args"]["model_instance_name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let stub = self.stub()?;
        for (r, &h) in requests.iter().zip(&handles) {
            stub.open.insert(h, r.keep()?);
        }
        let (header, blobs) = execute_frame(requests, &handles);
        let event = kiln_sdk::compute(|| stub.send(&header, &blobs).map(|()| stub.next_event()));
        let (unanswered, gone) = match event {
            Ok(Event::Done) if decoupled => (None, false),
            Ok(Event::Done) => (
                Some(Error::internal(
                    "the python model returned no response for the request",
                )),
                false,
            ),
            Ok(Event::Failed(message)) => (
                Some(Error::internal(format!(
                    "Failed to process the request(s) for model '{name}', message: {message}"
                ))),
                false,
            ),
            Ok(Event::Finalized) => (
                Some(Error::internal(
                    "the python stub finalized the model during execute",
                )),
                true,
            ),
            Ok(Event::Gone(e)) | Err(e) => (Some(e), true),
        };
        if let Some(e) = unanswered {
            stub.open.fail(handles, &e);
        }
        if gone {
            // Started again for the next batch.
            self.stub = None;
        }
        Ok(())
    }
}

/// How long an instance being unloaded waits for the requests its model still streams.
const DRAIN: Duration = Duration::from_secs(30);

impl Drop for PythonInstance {
    /// Lets the requests a decoupled model still answers finish (up to [`DRAIN`]), then
    /// runs `finalize` and ends the stub.
    fn drop(&mut self) {
        if let Some(stub) = self.stub.take() {
            let deadline = Instant::now() + DRAIN;
            while !stub.open.is_empty() && !stub.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            stub.stop();
        }
    }
}

export_backend!(PythonBackend);
