//! The command line, with tritonserver's flag names and defaults.
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Load every model at start; the load/unload API is refused.
    None,
    /// Load only --load-model models; the load/unload API is allowed.
    Explicit,
    /// Load every model at start, then follow the repository's changes every
    /// --repository-poll-secs; the load/unload API is refused.
    Poll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionLevel {
    None,
    Low,
    Medium,
    High,
}

/// Kiln — a Triton Inference Server compatible inference server.
#[derive(Debug, Parser)]
#[command(name = "kiln", version)]
pub struct Args {
    /// Model repository path (Triton layout: <repo>/<model>/config.pbtxt, numbered
    /// versions); repeatable, a model is served from the first repository that has it.
    #[arg(long = "model-repository", alias = "model-store", required = true)]
    pub model_repository: Vec<PathBuf>,
    /// Directory holding <backend>/libkiln_<backend>.so (default: `backends` next to the binary).
    #[arg(long = "backend-directory")]
    pub backend_directory: Option<PathBuf>,
    /// HTTP port.
    #[arg(long = "http-port", default_value_t = 8000)]
    pub http_port: u16,
    /// Address the HTTP server binds.
    #[arg(long = "http-address", default_value = "0.0.0.0")]
    pub http_address: String,
    /// Serve HTTP.
    #[arg(long = "allow-http", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_http: bool,
    /// gRPC port (0 picks a free port).
    #[arg(long = "grpc-port", default_value_t = 8001)]
    pub grpc_port: u16,
    /// Address the gRPC server binds.
    #[arg(long = "grpc-address", default_value = "0.0.0.0")]
    pub grpc_address: String,
    /// Serve gRPC.
    #[arg(long = "allow-grpc", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_grpc: bool,
    /// Milliseconds between HTTP/2 keepalive pings on gRPC connections.
    #[arg(long = "grpc-keepalive-time", default_value_t = 7_200_000)]
    pub grpc_keepalive_time: u64,
    /// Milliseconds to wait for a keepalive ping's answer before closing the connection.
    #[arg(long = "grpc-keepalive-timeout", default_value_t = 20_000)]
    pub grpc_keepalive_timeout: u64,
    /// gzip-compress gRPC inference responses: none, low, medium or high.
    #[arg(long = "grpc-infer-response-compression-level", default_value = "none")]
    pub grpc_infer_response_compression_level: CompressionLevel,
    /// How many models load at the same time.
    #[arg(long = "model-load-thread-count", default_value_t = 4)]
    pub model_load_thread_count: usize,
    /// Use each model's `configs/<name>.pbtxt` where it has one (else `config.pbtxt`).
    #[arg(long = "model-config-name")]
    pub model_config_name: Option<String>,
    /// Serve gRPC over TLS, with --grpc-server-cert and --grpc-server-key.
    #[arg(long = "grpc-use-ssl", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub grpc_use_ssl: bool,
    /// Also require client certificates issued by --grpc-root-cert (implies --grpc-use-ssl).
    #[arg(long = "grpc-use-ssl-mutual", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub grpc_use_ssl_mutual: bool,
    /// PEM file of the gRPC server's certificate chain.
    #[arg(long = "grpc-server-cert")]
    pub grpc_server_cert: Option<PathBuf>,
    /// PEM file of its private key.
    #[arg(long = "grpc-server-key")]
    pub grpc_server_key: Option<PathBuf>,
    /// PEM file of the CA that client certificates must chain to (mutual TLS).
    #[arg(long = "grpc-root-cert")]
    pub grpc_root_cert: Option<PathBuf>,
    /// Largest gRPC message received or sent, in bytes (Triton's limit: 2^31-1).
    #[arg(long = "grpc-max-message-size", default_value_t = i32::MAX as usize)]
    pub grpc_max_message_size: usize,
    /// Prometheus metrics port (`GET /metrics`; 0 picks a free port).
    #[arg(long = "metrics-port", default_value_t = 8002)]
    pub metrics_port: u16,
    /// Address the metrics server binds (default: the HTTP address).
    #[arg(long = "metrics-address")]
    pub metrics_address: Option<String>,
    /// Serve Prometheus metrics.
    #[arg(long = "allow-metrics", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_metrics: bool,
    /// Metric settings, `key=value` (repeatable): `histogram_latencies=true` adds
    /// nv_inference_first_response_histogram_ms.
    #[arg(long = "metrics-config")]
    pub metrics_config: Vec<String>,
    /// Model control mode.
    #[arg(long = "model-control-mode", value_enum, default_value_t = Mode::None)]
    pub model_control_mode: Mode,
    /// Model to load at start in explicit mode (repeatable; `*` loads all).
    #[arg(long = "load-model")]
    pub load_model: Vec<String>,
    /// Ready only when every model is ready.
    #[arg(long = "strict-readiness", default_value_t = true, action = clap::ArgAction::Set)]
    pub strict_readiness: bool,
    /// Seconds to let in-flight requests finish on shutdown.
    #[arg(long = "exit-timeout-secs", default_value_t = 30)]
    pub exit_timeout_secs: u64,
    /// Response cache, `<cache>,<key>=<value>` (repeatable): `local,size=<bytes>` caches
    /// the responses of models whose config has `response_cache { enable: true }`.
    #[arg(long = "cache-config")]
    pub cache_config: Vec<String>,
    /// The rate limiter: `off`, or `execution_count` (an instance runs a batch only when the
    /// resources of its group's `rate_limiter` are free; `priority` weights the turns).
    #[arg(long = "rate-limit", value_enum, default_value_t = RateLimit::Off)]
    pub rate_limit: RateLimit,
    /// Copies of a rate limiter resource, `<name>:<count>[:<device>]` (repeatable; without a
    /// device, on every device). Once any is given, a resource not named has none.
    #[arg(long = "rate-limit-resource")]
    pub rate_limit_resource: Vec<kiln_core::rate_limit::ExplicitResource>,
    /// HTTP headers whose names match this regular expression reach the model as request
    /// parameters.
    #[arg(long = "http-header-forward-pattern")]
    pub http_header_forward_pattern: Option<String>,
    /// gRPC metadata whose keys match this regular expression reach the model as request
    /// parameters.
    #[arg(long = "grpc-header-forward-pattern")]
    pub grpc_header_forward_pattern: Option<String>,
    /// Deprecated form of `--cache-config local,size=<bytes>` (as in tritonserver).
    #[arg(long = "response-cache-byte-size")]
    pub response_cache_byte_size: Option<usize>,
    /// Request tracing, `[<mode>,]<setting>=<value>` (repeatable): `level=TIMESTAMPS`,
    /// `rate=N`, `count=N`, `mode=triton`, `triton,file=<path>`, `triton,log-frequency=N`.
    #[arg(long = "trace-config")]
    pub trace_config: Vec<String>,
    /// Deprecated form of `--trace-config triton,file=`.
    #[arg(long = "trace-file")]
    pub trace_file: Option<String>,
    /// Deprecated form of `--trace-config level=` (repeatable).
    #[arg(long = "trace-level")]
    pub trace_level: Vec<String>,
    /// Deprecated form of `--trace-config rate=`.
    #[arg(long = "trace-rate")]
    pub trace_rate: Option<u64>,
    /// Deprecated form of `--trace-config count=`.
    #[arg(long = "trace-count")]
    pub trace_count: Option<i64>,
    /// Deprecated form of `--trace-config triton,log-frequency=`.
    #[arg(long = "trace-log-frequency")]
    pub trace_log_frequency: Option<u64>,
    /// Largest accepted HTTP request body, in bytes.
    #[arg(long = "http-max-input-size", default_value_t = 64 * 1024 * 1024)]
    pub http_max_input_size: usize,
    /// Verbose logging level (0 = off).
    #[arg(long = "log-verbose", default_value_t = 0)]
    pub log_verbose: u32,
    /// Log informational messages.
    #[arg(long = "log-info", default_value_t = true, action = clap::ArgAction::Set)]
    pub log_info: bool,
    /// Log warnings.
    #[arg(long = "log-warning", default_value_t = true, action = clap::ArgAction::Set)]
    pub log_warning: bool,
    /// Log errors.
    #[arg(long = "log-error", default_value_t = true, action = clap::ArgAction::Set)]
    pub log_error: bool,
    /// Log line format: default or ISO8601.
    #[arg(long = "log-format", default_value = "default")]
    pub log_format: String,
    /// Write the log to this file instead of standard output.
    #[arg(long = "log-file")]
    pub log_file: Option<PathBuf>,
    /// The server's name in its metadata.
    #[arg(long = "id", default_value = kiln_core::server::SERVER_NAME)]
    pub id: String,
    /// Seconds between looks at the repositories in poll mode.
    #[arg(long = "repository-poll-secs", default_value_t = 15)]
    pub repository_poll_secs: u64,
    /// Load configs as written: backends do not complete missing inputs, outputs or
    /// max_batch_size from the model files.
    #[arg(long = "disable-auto-complete-config", default_value_t = false)]
    pub disable_auto_complete_config: bool,
    /// Backend settings, `[<backend>,]<setting>=<value>` (repeatable), passed to the
    /// backends as Triton's backend config (the onnx backend reads
    /// `default-max-batch-size`).
    #[arg(long = "backend-config")]
    pub backend_config: Vec<String>,
    /// HTTP API groups that answer only requests with a header,
    /// `<api>,<api>,...:<key>=<value>` (repeatable; APIs: health, metadata, inference,
    /// shared-memory, model-config, model-repository, statistics, trace, logging).
    #[arg(long = "http-restricted-api")]
    pub http_restricted_api: Vec<String>,
    /// The same for gRPC; the header is `triton-grpc-protocol-<key>`.
    #[arg(long = "grpc-restricted-protocol")]
    pub grpc_restricted_protocol: Vec<String>,
    /// Deprecated form of --disable-auto-complete-config.
    #[arg(long = "strict-model-config", action = clap::ArgAction::Set)]
    pub strict_model_config: Option<bool>,
    /// tritonserver settings accepted so that its command lines run unchanged; see
    /// `compat.rs` for which are refused when they ask for what Kiln does not do.
    #[command(flatten)]
    pub compat: crate::compat::TritonFlags,
}

/// `--rate-limit` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimit {
    /// Instances run as soon as they have a batch.
    Off,
    /// Instances run as their rate limiter resources and priorities allow.
    #[value(name = "execution_count")]
    ExecutionCount,
}

impl Args {
    /// The compiled `--<front end>-header-forward-pattern`, if given.
    pub fn header_forward(
        flag: &str,
        pattern: &Option<String>,
    ) -> anyhow::Result<Option<kiln_core::forward::HeaderForward>> {
        pattern
            .as_deref()
            .map(|p| kiln_core::forward::HeaderForward::new(flag, p))
            .transpose()
            .map_err(anyhow::Error::msg)
    }

    /// `--model-config-name`, checked as tritonserver checks it: not empty, no spaces.
    pub fn model_config_name(&self) -> anyhow::Result<Option<String>> {
        match self.model_config_name.as_deref() {
            None => Ok(None),
            Some(n) if n.is_empty() || n.chars().any(char::is_whitespace) => Err(anyhow::anyhow!(
                "--model-config-name must be a non-empty name without spaces, got '{n}'"
            )),
            Some(n) => Ok(Some(n.to_string())),
        }
    }

    /// The gRPC port's TLS settings, read from their files (`None` without TLS).
    pub fn grpc_tls(&self) -> anyhow::Result<Option<kiln_grpc::GrpcTls>> {
        if !self.grpc_use_ssl && !self.grpc_use_ssl_mutual {
            return Ok(None);
        }
        let read = |flag: &str, path: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
            let path = path
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("--grpc-use-ssl needs --{flag}"))?;
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read --{flag} {}: {e}", path.display()))
        };
        let tls = kiln_grpc::GrpcTls {
            cert: read("grpc-server-cert", &self.grpc_server_cert)?,
            key: read("grpc-server-key", &self.grpc_server_key)?,
            client_ca: if self.grpc_use_ssl_mutual {
                Some(read("grpc-root-cert", &self.grpc_root_cert)?)
            } else {
                None
            },
        };
        tls.validate().map_err(|e| {
            anyhow::anyhow!("--grpc-use-ssl: the certificate and key cannot serve TLS: {e:?}")
        })?;
        Ok(Some(tls))
    }

    /// The rate limiter the flags ask for (`None` when it is off).
    pub fn rate_limiter(&self) -> Option<Arc<kiln_core::rate_limit::RateLimiter>> {
        (self.rate_limit == RateLimit::ExecutionCount)
            .then(|| kiln_core::rate_limit::RateLimiter::new(self.rate_limit_resource.clone()))
    }

    /// `--cache-config` settings, with the deprecated `--response-cache-byte-size` as
    /// `local,size=`.
    pub fn cache_settings(&self) -> Vec<String> {
        let mut settings = self.cache_config.clone();
        if let Some(size) = self.response_cache_byte_size {
            settings.push(format!("local,size={size}"));
        }
        settings
    }

    /// `--trace-config` settings, after those the deprecated `--trace-*` flags stand for.
    pub fn trace_settings(&self) -> Vec<String> {
        let mut settings: Vec<String> = Vec::new();
        if let Some(f) = &self.trace_file {
            settings.push(format!("triton,file={f}"));
        }
        settings.extend(self.trace_level.iter().map(|l| format!("level={l}")));
        if let Some(r) = self.trace_rate {
            settings.push(format!("rate={r}"));
        }
        if let Some(c) = self.trace_count {
            settings.push(format!("count={c}"));
        }
        if let Some(n) = self.trace_log_frequency {
            settings.push(format!("triton,log-frequency={n}"));
        }
        settings.extend(self.trace_config.iter().cloned());
        settings
    }

    /// The log settings the flags ask for.
    pub fn log_settings(&self) -> anyhow::Result<kiln_core::LogSettings> {
        if !matches!(self.log_format.as_str(), "default" | "ISO8601") {
            anyhow::bail!(
                "--log-format must be default or ISO8601, got '{}'",
                self.log_format
            );
        }
        Ok(kiln_core::LogSettings {
            info: self.log_info,
            warning: self.log_warning,
            error: self.log_error,
            verbose: self.log_verbose,
            format: self.log_format.clone(),
            file: self
                .log_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        })
    }
}
