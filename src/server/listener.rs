//! Step "listener": binds the gRPC and admin ports, then runs the gRPC
//! side — the accept loop (connection cap, concurrent TLS handshakes with a
//! deadline), the idle-connection sweeper, and tonic serving the three APIs.
//!
//! Must not: decide on requests (see `api`) or build TLS configs (see `tls`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, Core};
use crate::config::{Limits, ServeConfig};
use crate::metrics::Metrics;
use crate::proto;

use super::BoxError;

/// Both bound ports.
pub(super) struct Sockets {
    /// The gRPC (TLS) port.
    pub grpc: TcpListener,
    /// Its address (port 0 resolved).
    pub grpc_addr: SocketAddr,
    /// The admin HTTP port.
    pub admin: TcpListener,
    /// Its address.
    pub admin_addr: SocketAddr,
}

impl Sockets {
    /// Binds `listen` and `admin_listen`.
    pub async fn bind(cfg: &ServeConfig) -> Result<Self, BoxError> {
        let grpc = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {} (setting listen): {e}", cfg.listen))?;
        let grpc_addr = grpc.local_addr()?;
        let admin = TcpListener::bind(cfg.admin.admin_listen)
            .await
            .map_err(|e| {
                format!(
                    "cannot listen on {} (setting admin_listen): {e}",
                    cfg.admin.admin_listen
                )
            })?;
        let admin_addr = admin.local_addr()?;
        Ok(Self {
            grpc,
            grpc_addr,
            admin,
            admin_addr,
        })
    }
}

/// Serves the three gRPC APIs on `listener` until `stop` flips; the handle
/// ends when tonic has drained.
pub(super) fn serve_grpc(
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    core: Arc<Core>,
    connections: Arc<api::connections::Connections>,
    limits: &Limits,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // Accept loop: TLS handshakes run concurrently, finished streams feed tonic.
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(accept_loop(
        listener,
        tls,
        connections.clone(),
        limits.handshake_timeout,
        conn_tx,
        stop.clone(),
        metrics,
    ));
    if let Some(idle) = limits.idle_timeout {
        spawn_idle_sweeper(connections.clone(), idle, stop.clone());
    }
    let native = proto::meshca::identity_server::IdentityServer::new(api::native::NativeService(
        core.clone(),
    ))
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);
    let linkerd = proto::linkerd::identity_server::IdentityServer::new(
        api::linkerd::LinkerdService(core.clone()),
    )
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);
    let istio = proto::istio::istio_certificate_service_server::IstioCertificateServiceServer::new(
        api::istio::IstioService(core),
    )
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);

    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let mut grpc_stop = stop;
    let limits = limits.clone();
    tokio::spawn(async move {
        let r = grpc_builder(&limits)
            .layer(api::connections::RequestLayer::new(
                connections,
                api::MAX_MESSAGE_BYTES,
            ))
            .add_service(native)
            .add_service(linkerd)
            .add_service(istio)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server failed");
        }
    })
}

/// Closes connections with no open request for `idle`.
fn spawn_idle_sweeper(
    conns: Arc<api::connections::Connections>,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => { conns.close_idle(idle); }
                _ = stop.changed() => return,
            }
        }
    });
}

/// The HTTP/2 settings of the gRPC listener.
fn grpc_builder(limits: &Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .http2_max_header_list_size(limits.max_header_bytes)
}

/// A finished handshake, on its way to tonic.
type Handshaken = std::io::Result<
    tokio_rustls::server::TlsStream<api::connections::Guarded<tokio::net::TcpStream>>,
>;

/// Accepts TCP connections under the connection cap and runs their TLS
/// handshakes concurrently, each with a deadline; finished ones go to tonic.
/// A connection over the cap is closed at once (the client sees a reset
/// and retries) rather than left waiting in the backlog.
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    conns: Arc<api::connections::Connections>,
    handshake_timeout: Duration,
    conn_tx: tokio::sync::mpsc::Sender<Handshaken>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(slot) = conns.try_open(peer) else {
            metrics.grpc_connection_refused("limit");
            // One line a minute at most: a flood must not flood the log.
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_warning = Some(std::time::Instant::now());
                tracing::warn!(%peer, open = conns.open(), "gRPC connection refused: grpc_max_connections reached (see meshca_grpc_connections_refused_total)");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let conn_tx = conn_tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let io = api::connections::Guarded::new(tcp, slot);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                Ok(Ok(s)) => {
                    let _ = conn_tx.send(Ok(s)).await;
                }
                Ok(Err(e)) => {
                    metrics.grpc_connection_closed("handshake_failed");
                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                }
                Err(_) => {
                    metrics.grpc_connection_closed("handshake_timeout");
                    tracing::debug!(%peer, "TLS handshake timed out")
                }
            }
        });
    }
}
