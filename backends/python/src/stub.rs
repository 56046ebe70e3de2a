//! One instance's stub process: a Python interpreter running `stub.py`, which imports the
//! model's `model.py` and answers the backend's frames on its stdin/stdout.
use std::io::{BufRead, BufReader, BufWriter};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_sdk::{log, Error, LogLevel, Result};
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

    /// Receives a frame.
    pub fn recv(&mut self) -> Result<Frame> {
        frame::read(&mut self.from_stub).map_err(|e| self.gone(e))
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
