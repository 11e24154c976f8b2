//! SPIFFE federation, CA side (issue 14, part 4): this trust domain's
//! bundle endpoint, and following other trust domains' endpoints.
//!
//! Owns: the set of federated bundles handed to workloads (`Hub`, a `watch`
//! channel the native bundle stream reads), the per-domain follower
//! (`follower`: fetch, authenticate per profile, validate, keep the last good
//! bundle), its persistence (`store`), the https_spiffe endpoint check
//! (`verify`), the endpoint server (`endpoint`) and the settings
//! (`settings`). Must not: merge bundles of different trust domains (each is
//! kept under its own name, Federation §4.2), or change this trust domain's
//! own bundle or its `version` (the rotation gate counts that).

pub mod endpoint;
pub mod follower;
pub mod settings;
pub mod store;
mod verify;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::trust::spiffe_bundle::SpiffeBundle;

/// The foreign bundles workloads are given, keyed by trust domain name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Federated {
    /// Increases whenever `bundles` changes.
    pub version: u64,
    /// One bundle per followed trust domain that has one.
    pub bundles: BTreeMap<String, SpiffeBundle>,
}

/// What the status report says about one followed trust domain.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainStatus {
    /// The trust domain.
    pub trust_domain: String,
    /// Its endpoint.
    pub url: String,
    /// `https_web` or `https_spiffe`.
    pub profile: String,
    /// Whether a bundle is held (fetched, persisted or bootstrapped).
    pub has_bundle: bool,
    /// The held bundle's `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// X.509 authorities in the held bundle.
    pub x509_authorities: usize,
    /// JWT keys in the held bundle.
    pub jwt_keys: usize,
    /// Last successful refresh, Unix seconds.
    pub last_success_unix: Option<u64>,
    /// Last failed refresh, Unix seconds, and why.
    pub last_failure_unix: Option<u64>,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Consecutive failures since the last success.
    pub consecutive_failures: u32,
    /// When the next fetch is due, Unix seconds.
    pub next_refresh_unix: Option<u64>,
}

/// The federated bundles of a running CA, and each followed domain's state.
#[derive(Debug)]
pub struct Hub {
    tx: watch::Sender<Arc<Federated>>,
    status: Mutex<BTreeMap<String, DomainStatus>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            tx: watch::channel(Arc::new(Federated::default())).0,
            status: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Hub {
    /// A receiver that sees every change of the federated set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Federated>> {
        self.tx.subscribe()
    }

    /// The current set.
    pub fn current(&self) -> Arc<Federated> {
        self.tx.borrow().clone()
    }

    /// The bundle held for `trust_domain`.
    pub fn get(&self, trust_domain: &str) -> Option<SpiffeBundle> {
        self.tx.borrow().bundles.get(trust_domain).cloned()
    }

    /// Holds `bundle` for `trust_domain`; watchers are told only when it
    /// differs from what was held. Returns whether it did.
    pub fn set(&self, trust_domain: &str, bundle: SpiffeBundle) -> bool {
        self.tx.send_if_modified(|f| {
            if f.bundles.get(trust_domain) == Some(&bundle) {
                return false;
            }
            let mut next = (**f).clone();
            next.bundles.insert(trust_domain.to_string(), bundle);
            next.version += 1;
            *f = Arc::new(next);
            true
        })
    }

    /// Updates the status of one followed domain.
    pub(crate) fn update_status(&self, trust_domain: &str, f: impl FnOnce(&mut DomainStatus)) {
        let mut map = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(trust_domain.to_string()).or_default();
        entry.trust_domain = trust_domain.to_string();
        f(entry);
        if let Some(b) = self.get(trust_domain) {
            entry.has_bundle = true;
            entry.sequence = b.sequence;
            entry.x509_authorities = b.x509_authorities.len();
            entry.jwt_keys = b.jwt_keys.len();
        }
    }

    /// Every followed domain's status, by name.
    pub fn status(&self) -> Vec<DomainStatus> {
        let map = self.status.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}

/// Seconds since the epoch, for the status report.
pub(crate) fn unix(t: SystemTime) -> u64 {
    crate::util::clock::unix_secs(t)
}
