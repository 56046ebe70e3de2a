//! `kiln`: a Triton-compatible inference server. Flag names follow tritonserver's.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kiln_core::cache::ResponseCache;
use kiln_core::trace::Tracer;
use kiln_core::{ControlMode, LogSettings, RepositoryOptions, Server, ServerOptions};
use tracing_subscriber::{prelude::*, reload, EnvFilter};

/// Changes the log filter at run time (`POST /v2/logging`); `None` when `RUST_LOG` rules.
type FilterHandle = Option<reload::Handle<EnvFilter, tracing_subscriber::Registry>>;

/// The filter for Triton's log settings: the enabled severities, and debug (verbose 1) or
/// trace (2 and up) for Kiln's own crates when verbose.
fn log_filter(s: &LogSettings) -> EnvFilter {
    let base = match (s.info, s.warning, s.error) {
        (true, ..) => "info",
        (false, true, _) => "warn",
        (false, false, true) => "error",
        _ => "off",
    };
    let mut directives = base.to_string();
    if s.verbose > 0 {
        let level = if s.verbose >= 2 { "trace" } else { "debug" };
        for krate in [
            "kiln",
            "kiln_core",
            "kiln_http",
            "kiln_grpc",
            "kiln_metrics",
        ] {
            directives.push_str(&format!(",{krate}={level}"));
        }
    }
    EnvFilter::new(directives)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Load every model at start; the load/unload API is refused.
    None,
    /// Load only --load-model models; the load/unload API is allowed.
    Explicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CompressionLevel {
    None,
    Low,
    Medium,
    High,
}

/// Kiln — a Triton Inference Server compatible inference server.
#[derive(Debug, Parser)]
#[command(name = "kiln", version)]
struct Args {
    /// Model repository path (Triton layout: <repo>/<model>/config.pbtxt, numbered versions).
    #[arg(long = "model-repository", alias = "model-store", required = true)]
    model_repository: PathBuf,
    /// Directory holding <backend>/libkiln_<backend>.so (default: `backends` next to the binary).
    #[arg(long = "backend-directory")]
    backend_directory: Option<PathBuf>,
    /// HTTP port.
    #[arg(long = "http-port", default_value_t = 8000)]
    http_port: u16,
    /// Address the HTTP server binds.
    #[arg(long = "http-address", default_value = "0.0.0.0")]
    http_address: String,
    /// Serve HTTP.
    #[arg(long = "allow-http", default_value_t = true, action = clap::ArgAction::Set)]
    allow_http: bool,
    /// gRPC port (0 picks a free port).
    #[arg(long = "grpc-port", default_value_t = 8001)]
    grpc_port: u16,
    /// Address the gRPC server binds.
    #[arg(long = "grpc-address", default_value = "0.0.0.0")]
    grpc_address: String,
    /// Serve gRPC.
    #[arg(long = "allow-grpc", default_value_t = true, action = clap::ArgAction::Set)]
    allow_grpc: bool,
    /// Milliseconds between HTTP/2 keepalive pings on gRPC connections.
    #[arg(long = "grpc-keepalive-time", default_value_t = 7_200_000)]
    grpc_keepalive_time: u64,
    /// Milliseconds to wait for a keepalive ping's answer before closing the connection.
    #[arg(long = "grpc-keepalive-timeout", default_value_t = 20_000)]
    grpc_keepalive_timeout: u64,
    /// gzip-compress gRPC inference responses: none, low, medium or high.
    #[arg(long = "grpc-infer-response-compression-level", default_value = "none")]
    grpc_infer_response_compression_level: CompressionLevel,
    /// Largest gRPC message received or sent, in bytes (Triton's limit: 2^31-1).
    #[arg(long = "grpc-max-message-size", default_value_t = i32::MAX as usize)]
    grpc_max_message_size: usize,
    /// Prometheus metrics port (`GET /metrics`; 0 picks a free port).
    #[arg(long = "metrics-port", default_value_t = 8002)]
    metrics_port: u16,
    /// Address the metrics server binds (default: the HTTP address).
    #[arg(long = "metrics-address")]
    metrics_address: Option<String>,
    /// Serve Prometheus metrics.
    #[arg(long = "allow-metrics", default_value_t = true, action = clap::ArgAction::Set)]
    allow_metrics: bool,
    /// Metric settings, `key=value` (repeatable): `histogram_latencies=true` adds
    /// nv_inference_first_response_histogram_ms.
    #[arg(long = "metrics-config")]
    metrics_config: Vec<String>,
    /// Model control mode.
    #[arg(long = "model-control-mode", value_enum, default_value_t = Mode::None)]
    model_control_mode: Mode,
    /// Model to load at start in explicit mode (repeatable; `*` loads all).
    #[arg(long = "load-model")]
    load_model: Vec<String>,
    /// Ready only when every model is ready.
    #[arg(long = "strict-readiness", default_value_t = true, action = clap::ArgAction::Set)]
    strict_readiness: bool,
    /// Seconds to let in-flight requests finish on shutdown.
    #[arg(long = "exit-timeout-secs", default_value_t = 30)]
    exit_timeout_secs: u64,
    /// Response cache, `<cache>,<key>=<value>` (repeatable): `local,size=<bytes>` caches
    /// the responses of models whose config has `response_cache { enable: true }`.
    #[arg(long = "cache-config")]
    cache_config: Vec<String>,
    /// Deprecated form of `--cache-config local,size=<bytes>` (as in tritonserver).
    #[arg(long = "response-cache-byte-size")]
    response_cache_byte_size: Option<usize>,
    /// Request tracing, `[<mode>,]<setting>=<value>` (repeatable): `level=TIMESTAMPS`,
    /// `rate=N`, `count=N`, `mode=triton`, `triton,file=<path>`, `triton,log-frequency=N`.
    #[arg(long = "trace-config")]
    trace_config: Vec<String>,
    /// Deprecated form of `--trace-config triton,file=`.
    #[arg(long = "trace-file")]
    trace_file: Option<String>,
    /// Deprecated form of `--trace-config level=` (repeatable).
    #[arg(long = "trace-level")]
    trace_level: Vec<String>,
    /// Deprecated form of `--trace-config rate=`.
    #[arg(long = "trace-rate")]
    trace_rate: Option<u64>,
    /// Deprecated form of `--trace-config count=`.
    #[arg(long = "trace-count")]
    trace_count: Option<i64>,
    /// Deprecated form of `--trace-config triton,log-frequency=`.
    #[arg(long = "trace-log-frequency")]
    trace_log_frequency: Option<u64>,
    /// Largest accepted HTTP request body, in bytes.
    #[arg(long = "http-max-input-size", default_value_t = 64 * 1024 * 1024)]
    http_max_input_size: usize,
    /// Verbose logging level (0 = off).
    #[arg(long = "log-verbose", default_value_t = 0)]
    log_verbose: u32,
}

fn default_backend_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("backends")))
        .unwrap_or_else(|| PathBuf::from("backends"))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let from_env = EnvFilter::try_from_default_env().ok();
    let rules = from_env.is_none();
    let initial = from_env.unwrap_or_else(|| {
        log_filter(&LogSettings {
            info: true,
            warning: true,
            error: true,
            verbose: args.log_verbose,
            format: "default".into(),
        })
    });
    let (filter, handle) = reload::Layer::new(initial);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, rules.then_some(handle)))
}

async fn run(args: Args, filter: FilterHandle) -> anyhow::Result<()> {
    let repo = args.model_repository.canonicalize().with_context(|| {
        format!(
            "model repository '{}' not found",
            args.model_repository.display()
        )
    })?;
    let mut cache_settings = args.cache_config.clone();
    if let Some(size) = args.response_cache_byte_size {
        cache_settings.push(format!("local,size={size}"));
    }
    let response_cache = ResponseCache::from_settings(&cache_settings)
        .map_err(|e| anyhow::anyhow!(e))?
        .map(Arc::new);
    let mut trace_settings: Vec<String> = Vec::new();
    if let Some(f) = &args.trace_file {
        trace_settings.push(format!("triton,file={f}"));
    }
    trace_settings.extend(args.trace_level.iter().map(|l| format!("level={l}")));
    if let Some(r) = args.trace_rate {
        trace_settings.push(format!("rate={r}"));
    }
    if let Some(c) = args.trace_count {
        trace_settings.push(format!("count={c}"));
    }
    if let Some(n) = args.trace_log_frequency {
        trace_settings.push(format!("triton,log-frequency={n}"));
    }
    trace_settings.extend(args.trace_config.iter().cloned());
    let tracer = Arc::new(Tracer::from_settings(&trace_settings).map_err(|e| anyhow::anyhow!(e))?);
    let opts = ServerOptions {
        repository: RepositoryOptions {
            repository: repo,
            backend_directory: args
                .backend_directory
                .clone()
                .unwrap_or_else(default_backend_dir),
            control_mode: match args.model_control_mode {
                Mode::None => ControlMode::None,
                Mode::Explicit => ControlMode::Explicit,
            },
            startup_models: args.load_model.clone(),
            response_cache,
        },
        strict_readiness: args.strict_readiness,
        log_verbose: args.log_verbose,
        tracer,
    };
    tracing::info!(backend_directory = %opts.repository.backend_directory.display(), "starting kiln {}", env!("CARGO_PKG_VERSION"));
    let server: Arc<Server> = tokio::task::spawn_blocking(move || Server::start(opts)).await?;
    if let Some(handle) = filter {
        server.set_log_hook(Box::new(move |s| {
            if let Err(e) = handle.reload(log_filter(s)) {
                tracing::warn!("log settings not applied: {e}");
            }
        }));
    }
    for e in server.models().index(false) {
        tracing::info!(model = %e.name, version = ?e.version, state = ?e.state, "{}", e.reason);
    }
    let grace = Duration::from_secs(args.exit_timeout_secs);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    if args.allow_http {
        let addr: SocketAddr = format!("{}:{}", args.http_address, args.http_port)
            .parse()
            .context("invalid --http-address")?;
        let listener = kiln_http::bind(addr)
            .await
            .with_context(|| format!("cannot bind HTTP on {addr}"))?;
        tracing::info!("Started HTTPService at {}", listener.local_addr()?);
        let mut rx = stop_rx.clone();
        let s = server.clone();
        let http_opts = kiln_http::HttpOptions {
            max_input_size: args.http_max_input_size,
        };
        tasks.push(tokio::spawn(async move {
            kiln_http::serve(
                listener,
                s,
                http_opts,
                async move {
                    let _ = rx.changed().await;
                },
                grace,
            )
            .await
        }));
    }
    if args.allow_grpc {
        let addr: SocketAddr = format!("{}:{}", args.grpc_address, args.grpc_port)
            .parse()
            .context("invalid --grpc-address")?;
        let listener = kiln_grpc::bind(addr)
            .await
            .with_context(|| format!("cannot bind gRPC on {addr}"))?;
        tracing::info!("Started GRPCInferenceService at {}", listener.local_addr()?);
        let mut rx = stop_rx.clone();
        let s = server.clone();
        let grpc_opts = kiln_grpc::GrpcOptions {
            max_message_size: args.grpc_max_message_size,
            keepalive_time: Duration::from_millis(args.grpc_keepalive_time),
            keepalive_timeout: Duration::from_millis(args.grpc_keepalive_timeout),
            compress_responses: args.grpc_infer_response_compression_level
                != CompressionLevel::None,
        };
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.changed().await;
            };
            if let Err(e) = kiln_grpc::serve(listener, s, grpc_opts, stop, grace).await {
                tracing::error!("gRPC server failed: {e}");
            }
        }));
    }
    if args.allow_metrics {
        let mut metrics_opts = kiln_metrics::MetricsOptions::default();
        for setting in &args.metrics_config {
            metrics_opts.set(setting).map_err(anyhow::Error::msg)?;
        }
        let host = args
            .metrics_address
            .as_deref()
            .unwrap_or(&args.http_address);
        let addr: SocketAddr = format!("{host}:{}", args.metrics_port)
            .parse()
            .context("invalid --metrics-address")?;
        let listener = kiln_http::bind(addr)
            .await
            .with_context(|| format!("cannot bind metrics on {addr}"))?;
        tracing::info!("Started Metrics Service at {}", listener.local_addr()?);
        let mut rx = stop_rx.clone();
        let s = server.clone();
        tasks.push(tokio::spawn(async move {
            kiln_http::serve_metrics(listener, s, metrics_opts, async move {
                let _ = rx.changed().await;
            })
            .await
        }));
    }
    shutdown_signal().await;
    tracing::info!(
        "shutting down: finishing in-flight requests (up to {}s)",
        args.exit_timeout_secs
    );
    server.begin_shutdown();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let s = server.clone();
    let _ = tokio::time::timeout(grace, tokio::task::spawn_blocking(move || s.shutdown())).await;
    tracing::info!("kiln stopped");
    Ok(())
}
