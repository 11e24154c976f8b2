//! In-cluster mode: when `serve` runs in a pod (or `--kubernetes` is set),
//! the defaults that make a replicated CA work without further settings;
//! and the Kubernetes settings resolved from the flags.
//!
//! Must not: contact the API server (detection only reads the pod's
//! environment and mounts, in `kubernetes::detect`).

use std::time::Duration;

use crate::kubernetes::client::IN_CLUSTER;
use crate::kubernetes::settings::{PublishConfig, Settings};
use crate::util::settings::InvalidSetting;

use super::args::ServeArgs;
use super::ConfigError;

impl ServeArgs {
    /// Fills in the in-cluster defaults when `kubernetes` is on, or unset
    /// and `pod` says this runs in a pod. Settings given explicitly win.
    pub fn with_kubernetes(
        mut self,
        pod: Option<crate::kubernetes::detect::Pod>,
    ) -> Result<Self, ConfigError> {
        let on = self.kubernetes.unwrap_or(pod.is_some());
        self.kubernetes = Some(on);
        if !on {
            return Ok(self);
        }
        if pod.is_none() && self.kubeconfig.is_none() {
            return Err(InvalidSetting::new("kubernetes", format!(
                "this is not a pod (no KUBERNETES_SERVICE_HOST or no token in {}); set kubeconfig to run against a cluster from outside",
                crate::kubernetes::detect::SERVICE_ACCOUNT_DIR
            )).into());
        }
        self.kubeconfig.get_or_insert_with(|| IN_CLUSTER.into());
        if self.control_plane_namespace.is_none() {
            self.control_plane_namespace = pod.and_then(|p| p.namespace);
        }
        self.state_secret.get_or_insert_with(|| "meshca-ca".into());
        self.audit_key_secret
            .get_or_insert_with(|| "meshca-audit-key".into());
        self.issuer_secret
            .get_or_insert_with(|| "meshca-issuer".into());
        self.publish_bundle.get_or_insert(true);
        self.watch_token_bindings.get_or_insert(true);
        if self.jwks_file.is_none() && self.jwks_url.is_none() && self.oidc_issuer_url.is_none() {
            self.jwks_kubernetes.get_or_insert(true);
        }
        Ok(self)
    }

    /// The Kubernetes settings, defaults applied (not yet validated).
    pub(super) fn kubernetes_settings(&self) -> Result<Settings, ConfigError> {
        let d = |v: Option<crate::util::duration::HumanDuration>, default: u64| {
            v.map_or(Duration::from_secs(default), |d| d.0)
        };
        let publish = match self.publish_bundle.unwrap_or(false) {
            false => None,
            true => Some(PublishConfig {
                namespace_labels: crate::kubernetes::publish::parse_selector(
                    self.bundle_namespace_selector.as_deref().unwrap_or(""),
                )
                .map_err(|e| InvalidSetting::new("bundle_namespace_selector", e))?,
                resync: d(self.bundle_resync_interval, 30).max(Duration::from_millis(100)),
                lease: self
                    .leader_election_lease
                    .clone()
                    .unwrap_or_else(|| "meshca-leader".into()),
                lease_duration: d(self.leader_election_lease_duration, 15),
            }),
        };
        Ok(Settings {
            kubernetes: self.kubernetes.unwrap_or(false),
            kubeconfig: self.kubeconfig.clone(),
            state_secret: self.state_secret.clone(),
            state_poll_interval: d(self.state_poll_interval, 60).max(Duration::from_millis(100)),
            watch_idle_timeout: d(self.watch_idle_timeout, 180).max(Duration::from_millis(100)),
            audit_key_secret: self.audit_key_secret.clone(),
            issuer_secret: self.issuer_secret.clone(),
            publish,
            propagation_report_interval: d(self.propagation_report_interval, 5)
                .max(Duration::from_millis(100)),
            watch_token_bindings: self.watch_token_bindings.unwrap_or(false),
        })
    }
}
