//! gRPC front end: Triton's `inference.GRPCInferenceService` on tonic, sharing the core's
//! request path with HTTP. Also serves the standard `grpc.health.v1.Health` service.
mod convert;
mod service;
mod tensor;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::Server;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

pub use service::Inference;

/// Code generated from `grpc_service.proto` (service trait and server).
#[allow(clippy::all, missing_docs)]
pub mod generated {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// gRPC front-end settings (tritonserver's `--grpc-*` flags).
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// Largest message accepted or sent, in bytes (Triton: INT32_MAX).
    pub max_message_size: usize,
    /// HTTP/2 keepalive ping interval (`--grpc-keepalive-time`, Triton's default 2 h).
    pub keepalive_time: Duration,
    /// How long to wait for a ping's answer (`--grpc-keepalive-timeout`, default 20 s).
    pub keepalive_timeout: Duration,
    /// Compress responses with gzip (`--grpc-infer-response-compression-level` other
    /// than `none`). Compressed requests are always accepted.
    pub compress_responses: bool,
    /// `--grpc-restricted-protocol`: API groups that need a `triton-grpc-protocol-<key>`
    /// header.
    pub restricted: kiln_core::access::Restrictions,
    /// `--grpc-header-forward-pattern`: metadata passed to the model as parameters.
    pub header_forward: Option<kiln_core::forward::HeaderForward>,
    /// `--grpc-use-ssl`: serve over TLS.
    pub tls: Option<GrpcTls>,
}

/// TLS on the gRPC port (tritonserver's `--grpc-use-ssl`, `--grpc-use-ssl-mutual`,
/// `--grpc-server-cert`, `--grpc-server-key`, `--grpc-root-cert`), all PEM.
#[derive(Debug, Clone)]
pub struct GrpcTls {
    /// The server's certificate chain.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// Mutual TLS: clients must present a certificate issued by this CA.
    pub client_ca: Option<Vec<u8>>,
}

impl GrpcTls {
    fn config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }

    /// Checks that the certificate and key can serve (so a bad file stops the start).
    pub fn validate(&self) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .tls_config(self.config())
            .map(|_| ())
    }
}

impl Default for GrpcOptions {
    fn default() -> Self {
        GrpcOptions {
            max_message_size: i32::MAX as usize,
            keepalive_time: Duration::from_millis(7_200_000),
            keepalive_timeout: Duration::from_millis(20_000),
            compress_responses: false,
            restricted: Default::default(),
            header_forward: None,
            tls: None,
        }
    }
}

/// Binds `addr`; returns the listener (so callers learn the port before serving).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves gRPC on `listener` until `shutdown` resolves, then lets in-flight calls finish
/// for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    opts: GrpcOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let mut svc = generated::grpc_inference_service_server::GrpcInferenceServiceServer::new(
        Inference::new(server.clone())
            .restricted(opts.restricted.clone())
            .forward_headers(opts.header_forward.clone()),
    )
    .max_decoding_message_size(opts.max_message_size)
    .max_encoding_message_size(opts.max_message_size)
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Deflate);
    if opts.compress_responses {
        svc = svc.send_compressed(CompressionEncoding::Gzip);
    }
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<generated::grpc_inference_service_server::GrpcInferenceServiceServer<Inference>>()
        .await;
    // The builder's tcp_nodelay only applies to listeners tonic binds itself.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok::<_, std::io::Error>(conn)
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder.tls_config(tls.config())?;
    }
    let serving = builder
        .http2_keepalive_interval(Some(opts.keepalive_time))
        .http2_keepalive_timeout(Some(opts.keepalive_timeout))
        .add_service(health_svc)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.await;
        });
    tokio::pin!(serving);
    tokio::select! {
        r = &mut serving => return r,
        _ = shutdown => {}
    }
    health
        .set_not_serving::<generated::grpc_inference_service_server::GrpcInferenceServiceServer<Inference>>()
        .await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, serving).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("exit timeout reached with gRPC calls still in flight");
            Ok(())
        }
    }
}
