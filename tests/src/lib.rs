//! Helpers for end-to-end tests: start the `kiln` binary laid out by `cargo xtask build`
//! on a scratch repository and talk to it over HTTP.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `target/kiln` (from `KILN_DIST`, or the default xtask layout).
pub fn dist() -> PathBuf {
    std::env::var_os("KILN_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kiln"))
}

/// Whether the server binary exists (tests skip with a message otherwise).
pub fn have_dist() -> bool {
    let ok = dist().join("kiln").exists();
    if !ok {
        eprintln!(
            "SKIP: {} missing; run `cargo xtask test` (it builds the server first)",
            dist().display()
        );
    }
    ok
}

/// A running server; killed on drop.
pub struct Kiln {
    pub child: Child,
    pub port: u16,
    /// gRPC port (0 when started with `--allow-grpc false`).
    pub grpc_port: u16,
    pub log: mpsc::Receiver<String>,
}

impl Kiln {
    /// Starts kiln on `repo` with extra args; waits until HTTP is up.
    #[allow(clippy::zombie_processes)] // the child is owned by `Kiln`, whose Drop kills and waits
    pub fn start(repo: &Path, extra: &[&str]) -> Kiln {
        let mut child = Command::new(dist().join("kiln"))
            .arg("--model-repository")
            .arg(repo)
            .args([
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kiln");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[kiln] {line}");
                let _ = tx.send(line);
            }
        });
        let want_grpc = !extra.contains(&"--allow-grpc");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut port, mut grpc_port) = (0, 0);
        let port_of = |addr: &str| -> u16 {
            addr.trim()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port")
        };
        while port == 0 || (want_grpc && grpc_port == 0) {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("kiln did not start");
            if let Some(addr) = line.split("Started HTTPService at ").nth(1) {
                port = port_of(addr);
            }
            if let Some(addr) = line.split("Started GRPCInferenceService at ").nth(1) {
                grpc_port = port_of(addr);
            }
        }
        Kiln {
            child,
            port,
            grpc_port,
            log: rx,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// GET, returning status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::blocking::get(self.url(path)).expect("GET");
        (r.status().as_u16(), r.text().unwrap_or_default())
    }

    /// POST JSON, returning status and parsed body (Null when empty).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = reqwest::blocking::Client::new()
            .post(self.url(path))
            .json(body)
            .send()
            .expect("POST");
        let status = r.status().as_u16();
        let text = r.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Repository index as (name -> (state, reason)).
    pub fn index(&self) -> Vec<serde_json::Value> {
        let (s, v) = self.post("/v2/repository/index", &serde_json::json!({}));
        assert_eq!(s, 200);
        v.as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `<repo>/<name>/config.pbtxt` and an empty version folder `1/`; returns the model dir.
pub fn add_model(repo: &Path, name: &str, config: &str) -> PathBuf {
    let dir = repo.join(name);
    std::fs::create_dir_all(dir.join("1")).expect("mkdir");
    std::fs::write(dir.join("config.pbtxt"), config).expect("write config");
    dir
}

/// Config of a one-input FP32 identity-style model for `backend`, with extra lines.
pub fn fp32_config(backend: &str, extra: &str) -> String {
    format!(
        "backend: \"{backend}\"\nmax_batch_size: 8\ninput [ {{ name: \"INPUT0\" data_type: TYPE_FP32 dims: [ -1 ] }} ]\noutput [ {{ name: \"OUTPUT0\" data_type: TYPE_FP32 dims: [ -1 ] }} ]\n{extra}\n"
    )
}

/// An infer request body for those models.
pub fn fp32_request(values: &[f32]) -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, values.len()], "data": values}]})
}

/// Compiles C source into a shared library with the Kiln header on the include path.
pub fn compile_c_backend(src: &Path, out: &Path, defines: &[&str]) {
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/kiln-abi/include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(cc)
        .args([
            "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-std=c11",
        ])
        .arg("-I")
        .arg(include)
        .args(defines)
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .expect("run cc");
    assert!(st.success(), "cc failed for {}", src.display());
}

/// Path of a test C source in `tests/c/`.
pub fn c_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c").join(name)
}
