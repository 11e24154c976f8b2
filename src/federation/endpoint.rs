//! This trust domain's SPIFFE bundle: the document (kept current from the
//! CA's bundle, written to `bundle.spiffe.json` in the data directory) and
//! the bundle endpoint serving it (Federation §5.2): HTTPS, GET on the
//! configured path, `application/json`, no client authentication, a global
//! request rate limit. Profile `https_web` presents the operator's
//! certificate files (re-read every minute); `https_spiffe` presents an
//! X509-SVID the CA issues to itself (its own identity,
//! `spiffe://<td>/ns/<control-plane-ns>/sa/meshca`), renewed like the gRPC
//! server's.
//!
//! `spiffe_sequence` is the bundle's `version`, which increases on every
//! change of this trust domain's anchors and is the same on every replica
//! (it comes from the shared rotation journal).
//!
//! Must not: fetch or follow other domains (see `follower`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::settings::{ServeProfile, Settings};
use crate::ca::{Authority, TrustBundle};
use crate::identity::Workload;
use crate::trust::spiffe_bundle::SpiffeBundle;
use crate::util::ratelimit::TokenBucket;

/// The document's file name in the data directory (next to `bundle.pem`).
pub const DOCUMENT_FILE: &str = "bundle.spiffe.json";
/// Requests per second the endpoint answers (all clients together).
const RATE: f64 = 50.0;
const BURST: u32 = 100;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// This trust domain's bundle document for `b`.
pub fn document(b: &TrustBundle, refresh_hint: Duration) -> Result<String, String> {
    SpiffeBundle::from_trust_bundle(b, b.version, refresh_hint)
        .to_json()
        .map_err(|e| e.to_string())
}

/// Keeps the current document (returned) and `bundle.spiffe.json` in line
/// with the CA's bundle until `stop` flips.
pub fn spawn_document(
    ca: &Authority,
    data_dir: &Path,
    refresh_hint: Duration,
    mut stop: watch::Receiver<bool>,
) -> Arc<ArcSwap<Bytes>> {
    let current = Arc::new(ArcSwap::from_pointee(Bytes::new()));
    let mut bundle = ca.watch_bundle();
    let path = data_dir.join(DOCUMENT_FILE);
    let out = current.clone();
    let update = move |b: &TrustBundle| match document(b, refresh_hint) {
        Ok(doc) => {
            if let Err(e) = crate::util::secret::write_public(&path, doc.as_bytes()) {
                tracing::error!(file = %path.display(), error = %e, "cannot write the SPIFFE bundle file");
            }
            out.store(Arc::new(Bytes::from(doc)));
        }
        Err(e) => tracing::error!(error = %e, "cannot encode this trust domain's SPIFFE bundle"),
    };
    update(&bundle.borrow_and_update());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = bundle.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            let b = bundle.borrow_and_update().clone();
            update(&b);
        }
    });
    current
}

/// The TLS configuration of the endpoint, and when to rebuild it.
fn server_config(
    ca: &Authority,
    profile: &ServeProfile,
) -> Result<(Arc<ServerConfig>, SystemTime), String> {
    let (chain, key, next) = match profile {
        ServeProfile::HttpsWeb {
            cert_file,
            key_file,
        } => {
            let (chain, key) = read_pair(cert_file, key_file)?;
            (chain, key, ca.clock().now() + Duration::from_secs(60))
        }
        ServeProfile::HttpsSpiffe => own_svid(ca)?,
    };
    let mut sc = ServerConfig::builder_with_provider(crate::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("bundle endpoint certificate: {e}"))?;
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(sc), next))
}

type Pair = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<Pair, String> {
    let pem = std::fs::read(cert_file).map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let chain =
        crate::ca::pem_to_certs(&pem).map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let key = crate::util::secret::read_private(key_file)
        .map_err(|e| format!("{}: {e}", key_file.display()))?;
    let key = crate::util::pem::private_key(key.expose())
        .map_err(|e| format!("{}: {e}", key_file.display()))?
        .ok_or_else(|| format!("{}: no private key", key_file.display()))?;
    Ok((chain, key))
}

/// An X509-SVID for the CA's own identity, issued by the CA.
fn own_svid(
    ca: &Authority,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        SystemTime,
    ),
    String,
> {
    let key = crate::ca::CaKey::generate_p256().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let me = Workload::new(
        ca.mesh().control_plane_ns.as_str(),
        crate::identity::CA_SERVICE_ACCOUNT,
    )
    .map_err(|e| e.to_string())?;
    let issued = ca
        .issue_with_dns(&me, &[], csr.der(), Some(ca.policy().max_ttl))
        .map_err(|e| format!("cannot issue the bundle endpoint's SVID: {e}"))?;
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(issued.intermediates.iter().cloned());
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.to_pkcs8_der().expose().to_vec(),
    ));
    Ok((chain, key_der, issued.refresh_at))
}

/// The SPIFFE ID the https_spiffe endpoint presents.
pub fn endpoint_spiffe_id(ca: &Authority) -> String {
    Workload::new(
        ca.mesh().control_plane_ns.as_str(),
        crate::identity::CA_SERVICE_ACCOUNT,
    )
    .map(|w| w.spiffe_id(ca.mesh()).to_string())
    .unwrap_or_default()
}

/// A running bundle endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Binds and serves the bundle endpoint until `stop` flips.
pub async fn serve(
    settings: &Settings,
    ca: Arc<Authority>,
    document: Arc<ArcSwap<Bytes>>,
    stop: watch::Receiver<bool>,
) -> Result<Option<Endpoint>, String> {
    let Some(listen) = settings.listen else {
        return Ok(None);
    };
    let (config, next) = server_config(&ca, &settings.profile)?;
    let tls = Arc::new(ArcSwap::new(config));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("federation_listen {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    spawn_renewal(
        ca.clone(),
        settings.profile.clone(),
        tls.clone(),
        next,
        stop.clone(),
    );
    let limiter = Arc::new(TokenBucket::new(RATE, BURST, ca.clock().clone()));
    let app = App {
        path: settings.path.clone(),
        document,
        limiter,
    };
    tokio::spawn(accept_loop(listener, tls, app, stop));
    tracing::info!(%addr, path = %settings.path, profile = ?settings.profile, "serving the SPIFFE bundle endpoint");
    Ok(Some(Endpoint { addr }))
}

fn spawn_renewal(
    ca: Arc<Authority>,
    profile: ServeProfile,
    tls: Arc<ArcSwap<ServerConfig>>,
    mut next: SystemTime,
    mut stop: watch::Receiver<bool>,
) {
    let mut bundle = ca.watch_bundle();
    tokio::spawn(async move {
        loop {
            let wait = next
                .duration_since(ca.clock().now())
                .unwrap_or_default()
                .max(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = bundle.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            match server_config(&ca, &profile) {
                Ok((c, n)) => {
                    tls.store(c);
                    next = n;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the bundle endpoint's certificate; retrying in 30s");
                    next = ca.clock().now() + Duration::from_secs(30);
                }
            }
        }
    });
}

#[derive(Clone)]
struct App {
    path: String,
    document: Arc<ArcSwap<Bytes>>,
    limiter: Arc<TokenBucket>,
}

impl App {
    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let plain = |status: StatusCode, text: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
            *r.status_mut() = status;
            r
        };
        if !self.limiter.try_take() {
            let mut r = plain(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests; retry shortly\n",
            );
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
            return r;
        }
        if req.uri().path() != self.path {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: this endpoint serves the SPIFFE bundle only\n",
            );
        }
        if req.method() != Method::GET {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is served\n");
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("GET"),
            );
            return r;
        }
        let mut r = Response::new(Full::new((**self.document.load()).clone()));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        r
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    app: App,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "bundle endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // full: drop the connection
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let r = app.answer(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Some(HANDSHAKE_TIMEOUT))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}
