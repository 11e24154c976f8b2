//! Step "services": what requests and operators act on — the issuance
//! core (`api::Core` with its limits, revocations, renewal index and audit
//! log), and the rotation service over the live CA (shared with the other
//! replicas when the state is).
//!
//! Must not: bind sockets or talk to Kubernetes except through the shared
//! state the CA step opened.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::api::{self, Core};
use crate::authn::renewal::Renewal;
use crate::ca::Authority;
use crate::config::ServeConfig;
use crate::kubernetes::state::SecretState;
use crate::metrics::Metrics;
use crate::revocation::Revocations;
use crate::trust::manager::{Reconciled, TrustManager};
use crate::trust::propagation::Tracker;
use crate::trust::service::RotationService;
use crate::util::clock::Clock;

use super::audit::Audit;
use super::authn::Authn;
use super::BoxError;

/// The services the listeners and controllers share.
pub(super) struct Services {
    /// The issuance pipeline behind the three gRPC APIs.
    pub core: Arc<Core>,
    /// The gRPC connection cap and per-connection state.
    pub connections: Arc<api::connections::Connections>,
    /// Which bundle version each client has been sent.
    pub tracker: Arc<Tracker>,
    /// The operator's revocations.
    pub revocations: Arc<Revocations>,
    /// Root and issuer rotation.
    pub rotation: Arc<RotationService>,
    /// The audit log, when on.
    pub audit: Option<crate::audit::AuditLog>,
}

/// The parts of the open CA the services take over.
pub(super) struct CaParts {
    pub ca: Arc<Authority>,
    pub manager: Arc<TrustManager>,
    pub reconciled: Reconciled,
    pub shared: Option<Arc<SecretState>>,
}

/// Builds the issuance core and the rotation service.
pub(super) async fn start(
    cfg: &ServeConfig,
    parts: CaParts,
    authn: &Authn,
    audit: &Audit,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<Services, BoxError> {
    let tracker = Arc::new(Tracker::default());
    let connections =
        api::connections::Connections::new(cfg.api.limits.max_connections, metrics.clone());
    // The operator's revocations: a list that does not parse stops the
    // start rather than re-admitting what was shut out.
    let revocations = Arc::new(Revocations::open(&cfg.data_dir, metrics.clone())?);
    let renewal = Arc::new(Renewal::new(cfg.authn.renewal_max_age, metrics.clone()));
    let mut core = Core::new(
        parts.ca.clone(),
        authn.authenticator.clone(),
        cfg.api.audiences.clone(),
        cfg.api.rate_limit,
        cfg.api.rate_burst,
        metrics.clone(),
    )
    .with_identity_limit(
        cfg.api.limits.identity_rate_limit,
        cfg.api.limits.identity_rate_burst,
    )
    .with_watch_settings(cfg.api.limits.watch)
    .with_connections(connections.clone())
    .with_tracker(tracker.clone())
    .with_revocations(revocations.clone())
    .with_renewal(renewal.clone());
    if let (Some(log), Some(gate)) = (&audit.log, &audit.gate) {
        core = core.with_audit(log.clone()).with_refusal_gate(gate.clone());
        load_renewal_index(&renewal, log.db_path(), clock.now(), cfg.issuance.max_ttl)?;
    }
    let rotation = RotationService::new(
        parts.manager,
        parts.ca,
        tracker.clone(),
        audit.log.clone(),
        cfg.trust.clone(),
        metrics.clone(),
    );
    rotation.observe(renewal.clone());
    rotation.observe(revocations.clone());
    rotation.publish(&parts.reconciled).await?;
    spawn_renewal_pruning(renewal, clock);
    if let Some(ss) = parts.shared {
        share(&rotation, ss).await?;
    }
    Ok(Services {
        core: Arc::new(core),
        connections,
        tracker,
        revocations,
        rotation,
        audit: audit.log.clone(),
    })
}

/// Hands the shared state to the rotation service; the first replica
/// makes its CA the shared one.
async fn share(rotation: &Arc<RotationService>, ss: Arc<SecretState>) -> Result<(), BoxError> {
    rotation.set_shared(ss.clone());
    if ss.is_shared() {
        return Ok(());
    }
    // First replica: this CA becomes the shared one, unless another replica
    // created it meanwhile (then adopt theirs).
    match crate::trust::service::SharedState::push(ss.as_ref()).await? {
        true => tracing::info!("created the shared CA state"),
        false => {
            rotation.pull_shared().await?;
            tracing::info!("another replica created the shared CA state first; adopted it");
        }
    }
    Ok(())
}

/// Rebuilds the renewal index from the audit log (the leaves granted within
/// the longest leaf lifetime), so certificates issued before a restart can
/// still renew.
fn load_renewal_index(
    renewal: &Renewal,
    db: &std::path::Path,
    now: SystemTime,
    max_ttl: Duration,
) -> Result<(), BoxError> {
    let store = crate::audit::store::SqliteStore::open_read_only(db)?;
    let n = renewal
        .load_from_audit(&store, now, max_ttl + crate::ca::BACKDATE)
        .map_err(|e| format!("rebuilding the renewal index from the audit log: {e}"))?;
    tracing::info!(certificates = n, "renewal index loaded from the audit log");
    Ok(())
}

/// Drops expired certificates from the renewal index once a minute.
fn spawn_renewal_pruning(renewal: Arc<Renewal>, clock: Arc<dyn Clock>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            renewal.prune(clock.now());
        }
    });
}
