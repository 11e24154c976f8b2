//! Following a Kubernetes collection: list, then watch from the list's
//! resourceVersion, so a change made anywhere (another replica, an
//! operator's `kubectl apply`, cert-manager) reaches this replica within
//! the round trip of one event instead of a poll period.
//!
//! Owns: the list/watch loop and its failure handling — a watch that ends
//! (server timeout, dropped connection) resumes from the last
//! resourceVersion seen; a `410 Gone` (the resourceVersion was compacted
//! away, sent as an `ERROR` event or as the response status) forces a fresh
//! list, because events were lost; other errors back off and retry. Each
//! list and each event wakes the consumer through a [`Notify`]: consumers
//! re-read what they care about, so a lost or coalesced wake-up can never
//! leave them on stale state. Must not: interpret the objects.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::core::{ObjectMeta, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

/// What to follow.
#[derive(Debug, Clone)]
pub struct Target {
    /// A name for logs and metrics ("secrets", "namespaces", …).
    pub resource: &'static str,
    /// Only the object with this name (a `metadata.name` field selector,
    /// which also lets RBAC restrict the watch by `resourceNames`).
    pub name: Option<String>,
    /// Only objects with these labels (a label selector, `k=v,k2=v2`).
    pub labels: Option<String>,
}

impl Target {
    fn field_selector(&self) -> Option<String> {
        self.name.as_ref().map(|n| format!("metadata.name={n}"))
    }
}

/// How a watch ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The server closed the stream: resume from the last version.
    Closed,
    /// 410 Gone: events were lost; list again.
    Gone,
    /// Something failed; back off, then resume.
    Failed(String),
}

/// Lists and watches `api` until `stop` flips, waking `wake` on the
/// initial list, on every re-list and on every event.
pub async fn follow<K>(
    api: Api<K>,
    target: Target,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut backoff = Duration::from_millis(200);
    'list: loop {
        let lp = ListParams {
            field_selector: target.field_selector(),
            label_selector: target.labels.clone(),
            ..Default::default()
        };
        let mut rv = match api.list_metadata(&lp).await {
            Ok(list) => {
                backoff = Duration::from_millis(200);
                wake.notify_one();
                list.metadata.resource_version.unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(resource = target.resource, error = %e, "Kubernetes list failed; retrying");
                metrics.kubernetes_watch_restart(target.resource, "error");
                if pause(&mut backoff, &mut stop).await {
                    return;
                }
                continue 'list;
            }
        };
        loop {
            let end = tokio::select! {
                end = watch_once(&api, &target, &mut rv, &wake) => end,
                _ = stop.changed() => return,
            };
            match end {
                End::Closed => {
                    metrics.kubernetes_watch_restart(target.resource, "closed");
                }
                End::Gone => {
                    tracing::info!(
                        resource = target.resource,
                        "Kubernetes watch: resourceVersion {rv} expired (410 Gone); listing again"
                    );
                    metrics.kubernetes_watch_restart(target.resource, "gone");
                    continue 'list;
                }
                End::Failed(e) => {
                    tracing::warn!(resource = target.resource, error = %e, "Kubernetes watch failed; retrying");
                    metrics.kubernetes_watch_restart(target.resource, "error");
                    if pause(&mut backoff, &mut stop).await {
                        return;
                    }
                }
            }
        }
    }
}

/// Sleeps for the backoff (doubling it up to 30 s); true when stopping.
async fn pause(backoff: &mut Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(30));
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

fn version(meta: &ObjectMeta) -> Option<String> {
    meta.resource_version.clone()
}

async fn watch_once<K>(api: &Api<K>, target: &Target, rv: &mut String, wake: &Notify) -> End
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let wp = WatchParams {
        field_selector: target.field_selector(),
        label_selector: target.labels.clone(),
        // Servers end watches after at most this; we then resume.
        timeout: Some(290),
        bookmarks: true,
        ..Default::default()
    };
    let stream = match api.watch(&wp, rv).await {
        Ok(s) => s,
        Err(kube::Error::Api(st)) if st.code == 410 => return End::Gone,
        Err(e) => return End::Failed(e.to_string()),
    };
    futures_util::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) | Ok(WatchEvent::Deleted(o)) => {
                if let Some(v) = version(o.meta()) {
                    *rv = v;
                }
                wake.notify_one();
            }
            Ok(WatchEvent::Bookmark(b)) => *rv = b.metadata.resource_version,
            Ok(WatchEvent::Error(st)) if st.code == 410 => return End::Gone,
            Ok(WatchEvent::Error(st)) => return End::Failed(st.message.clone()),
            Err(kube::Error::Api(st)) if st.code == 410 => return End::Gone,
            Err(e) => return End::Failed(e.to_string()),
        }
    }
    End::Closed
}
