//! HTTP/REST front end: KServe v2 plus Triton's extensions (binary tensor data,
//! classification, model repository, statistics), on hyper + tokio.
mod body;
mod compress;
mod generate;
pub mod infer;
mod json_tensor;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use kiln_core::Server;
use tokio::net::TcpListener;

/// HTTP front-end settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest accepted request body (after decompression), in bytes.
    pub max_input_size: usize,
    /// `--http-restricted-api`: API groups that need a header.
    pub restricted: kiln_core::access::Restrictions,
    /// `--http-header-forward-pattern`: headers passed to the model as parameters.
    pub header_forward: Option<kiln_core::forward::HeaderForward>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_input_size: 64 * 1024 * 1024,
            restricted: Default::default(),
            header_forward: None,
        }
    }
}

/// Binds `addr`; returns the listener (so callers learn the port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves HTTP on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    opts: HttpOptions,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) {
    let state = Arc::new(routes::State { server, opts });
    accept_loop(
        listener,
        move |req| routes::handle(state.clone(), req),
        shutdown,
        grace,
    )
    .await
}

/// Serves Prometheus metrics (`GET /metrics`) on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    server: Arc<Server>,
    opts: kiln_metrics::MetricsOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let cpu = Arc::new(kiln_metrics::CpuSampler::default());
    let opts = Arc::new(opts);
    accept_loop(
        listener,
        move |req| routes::metrics(server.clone(), cpu.clone(), opts.clone(), req),
        shutdown,
        Duration::from_secs(1),
    )
    .await
}

/// Accepts connections and answers each request with `handler`; on `shutdown`, stops
/// accepting and waits up to `grace` for open connections.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    handler: F,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = http::Response<body::ChunkedBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended: {e}");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => tracing::warn!("exit timeout reached with HTTP requests still in flight"),
    }
}
