//! The one Kubernetes client factory of `serve`.
//!
//! Owns: turning the `kubeconfig` setting (a file, or `in-cluster` for the
//! pod's service account) into a `kube::Client`, built at most once per
//! server and shared by every controller and token source. Must not: call
//! the API server itself (building a client contacts nothing), or decide
//! which features need a client.

use std::path::{Path, PathBuf};

use tokio::sync::OnceCell;

/// The `kubeconfig` value that means "the pod's own service account".
pub(crate) use crate::authn::tokenreview::IN_CLUSTER;

/// Why no client could be built from the configured credentials.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `in-cluster` outside a pod (no service-account mount or environment).
    #[error("in-cluster configuration: {0} (is this running in a pod?)")]
    InCluster(#[source] kube::config::InClusterError),
    /// The kubeconfig file is missing, unreadable or does not describe a cluster.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The file named by the setting.
        path: PathBuf,
        /// What kube said about it.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// The configuration was read but kube could not build a client from it.
    #[error("kube client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds a client from a kubeconfig path (or [`IN_CLUSTER`]).
pub async fn connect(path: &Path) -> Result<kube::Client, ClientError> {
    if path.as_os_str() == IN_CLUSTER {
        // The pod's service account: token, CA and API server address from
        // the standard mounts and environment.
        let cfg = kube::Config::incluster().map_err(ClientError::InCluster)?;
        return kube::Client::try_from(cfg).map_err(ClientError::Client);
    }
    let bad = |source| ClientError::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(bad)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(bad)?;
    kube::Client::try_from(cfg).map_err(ClientError::Client)
}

/// The server's Kubernetes client: built on first use from the configured
/// kubeconfig, then shared (a `kube::Client` is a cheap handle to one
/// connection pool). Lazily, so a feature that does not need the API server
/// never fails start-up on bad credentials, exactly as before the factory.
#[derive(Default)]
pub struct Factory {
    kubeconfig: Option<PathBuf>,
    client: OnceCell<kube::Client>,
}

impl std::fmt::Debug for Factory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Factory")
            .field("kubeconfig", &self.kubeconfig)
            .field("built", &self.client.initialized())
            .finish()
    }
}

impl Factory {
    /// A factory for `kubeconfig` (None: Kubernetes is not configured).
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Self {
            kubeconfig,
            client: OnceCell::new(),
        }
    }

    /// Whether credentials are configured at all.
    pub fn configured(&self) -> bool {
        self.kubeconfig.is_some()
    }

    /// The shared client; None when no kubeconfig is configured. A failed
    /// build is not remembered: the next caller tries again.
    pub async fn client(&self) -> Result<Option<kube::Client>, ClientError> {
        let Some(path) = &self.kubeconfig else {
            return Ok(None);
        };
        self.client
            .get_or_try_init(|| connect(path))
            .await
            .map(|c| Some(c.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_kubeconfig_means_no_client_and_no_error() {
        let f = Factory::new(None);
        assert!(!f.configured());
        assert!(f.client().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_names_the_file() {
        let f = Factory::new(Some("/nonexistent/meshca-kubeconfig".into()));
        let Err(e) = f.client().await else {
            panic!("a missing kubeconfig gave a client");
        };
        assert!(matches!(e, ClientError::Kubeconfig { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("kubeconfig /nonexistent/meshca-kubeconfig: "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_client_is_built_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:1'}\ncontexts:\n- name: c\n  context: {cluster: c, user: u}\ncurrent-context: c\nusers:\n- name: u\n  user: {token: t}\n",
        )
        .unwrap();
        let f = Factory::new(Some(kc.clone()));
        assert!(f.client().await.unwrap().is_some());
        // Built once: deleting the file now cannot make a later call fail,
        // whereas building again would.
        std::fs::remove_file(&kc).unwrap();
        assert!(f.client().await.unwrap().is_some());
        assert!(Factory::new(Some(kc)).client().await.is_err());
    }
}
