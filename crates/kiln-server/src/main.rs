//! `kiln`: a Triton-compatible inference server. Flag names follow tritonserver's.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kiln_core::access::Restrictions;
use kiln_core::cache::ResponseCache;
use kiln_core::trace::Tracer;
use kiln_core::{ControlMode, LogSettings, RepositoryOptions, Server, ServerOptions};
use tracing_subscriber::{fmt::writer::BoxMakeWriter, prelude::*, reload, EnvFilter};

mod args;
mod compat;

use args::{Args, CompressionLevel, Mode};

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
    let log = args.log_settings()?;
    let from_env = EnvFilter::try_from_default_env().ok();
    let rules = from_env.is_none();
    let initial = from_env.unwrap_or_else(|| log_filter(&log));
    let (filter, handle) = reload::Layer::new(initial);
    let (writer, ansi) = match &args.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open --log-file '{}'", path.display()))?;
            (BoxMakeWriter::new(std::sync::Mutex::new(file)), false)
        }
        None => (
            BoxMakeWriter::new(std::io::stdout),
            std::io::IsTerminal::is_terminal(&std::io::stdout()),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(writer),
        )
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(run(args, log, rules.then_some(handle)));
    // Work still running past --exit-timeout-secs is abandoned, as Triton's exit timeout
    // does: dropping the runtime normally would wait for its blocking tasks (a model's
    // execute) however long they take.
    rt.shutdown_background();
    outcome
}

async fn run(args: Args, log: LogSettings, filter: FilterHandle) -> anyhow::Result<()> {
    let repositories = args
        .model_repository
        .iter()
        .map(|r| {
            r.canonicalize()
                .with_context(|| format!("model repository '{}' not found", r.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ignored = args.compat.check().map_err(anyhow::Error::msg)?;
    let backend_settings = args
        .backend_config
        .iter()
        .map(|s| kiln_core::loader::parse_backend_setting(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    kiln_core::loader::set_backend_config(backend_settings);
    let http_restricted =
        Restrictions::parse("--http-restricted-api", "", &args.http_restricted_api)
            .map_err(anyhow::Error::msg)?;
    let grpc_restricted = Restrictions::parse(
        "--grpc-restricted-protocol",
        "triton-grpc-protocol-",
        &args.grpc_restricted_protocol,
    )
    .map_err(anyhow::Error::msg)?;
    if !ignored.is_empty() {
        tracing::info!(
            "tritonserver flags accepted with no effect in Kiln: {}",
            ignored.join(", ")
        );
    }
    let http_forward = Args::header_forward(
        "--http-header-forward-pattern",
        &args.http_header_forward_pattern,
    )?;
    let grpc_tls = args.grpc_tls()?;
    let grpc_forward = Args::header_forward(
        "--grpc-header-forward-pattern",
        &args.grpc_header_forward_pattern,
    )?;
    let response_cache = ResponseCache::from_settings(&args.cache_settings())
        .map_err(|e| anyhow::anyhow!(e))?
        .map(Arc::new);
    let tracer =
        Arc::new(Tracer::from_settings(&args.trace_settings()).map_err(|e| anyhow::anyhow!(e))?);
    let opts = ServerOptions {
        repository: RepositoryOptions {
            repositories,
            backend_directory: args
                .backend_directory
                .clone()
                .unwrap_or_else(default_backend_dir),
            control_mode: match args.model_control_mode {
                Mode::None => ControlMode::None,
                Mode::Explicit => ControlMode::Explicit,
                Mode::Poll => ControlMode::Poll,
            },
            startup_models: args.load_model.clone(),
            config_name: args.model_config_name()?,
            load_threads: args.model_load_thread_count.max(1),
            response_cache,
            autocomplete: !(args.disable_auto_complete_config
                || args.strict_model_config == Some(true)),
            poll_secs: args.repository_poll_secs,
            rate_limiter: args.rate_limiter(),
        },
        strict_readiness: args.strict_readiness,
        log,
        server_id: args.id.clone(),
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
            restricted: http_restricted.clone(),
            header_forward: http_forward.clone(),
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
            restricted: grpc_restricted.clone(),
            header_forward: grpc_forward.clone(),
            tls: grpc_tls.clone(),
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
