//! The gRPC APIs: one file per wire API, all sharing one pipeline.
//!
//! Owns: decode → authenticate → rate-limit → issue → encode, the one
//! structured log line per issuance decision, and the issuance metrics. The
//! wire files (`native`, `linkerd`, `istio`) only translate messages; errors
//! become gRPC statuses in exactly one place, `status`. Must not: sign
//! anything itself, or talk to Kubernetes except through `authn`.

pub(crate) mod connections;
pub mod istio;
pub mod jwt_svid;
pub mod linkerd;
pub mod native;
pub mod settings;
pub(crate) mod status;
pub(crate) mod watchers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use crate::authn::{Authenticated, Authenticator, AuthnError, Method};
use crate::ca::{Authority, CaError, Issued};
use crate::identity::Workload;
use crate::metrics::Metrics;
use crate::util::ratelimit::KeyedLimiter;
pub use status::ApiError;

/// The largest gRPC message accepted, in bytes.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Default ceiling for all pods of one service account: certificates per
/// second. A 1,000-replica Deployment restarted at once asks for 1,000
/// certificates within seconds; the burst admits all of them, and the rate
/// refills it in 10 s, so the next rollout is not throttled either.
pub(crate) const IDENTITY_RATE: f64 = 100.0;
/// Default burst of the per-service-account ceiling (see [`IDENTITY_RATE`]).
pub(crate) const IDENTITY_BURST: u32 = 1000;

/// Which wire API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireApi {
    /// `meshca.v1.Identity`.
    Native,
    /// `io.linkerd.proxy.identity.Identity`.
    Linkerd,
    /// `istio.v1.auth.IstioCertificateService`.
    Istio,
}

impl WireApi {
    /// Label for logs and metrics.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            WireApi::Native => "native",
            WireApi::Linkerd => "linkerd",
            WireApi::Istio => "istio",
        }
    }
}

/// Token audiences per API.
#[derive(Debug, Clone)]
pub struct Audiences {
    /// Native API audience (default `meshca`).
    pub native: String,
    /// Linkerd API audience (default `identity.l5d.io`).
    pub linkerd: String,
    /// Istio API audience (default `istio-ca`).
    pub istio: String,
}

impl Default for Audiences {
    fn default() -> Self {
        Self {
            native: "meshca".into(),
            linkerd: "identity.l5d.io".into(),
            istio: "istio-ca".into(),
        }
    }
}

/// How the caller proves who it is. `Debug` never shows the token (a
/// `?input` in a log line must not leak a bearer credential).
pub enum Credential<'a> {
    /// A bearer token.
    Token(&'a str),
    /// The leaf of a verified mTLS client chain.
    PeerCertificate(&'a CertificateDer<'static>),
    /// Nothing.
    None,
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(t) => write!(f, "Token(<{} bytes, redacted>)", t.len()),
            Credential::PeerCertificate(_) => f.write_str("PeerCertificate"),
            Credential::None => f.write_str("None"),
        }
    }
}

/// One certificate request, whatever API it came through.
#[derive(Debug)]
pub struct CertifyInput<'a> {
    /// The API.
    pub api: WireApi,
    /// The credential.
    pub credential: Credential<'a>,
    /// DER CSR.
    pub csr_der: &'a [u8],
    /// Requested lifetime.
    pub ttl: Option<Duration>,
    /// The identity the caller claims (Linkerd's `identity` field).
    pub claimed_dns_identity: Option<&'a str>,
    /// The caller's address.
    pub peer: Option<SocketAddr>,
}

/// Shared state of the gRPC services.
pub struct Core {
    /// The CA.
    pub ca: Arc<Authority>,
    /// The token chain.
    pub authn: Arc<Authenticator>,
    /// Audiences per API.
    pub audiences: Audiences,
    /// Per pod (token's pod UID, else peer IP), so one pod cannot starve
    /// its siblings of the same service account.
    limiter: KeyedLimiter<String>,
    /// Per service account: the ceiling over all its pods.
    identity_limiter: KeyedLimiter<Workload>,
    audit: Option<crate::audit::AuditLog>,
    refusals: Option<Arc<crate::audit::intake::RefusalGate>>,
    tracker: Arc<crate::trust::propagation::Tracker>,
    watchers: Arc<watchers::Watchers>,
    connections: Option<Arc<connections::Connections>>,
    renewal: Arc<crate::authn::renewal::Renewal>,
    revocations: Arc<crate::revocation::Revocations>,
    metrics: Arc<Metrics>,
    /// The federated bundles handed out with this domain's (issue 14).
    federation: Arc<crate::federation::Hub>,
}

/// Where a grant's authentication comes from: recorded with it, so the
/// renewal chain stays bounded by the token authentication it descends from.
#[derive(Debug, Clone)]
struct Provenance {
    /// The token authentication at the root of the renewal chain.
    auth_time: std::time::SystemTime,
    /// The serial of the certificate presented (renewal by certificate).
    renewed_from: Option<String>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl Core {
    /// Builds the pipeline with a per-pod limit of `rate`/s, `burst`, and
    /// the default per-service-account ceiling.
    pub fn new(
        ca: Arc<Authority>,
        authn: Arc<Authenticator>,
        audiences: Audiences,
        rate: f64,
        burst: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limiter = KeyedLimiter::new(rate, burst, ca.clock().clone());
        let identity_limiter = KeyedLimiter::new(IDENTITY_RATE, IDENTITY_BURST, ca.clock().clone());
        Self {
            ca,
            authn,
            audiences,
            limiter,
            identity_limiter,
            audit: None,
            refusals: None,
            tracker: Arc::default(),
            watchers: watchers::Watchers::new(watchers::WatchSettings::default()),
            connections: None,
            renewal: Arc::new(crate::authn::renewal::Renewal::new(
                Duration::from_secs(86400),
                metrics.clone(),
            )),
            revocations: Arc::new(crate::revocation::Revocations::in_memory(metrics.clone())),
            metrics,
            federation: Arc::default(),
        }
    }

    /// The federated bundles (filled by the federation start-up step).
    pub fn federation(&self) -> &Arc<crate::federation::Hub> {
        &self.federation
    }

    /// Uses `renewal` to decide renewals by certificate (and feeds it every grant).
    pub(crate) fn with_renewal(mut self, renewal: Arc<crate::authn::renewal::Renewal>) -> Self {
        self.renewal = renewal;
        self
    }

    /// Enforces `revocations` (revoked serials, denied identities).
    pub(crate) fn with_revocations(
        mut self,
        revocations: Arc<crate::revocation::Revocations>,
    ) -> Self {
        self.revocations = revocations;
        self
    }

    /// The renewal index.
    pub fn renewal(&self) -> &Arc<crate::authn::renewal::Renewal> {
        &self.renewal
    }

    /// Refuses a bundle request from a caller whose client certificate names
    /// a denied identity (anonymous callers get the public bundle).
    pub(crate) fn check_bundle_caller(&self, peer_leaf: Option<&[u8]>) -> Result<(), ApiError> {
        if self.revocations.is_empty() {
            return Ok(());
        }
        let Some(w) = peer_leaf.and_then(|l| workload_of(l, self.ca.mesh()).ok()) else {
            return Ok(());
        };
        self.check_denied(&w)
    }

    fn check_denied(&self, w: &Workload) -> Result<(), ApiError> {
        match self.revocations.denied(w) {
            None => Ok(()),
            Some(_) => {
                self.metrics.revocation_refused("identity");
                Err(ApiError::Denied {
                    identity: w.to_string(),
                })
            }
        }
    }

    /// Sets the per-service-account ceiling: `rate`/s, `burst`.
    pub fn with_identity_limit(mut self, rate: f64, burst: u32) -> Self {
        self.identity_limiter = KeyedLimiter::new(rate, burst, self.ca.clock().clone());
        self
    }

    /// Sets the bundle-watcher limits.
    pub(crate) fn with_watch_settings(mut self, settings: watchers::WatchSettings) -> Self {
        self.watchers = watchers::Watchers::new(settings);
        self
    }

    /// The gRPC listener's connections (so a stalled stream's connection
    /// can be closed).
    pub(crate) fn with_connections(mut self, conns: Arc<connections::Connections>) -> Self {
        self.connections = Some(conns);
        self
    }

    /// The bundle-watcher limits.
    pub fn watchers(&self) -> &Arc<watchers::Watchers> {
        &self.watchers
    }

    /// The listener's connections, when known.
    pub fn connections(&self) -> Option<&Arc<connections::Connections>> {
        self.connections.as_ref()
    }

    /// Shares the bundle-propagation tracker (the rotation gate reads it).
    pub(crate) fn with_tracker(mut self, tracker: Arc<crate::trust::propagation::Tracker>) -> Self {
        self.tracker = tracker;
        self
    }

    /// The bundle-propagation tracker.
    pub fn tracker(&self) -> &Arc<crate::trust::propagation::Tracker> {
        &self.tracker
    }

    /// Records every decision in `log`; certificates are returned only once
    /// their entry is durable.
    pub(crate) fn with_audit(mut self, log: crate::audit::AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Passes refusals through `gate` before they reach the audit log (a
    /// per-peer budget, identical repeats folded into one counted entry).
    pub(crate) fn with_refusal_gate(
        mut self,
        gate: Arc<crate::audit::intake::RefusalGate>,
    ) -> Self {
        self.refusals = Some(gate);
        self
    }

    fn audience(&self, api: WireApi) -> &str {
        match api {
            WireApi::Native => &self.audiences.native,
            WireApi::Linkerd => &self.audiences.linkerd,
            WireApi::Istio => &self.audiences.istio,
        }
    }

    /// Runs one request through authentication, policy and signing, and
    /// records the decision (log line + metrics) whatever the outcome.
    pub async fn certify(&self, input: CertifyInput<'_>) -> Result<Issued, ApiError> {
        let metrics = &self.metrics;
        let _guard = metrics.in_flight();
        let started = Instant::now();
        let mut who: Option<Authenticated> = None;
        let mut provenance: Option<Provenance> = None;
        let mut result = self.certify_inner(&input, &mut who, &mut provenance).await;
        let now = self.ca.clock().now();
        self.record_decision(
            |r| audit_entry(&input, who.as_ref(), r, now),
            provenance.as_ref(),
            &mut result,
        )
        .await;
        let identity = who
            .as_ref()
            .map(|a| a.workload.to_string())
            .unwrap_or_else(|| "-".into());
        let method = who.as_ref().map(|a| a.method.as_str()).unwrap_or("-");
        let peer = input
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        if let (Ok(issued), Some(a), Some(p)) = (&result, &who, &provenance) {
            // Only once its audit entry is durable: a withheld certificate
            // never becomes renewable.
            self.renewal.record(
                &issued.serial,
                a.workload.clone(),
                &issued.leaf,
                issued.issuer_fingerprint.clone(),
                issued.root_fingerprint.clone(),
                issued.not_after,
                p.auth_time,
                p.renewed_from.as_deref(),
            );
        }
        match &result {
            Ok(issued) => {
                metrics.issuance(input.api.as_str(), true, "ok", started.elapsed());
                // Linkerd responses carry no bundle: nothing was delivered.
                if input.api != WireApi::Linkerd {
                    self.tracker.certified(
                        &crate::trust::propagation::client_key(
                            issued.spiffe_id.as_str(),
                            input.peer,
                        ),
                        issued.bundle.version,
                        issued.not_after,
                        issued.root_fingerprint.as_deref(),
                    );
                }
                tracing::info!(
                    target: "meshca::issuance",
                    api = input.api.as_str(),
                    identity = %identity,
                    spiffe_id = %issued.spiffe_id,
                    method,
                    peer = %peer,
                    pod = who.as_ref().and_then(|a| a.pod_name.as_deref()).unwrap_or("-"),
                    serial = %issued.serial,
                    not_after = %crate::util::clock::rfc3339(issued.not_after),
                    ttl_clamped = issued.ttl_clamped,
                    result = "granted",
                    reason = "ok",
                    "certificate issued"
                );
            }
            Err(e) => {
                metrics.issuance(input.api.as_str(), false, e.reason(), started.elapsed());
                tracing::info!(
                    target: "meshca::issuance",
                    api = input.api.as_str(),
                    identity = %identity,
                    method,
                    peer = %peer,
                    result = "refused",
                    reason = e.reason(),
                    detail = %crate::audit::intake::bound_detail(&e.to_string()),
                    "certificate refused"
                );
            }
        }
        result
    }

    async fn certify_inner(
        &self,
        input: &CertifyInput<'_>,
        who: &mut Option<Authenticated>,
        provenance: &mut Option<Provenance>,
    ) -> Result<Issued, ApiError> {
        let authenticated = self
            .authenticate(input.api, &input.credential, input.peer, provenance)
            .await?;
        *who = Some(authenticated.clone());
        let workload = &authenticated.workload;
        self.check_denied(workload)?;
        if let Some(claimed) = input.claimed_dns_identity {
            let actual = workload
                .dns_identity(self.ca.mesh())
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            if claimed != actual.as_str() {
                return Err(ApiError::IdentityMismatch {
                    claimed: claimed.chars().take(253).collect(),
                    actual: actual.to_string(),
                });
            }
        }
        self.rate_limit(&authenticated, input.peer)?;
        // Signing is ~100 µs of CPU and no I/O, like the token check above:
        // running it inline on the worker measured ~5% faster (`meshca bench`,
        // docs/performance.md) than a hand-off to the blocking pool.
        let issued = self.ca.issue(workload, input.csr_der, input.ttl)?;
        Ok(issued)
    }

    /// Checks the caller's credential (a token for `api`'s audience, or a
    /// meshca client certificate this CA granted), failing closed, and
    /// counts the validation. Every API that acts for a caller's identity
    /// goes through here.
    async fn authenticate(
        &self,
        api: WireApi,
        credential: &Credential<'_>,
        peer: Option<SocketAddr>,
        provenance: &mut Option<Provenance>,
    ) -> Result<Authenticated, ApiError> {
        let metrics = &self.metrics;
        let authenticated = match *credential {
            Credential::Token(token) => {
                let r = self
                    .authn
                    .authenticate_from(token, self.audience(api), peer.map(|p| p.ip()))
                    .await;
                let (method, result) = match &r {
                    Ok(a) => (a.method.as_str(), "ok"),
                    Err(AuthnError::Unavailable(_)) => ("token", "unavailable"),
                    Err(_) => ("token", "rejected"),
                };
                metrics.validation(method, result);
                let a = r?;
                *provenance = Some(Provenance {
                    auth_time: self.ca.clock().now(),
                    renewed_from: None,
                });
                a
            }
            Credential::PeerCertificate(cert) => {
                let r = self.authenticate_peer(cert);
                metrics.validation("certificate", if r.is_ok() { "ok" } else { "rejected" });
                let (a, p) = r?;
                *provenance = Some(p);
                a
            }
            Credential::None => {
                metrics.validation("none", "rejected");
                return Err(AuthnError::Missing.into());
            }
        };
        Ok(authenticated)
    }

    /// One pod's bucket, then its service account's ceiling (only a request
    /// its pod may make draws on the ceiling).
    fn rate_limit(&self, who: &Authenticated, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        let metrics = &self.metrics;
        let (key, what) = pod_key(who, peer);
        if !self.limiter.try_take(&key) {
            metrics.rate_limited("pod");
            return Err(ApiError::RateLimited(format!(
                "{what} of {} (setting rate_limit, per pod)",
                who.workload
            )));
        }
        if !self.identity_limiter.try_take(&who.workload) {
            metrics.rate_limited("identity");
            return Err(ApiError::RateLimited(format!(
                "service account {} (setting identity_rate_limit, all its pods together)",
                who.workload
            )));
        }
        Ok(())
    }

    /// Authenticates a caller by the meshca leaf it presented over mTLS.
    /// rustls has verified the chain to *some* bundle root; that is not
    /// enough (a root may be tainted, its key stolen), so the leaf must be
    /// the exact certificate this replica granted under that serial, to that
    /// identity, under a root that is active or retired, not revoked, and
    /// within `renewal_max_age` of the token authentication it descends
    /// from (see `renewal`).
    fn authenticate_peer(
        &self,
        cert: &CertificateDer<'_>,
    ) -> Result<(Authenticated, Provenance), ApiError> {
        let who = self.peer_identity(cert)?;
        let (_, x509) = X509Certificate::from_der(cert)
            .map_err(|e| AuthnError::Invalid(format!("client certificate does not parse: {e}")))?;
        let serial = hex::encode(x509.raw_serial());
        let revocations = &self.revocations;
        let auth_time = self
            .renewal
            .check(cert, &serial, &who.workload, self.ca.clock().now(), |s| {
                revocations.is_revoked(s)
            })
            .map_err(|e| {
                let m = &self.metrics;
                m.renewal_refused(e.reason());
                if matches!(e, crate::authn::renewal::RenewalError::Revoked { .. }) {
                    m.revocation_refused("serial");
                }
                ApiError::Renewal(e)
            })?;
        Ok((
            who,
            Provenance {
                auth_time,
                renewed_from: Some(serial),
            },
        ))
    }

    /// Who a TLS-verified meshca leaf names: enough to count a bundle
    /// watcher under its identity, not to renew (see `authenticate_peer`).
    fn peer_identity(&self, cert: &CertificateDer<'_>) -> Result<Authenticated, AuthnError> {
        let (_, x509) = X509Certificate::from_der(cert)
            .map_err(|e| AuthnError::Invalid(format!("client certificate does not parse: {e}")))?;
        let not_after = crate::ca::to_system_time(x509.validity().not_after);
        if not_after <= self.ca.clock().now() {
            return Err(AuthnError::Invalid("client certificate has expired".into()));
        }
        Ok(Authenticated {
            workload: workload_of(cert, self.ca.mesh())?,
            pod_name: None,
            pod_uid: None,
            method: Method::Certificate,
            expires: Some(not_after),
        })
    }
}

/// The workload a meshca leaf names (its SPIFFE ID in our trust domain).
fn workload_of(cert: &[u8], mesh: &crate::identity::Mesh) -> Result<Workload, AuthnError> {
    let uri = crate::ca::uri_san(cert)
        .ok_or_else(|| AuthnError::Invalid("client certificate has no SPIFFE ID".into()))?;
    let id: crate::identity::SpiffeId = uri
        .parse()
        .map_err(|e| AuthnError::Invalid(format!("{e}")))?;
    if id.trust_domain() != mesh.trust_domain.as_str() {
        return Err(AuthnError::Invalid(format!(
            "client certificate is for trust domain {}, not {}",
            id.trust_domain(),
            mesh.trust_domain
        )));
    }
    let parts: Vec<&str> = id.path().split('/').collect();
    match parts.as_slice() {
        ["", "ns", ns, "sa", sa] => Workload::new(ns, sa)
            .map_err(|e| AuthnError::Invalid(format!("client certificate: {e}"))),
        _ => Err(AuthnError::Invalid(format!(
            "client certificate SPIFFE ID {id} is not a workload identity"
        ))),
    }
}

/// The rate-limit key of one caller, and how to name it: the pod UID its
/// token is bound to; without one (mTLS renewal, unbound tokens) its IP
/// address, which in Kubernetes is the pod's.
fn pod_key(who: &Authenticated, peer: Option<SocketAddr>) -> (String, String) {
    match (&who.pod_uid, peer) {
        (Some(uid), _) => (format!("{} pod {uid}", who.workload), format!("pod {uid}")),
        (None, Some(p)) => (
            format!("{} ip {}", who.workload, p.ip()),
            format!("the caller at {}", p.ip()),
        ),
        (None, None) => (who.workload.to_string(), "the caller".into()),
    }
}

impl Core {
    /// Writes one decision's audit record, built by `entry` only when the
    /// log is on. Refusals cost an attacker nothing, so each peer gets a
    /// bounded share of the log; grants always get their own entry, and a
    /// grant whose entry cannot be made durable becomes `AuditUnavailable`
    /// (never handed out unrecorded).
    async fn record_decision<T>(
        &self,
        entry: impl FnOnce(&Result<T, ApiError>) -> crate::audit::Entry,
        provenance: Option<&Provenance>,
        result: &mut Result<T, ApiError>,
    ) {
        let Some(log) = &self.audit else {
            return;
        };
        let mut entry = entry(result);
        if let Some(p) = provenance {
            entry.auth_time = Some(crate::util::clock::rfc3339(p.auth_time));
            entry.renewed_from = p.renewed_from.clone();
        }
        let folded = match (&*result, &self.refusals) {
            (Err(_), Some(gate)) => gate.admit(&entry) == crate::audit::intake::Admit::Folded,
            _ => false,
        };
        if folded {
            self.metrics.audit_refusal_folded();
            return;
        }
        match (log.append(entry).await, &*result) {
            (Ok(_), _) => {}
            (Err(e), Ok(_)) => *result = Err(ApiError::AuditUnavailable(e.to_string())),
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "could not record a refusal in the audit log")
            }
        }
    }
}

/// The fields every decision record shares (certificates and JWT-SVIDs):
/// when, of what kind, through which API, who as authenticated, from where,
/// and the lifetime asked for.
pub(crate) fn decision_entry(
    kind: &str,
    api: WireApi,
    who: Option<&Authenticated>,
    peer: Option<SocketAddr>,
    ttl: Option<Duration>,
    now: std::time::SystemTime,
) -> crate::audit::Entry {
    use crate::util::clock::{rfc3339, unix_millis};
    crate::audit::Entry {
        time: rfc3339(now),
        time_unix_ms: unix_millis(now),
        kind: kind.into(),
        api: Some(api.as_str().into()),
        auth_method: who.map(|a| a.method.as_str().into()),
        namespace: who.map(|a| a.workload.namespace.to_string()),
        service_account: who.map(|a| a.workload.service_account.to_string()),
        pod_name: who.and_then(|a| a.pod_name.clone()),
        pod_uid: who.and_then(|a| a.pod_uid.clone()),
        peer: peer.map(|p| p.to_string()),
        requested_ttl_s: ttl.map(|d| d.as_secs()),
        ..Default::default()
    }
}

/// Marks a decision record refused, with the error's reason and detail.
pub(crate) fn mark_refused(e: &mut crate::audit::Entry, err: &ApiError) {
    e.result = "refused".into();
    e.reason = err.reason().into();
    // The detail may echo what the caller sent (an `iss`, a `kid`).
    e.detail = Some(crate::audit::intake::bound_detail(&err.to_string()));
}

/// Builds the audit record of one decision.
fn audit_entry(
    input: &CertifyInput<'_>,
    who: Option<&Authenticated>,
    result: &Result<Issued, ApiError>,
    now: std::time::SystemTime,
) -> crate::audit::Entry {
    use crate::util::clock::rfc3339;
    let mut e = decision_entry("issuance", input.api, who, input.peer, input.ttl, now);
    // Untrusted: a DNS name is at most 253 bytes, so real ones are whole.
    e.requested_identity = input
        .claimed_dns_identity
        .map(|s| crate::audit::intake::truncate(s, 253));
    e.csr_sha256 = (!input.csr_der.is_empty()).then(|| crate::ca::fingerprint(input.csr_der));
    match result {
        Ok(i) => {
            e.result = "granted".into();
            e.reason = "ok".into();
            e.serial = Some(i.serial.clone());
            e.sans = i.sans.clone();
            e.not_before = Some(rfc3339(i.not_before));
            e.not_after = Some(rfc3339(i.not_after));
            e.leaf_sha256 = Some(crate::ca::fingerprint(&i.leaf));
            e.spki_sha256 = Some(i.spki_sha256.clone());
            e.issuer_fingerprint = Some(i.issuer_fingerprint.clone());
            e.root_fingerprint = i.root_fingerprint.clone();
            e.bundle_version = (input.api != WireApi::Linkerd).then_some(i.bundle.version);
        }
        Err(err) => mark_refused(&mut e, err),
    }
    e
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        ApiError::Ca(e)
    }
}

impl From<AuthnError> for ApiError {
    fn from(e: AuthnError) -> Self {
        ApiError::Authn(e)
    }
}

/// Converts a `SystemTime` to a protobuf timestamp.
pub(crate) fn to_timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `?input` in some future log line must not print the bearer token.
    #[test]
    fn debug_output_of_a_credential_never_shows_the_token() {
        let shown = format!("{:?}", Credential::Token("eyJhbGciOi.secret-part.sig"));
        assert!(!shown.contains("secret-part"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    fn who(sa: &str, pod_uid: Option<&str>) -> Authenticated {
        Authenticated {
            workload: Workload::new("shop", sa).unwrap(),
            pod_name: None,
            pod_uid: pod_uid.map(str::to_string),
            method: Method::Jwks,
            expires: None,
        }
    }

    #[test]
    fn the_rate_limit_key_is_the_pod_else_the_address() {
        let p = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let key = |w: &Authenticated, peer| pod_key(w, peer).0;
        // A pod-bound token: the pod, wherever it connects from.
        let a = who("web", Some("uid-a"));
        assert_eq!(key(&a, p("10.0.0.1:1")), key(&a, p("10.0.0.9:2")));
        assert_ne!(
            key(&a, p("10.0.0.1:1")),
            key(&who("web", Some("uid-b")), p("10.0.0.1:1"))
        );
        // No pod: the address (not the port), per service account.
        let n = who("web", None);
        assert_eq!(key(&n, p("10.0.0.1:1")), key(&n, p("10.0.0.1:2")));
        assert_ne!(key(&n, p("10.0.0.1:1")), key(&n, p("10.0.0.2:1")));
        assert_ne!(
            key(&n, p("10.0.0.1:1")),
            key(&who("db", None), p("10.0.0.1:1"))
        );
        assert!(pod_key(&a, None).1.contains("uid-a"));
    }
}
