//! The admin HTTP endpoint: probes, metrics, and the operator and auditor
//! routes (rotation, audit, revocation), behind one guard.
//!
//! Owns: HTTP routing (the whole router is assembled here, in [`router`]),
//! request parsing and the mapping of domain errors to HTTP status codes.
//! Must not: make decisions itself — every route calls the domain service
//! (`trust`, `audit`, `revocation`) that owns the state, and `/ready` is the
//! pure [`probes::readiness`] of what the router observed.

pub mod audit;
mod error;
pub(crate) mod federation;
pub(crate) mod guard;
pub mod probes;
pub(crate) mod revocation;
pub(crate) mod rotation;
pub mod settings;

pub(crate) use error::AdminError;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::authn::Authenticator;
use crate::ca::Authority;
use crate::trust::service::RotationService;

/// Everything the admin routes act on.
pub(crate) struct Endpoints {
    /// The live CA (issuer expiry for `/ready`).
    pub(crate) ca: Arc<Authority>,
    /// The token sources (can one decide now, for `/ready`).
    pub(crate) authn: Arc<Authenticator>,
    /// The audit log, when on (its routes, and `/ready`).
    pub(crate) audit: Option<crate::audit::AuditLog>,
    /// Root and issuer rotation.
    pub(crate) rotation: Arc<RotationService>,
    /// The operator's revocations.
    pub(crate) revocations: crate::revocation::RevocationService,
    /// The admin token (content of `admin.token`).
    pub(crate) admin_token: String,
    /// Where the endpoint listens (for the `Host` guard).
    pub(crate) listen: SocketAddr,
    /// Extra `Host` names it answers to (`admin_allowed_hosts`).
    pub(crate) allowed_hosts: Vec<String>,
    /// This server's instruments (what `/metrics` renders).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The followed trust domains (`GET /federation`).
    pub(crate) federation: Arc<crate::federation::Hub>,
}

/// The admin router: open probes and metrics, token-protected operator and
/// auditor routes, all behind the `Host` (DNS-rebinding) guard.
pub(crate) fn router(e: Endpoints) -> Router {
    let open = open_routes(e.ca, e.authn, e.audit.clone(), e.metrics);
    // For operators and auditors: the admin token on every method. Every
    // route that reads or changes CA state (revocation too) belongs here.
    let protected = rotation::routes(e.rotation, &e.admin_token)
        .merge(revocation::routes(e.revocations, &e.admin_token))
        .merge(federation::routes(e.federation));
    let protected = match e.audit {
        Some(log) => protected.merge(audit::routes(log)),
        None => protected,
    };
    let router = open.merge(guard::protect(protected, &e.admin_token));
    guard::check_hosts(router, guard::HostRule::new(e.listen, &e.allowed_hosts))
}

/// Open to probes and Prometheus: nothing here changes or reveals the CA.
fn open_routes(
    ca: Arc<Authority>,
    authn: Arc<Authenticator>,
    audit: Option<crate::audit::AuditLog>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Router {
    let ready = move || {
        let issuer = ca.issuer();
        let observed = probes::Observed {
            audit_problem: audit.as_ref().and_then(|l| l.storage_problem()),
            now: ca.clock().now(),
            issuer_fingerprint: issuer.fingerprint.clone(),
            issuer_not_after: issuer.not_after,
            authn: authn.readiness(),
        };
        async move { probes::readiness(&observed).response() }
    };
    Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        )
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
}
