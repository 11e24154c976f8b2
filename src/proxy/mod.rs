//! `meshca proxy`: a small L4 mTLS sidecar.
//!
//! Owns: the inbound listener (mTLS in, client SPIFFE ID checked against
//! the allow-list, plaintext to the local application) and the outbound
//! listener (plaintext from the application, mTLS to the upstream, whose
//! SPIFFE ID must be the expected one), the per-connection byte copying,
//! hot-swapping of certificates and bundles (a new identity rebuilds the
//! rustls configurations; established connections keep theirs), periodic
//! re-resolution of the upstream, and the proxy metrics. Identity comes as a
//! [`State`] stream, from an in-process agent or the Workload API
//! (`identity`). Must not: obtain certificates itself.

pub(crate) mod balance;
pub mod identity;
pub(crate) mod spiffe_tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::agent::State;
use crate::metrics::Metrics;
use balance::Balancer;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_ATTEMPTS: usize = 3;

/// How the proxy is set up.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Inbound: listen here (mTLS) and forward to the application at this address.
    pub inbound: Option<(SocketAddr, String)>,
    /// Inbound: SPIFFE IDs allowed in (exact, or a prefix ending in `/` or `*`).
    pub allow: Vec<String>,
    /// Outbound: listen here (plaintext) and forward to this upstream (`host:port`).
    pub outbound: Option<(SocketAddr, String)>,
    /// Outbound: the SPIFFE ID the upstream must present.
    pub upstream_identity: Option<String>,
    /// How often the upstream name is re-resolved.
    pub resolve_interval: Duration,
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// Where the inbound listener is.
    pub inbound_addr: Option<SocketAddr>,
    /// Where the outbound listener is.
    pub outbound_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// True when `id` matches an allow-list entry (exact, or prefix when the
/// entry ends with `/` or `*`).
pub fn allowed(id: &str, allow: &[String]) -> bool {
    allow.iter().any(|a| {
        if let Some(p) = a.strip_suffix('*') {
            id.starts_with(p)
        } else if a.ends_with('/') {
            id.starts_with(a.as_str())
        } else {
            id == a
        }
    })
}

struct Configs {
    server: ArcSwapOption<rustls::ServerConfig>,
    client: ArcSwapOption<rustls::ClientConfig>,
}

/// Why the proxy could not start (or re-resolve its upstream).
///
/// `Config` is the operator's flags (fix them); `Listen` is the host (the
/// port is taken, or not ours to bind); `Resolve` is DNS (retried while
/// running, fatal only at start).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The settings do not describe a usable proxy.
    #[error("{0}")]
    Config(String),
    /// A listener could not be opened.
    #[error("cannot listen on {addr} ({side}): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// `inbound` or `outbound`.
        side: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The upstream name did not resolve.
    #[error("{0}")]
    Resolve(String),
}

/// Binds `addr` for one side of the proxy.
async fn bind(
    addr: SocketAddr,
    side: &'static str,
) -> Result<(TcpListener, SocketAddr), ProxyError> {
    let err = |source| ProxyError::Listen { addr, side, source };
    let l = TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

/// Starts the listeners, reporting to `metrics`.
pub async fn start(
    cfg: ProxyConfig,
    identity: watch::Receiver<State>,
    metrics: Arc<Metrics>,
) -> Result<Proxy, ProxyError> {
    let config = |s: &str| Err(ProxyError::Config(s.to_string()));
    if cfg.inbound.is_none() && cfg.outbound.is_none() {
        return config("nothing to proxy: give --inbound and/or --outbound");
    }
    if cfg.inbound.is_some() && cfg.allow.is_empty() {
        return config(
            "--inbound needs at least one --allow SPIFFE-ID (or prefix ending in / or *)",
        );
    }
    let expected = match (&cfg.outbound, &cfg.upstream_identity) {
        (Some(_), None) => return config("--outbound needs --upstream-identity spiffe://…"),
        (_, e) => e.clone(),
    };
    let (stop, stop_rx) = watch::channel(false);
    let configs = Arc::new(Configs {
        server: ArcSwapOption::empty(),
        client: ArcSwapOption::empty(),
    });
    // Rebuild the TLS configurations on every identity or bundle change.
    {
        let configs = configs.clone();
        let mut rx = identity.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let st = rx.borrow_and_update().clone();
                if st.svid.is_some() {
                    match spiffe_tls::server_config(&st) {
                        Ok(c) => configs.server.store(Some(c)),
                        Err(e) => tracing::error!(error = %e, "inbound TLS configuration"),
                    }
                    if let Some(exp) = &expected {
                        match spiffe_tls::client_config(&st, exp) {
                            Ok(c) => configs.client.store(Some(c)),
                            Err(e) => tracing::error!(error = %e, "outbound TLS configuration"),
                        }
                    }
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }
    let mut proxy = Proxy {
        inbound_addr: None,
        outbound_addr: None,
        stop,
    };
    if let Some((listen, app)) = cfg.inbound.clone() {
        let (l, local) = bind(listen, "inbound").await?;
        proxy.inbound_addr = Some(local);
        let allow = Arc::new(cfg.allow.clone());
        let configs = configs.clone();
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.wait_for(|s| *s) => return,
                };
                let (configs, allow, app) = (configs.clone(), allow.clone(), app.clone());
                let m = metrics.clone();
                tokio::spawn(async move { inbound(tcp, peer, &configs, &allow, &app, &m).await });
            }
        });
    }
    if let Some((listen, upstream)) = cfg.outbound.clone() {
        let (l, local) = bind(listen, "outbound").await?;
        proxy.outbound_addr = Some(local);
        let balancer = Arc::new(Balancer::default());
        let host = upstream
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .ok_or_else(|| ProxyError::Config(format!("upstream {upstream:?} is not host:port")))?;
        resolve(&upstream, &balancer).await?;
        {
            let (balancer, upstream) = (balancer.clone(), upstream.clone());
            let every = cfg.resolve_interval.max(Duration::from_millis(100));
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    if let Err(e) = resolve(&upstream, &balancer).await {
                        tracing::warn!(error = %e, "upstream re-resolution failed; keeping the last addresses");
                    }
                }
            });
        }
        let mut stop = stop_rx;
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.wait_for(|s| *s) => return,
                };
                let (configs, balancer, host) = (configs.clone(), balancer.clone(), host.clone());
                let m = metrics.clone();
                tokio::spawn(async move { outbound(tcp, &configs, &balancer, &host, &m).await });
            }
        });
    }
    Ok(proxy)
}

async fn resolve(upstream: &str, balancer: &Balancer) -> Result<(), ProxyError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(upstream)
        .await
        .map_err(|e| ProxyError::Resolve(format!("{upstream}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(ProxyError::Resolve(format!("{upstream}: no addresses")));
    }
    balancer.set_addresses(&addrs);
    Ok(())
}

async fn inbound(
    tcp: TcpStream,
    peer: SocketAddr,
    configs: &Configs,
    allow: &[String],
    app: &str,
    m: &Metrics,
) {
    let Some(cfg) = configs.server.load_full() else {
        m.proxy_handshake("inbound", false, "no_certificate_yet");
        return;
    };
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cfg).accept(tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = spiffe_tls::failure_reason(&e);
            m.proxy_handshake("inbound", false, reason);
            tracing::info!(%peer, reason, error = %e, "inbound handshake refused");
            return;
        }
        Err(_) => {
            m.proxy_handshake("inbound", false, "timeout");
            return;
        }
    };
    let id = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::ca::uri_san(c));
    let Some(id) = id.filter(|id| allowed(id, allow)) else {
        m.proxy_handshake("inbound", false, "identity_not_allowed");
        let shown = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| crate::ca::uri_san(c));
        tracing::info!(%peer, peer_identity = shown.as_deref().unwrap_or("-"), "inbound connection refused: identity not allowed");
        return;
    };
    m.proxy_handshake("inbound", true, "ok");
    m.proxy_peer("inbound", &id);
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(app)).await {
        Ok(Ok(s)) => s,
        _ => {
            m.proxy_handshake("inbound", false, "application_unreachable");
            tracing::warn!(app, "the local application does not accept connections");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    pipe("inbound", tls, upstream, m).await;
}

async fn outbound(
    mut app: TcpStream,
    configs: &Configs,
    balancer: &Balancer,
    host: &str,
    m: &Metrics,
) {
    let Some(cfg) = configs.client.load_full() else {
        m.proxy_handshake("outbound", false, "no_certificate_yet");
        return;
    };
    let _ = app.set_nodelay(true);
    let mut tried = Vec::new();
    let mut conn = None;
    for _ in 0..CONNECT_ATTEMPTS {
        let Some(lease) = balancer.pick(Instant::now(), &tried) else {
            break;
        };
        let addr = lease.endpoint().addr;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                balancer.succeeded(lease.endpoint());
                conn = Some((s, lease));
                break;
            }
            _ => {
                let wait = balancer.failed(lease.endpoint(), Instant::now());
                tracing::info!(%addr, eject_s = wait.as_secs(), "upstream endpoint did not accept; ejected");
                tried.push(addr);
            }
        }
    }
    let Some((tcp, _lease)) = conn else {
        m.proxy_handshake("outbound", false, "upstream_unreachable");
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut app).await;
        return;
    };
    let _ = tcp.set_nodelay(true);
    // The name is for SNI only; the server is checked by SPIFFE ID.
    let name = ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("upstream.invalid").expect("valid name"));
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = spiffe_tls::failure_reason(&e);
            m.proxy_handshake("outbound", false, reason);
            tracing::info!(reason, error = %e, "outbound handshake failed");
            return;
        }
        Err(_) => {
            m.proxy_handshake("outbound", false, "timeout");
            return;
        }
    };
    m.proxy_handshake("outbound", true, "ok");
    if let Some(id) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::ca::uri_san(c))
    {
        m.proxy_peer("outbound", &id);
    }
    pipe("outbound", app, tls, m).await;
}

async fn pipe<A, B>(direction: &'static str, mut a: A, mut b: B, m: &Metrics)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _open = m.proxy_open(direction);
    match tokio::io::copy_bidirectional(&mut a, &mut b).await {
        Ok((ab, ba)) => m.proxy_bytes(direction, ab + ba),
        Err(e) => tracing::debug!(direction, error = %e, "connection ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_exactly_or_by_prefix() {
        let allow = vec![
            "spiffe://td/ns/shop/sa/web".to_string(),
            "spiffe://td/ns/batch/".to_string(),
            "spiffe://td/ns/ops/sa/*".to_string(),
        ];
        assert!(allowed("spiffe://td/ns/shop/sa/web", &allow));
        assert!(!allowed("spiffe://td/ns/shop/sa/webx", &allow));
        assert!(allowed("spiffe://td/ns/batch/sa/x", &allow));
        assert!(!allowed("spiffe://td/ns/batchx/sa/x", &allow));
        assert!(allowed("spiffe://td/ns/ops/sa/anything", &allow));
        assert!(!allowed("spiffe://other/ns/shop/sa/web", &allow));
    }

    /// Flags that describe no proxy and a port someone else holds are
    /// different failures: the first is the operator's to fix, the second
    /// the host's.
    #[tokio::test]
    async fn bad_flags_and_a_taken_port_are_different_errors() {
        let (_tx, identity) = watch::channel(State {
            svid: None,
            bundle: Arc::new(crate::agent::Bundle {
                version: 0,
                trust_domain: String::new(),
                roots: Vec::new(),
                ..Default::default()
            }),
        });
        let m = Arc::new(Metrics::new());
        let start = |cfg| start(cfg, identity.clone(), m.clone());
        let e = start(ProxyConfig::default()).await.unwrap_err();
        assert!(matches!(e, ProxyError::Config(_)), "{e:?}");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = start(ProxyConfig {
            inbound: Some((addr, "127.0.0.1:1".into())),
            allow: vec!["spiffe://td/".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(
            matches!(&e, ProxyError::Listen { side: "inbound", source, .. }
                if source.kind() == std::io::ErrorKind::AddrInUse),
            "{e:?}"
        );
        let e = start(ProxyConfig {
            outbound: Some(("127.0.0.1:0".parse().unwrap(), "no-port".into())),
            upstream_identity: Some("spiffe://td/ns/a/sa/b".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(e, ProxyError::Config(_)), "{e:?}");
    }
}
