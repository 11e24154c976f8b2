//! Running inside Kubernetes: what a replicated CA needs from the API server.
//!
//! Owns: leader election over a Lease (`lease`); on the leader, publishing
//! the trust bundle as a ConfigMap in every (selected) namespace
//! (`publish`); the CA state shared by replicas through Secrets (`state`);
//! following collections with list + watch and 410 handling (`watch`); the
//! start-up permission check (`rbac`); in-cluster detection (`detect`); the
//! issuer's `kubernetes.io/tls` Secret (`issuer_secret`); the shared audit
//! key (`audit_key`); propagation reports between replicas (`reports`);
//! Events (`event`); the one client factory (`client`); and the pods and service accounts that exist, for
//! token bindings (`bindings`).
//! Talks to the API server through kube with the configured credentials
//! (`--kubeconfig`, or `in-cluster`). Must not: issue certificates or decide
//! rotation steps.

pub(crate) mod audit_key;
pub mod bindings;
pub mod client;
pub(crate) mod detect;
pub mod error;
pub(crate) mod event;
pub(crate) mod issuer_secret;
pub(crate) mod lease;
pub mod publish;
pub mod rbac;
pub mod reports;
pub mod settings;
pub mod state;
pub(crate) mod watch;

pub use error::Error;

/// The field manager of meshca's server-side apply writes.
pub(crate) const FIELD_MANAGER: &str = "meshca";

/// The label every object meshca writes carries.
pub(crate) fn managed_by() -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        "meshca".to_string(),
    )])
}

/// A Secret object carrying key material: its data is zeroized when it is
/// dropped, so copies made for a request or read from a response do not
/// linger in freed memory.
pub(crate) struct KeySecret(pub k8s_openapi::api::core::v1::Secret);

impl Drop for KeySecret {
    fn drop(&mut self) {
        for v in self.0.data.iter_mut().flat_map(|d| d.values_mut()) {
            zeroize::Zeroize::zeroize(&mut v.0);
        }
    }
}
