//! One instance's stub process: a Python interpreter running `stub.py`, which imports the
//! model's `model.py` and answers the backend's frames on its stdin/stdout. After the
//! model's `initialize`, a reader thread (`dispatch.rs`) takes every frame the stub sends.
use std::io::{BufRead, BufReader, BufWriter, Read};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_sdk::{log, metric, Error, LogLevel, MetricKind, MetricOp, MetricSeries, Result};
use serde_json::{json, Value};

use crate::dispatch::{self, Event, Open};
use crate::frame::{self, Frame};

/// The stub's source, run with `python -c`.
const STUB_SOURCE: &str = include_str!("stub.py");

/// Copies the stub's stderr into the server's log, line by line: a line that
/// `pb_utils.Logger` marked (`\x1f` and a level digit) at its level, anything else
/// (prints, tracebacks) as info.
fn forward_log(stderr: ChildStderr, label: String) {
    let spawned = std::thread::Builder::new()
        .name("kiln-py-log".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let (level, text) = match line.strip_prefix('\u{1f}') {
                    Some(rest) => {
                        let level = match rest.as_bytes().first() {
                            Some(b'1') => LogLevel::Warn,
                            Some(b'2') => LogLevel::Error,
                            Some(b'3') => LogLevel::Verbose,
                            _ => LogLevel::Info,
                        };
                        (level, rest.get(1..).unwrap_or_default())
                    }
                    None => (LogLevel::Info, line.as_str()),
                };
                log(level, &format!("[{label}] {text}"));
            }
        });
    if let Err(e) = spawned {
        log(
            LogLevel::Warn,
            &format!("cannot forward the python stub's output: {e}"),
        );
    }
}

/// Runs a `pb_utils.MetricFamily` operation of the stub: `kind` and `code` as the ABI's.
pub(crate) fn apply_metric(h: &Value) -> Result<f64> {
    let buckets: Vec<f64> = h["buckets"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let kind = match h["kind"].as_u64() {
        Some(0) => MetricKind::Counter,
        Some(1) => MetricKind::Gauge,
        _ => MetricKind::Histogram,
    };
    let value = h["value"].as_f64().unwrap_or(0.0);
    let op = match h["code"].as_u64() {
        Some(0) => MetricOp::Set(value),
        Some(1) => MetricOp::Add(value),
        Some(2) => MetricOp::Observe(value),
        _ => MetricOp::Read,
    };
    let series = MetricSeries {
        family: h["family"].as_str().unwrap_or_default(),
        description: h["description"].as_str().unwrap_or_default(),
        kind,
        labels_json: h["labels"].as_str().unwrap_or_default(),
        buckets: &buckets,
    };
    metric(&series, op)
}

/// The error an `error` reply of the stub carries (its Python traceback).
fn failure(reply: &Value) -> Error {
    let message = reply["message"].as_str().unwrap_or("no reason given");
    Error::internal(message.trim_end().to_string())
}

/// The writing end of a stub's pipe, shared by the instance's thread and the reader's.
#[derive(Clone)]
pub struct Writer(Arc<Mutex<BufWriter<ChildStdin>>>);

impl Writer {
    /// Sends a frame.
    pub fn send(&self, header: &Value, blobs: &[&[u8]]) -> Result<()> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        frame::write(&mut *w, header, blobs)
            .map_err(|e| Error::internal(format!("cannot write to the python stub: {e}")))
    }
}

/// A stub process and the writing end of its pipe.
#[derive(Clone)]
pub struct Process {
    child: Arc<Mutex<Child>>,
    pub writer: Writer,
}

impl Process {
    fn spawn(python: &str, label: &str) -> Result<(Process, BufReader<ChildStdout>)> {
        let mut child = Command::new(python)
            .arg("-u")
            .arg("-c")
            .arg(STUB_SOURCE)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::internal(format!(
                    "cannot start the python stub with '{python}' (set KILN_PYTHON to a Python 3 with numpy): {e}"
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err(Error::internal("the python stub has no pipes"));
        };
        forward_log(stderr, label.to_string());
        let process = Process {
            child: Arc::new(Mutex::new(child)),
            writer: Writer(Arc::new(Mutex::new(BufWriter::new(stdin)))),
        };
        Ok((process, BufReader::new(stdout)))
    }

    /// Receives a frame before the reader thread runs, serving the `metric` frames
    /// (custom metrics made in `initialize`) that come first.
    /// BLS requests and model control are refused meanwhile: the model is still loading
    /// (as Triton's, which allows neither during `initialize`).
    fn recv(&self, from_stub: &mut impl Read) -> Result<Frame> {
        const LOADING: &str = "not available while the model initializes: call it from execute";
        loop {
            let f = frame::read(from_stub).map_err(|e| self.gone(e))?;
            let call = &f.header["call"];
            let reply = match f.header["op"].as_str() {
                Some("metric") => match apply_metric(&f.header) {
                    Ok(value) => json!({"op": "metric_value", "value": value}),
                    Err(e) => json!({"op": "metric_value", "error": e.message}),
                },
                Some("bls") => json!({"op": "bls_response", "call": call, "final": true,
                                      "error": format!("BLS is {LOADING}"), "code": 5}),
                Some("model_control") => json!({"op": "control_result", "call": call,
                                                "error": format!("model control is {LOADING}")}),
                _ => return Ok(f),
            };
            self.writer.send(&reply, &[])?;
        }
    }

    /// The error for a stub that stopped answering (it exited, or broke the framing).
    pub fn gone(&self, e: std::io::Error) -> Error {
        let exited = self
            .child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_wait();
        let status = match exited {
            Ok(Some(s)) => format!(
                "it exited ({s}); its output is in the server's log (the Python named by KILN_PYTHON needs numpy)"
            ),
            _ => format!("{e}"),
        };
        Error::internal(format!(
            "the python stub process stopped answering: {status}"
        ))
    }

    fn exited(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        matches!(child.try_wait(), Ok(Some(_)))
    }

    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A running stub: its process, the requests it may still answer, and the events its
/// reader thread hands to the instance.
pub struct Stub {
    process: Process,
    /// Requests sent to the stub and not yet ended.
    pub open: Open,
    events: Receiver<Event>,
}

impl Stub {
    /// Starts `python` on the stub and initializes the model with `init` (the `init`
    /// frame: model file, its folder, whether it is decoupled, `initialize`'s args); then
    /// a thread reads the stub's frames (`dispatch::run`).
    pub fn start(python: &str, init: &Value) -> Result<Stub> {
        let label = init["args"]["model_instance_name"]
            .as_str()
            .unwrap_or("python model");
        let (process, mut from_stub) = Process::spawn(python, label)?;
        let reply = process
            .writer
            .send(init, &[])
            .and_then(|()| process.recv(&mut from_stub));
        let reply = match reply {
            Ok(f) if f.header["op"] == "ok" => f,
            Ok(f) => {
                process.kill();
                return Err(failure(&f.header));
            }
            Err(e) => {
                process.kill();
                return Err(e);
            }
        };
        drop(reply);
        let open = Open::default();
        let (tx, events) = channel();
        let (p, o) = (process.clone(), open.clone());
        std::thread::Builder::new()
            .name("kiln-py-reader".into())
            .spawn(move || dispatch::run(from_stub, p, o, tx))
            .map_err(|e| {
                process.kill();
                Error::internal(format!("cannot start the python stub's reader: {e}"))
            })?;
        Ok(Stub {
            process,
            open,
            events,
        })
    }

    /// Runs a stub for one exchange: sends `header`, returns the stub's reply (an `error`
    /// reply becomes the error), and ends the process.
    pub fn once(python: &str, header: &Value) -> Result<Value> {
        let (process, mut from_stub) = Process::spawn(python, "python auto-complete")?;
        let reply = process
            .writer
            .send(header, &[])
            .and_then(|()| process.recv(&mut from_stub));
        process.kill();
        let reply = reply?.header;
        match reply["op"].as_str() {
            Some("ok") => Ok(reply),
            _ => Err(failure(&reply)),
        }
    }

    /// Sends a frame.
    pub fn send(&self, header: &Value, blobs: &[&[u8]]) -> Result<()> {
        self.process.writer.send(header, blobs)
    }

    /// Waits for the reader's next event.
    pub fn next_event(&self) -> Event {
        self.events.recv().unwrap_or_else(|_| {
            Event::Gone(Error::internal(
                "the python stub process stopped answering: its reader ended",
            ))
        })
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        self.process.exited()
    }

    /// Runs the model's `finalize` and ends the process (killed if it takes over 10 s).
    pub fn stop(self) {
        if self.send(&json!({"op": "fini"}), &[]).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match self.events.recv_timeout(left) {
                    Ok(Event::Finalized) | Ok(Event::Gone(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        // Dropping kills the process; its reader then fails what is still open.
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.process.kill();
    }
}
