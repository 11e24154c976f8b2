//! Step "admin": the admin token, then the admin HTTP endpoint (router in
//! `crate::admin`) served on its port until the stop signal.
//!
//! Must not: route or decide requests (see `crate::admin`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ServeConfig;
use crate::util::clock::Clock;

use super::services::Services;
use super::BoxError;

/// The admin token of the data directory, created on first start.
pub(super) fn token(cfg: &ServeConfig) -> Result<String, BoxError> {
    Ok(crate::admin::rotation::ensure_token(&cfg.data_dir)?)
}

/// Serves the admin endpoint on `listener` until `stop` flips.
#[allow(clippy::too_many_arguments)]
pub(super) fn serve(
    listener: TcpListener,
    listen: SocketAddr,
    cfg: &ServeConfig,
    services: &Services,
    admin_token: String,
    clock: Arc<dyn Clock>,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let router = crate::admin::router(crate::admin::Endpoints {
        ca: services.core.ca.clone(),
        authn: services.core.authn.clone(),
        audit: services.audit.clone(),
        rotation: services.rotation.clone(),
        revocations: crate::revocation::RevocationService::new(
            services.revocations.clone(),
            services.audit.clone(),
            Some(services.rotation.clone()),
            clock,
        ),
        admin_token,
        listen,
        allowed_hosts: cfg.admin.admin_allowed_hosts.clone(),
        metrics,
        federation: services.core.federation().clone(),
    });
    tokio::spawn(async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin server failed");
        }
    })
}
