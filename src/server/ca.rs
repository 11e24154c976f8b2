//! Step "open the CA": the data directory (pulled from the shared state
//! first when replicas share one CA, created when empty), the lock that
//! keeps offline `meshca rotation` commands out, the trust manager's
//! reconciliation, and the live `Authority`.
//!
//! Must not: start tasks or bind sockets (later steps do).

use std::sync::Arc;

use crate::ca::store::{lock_data_dir, DataDir, InitOptions};
use crate::ca::{Authority, Policy};
use crate::config::ServeConfig;
use crate::kubernetes::client::Factory;
use crate::kubernetes::state::SecretState;
use crate::metrics::Metrics;
use crate::trust::manager::{Reconciled, TrustManager};
use crate::util::clock::Clock;

use super::BoxError;

/// What the later steps need from an open CA.
pub(super) struct OpenedCa {
    /// The data directory.
    pub data: DataDir,
    /// Held until the server has drained: one server per data directory.
    pub lock: std::fs::File,
    /// The rotation journal and derived files.
    pub manager: Arc<TrustManager>,
    /// What start-up reconciliation did (published by the rotation service).
    pub reconciled: Reconciled,
    /// The live CA.
    pub ca: Arc<Authority>,
    /// The CA state shared with other replicas (`state_secret`), if any.
    pub shared: Option<Arc<SecretState>>,
}

/// Opens (or creates) the CA in the data directory.
pub(super) async fn open(
    cfg: &ServeConfig,
    kube: &Factory,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<OpenedCa, BoxError> {
    let data = DataDir::new(&cfg.data_dir);
    // Replicated: the shared state (a Secret), when it exists, is the CA;
    // this replica's data directory becomes a copy of it.
    let shared = pull_shared(cfg, kube, &data, metrics).await?;
    if !data.is_initialized() {
        init(cfg, &data, clock.as_ref())?;
    }
    // One server per data directory: offline `meshca rotation` commands
    // take the same lock, so they cannot race a running server.
    let lock = lock_data_dir(&data)?;
    let manager = Arc::new(
        TrustManager::open(data.clone(), clock.now())?.with_jwt_key_type(cfg.jwt.key_type),
    );
    jwt_keys(&manager, shared.as_deref()).await?;
    // Finish whatever a crash interrupted, renew an expired issuer under a
    // still-valid root; an expired root is reported, not fatal (recovery is
    // `rotation prepare` + `activate --force` against this running server).
    let reconciled = manager.reconcile(cfg.trust.issuer_lifetime, clock.now())?;
    let loaded = data.load().map_err(|e| e.to_string())?;
    let active_root = manager
        .state()
        .active()
        .map(|r| r.id.clone())
        .ok_or("the rotation state has no active root")?;
    let policy = Policy {
        mesh: cfg.issuance.mesh.clone(),
        default_ttl: cfg.issuance.default_ttl,
        max_ttl: cfg.issuance.max_ttl,
        min_ttl: cfg.issuance.min_ttl,
    };
    let ca = Arc::new(
        Authority::new(
            policy,
            clock,
            loaded.issuer.with_root(active_root),
            loaded.roots,
        )
        .with_jwt_policy(cfg.jwt.policy),
    );
    ca.set_bundle(manager.bundle()?);
    ca.set_jwt_key(Some(manager.active_jwt_key()?));
    metrics.set_issuer_expiry(crate::util::clock::unix_secs(ca.issuer().not_after));
    Ok(OpenedCa {
        data,
        lock,
        manager,
        reconciled,
        ca,
        shared,
    })
}

/// Gives roots made before JWT-SVIDs existed their JWT-SVID keys; when
/// replicas share the CA, shares the new keys at once (a replica that loses
/// the race adopts the keys the winner shared), so every replica signs with,
/// and publishes, the same key.
async fn jwt_keys(manager: &TrustManager, shared: Option<&SecretState>) -> Result<(), BoxError> {
    let made = manager.ensure_jwt_keys()?;
    if made.is_empty() {
        return Ok(());
    }
    tracing::info!(roots = ?made, "made JWT-SVID signing keys for roots that had none (bundle version moved)");
    let Some(ss) = shared.filter(|s| s.is_shared()) else {
        return Ok(());
    };
    if !crate::trust::service::SharedState::push(ss).await? {
        ss.pull().await?;
        manager.reload()?;
        tracing::info!("another replica shared its JWT-SVID keys first; adopted them");
    }
    Ok(())
}

/// With `state_secret`: copies the shared CA state into the data directory.
async fn pull_shared(
    cfg: &ServeConfig,
    kube: &Factory,
    data: &DataDir,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<SecretState>>, BoxError> {
    let Some(name) = &cfg.kubernetes.state_secret else {
        return Ok(None);
    };
    let Some(client) = kube
        .client()
        .await
        .map_err(|e| format!("invalid setting kubeconfig: {e}"))?
    else {
        return Ok(None);
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
    let ss = Arc::new(SecretState::new(
        client,
        cfg.issuance.mesh.control_plane_ns.as_str(),
        name,
        &cfg.replica,
        data.clone(),
        metrics.clone(),
    ));
    if ss.pull().await? {
        tracing::info!(secret = %name, "loaded the CA state shared by the other replicas");
    }
    Ok(Some(ss))
}

/// Creates the CA in an empty data directory (root generated or imported).
fn init(cfg: &ServeConfig, data: &DataDir, clock: &dyn Clock) -> Result<(), BoxError> {
    let opts = InitOptions {
        issuer_lifetime: cfg.trust.issuer_lifetime,
        import_root: cfg.init_root.clone(),
        jwt_key_type: cfg.jwt.key_type,
        ..Default::default()
    };
    let report = data
        .init(&opts, clock.now())
        .map_err(|e| format!("initializing {}: {e}", cfg.data_dir.display()))?;
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        root = %report.root_fingerprint,
        issuer = %report.issuer_fingerprint,
        imported = report.imported,
        "data directory was empty: created the CA (root {}, and a new issuer)",
        if report.imported { "imported" } else { "generated" }
    );
    Ok(())
}
