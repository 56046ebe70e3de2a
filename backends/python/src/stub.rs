//! One instance's stub process: a Python interpreter running `stub.py`, which imports the
//! model's `model.py` and answers the backend's frames on its stdin/stdout.
use std::io::{BufRead, BufReader, BufWriter};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_sdk::{log, metric, Error, LogLevel, MetricKind, MetricOp, MetricSeries, Result};
use serde_json::{json, Value};

use crate::frame::{self, Frame};

/// The stub's source, run with `python -c`.
const STUB_SOURCE: &str = include_str!("stub.py");

/// A running stub.
pub struct Stub {
    child: Child,
    to_stub: BufWriter<ChildStdin>,
    from_stub: BufReader<ChildStdout>,
}

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
fn apply_metric(h: &Value) -> Result<f64> {
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

impl Stub {
    /// Starts `python` on the stub and initializes the model with `init` (the `init`
    /// frame: model file, its folder, whether it is decoupled, `initialize`'s args).
    pub fn start(python: &str, init: &Value) -> Result<Stub> {
        let label = init["args"]["model_instance_name"]
            .as_str()
            .unwrap_or("python model");
        let mut stub = Self::spawn(python, label)?;
        stub.send(init, &[])?;
        let reply = stub.recv()?;
        match reply.header["op"].as_str() {
            Some("ok") => Ok(stub),
            _ => {
                stub.kill();
                Err(failure(&reply.header))
            }
        }
    }

    fn spawn(python: &str, label: &str) -> Result<Stub> {
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
        Ok(Stub {
            child,
            to_stub: BufWriter::new(stdin),
            from_stub: BufReader::new(stdout),
        })
    }

    /// Runs a stub for one exchange: sends `header`, returns the stub's reply (an `error`
    /// reply becomes the error), and ends the process.
    pub fn once(python: &str, header: &Value) -> Result<Value> {
        let mut stub = Self::spawn(python, "python auto-complete")?;
        let reply = stub.send(header, &[]).and_then(|()| stub.recv());
        stub.kill();
        let reply = reply?.header;
        match reply["op"].as_str() {
            Some("ok") => Ok(reply),
            _ => Err(failure(&reply)),
        }
    }

    /// Sends a frame.
    pub fn send(&mut self, header: &Value, blobs: &[&[u8]]) -> Result<()> {
        frame::write(&mut self.to_stub, header, blobs).map_err(|e| self.gone(e))
    }

    /// Receives a frame, serving the `metric` frames (custom metrics) that come first.
    pub fn recv(&mut self) -> Result<Frame> {
        loop {
            let f = frame::read(&mut self.from_stub).map_err(|e| self.gone(e))?;
            if f.header["op"] != "metric" {
                return Ok(f);
            }
            let reply = match apply_metric(&f.header) {
                Ok(value) => json!({"op": "metric_value", "value": value}),
                Err(e) => json!({"op": "metric_value", "error": e.message}),
            };
            self.send(&reply, &[])?;
        }
    }

    /// The error for a stub that stopped answering (it exited, or broke the framing).
    fn gone(&mut self, e: std::io::Error) -> Error {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!(
                "it exited ({s}); its output is in the server's log (the Python named by KILN_PYTHON needs numpy)"
            ),
            _ => format!("{e}"),
        };
        Error::internal(format!(
            "the python stub process stopped answering: {status}"
        ))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs the model's `finalize` and ends the process (killed if it takes over 10 s).
    pub fn stop(mut self) {
        if self.send(&json!({"op": "fini"}), &[]).is_ok() {
            let _ = self.recv();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}
