//! Whether meshca runs in a Kubernetes pod, and which namespace it is in.
//!
//! Owns: the detection rule behind `serve --kubernetes`'s automatic mode —
//! the kubelet sets `KUBERNETES_SERVICE_HOST` in every container and mounts
//! the service account's token (unless `automountServiceAccountToken` is
//! off, in which case in-cluster credentials could not work anyway).
//! Must not: read the token, or talk to the API server.

use std::path::Path;

/// Where the kubelet mounts the service account's credentials.
pub(crate) const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the pod's environment says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    /// The pod's namespace ($POD_NAMESPACE, else the service account's).
    pub namespace: Option<String>,
}

/// The current process's pod, if it runs in one.
pub(crate) fn pod() -> Option<Pod> {
    pod_from(
        std::env::var("KUBERNETES_SERVICE_HOST").ok().as_deref(),
        std::env::var("POD_NAMESPACE").ok().as_deref(),
        Path::new(SERVICE_ACCOUNT_DIR),
    )
}

/// The detection rule on explicit inputs.
pub(crate) fn pod_from(
    service_host: Option<&str>,
    pod_namespace: Option<&str>,
    sa_dir: &Path,
) -> Option<Pod> {
    if service_host.is_none_or(str::is_empty) || !sa_dir.join("token").is_file() {
        return None;
    }
    let namespace = pod_namespace
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| {
            std::fs::read_to_string(sa_dir.join("namespace"))
                .ok()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
        });
    Some(Pod { namespace })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_needs_both_the_service_host_and_a_token() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(pod_from(Some("10.0.0.1"), None, d.path()), None);
        std::fs::write(d.path().join("token"), "t").unwrap();
        assert_eq!(pod_from(None, None, d.path()), None);
        assert_eq!(
            pod_from(Some("10.0.0.1"), None, d.path()),
            Some(Pod { namespace: None })
        );
        std::fs::write(d.path().join("namespace"), "mesh-system\n").unwrap();
        assert_eq!(
            pod_from(Some("10.0.0.1"), None, d.path())
                .unwrap()
                .namespace,
            Some("mesh-system".into())
        );
        assert_eq!(
            pod_from(Some("10.0.0.1"), Some("other"), d.path())
                .unwrap()
                .namespace,
            Some("other".into())
        );
    }
}
