//! Following a Kubernetes collection: list, then watch from the list's
//! resourceVersion, so a change made anywhere (another replica, an
//! operator's `kubectl apply`, cert-manager) reaches this replica within
//! the round trip of one event instead of a poll period.
//!
//! Owns: the one list/watch loop of meshca ([`run`]; [`follow`] for
//! consumers that only need waking). The protocol is kube-runtime's
//! `watcher`: a watch that ends (server timeout, dropped connection)
//! resumes from the last resourceVersion seen; a `410 Gone` (the version was
//! compacted away) forces a fresh list, because events were lost. Around it
//! this module adds what meshca promises on top (docs/kubernetes.md):
//! errors back off ([`crate::util::backoff`]); every restart is counted in
//! `meshca_kubernetes_watch_restarts_total{resource,reason}` (`closed`,
//! `gone`, `error`); a 410 answered to the watch request itself (not as an
//! `ERROR` event) also lists again, where kube-runtime alone would retry
//! the same expired version forever. Lists and watches ask for metadata
//! only (`PartialObjectMetadata`): consumers re-read what they need, and
//! Secret data never travels over a watch.
//!
//! kube-runtime's event stream is silent about a watch that closed and
//! resumed cleanly, and about a watch request that succeeded, so the
//! watcher's `Api` runs over a [`Probe`]d client that sees its requests.
//! Must not: interpret the objects.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use kube::api::{Api, PartialObjectMeta};
use kube::core::Resource;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;
use crate::util::backoff::Backoff;

/// What to follow.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// A name for logs and metrics ("secrets", "namespaces", …).
    pub resource: &'static str,
    /// Only the object with this name (a `metadata.name` field selector,
    /// which also lets RBAC restrict the watch by `resourceNames`).
    pub name: Option<String>,
    /// Only objects with these labels (a label selector, `k=v,k2=v2`).
    pub labels: Option<String>,
}

impl Target {
    fn config(&self) -> watcher::Config {
        watcher::Config {
            field_selector: self.name.as_ref().map(|n| format!("metadata.name={n}")),
            label_selector: self.labels.clone(),
            // Servers end watches after at most this; the watcher resumes.
            timeout: Some(290),
            // Bookmarks keep the resume version fresh on quiet collections.
            bookmarks: true,
            ..Default::default()
        }
    }
}

/// What a consumer of [`run`] is told, in order. A (re)list is
/// `relisting`, one `listed` per object, then `synced`.
pub(crate) trait Follower<K>: Send {
    /// A fresh list begins: what was known may be stale.
    fn relisting(&mut self) {}
    /// One object of the list.
    fn listed(&mut self, _object: K) {}
    /// The list is complete; watch events follow.
    fn synced(&mut self);
    /// An object was added or changed.
    fn applied(&mut self, object: K);
    /// An object was deleted.
    fn deleted(&mut self, object: K);
    /// A list or watch failed (a retry follows after a backoff).
    fn failing(&mut self) {}
}

/// Called (on the client's task) when a watch request is answered 200: the
/// watch is up again even if no event follows for a while.
pub(crate) type OnOpen = Arc<dyn Fn() + Send + Sync>;

/// A follower that only wakes a consumer (which re-reads what it cares
/// about, so a coalesced wake-up never leaves it on stale state).
struct Wake(Arc<Notify>);

impl<K> Follower<K> for Wake {
    fn synced(&mut self) {
        self.0.notify_one();
    }
    fn applied(&mut self, _: K) {
        self.0.notify_one();
    }
    fn deleted(&mut self, _: K) {
        self.0.notify_one();
    }
}

/// Lists and watches (through the `Api` that `api` builds over the client)
/// until `stop` flips, waking `wake` on the initial list, on every re-list
/// and on every event.
pub(crate) async fn follow<K>(
    client: kube::Client,
    api: impl FnOnce(kube::Client) -> Api<PartialObjectMeta<K>> + Send,
    target: Target,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let spec = Spec {
        target: &target,
        on_open: None,
        metrics,
    };
    run(client, api, spec, &mut Wake(wake), stop).await
}

/// How [`run`] reports: the target, a hook for a reopened watch, and the
/// registry its restarts are counted in.
pub(crate) struct Spec<'a> {
    /// What is followed.
    pub target: &'a Target,
    /// Called when a watch request is answered 200.
    pub on_open: Option<OnOpen>,
    /// Where restarts are counted.
    pub metrics: Arc<Metrics>,
}

/// The loop: kube-runtime's watcher, with backoff, restart accounting and
/// the 410-on-request re-list; tells `follower` what it saw.
pub(crate) async fn run<K, F>(
    client: kube::Client,
    api: impl FnOnce(kube::Client) -> Api<PartialObjectMeta<K>> + Send,
    spec: Spec<'_>,
    follower: &mut F,
    mut stop: watch::Receiver<bool>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    F: Follower<PartialObjectMeta<K>>,
{
    let Spec {
        target,
        on_open,
        metrics,
    } = spec;
    let probe = Arc::new(Probe {
        resource: target.resource,
        watching_cleanly: AtomicBool::new(false),
        on_open,
        metrics: metrics.clone(),
    });
    let ns = client.default_namespace().to_string();
    let api = api(kube::Client::new(
        Probed {
            client,
            probe: probe.clone(),
        },
        ns,
    ));
    let start = || watcher::watcher(api.clone(), target.config()).boxed();
    let mut events = start();
    let mut backoff = Backoff::default();
    loop {
        let next = tokio::select! {
            e = events.next() => e,
            _ = stop.changed() => return,
        };
        let e = match next {
            // The watcher's stream never ends on its own.
            None => return,
            Some(Ok(ev)) => {
                backoff.reset();
                deliver(follower, ev);
                continue;
            }
            Some(Err(e)) => e,
        };
        probe.errored();
        match restart(&e) {
            Restart::Gone { relist } => {
                tracing::info!(
                    resource = target.resource,
                    "Kubernetes watch: resourceVersion expired (410 Gone); listing again"
                );
                metrics.kubernetes_watch_restart(target.resource, "gone");
                if relist {
                    events = start();
                }
            }
            Restart::Error => {
                tracing::warn!(resource = target.resource, error = %e, "Kubernetes list/watch failed; retrying");
                metrics.kubernetes_watch_restart(target.resource, "error");
                follower.failing();
                if backoff.sleep_or_stop(&mut stop).await {
                    return;
                }
            }
        }
    }
}

fn deliver<K, F: Follower<K>>(follower: &mut F, ev: Event<K>) {
    match ev {
        Event::Init => follower.relisting(),
        Event::InitApply(o) => follower.listed(o),
        Event::InitDone => follower.synced(),
        Event::Apply(o) => follower.applied(o),
        Event::Delete(o) => follower.deleted(o),
    }
}

/// What an error from the watcher calls for.
#[derive(Debug, PartialEq, Eq)]
enum Restart {
    /// 410 Gone: events were lost. `relist`: the watcher will not list again
    /// by itself (the 410 answered the watch request), so start it afresh.
    Gone { relist: bool },
    /// Back off, then let the watcher retry.
    Error,
}

fn restart(e: &watcher::Error) -> Restart {
    use watcher::Error as E;
    match e {
        // kube-runtime resets to a fresh list on an ERROR event with 410.
        E::WatchError(st) if st.code == 410 => Restart::Gone { relist: false },
        E::WatchStartFailed(kube::Error::Api(st)) | E::WatchFailed(kube::Error::Api(st))
            if st.code == 410 =>
        {
            Restart::Gone { relist: true }
        }
        _ => Restart::Error,
    }
}

/// Sees the watcher's requests: a watch request right after a watch that
/// ended without an error is a clean resume (`closed`); a watch answered
/// 200 calls `on_open`.
struct Probe {
    resource: &'static str,
    /// The last request was a watch, and no error was reported since.
    watching_cleanly: AtomicBool,
    on_open: Option<OnOpen>,
    metrics: Arc<Metrics>,
}

impl Probe {
    /// A request is about to be sent. The watcher sends one request at a
    /// time, and only when polled, so this never races [`Probe::errored`]
    /// (called before the stream is polled again).
    fn request(&self, is_watch: bool) {
        let was_watching = self.watching_cleanly.swap(is_watch, Ordering::AcqRel);
        if is_watch && was_watching {
            self.metrics
                .kubernetes_watch_restart(self.resource, "closed");
        }
    }

    fn errored(&self) {
        self.watching_cleanly.store(false, Ordering::Release);
    }

    fn opened(&self) {
        if let Some(f) = &self.on_open {
            f();
        }
    }
}

fn is_watch(uri: &http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true"))
}

/// The client under the watcher's `Api`: passes every request to the real
/// client, telling the [`Probe`].
#[derive(Clone)]
struct Probed {
    client: kube::Client,
    probe: Arc<Probe>,
}

type Response = http::Response<kube::client::Body>;

impl tower::Service<http::Request<kube::client::Body>> for Probed {
    type Response = Response;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let watching = is_watch(req.uri());
        self.probe.request(watching);
        let (client, probe) = (self.client.clone(), self.probe.clone());
        Box::pin(async move {
            let r = client.send(req).await;
            if watching && r.as_ref().is_ok_and(|r| r.status().is_success()) {
                probe.opened();
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> kube::core::Status {
        kube::core::Status {
            code,
            ..Default::default()
        }
    }

    #[test]
    fn gone_relists_and_other_errors_back_off() {
        let gone_event = watcher::Error::WatchError(Box::new(status(410)));
        assert_eq!(restart(&gone_event), Restart::Gone { relist: false });
        let gone_request =
            watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status(410))));
        assert_eq!(restart(&gone_request), Restart::Gone { relist: true });
        for e in [
            watcher::Error::WatchError(Box::new(status(500))),
            watcher::Error::WatchStartFailed(kube::Error::Api(Box::new(status(403)))),
            watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status(410)))),
            watcher::Error::NoResourceVersion,
        ] {
            assert_eq!(restart(&e), Restart::Error, "{e}");
        }
    }

    #[test]
    fn watch_requests_are_told_from_lists() {
        let u = |s: &str| s.parse::<http::Uri>().unwrap();
        assert!(is_watch(&u(
            "/api/v1/namespaces/m/secrets?&watch=true&timeoutSeconds=290&resourceVersion=5"
        )));
        assert!(is_watch(&u("/api/v1/pods?watch=true")));
        assert!(!is_watch(&u("/api/v1/pods?limit=500")));
        assert!(!is_watch(&u("/api/v1/pods?fieldSelector=watch%3Dtrue")));
        assert!(!is_watch(&u("/api/v1/pods")));
    }

    #[test]
    fn only_a_clean_resume_counts_as_closed_and_opens_call_back() {
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let o = opened.clone();
        let p = Probe {
            resource: "secrets",
            watching_cleanly: AtomicBool::new(false),
            on_open: Some(Arc::new(move || {
                o.fetch_add(1, Ordering::SeqCst);
            })),
            metrics: Arc::default(),
        };
        let closed = || {
            p.metrics
                .render()
                .lines()
                .find(|l| {
                    l.starts_with("meshca_kubernetes_watch_restarts_total{")
                        && l.contains("resource=\"secrets\"")
                        && l.contains("reason=\"closed\"")
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        p.request(false); // list
        p.request(true); // watch from the list's version
        assert_eq!(closed(), 0);
        p.request(true); // the watch ended cleanly: resumed
        assert_eq!(closed(), 1);
        p.errored(); // the watch failed
        p.request(true); // retried: an error, not a clean close
        assert_eq!(closed(), 1);
        p.request(false); // 410: a fresh list…
        p.request(true); // …and a watch from it
        assert_eq!(closed(), 1);
        p.opened();
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }
}
