//! Following one foreign trust domain's bundle endpoint: fetch over HTTPS
//! authenticated per profile, validate, keep the last good bundle (in the
//! [`Hub`] and on disk), refresh on the bundle's `spiffe_refresh_hint`
//! (clamped to [`MIN_REFRESH`, `MAX_REFRESH`]) and retry failures with
//! backoff. A failed refresh never drops the bundle held.
//!
//! `spiffe_sequence` going backwards: refused (`sequence_regressed`). The
//! sequence exists for ordering (Trust Domain and Bundle §4.1.1), and an
//! older bundle served again may re-admit a key the domain removed (a
//! compromised root). A domain that really restarted its numbering is
//! followed again once the operator deletes `federation/<td>.json` from
//! the data directory and restarts (docs/federation.md).
//!
//! Must not: serve anything, or touch this trust domain's own bundle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::ServerCertVerifier;
use tokio::sync::watch;

use super::settings::{Follow, Profile, DEFAULT_REFRESH, MAX_REFRESH, MIN_REFRESH};
use super::verify::Refusal;
use super::{store, unix, Hub};
use crate::ca::Authority;
use crate::metrics::Metrics;
use crate::trust::spiffe_bundle::{BundleError, SpiffeBundle, MAX_DOCUMENT_BYTES};
use crate::util::backoff::Backoff;

/// How long one fetch (connect, TLS, request, body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a refresh failed. The bundle held before stays in use.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The client could not be set up (unreadable CA file, no anchors).
    #[error("cannot set up the fetch: {0}")]
    Setup(String),
    /// No TCP connection / HTTP exchange.
    #[error("cannot reach the endpoint: {0}")]
    Connect(String),
    /// The endpoint's certificate was refused.
    #[error("the endpoint's TLS certificate was refused: {0}")]
    Tls(String),
    /// No complete answer in time.
    #[error("no complete answer within {}s", FETCH_TIMEOUT.as_secs())]
    Timeout,
    /// An answer other than 200 (redirects are not followed).
    #[error("HTTP {0} (expected 200; redirects are not followed)")]
    Status(u16),
    /// The document was refused.
    #[error("{0}")]
    Bundle(#[from] BundleError),
    /// `spiffe_sequence` went backwards.
    #[error("spiffe_sequence went backwards from {held} to {got}: an older bundle is not adopted")]
    SequenceRegressed {
        /// Held.
        held: u64,
        /// Fetched.
        got: u64,
    },
}

impl FetchError {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Setup(_) => "setup",
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Timeout => "timeout",
            Self::Status(_) => "http_status",
            Self::Bundle(BundleError::TooLarge { .. }) => "too_large",
            Self::Bundle(BundleError::WrongTrustDomain { .. }) => "wrong_trust_domain",
            Self::Bundle(_) => "malformed",
            Self::SequenceRegressed { .. } => "sequence_regressed",
        }
    }
}

/// One followed trust domain.
#[derive(Debug, Clone)]
pub struct Follower {
    follow: Follow,
    hub: Arc<Hub>,
    own: Arc<Authority>,
    data_dir: PathBuf,
    metrics: Arc<Metrics>,
    bootstrap: Option<SpiffeBundle>,
}

impl Follower {
    /// A follower; puts the persisted bundle (else the bootstrap one) in the hub.
    pub fn new(
        follow: Follow,
        hub: Arc<Hub>,
        own: Arc<Authority>,
        data_dir: PathBuf,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let td = &follow.trust_domain;
        let bootstrap = match &follow.bundle_file {
            Some(p) => Some(store::read_bootstrap(p, td)?),
            None => None,
        };
        let persisted = store::load(&data_dir, td).unwrap_or_else(|e| {
            tracing::warn!(trust_domain = %td, error = %e, "ignoring the persisted federated bundle");
            None
        });
        if let Some(b) = persisted.or_else(|| bootstrap.clone()) {
            hub.set(td.as_str(), b);
        }
        hub.update_status(td.as_str(), |s| {
            s.url = follow.url.clone();
            s.profile = follow.profile.as_str().to_string();
        });
        Ok(Self {
            follow,
            hub,
            own,
            data_dir,
            metrics,
            bootstrap,
        })
    }

    /// The roots that authenticate an https_spiffe endpoint: the latest
    /// bundle of its SPIFFE ID's trust domain (ours, or a followed one;
    /// for a self-serving endpoint with nothing fetched yet, the bootstrap).
    fn endpoint_roots(&self, endpoint_td: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        if endpoint_td == self.own.mesh().trust_domain.as_str() {
            return self.own.bundle().roots.clone();
        }
        self.hub
            .get(endpoint_td)
            .or_else(|| self.bootstrap.clone())
            .map(|b| b.x509_authorities)
            .unwrap_or_default()
    }

    /// The client configuration; every certificate refusal is recorded in
    /// the returned slot, so it is reported as such (not as "unreachable").
    fn tls_config(&self) -> Result<(rustls::ClientConfig, Refusal), FetchError> {
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| FetchError::Setup(e.to_string()))?;
        let refusal = Refusal::default();
        let verifier: Arc<dyn ServerCertVerifier> =
            match (&self.follow.profile, &self.follow.endpoint_spiffe_id) {
                (Profile::HttpsSpiffe, Some(id)) => {
                    let roots = self.endpoint_roots(id.trust_domain());
                    if roots.is_empty() {
                        return Err(FetchError::Setup(format!(
                            "no bundle of trust domain {} to authenticate the endpoint with",
                            id.trust_domain()
                        )));
                    }
                    Arc::new(super::verify::SpiffeEndpointVerifier::new(
                        id.clone(),
                        &roots,
                    ))
                }
                _ => rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.web_roots()?),
                    crate::tls::crypto_provider(),
                )
                .build()
                .map_err(|e| FetchError::Setup(e.to_string()))?,
            };
        let recording = super::verify::Recording {
            inner: verifier,
            refusal: refusal.clone(),
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(recording))
            .with_no_client_auth();
        Ok((config, refusal))
    }

    fn web_roots(&self) -> Result<rustls::RootCertStore, FetchError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.follow.ca_file {
            Some(p) => {
                let pem = std::fs::read(p)
                    .map_err(|e| FetchError::Setup(format!("{}: {e}", p.display())))?;
                for c in crate::ca::pem_to_certs(&pem).map_err(FetchError::Setup)? {
                    roots
                        .add(c)
                        .map_err(|e| FetchError::Setup(format!("{}: {e}", p.display())))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        Ok(roots)
    }

    /// GETs the endpoint's document (200 only, at most the size limit + 1).
    async fn get(&self) -> Result<Bytes, FetchError> {
        let (tls, refusal) = self.tls_config()?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
        let uri: hyper::Uri = self
            .follow
            .url
            .parse()
            .map_err(|e| FetchError::Setup(format!("url: {e}")))?;
        let fut = async {
            let resp = client.get(uri).await.map_err(|e| match refusal.take() {
                Some(why) => FetchError::Tls(why),
                None => FetchError::Connect(chain(&e)),
            })?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            match Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
            {
                Ok(b) => Ok(b.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err(BundleError::TooLarge {
                        size: MAX_DOCUMENT_BYTES + 1,
                        max: MAX_DOCUMENT_BYTES,
                    }
                    .into())
                }
                Err(e) => Err(FetchError::Connect(format!("reading the body: {e}"))),
            }
        };
        tokio::time::timeout(FETCH_TIMEOUT, fut)
            .await
            .map_err(|_| FetchError::Timeout)?
    }

    /// Fetches, validates and adopts the bundle once; returns the wait
    /// before the next refresh.
    pub async fn refresh_once(&self) -> Result<Duration, FetchError> {
        let td = &self.follow.trust_domain;
        let body = self.get().await?;
        let bundle = SpiffeBundle::parse(&body, td)?;
        if let Some(held) = self.hub.get(td.as_str()).and_then(|b| b.sequence) {
            if let Some(got) = bundle.sequence.filter(|got| *got < held) {
                return Err(FetchError::SequenceRegressed { held, got });
            }
        }
        let hint = bundle.refresh_hint.unwrap_or(DEFAULT_REFRESH);
        let (seq, n_x509, n_jwt) = (
            bundle.sequence,
            bundle.x509_authorities.len(),
            bundle.jwt_keys.len(),
        );
        if self.hub.set(td.as_str(), bundle) {
            tracing::info!(trust_domain = %td, sequence = ?seq, x509_authorities = n_x509, jwt_keys = n_jwt, "adopted a new federated bundle");
            if let Err(e) = store::save(&self.data_dir, td, &body) {
                tracing::error!(trust_domain = %td, error = %e, "cannot persist the federated bundle; it is used, but a restart starts from the previous one");
            }
        }
        Ok(hint.clamp(MIN_REFRESH, MAX_REFRESH))
    }

    /// Refreshes until `stop` flips.
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut backoff =
                Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).with_jitter();
            loop {
                let wait = self.refresh_and_record(&mut backoff).await;
                let next = self.own.clock().now() + wait;
                self.hub
                    .update_status(self.follow.trust_domain.as_str(), |s| {
                        s.next_refresh_unix = Some(unix(next));
                    });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }

    async fn refresh_and_record(&self, backoff: &mut Backoff) -> Duration {
        let td = self.follow.trust_domain.as_str();
        let now = self.own.clock().now();
        match self.refresh_once().await {
            Ok(wait) => {
                backoff.reset();
                self.metrics.federation_refreshed(td, unix(now));
                self.hub.update_status(td, |s| {
                    s.last_success_unix = Some(unix(now));
                    s.consecutive_failures = 0;
                });
                wait
            }
            Err(e) => {
                self.metrics.federation_refresh_failed(td, e.reason());
                tracing::warn!(trust_domain = %td, url = %self.follow.url, reason = e.reason(), error = %e, "federated bundle refresh failed; keeping the last good bundle");
                self.hub.update_status(td, |s| {
                    s.last_failure_unix = Some(unix(now));
                    s.last_error = Some(e.to_string());
                    s.consecutive_failures += 1;
                });
                backoff.next_wait()
            }
        }
    }
}

/// An error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !msg.ends_with(&more) {
            msg = format!("{msg}: {more}");
        }
        source = s.source();
    }
    msg
}
