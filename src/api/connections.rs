//! gRPC connections: how many may be open, and how to close one.
//!
//! Owns: the connection cap (a [`Slot`] per accepted TCP connection, taken
//! before the TLS handshake and held until the connection is gone, so
//! half-open handshakes count too); the per-connection state the listener
//! limits need (open requests and when the last one ended, for the idle
//! timeout; a kill switch, for a bundle stream whose client stopped reading);
//! the registry of open connections by peer address; [`Guarded`], the I/O
//! wrapper that makes the kill switch act; and [`RequestLayer`], which counts
//! a connection's open requests and gives oversized messages the gRPC code
//! for them. Must not: decide when to close a connection (the bundle-stream
//! watchdog in `watchers` and the idle sweeper in `server` do).
//!
//! Why a kill switch on the socket: hyper stops polling a response body
//! while the client grants no flow-control window, so a stream whose client
//! does not read cannot be ended from inside the stream. Failing the
//! connection's reads makes hyper drop it, with every stream on it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::metrics::Metrics;

const SHARDS: usize = 16;

/// Milliseconds since the first call (a monotonic clock in one atomic).
fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Why a connection was closed by meshca.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No request for the idle timeout.
    Idle,
    /// A bundle stream on it did not consume an update in time.
    Stalled,
}

impl CloseReason {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Stalled => "stalled",
        }
    }
}

/// One open connection.
#[derive(Debug)]
pub struct Conn {
    peer: SocketAddr,
    closed: AtomicBool,
    waker: AtomicWaker,
    active: AtomicUsize,
    last_active_ms: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Conn {
    /// Closes the connection (its next read fails, so hyper drops it).
    /// Returns false if it was already closed.
    pub fn close(&self, why: CloseReason) -> bool {
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.metrics.grpc_connection_closed(why.as_str());
        tracing::debug!(peer = %self.peer, reason = why.as_str(), "closing gRPC connection");
        self.waker.wake();
        true
    }

    /// Whether [`Conn::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks a request open until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }

    fn idle_for(&self, now_ms: u64) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = self.last_active_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms.saturating_sub(last)))
    }
}

/// An open request on a connection (a unary call until its response is
/// sent, a stream until it ends).
#[derive(Debug)]
pub struct RequestGuard(Arc<Conn>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.last_active_ms.store(now_ms(), Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections of one listener, and their cap.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    open: AtomicUsize,
    shards: Vec<Mutex<HashMap<SocketAddr, Arc<Conn>>>>,
    metrics: Arc<Metrics>,
}

impl Connections {
    /// At most `max` connections open at once.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            open: AtomicUsize::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            metrics,
        })
    }

    fn shard(&self, peer: &SocketAddr) -> &Mutex<HashMap<SocketAddr, Arc<Conn>>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        peer.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Takes a slot for a new connection from `peer`, or None at the cap.
    pub fn try_open(self: &Arc<Self>, peer: SocketAddr) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if taken.is_err() {
            return None;
        }
        let conn = Arc::new(Conn {
            peer,
            closed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            active: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(now_ms()),
            metrics: self.metrics.clone(),
        });
        self.shard(&peer)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, conn.clone());
        self.metrics.set_grpc_connections(self.open());
        Some(Slot {
            conns: self.clone(),
            conn,
        })
    }

    /// The open connection from `peer` (one TCP connection per address).
    pub fn get(&self, peer: &SocketAddr) -> Option<Arc<Conn>> {
        self.shard(peer)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .cloned()
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Closes every connection that has had no open request for `idle`;
    /// returns how many.
    pub fn close_idle(&self, idle: Duration) -> usize {
        let now = now_ms();
        let mut victims = Vec::new();
        for shard in &self.shards {
            let m = shard.lock().unwrap_or_else(|e| e.into_inner());
            victims.extend(
                m.values()
                    .filter(|c| !c.is_closed() && c.idle_for(now).is_some_and(|d| d >= idle))
                    .cloned(),
            );
        }
        victims
            .iter()
            .filter(|c| c.close(CloseReason::Idle))
            .count()
    }
}

/// A connection's place under the cap; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    conns: Arc<Connections>,
    conn: Arc<Conn>,
}

impl Slot {
    /// The connection's state.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut m = self
                .conns
                .shard(&self.conn.peer)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if m.get(&self.conn.peer)
                .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
            {
                m.remove(&self.conn.peer);
            }
        }
        self.conns.open.fetch_sub(1, Ordering::AcqRel);
        self.conns.metrics.set_grpc_connections(self.conns.open());
    }
}

/// A socket that fails once its connection is closed by meshca, and frees
/// its slot when dropped.
#[derive(Debug)]
pub(crate) struct Guarded<T> {
    inner: T,
    slot: Slot,
}

impl<T> Guarded<T> {
    /// Wraps `inner`, which holds `slot`.
    pub(crate) fn new(inner: T, slot: Slot) -> Self {
        Self { inner, slot }
    }

    fn closed(&self, cx: &mut Context<'_>) -> bool {
        let c = &self.slot.conn;
        if c.is_closed() {
            return true;
        }
        c.waker.register(cx.waker());
        // Closed between the check and the registration: do not sleep.
        c.is_closed()
    }
}

fn aborted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed by meshca",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed(cx) {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.slot.conn.is_closed() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The peer address tonic recorded for a request.
pub(crate) fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| {
            req.extensions()
                .get::<TcpConnectInfo>()
                .and_then(|i| i.remote_addr())
        })
}

/// The tower layer in front of the gRPC services (see [`RequestService`]).
#[derive(Debug, Clone)]
pub(crate) struct RequestLayer {
    conns: Arc<Connections>,
    max_message_bytes: usize,
}

impl RequestLayer {
    /// Accounts requests on the connections of `conns`.
    pub(crate) fn new(conns: Arc<Connections>, max_message_bytes: usize) -> Self {
        Self {
            conns,
            max_message_bytes,
        }
    }
}

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            layer: self.clone(),
        }
    }
}

/// Marks the connection busy while a request (or stream) is open, and
/// turns tonic's OUT_OF_RANGE for an oversized request message into
/// RESOURCE_EXHAUSTED, the code gRPC specifies for a message over the
/// limit (grpc-go and grpc-java answer so).
#[derive(Debug, Clone)]
pub(crate) struct RequestService<S> {
    inner: S,
    layer: RequestLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for RequestService<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let guard = peer_of(&req)
            .and_then(|p| self.layer.conns.get(&p))
            .map(|c| c.request_started());
        let limit = self.layer.max_message_bytes;
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = oversize_is_resource_exhausted(fut.await?, limit);
            Ok(match guard {
                None => resp,
                Some(g) => resp.map(|b| {
                    use http_body_util::BodyExt;
                    // The guard lives as long as the response body: a
                    // stream keeps its connection busy until it ends.
                    tonic::body::Body::new(b.map_frame(move |f| {
                        let _ = &g;
                        f
                    }))
                }),
            })
        })
    }
}

/// tonic reports a request message over `max_decoding_message_size` as
/// OUT_OF_RANGE ("decoded message length too large"); none of meshca's own
/// errors uses OUT_OF_RANGE, so that answer is exactly this case.
fn oversize_is_resource_exhausted(
    resp: http::Response<tonic::body::Body>,
    limit: usize,
) -> http::Response<tonic::body::Body> {
    let out_of_range = resp
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if !out_of_range {
        return resp;
    }
    let found = tonic::Status::from_header_map(resp.headers())
        .map(|s| s.message().to_string())
        .unwrap_or_default();
    if !found.contains("too large") {
        return resp;
    }
    tonic::Status::resource_exhausted(format!(
        "the request message is larger than the {limit}-byte limit ({found}); send a smaller CSR or token"
    ))
    .into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_cap_counts_slots_until_they_drop() {
        let c = Connections::new(2, Arc::default());
        let a = c.try_open(addr(1)).unwrap();
        let b = c.try_open(addr(2)).unwrap();
        assert!(c.try_open(addr(3)).is_none(), "third over a cap of 2");
        assert_eq!(c.open(), 2);
        drop(a);
        assert!(c.get(&addr(1)).is_none());
        let d = c.try_open(addr(3)).expect("a slot was freed");
        assert_eq!(c.open(), 2);
        drop((b, d));
        assert_eq!(c.open(), 0);
    }

    #[test]
    fn only_connections_without_open_requests_are_idle() {
        let c = Connections::new(10, Arc::default());
        let busy = c.try_open(addr(1)).unwrap();
        let idle = c.try_open(addr(2)).unwrap();
        let req = busy.conn().request_started();
        assert_eq!(c.close_idle(Duration::ZERO), 1);
        assert!(idle.conn().is_closed() && !busy.conn().is_closed());
        drop(req);
        assert_eq!(c.close_idle(Duration::ZERO), 1);
        assert!(busy.conn().is_closed());
        assert_eq!(c.close_idle(Duration::ZERO), 0, "closed once");
        let fresh = c.try_open(addr(3)).unwrap();
        assert_eq!(c.close_idle(Duration::from_secs(3600)), 0);
        assert!(!fresh.conn().is_closed());
    }
}
