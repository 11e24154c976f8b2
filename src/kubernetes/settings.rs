//! The Kubernetes settings: credentials (`kubeconfig`), the shared state
//! and key Secrets, bundle publishing with its leader election, propagation
//! reports and the token-bindings watch; and their validation.
//!
//! Must not: read flags, detect the pod (see `config::kubernetes` and
//! `detect`), or contact the API server.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::util::settings::InvalidSetting;

/// The error for a Kubernetes feature set without credentials.
pub const NEEDS_KUBECONFIG: &str = "needs kubeconfig (in a pod: kubeconfig = \"in-cluster\")";

/// What meshca does with the API server.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// In-cluster mode is on (explicitly or detected).
    pub kubernetes: bool,
    /// Credentials: a kubeconfig file, or `in-cluster` (None: no Kubernetes).
    pub kubeconfig: Option<PathBuf>,
    /// The Secret holding the shared CA state (None: local only).
    pub state_secret: Option<String>,
    /// How often the shared state is checked.
    pub state_poll_interval: Duration,
    /// A watch silent this long is re-established (zero: the default).
    pub watch_idle_timeout: Duration,
    /// The Secret holding the audit log's signing key (None: the data directory's).
    pub audit_key_secret: Option<String>,
    /// The `kubernetes.io/tls` Secret mirroring the issuer (None: none).
    pub issuer_secret: Option<String>,
    /// Bundle ConfigMap publishing with leader election (None: off).
    pub publish: Option<PublishConfig>,
    /// How often replicas exchange propagation reports.
    pub propagation_report_interval: Duration,
    /// Refuse tokens whose pod or service account is gone (a metadata-only watch).
    pub watch_token_bindings: bool,
}

/// `publish_bundle` and its leader election.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// Namespace label selector (empty: all).
    pub namespace_labels: BTreeMap<String, String>,
    /// Resync period.
    pub resync: Duration,
    /// Lease name (in the control-plane namespace).
    pub lease: String,
    /// Lease duration.
    pub lease_duration: Duration,
}

impl Settings {
    /// How every watch is paced (`watch_idle_timeout`).
    pub(crate) fn watch_pacing(&self) -> super::watch::Pacing {
        super::watch::Pacing::with_idle_timeout(self.watch_idle_timeout)
    }

    /// The kubeconfig exists, every feature that talks to the API server
    /// has credentials, and the Lease lasts long enough to be renewed.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if let Some(p) = &self.kubeconfig {
            if p.as_os_str() != super::client::IN_CLUSTER && !p.exists() {
                let why = format!("{} does not exist", p.display());
                return Err(InvalidSetting::new("kubeconfig", why));
            }
        }
        if self.kubeconfig.is_none() {
            for (setting, set) in [
                ("issuer_secret", self.issuer_secret.is_some()),
                ("audit_key_secret", self.audit_key_secret.is_some()),
                ("state_secret", self.state_secret.is_some()),
                ("publish_bundle", self.publish.is_some()),
                ("watch_token_bindings", self.watch_token_bindings),
            ] {
                if set {
                    return Err(InvalidSetting::new(setting, NEEDS_KUBECONFIG));
                }
            }
        }
        if let Some(p) = &self.publish {
            if p.lease_duration < Duration::from_secs(1) {
                return Err(InvalidSetting::new(
                    "leader_election_lease_duration",
                    "must be at least 1s",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_that_call_the_api_server_need_credentials() {
        assert!(Settings::default().validate().is_ok());
        let publish = PublishConfig {
            namespace_labels: BTreeMap::new(),
            resync: Duration::from_secs(30),
            lease: "meshca-leader".into(),
            lease_duration: Duration::from_secs(15),
        };
        let cases: [(&str, Settings); 5] = [
            (
                "issuer_secret",
                Settings {
                    issuer_secret: Some("s".into()),
                    ..Default::default()
                },
            ),
            (
                "audit_key_secret",
                Settings {
                    audit_key_secret: Some("s".into()),
                    ..Default::default()
                },
            ),
            (
                "state_secret",
                Settings {
                    state_secret: Some("s".into()),
                    ..Default::default()
                },
            ),
            (
                "publish_bundle",
                Settings {
                    publish: Some(publish.clone()),
                    ..Default::default()
                },
            ),
            (
                "watch_token_bindings",
                Settings {
                    watch_token_bindings: true,
                    ..Default::default()
                },
            ),
        ];
        for (setting, s) in cases {
            let e = s.validate().unwrap_err();
            assert_eq!((e.setting, e.reason.as_str()), (setting, NEEDS_KUBECONFIG));
            let with_creds = Settings {
                kubeconfig: Some(super::super::client::IN_CLUSTER.into()),
                ..s
            };
            assert!(with_creds.validate().is_ok(), "{setting}");
        }
        let short = Settings {
            kubeconfig: Some(super::super::client::IN_CLUSTER.into()),
            publish: Some(PublishConfig {
                lease_duration: Duration::from_millis(999),
                ..publish
            }),
            ..Default::default()
        };
        assert_eq!(
            short.validate().unwrap_err().setting,
            "leader_election_lease_duration"
        );
        let missing = Settings {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            ..Default::default()
        };
        assert_eq!(missing.validate().unwrap_err().setting, "kubeconfig");
    }
}
