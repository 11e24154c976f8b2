//! `meshca agent`: the workload's identity, kept fresh.
//!
//! Owns: obtaining a certificate from the CA over the native API (a new
//! P-256 key per renewal, held only in memory; the projected token re-read
//! on every request), renewing it at the server-suggested time with jitter,
//! retrying with exponential backoff and jitter while the CA is unavailable
//! (the current certificate is served until it expires), following the
//! trust-bundle stream (and re-certifying at once when its root is tainted),
//! and publishing the result as a [`State`] that the outputs (`files`, the
//! SPIFFE Workload API in `workload_api`, the proxy) read. Finding the CA
//! among several replicas is `endpoints`. Must not: write files or serve
//! sockets itself, or trust anything but the bootstrap bundle and what
//! arrives over TLS verified by it.

pub(crate) mod endpoints;
mod error;
#[cfg(test)]
mod federation_tests;
pub mod files;
pub mod jwt;
pub mod socket;
pub mod workload_api;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, Notify};

use crate::ca::{der_to_pem, pem_to_certs};
use crate::metrics::Metrics;
use crate::proto::meshca as pb;
use crate::util::backoff::Backoff;
use crate::util::secret::SecretBytes;
use endpoints::Endpoints;
pub use error::AgentError;

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The CA: `host:port`, or several separated by commas. A host name may
    /// resolve to several replicas (a headless Service); it is re-resolved
    /// for every connection.
    pub ca_address: String,
    /// The name in the CA's server certificate.
    pub server_name: String,
    /// PEM roots that vouch for the CA's server certificate at first contact.
    pub bootstrap_bundle: PathBuf,
    /// The workload's service-account token (re-read on every request).
    pub token_file: PathBuf,
    /// Requested certificate lifetime (None: the server's default).
    pub requested_ttl: Option<Duration>,
}

/// One X.509-SVID: certificate chain and its private key.
pub struct Svid {
    /// The SPIFFE ID in the leaf.
    pub spiffe_id: String,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER private key (zeroized on drop).
    pub key_pkcs8: SecretBytes,
    /// The same key, PEM (zeroized on drop).
    pub key_pem: SecretBytes,
    /// The leaf's expiry.
    pub not_after: SystemTime,
    /// When the agent will renew (server suggestion with jitter).
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// The chain as PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| der_to_pem(c)).collect()
    }
}

/// The trust bundle the agent follows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bundle {
    /// The CA's bundle version (0: the bootstrap bundle).
    pub version: u64,
    /// The trust domain.
    pub trust_domain: String,
    /// DER roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// DER roots that are tainted.
    pub tainted: Vec<CertificateDer<'static>>,
    /// This trust domain's JWT-SVID verification keys.
    pub jwt_authorities: Vec<JwtKey>,
    /// Federated trust domains' anchors, by trust domain name.
    pub federated: BTreeMap<String, FederatedBundle>,
    /// The CA's `federation_version` (changes of `federated` only).
    pub federation_version: u64,
}

/// A JWT-SVID verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The JWS `kid`.
    pub key_id: String,
    /// DER SubjectPublicKeyInfo.
    pub public_key: Vec<u8>,
    /// When the key stops being valid, if stated.
    pub expires_at: Option<SystemTime>,
}

/// Another trust domain's anchors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FederatedBundle {
    /// DER roots of that trust domain.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// Its JWT-SVID verification keys.
    pub jwt_authorities: Vec<JwtKey>,
    /// Its `spiffe_sequence` (0 when not stated).
    pub sequence: u64,
}

impl From<pb::JwtAuthority> for JwtKey {
    fn from(k: pb::JwtAuthority) -> Self {
        JwtKey {
            key_id: k.key_id,
            public_key: k.public_key,
            expires_at: k.expires_at.and_then(|t| {
                let secs = u64::try_from(t.seconds).ok()?;
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            }),
        }
    }
}

impl From<pb::FederatedBundle> for FederatedBundle {
    fn from(b: pb::FederatedBundle) -> Self {
        FederatedBundle {
            x509_authorities: b
                .x509_authorities
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            jwt_authorities: b.jwt_authorities.into_iter().map(JwtKey::from).collect(),
            sequence: b.sequence,
        }
    }
}

impl Bundle {
    /// The roots as PEM.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|c| der_to_pem(c)).collect()
    }
}

/// What the agent holds right now.
#[derive(Debug, Clone)]
pub struct State {
    /// The current SVID (None until the first certificate arrives).
    pub svid: Option<Arc<Svid>>,
    /// The current bundle.
    pub bundle: Arc<Bundle>,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    jwt: Arc<jwt::JwtSvids>,
}

impl Agent {
    /// The registry the agent reports to (its `/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A receiver of every state change.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// What the Workload API serves for this agent (state and JWT-SVIDs).
    pub fn workload_source(&self) -> workload_api::Source {
        workload_api::Source {
            state: self.state.clone(),
            jwt: self.jwt.clone(),
        }
    }

    /// Waits for the first certificate (or fails after `timeout`).
    pub async fn ready(&self, timeout: Duration) -> Result<Arc<Svid>, AgentError> {
        let mut rx = self.state.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|s| s.svid.is_some())).await;
        match r {
            Ok(Ok(s)) => Ok(s.svid.clone().expect("waited for it")),
            Ok(Err(_)) => Err(AgentError::Stopped),
            Err(_) => Err(AgentError::NotReady(timeout.as_secs())),
        }
    }

    /// Stops the agent's loops.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Inner {
    cfg: AgentConfig,
    endpoints: Endpoints,
    state: watch::Sender<State>,
    renew_now: Notify,
    metrics: Arc<Metrics>,
}

/// Starts the agent: reads the bootstrap bundle, then runs the renewal and
/// bundle-watch loops in the background, reporting to `metrics`.
pub fn start(cfg: AgentConfig, metrics: Arc<Metrics>) -> Result<Agent, AgentError> {
    let bootstrap = |reason: String| AgentError::Bootstrap {
        path: cfg.bootstrap_bundle.clone(),
        reason,
    };
    let pem = std::fs::read(&cfg.bootstrap_bundle).map_err(|e| bootstrap(e.to_string()))?;
    let roots = pem_to_certs(&pem).map_err(bootstrap)?;
    let endpoints = Endpoints::parse(&cfg.ca_address)?;
    let (state, rx) = watch::channel(State {
        svid: None,
        bundle: Arc::new(Bundle {
            version: 0,
            trust_domain: String::new(),
            roots,
            ..Default::default()
        }),
    });
    let (stop, stop_rx) = watch::channel(false);
    let inner = Arc::new(Inner {
        cfg,
        endpoints,
        state,
        renew_now: Notify::new(),
        metrics: metrics.clone(),
    });
    {
        let inner = inner.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = inner.renewal_loop() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
    let jwt = Arc::new(jwt::JwtSvids::new(
        Some(inner.clone() as Arc<dyn jwt::Minter>),
        Arc::new(crate::util::clock::SystemClock),
    ));
    {
        let mut stop = stop_rx;
        tokio::spawn(async move {
            tokio::select! {
                _ = inner.watch_loop() => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
    Ok(Agent {
        state: rx,
        stop,
        metrics,
        jwt,
    })
}

/// True when the top of `chain` (the issuer) is signed by one of `roots`.
fn chains_to(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) -> bool {
    chain
        .last()
        .is_some_and(|top| roots.iter().any(|r| crate::ca::signed_by(top, r)))
}

impl Inner {
    fn current(&self) -> State {
        self.state.borrow().clone()
    }

    /// Adopts a bundle if it is newer than the one held. `fresh` is the
    /// first message of a new stream: its federated part replaces ours
    /// whatever its `federation_version` (that counter is the answering
    /// replica's; after a failover or a CA restart it may be lower).
    fn adopt_bundle(&self, b: pb::TrustBundle, fresh: bool) {
        let bundle = Bundle {
            version: b.version,
            trust_domain: b.trust_domain,
            roots: b.roots.into_iter().map(CertificateDer::from).collect(),
            tainted: b
                .tainted_roots
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
            jwt_authorities: b.jwt_authorities.into_iter().map(JwtKey::from).collect(),
            federated: b
                .federated_bundles
                .into_iter()
                .map(|(td, fb)| (td, FederatedBundle::from(fb)))
                .collect(),
            federation_version: b.federation_version,
        };
        let mut tainted_chain = false;
        self.state.send_if_modified(|s| {
            if bundle.version <= s.bundle.version && s.bundle.version != 0 {
                // Same own anchors: only a federation change is news.
                return self.adopt_federation(s, &bundle, fresh);
            }
            tainted_chain = s
                .svid
                .as_ref()
                .is_some_and(|v| chains_to(&v.chain, &bundle.tainted));
            self.metrics.agent_bundle(bundle.version);
            tracing::info!(
                version = bundle.version,
                roots = bundle.roots.len(),
                tainted = bundle.tainted.len(),
                "trust bundle updated"
            );
            self.note_federation(&s.bundle, &bundle);
            s.bundle = Arc::new(bundle.clone());
            true
        });
        if tainted_chain {
            tracing::warn!("the root of our certificate is tainted: re-certifying now");
            self.renew_now.notify_one();
        }
    }

    /// Takes the federated part of `new` (whose own anchors are not newer
    /// than the held ones) when it is a change; true if it was.
    fn adopt_federation(&self, s: &mut State, new: &Bundle, fresh: bool) -> bool {
        let held = &s.bundle;
        let newer = new.federation_version > held.federation_version;
        if new.version != held.version || !(newer || fresh) || new.federated == held.federated {
            return false;
        }
        self.note_federation(held, new);
        let mut b = (**held).clone();
        b.federated = new.federated.clone();
        b.federation_version = new.federation_version;
        s.bundle = Arc::new(b);
        true
    }

    /// Logs and counts a change of the federated bundles.
    fn note_federation(&self, held: &Bundle, new: &Bundle) {
        self.metrics.agent_federated_bundles(new.federated.len());
        if held.federated != new.federated {
            let domains: Vec<&str> = new.federated.keys().map(String::as_str).collect();
            tracing::info!(
                federation_version = new.federation_version,
                trust_domains = ?domains,
                "federated bundles updated"
            );
        }
    }

    async fn renewal_loop(&self) {
        let mut backoff = Backoff::default();
        loop {
            let due = self.current().svid.map(|s| s.renew_at);
            if let Some(due) = due {
                let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.renew_now.notified() => {}
                }
            }
            loop {
                match self.certify().await {
                    Ok(()) => {
                        backoff.reset();
                        self.metrics.agent_renewal(true);
                        break;
                    }
                    Err(e) => {
                        self.metrics.agent_renewal(false);
                        let wait = if e.is_denied() {
                            backoff.wait_at_cap()
                        } else {
                            backoff.next_wait()
                        };
                        let expires = self
                            .current()
                            .svid
                            .map(|s| crate::util::clock::rfc3339(s.not_after));
                        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, current_expires = expires.as_deref().unwrap_or("none"), "certificate request failed; retrying");
                        self.sleep_serving_until_expiry(wait).await;
                    }
                }
            }
        }
    }

    /// Sleeps `wait`, but drops the held certificate the moment it expires
    /// (an expired SVID is never served; the outputs see `svid: None`).
    async fn sleep_serving_until_expiry(&self, wait: Duration) {
        let now = SystemTime::now();
        let Some(not_after) = self.current().svid.map(|s| s.not_after) else {
            tokio::time::sleep(wait).await;
            return;
        };
        let left = not_after.duration_since(now).unwrap_or_default();
        if left < wait {
            tokio::time::sleep(left).await;
            self.state.send_if_modified(|s| {
                let expired = s
                    .svid
                    .as_ref()
                    .is_some_and(|v| v.not_after <= SystemTime::now());
                if expired {
                    tracing::error!(
                        "the certificate expired and could not be renewed: no longer serving it"
                    );
                    s.svid = None;
                }
                expired
            });
            tokio::time::sleep(wait - left).await;
        } else {
            tokio::time::sleep(wait).await;
        }
    }

    /// One certificate request, tried against each CA endpoint in turn.
    async fn certify(&self) -> Result<(), AgentError> {
        let token =
            std::fs::read_to_string(&self.cfg.token_file).map_err(|source| AgentError::Token {
                path: self.cfg.token_file.clone(),
                source,
            })?;
        let (key, csr) = crate::client::new_key_and_csr(None)?;
        let state = self.current();
        let bundle_pem = state.bundle.to_pem();
        let req = pb::CertifyRequest {
            token: token.trim().to_string(),
            csr,
            requested_ttl: self.cfg.requested_ttl.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: 0,
            }),
        };
        let resp = self
            .endpoints
            .first_answer(|addr| {
                let bundle_pem = bundle_pem.clone();
                let req = req.clone();
                async move {
                    let ch = crate::client::connect(
                        &addr.to_string(),
                        &bundle_pem,
                        &self.cfg.server_name,
                        None,
                    )
                    .await?;
                    pb::identity_client::IdentityClient::new(ch)
                        .certify(req)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(AgentError::from)
                }
            })
            .await?;
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let ts = |t: Option<prost_types::Timestamp>| {
            t.map(|t| {
                SystemTime::UNIX_EPOCH
                    + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
            })
        };
        let not_after =
            ts(resp.not_after).ok_or(AgentError::BadResponse("response without not_after"))?;
        let refresh = ts(resp.refresh_at).unwrap_or(not_after);
        // Jitter of ±10% of the lifetime around the server's suggestion
        // (which is 60%), so replicas of a workload do not renew in step.
        let now = SystemTime::now();
        let life = not_after.duration_since(now).unwrap_or_default();
        let jitter = life.mul_f64(rand::random::<f64>() * 0.2);
        let renew_at = (refresh.checked_sub(life / 10).unwrap_or(refresh) + jitter).min(not_after);
        let svid = Svid {
            spiffe_id: resp.spiffe_id,
            chain,
            key_pkcs8: SecretBytes::new(key.serialize_der()),
            key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
            not_after,
            renew_at,
        };
        tracing::info!(spiffe_id = %svid.spiffe_id, not_after = %crate::util::clock::rfc3339(not_after), renew_at = %crate::util::clock::rfc3339(renew_at), "certificate obtained");
        self.metrics
            .agent_expiry(crate::util::clock::unix_secs(not_after));
        self.state.send_modify(|s| s.svid = Some(Arc::new(svid)));
        if let Some(b) = resp.trust_bundle {
            self.adopt_bundle(b, false);
        }
        Ok(())
    }

    async fn watch_loop(&self) {
        let mut rx = self.state.subscribe();
        if rx.wait_for(|s| s.svid.is_some()).await.is_err() {
            return;
        }
        let mut backoff = Backoff::default();
        loop {
            let r = self.watch_once(&mut backoff).await;
            let wait = match &r {
                Err(e) if e.is_denied() => backoff.wait_at_cap(),
                _ => backoff.next_wait(),
            };
            tracing::debug!(error = ?r.err(), retry_in_ms = wait.as_millis() as u64, "bundle watch ended; reconnecting");
            tokio::time::sleep(wait).await;
        }
    }

    /// One bundle stream, over mTLS with the current certificate (so the CA
    /// counts this workload as a watcher under its own identity).
    async fn watch_once(&self, backoff: &mut Backoff) -> Result<(), AgentError> {
        let state = self.current();
        let svid = state.svid.clone().ok_or(AgentError::NoCertificate)?;
        let identity = (
            svid.chain_pem(),
            String::from_utf8_lossy(svid.key_pem.expose()).into_owned(),
        );
        let bundle_pem = state.bundle.to_pem();
        let mut stream = self
            .endpoints
            .first_answer(|addr| {
                let (bundle_pem, identity) = (bundle_pem.clone(), identity.clone());
                async move {
                    let ch = crate::client::connect(
                        &addr.to_string(),
                        &bundle_pem,
                        &self.cfg.server_name,
                        Some(identity),
                    )
                    .await?;
                    pb::identity_client::IdentityClient::new(ch)
                        .watch_trust_bundle(pb::WatchTrustBundleRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(AgentError::from)
                }
            })
            .await?;
        let mut fresh = true;
        loop {
            match stream.message().await {
                Ok(Some(b)) => {
                    backoff.reset();
                    self.adopt_bundle(b, std::mem::take(&mut fresh));
                }
                Ok(None) => return Err(AgentError::StreamClosed),
                Err(s) => return Err(s.into()),
            }
        }
    }
}

impl jwt::Minter for Inner {
    /// `MintJWTSVID` over mTLS with the held X.509-SVID (the CA authenticates
    /// the certificate exactly as for an mTLS `Certify`; no token is sent).
    fn mint<'a>(&'a self, audience: &'a [String]) -> jwt::MintFuture<'a> {
        Box::pin(async move {
            let state = self.current();
            let svid = state.svid.clone().ok_or(AgentError::NoCertificate)?;
            let identity = (
                svid.chain_pem(),
                String::from_utf8_lossy(svid.key_pem.expose()).into_owned(),
            );
            let bundle_pem = state.bundle.to_pem();
            let req = pb::MintJwtsvidRequest {
                token: String::new(),
                audience: audience.to_vec(),
                requested_ttl: None,
            };
            let resp = self
                .endpoints
                .first_answer(|addr| {
                    let (bundle_pem, identity, req) =
                        (bundle_pem.clone(), identity.clone(), req.clone());
                    async move {
                        let ch = crate::client::connect(
                            &addr.to_string(),
                            &bundle_pem,
                            &self.cfg.server_name,
                            Some(identity),
                        )
                        .await?;
                        pb::identity_client::IdentityClient::new(ch)
                            .mint_jwtsvid(req)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(AgentError::from)
                    }
                })
                .await?;
            let ts = |t: Option<prost_types::Timestamp>| {
                t.map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.seconds.max(0) as u64))
            };
            Ok(jwt::Minted {
                expires_at: ts(resp.expires_at)
                    .ok_or(AgentError::BadResponse("JWT-SVID without expires_at"))?,
                issued_at: ts(resp.issued_at).unwrap_or_else(SystemTime::now),
                spiffe_id: resp.spiffe_id,
                token: zeroize::Zeroizing::new(resp.token),
            })
        })
    }
}
