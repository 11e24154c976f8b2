//! Step "federation": this trust domain's SPIFFE bundle document (kept in
//! the data directory as `bundle.spiffe.json`), its bundle endpoint when
//! `federation_listen` is set, and one follower per `federate_with` entry
//! feeding the federated bundles the native API hands to agents.
//!
//! Must not: decide what a bundle may contain (see `crate::federation`).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::api::Core;
use crate::config::ServeConfig;
use crate::federation::{endpoint, follower::Follower};
use crate::metrics::Metrics;

use super::BoxError;

/// Starts federation; returns the bundle endpoint's address when it serves one.
pub(super) async fn start(
    cfg: &ServeConfig,
    core: &Arc<Core>,
    metrics: &Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> Result<Option<SocketAddr>, BoxError> {
    let settings = &cfg.federation;
    let document =
        endpoint::spawn_document(&core.ca, &cfg.data_dir, settings.refresh_hint, stop.clone());
    for f in &settings.follow {
        let td = f.trust_domain.clone();
        let follower = Follower::new(
            f.clone(),
            core.federation().clone(),
            core.ca.clone(),
            cfg.data_dir.clone(),
            metrics.clone(),
        )
        .map_err(|e| format!("federate_with {td}: {e}"))?;
        follower.spawn(stop.clone());
        tracing::info!(trust_domain = %td, url = %f.url, profile = f.profile.as_str(), "following a federated trust domain");
    }
    let served = endpoint::serve(settings, core.ca.clone(), document, stop).await?;
    Ok(served.map(|e| e.addr))
}
