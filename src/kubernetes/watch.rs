//! Following a Kubernetes collection: list, then watch from the list's
//! resourceVersion, so a change made anywhere (another replica, an
//! operator's `kubectl apply`, cert-manager) reaches this replica within
//! the round trip of one event instead of a poll period.
//!
//! Owns: the one list/watch loop of meshca ([`run`]; [`follow`] for
//! consumers that only need waking) and its pacing ([`Pacing`]). The
//! protocol is kube-runtime's `watcher`: a watch that ends (server timeout,
//! dropped connection) resumes from the last resourceVersion seen,
//! bookmarks included; a `410 Gone` (the version was compacted away) forces
//! a fresh list, because events were lost. Around it this module adds what
//! meshca promises on top (docs/kubernetes.md): every restart is counted in
//! `meshca_kubernetes_watch_restarts_total{resource,reason}` (`closed`,
//! `gone`, `error`, `idle`); a 410 answered to the watch request itself
//! (not as an `ERROR` event) also lists again, where kube-runtime alone
//! would retry the same expired version forever; a request or stream that
//! brings nothing (no event, no bookmark) within the idle timeout is
//! abandoned, so a connection that died silently is noticed; and one
//! backoff ([`crate::util::backoff`]) paces every retry — after an error,
//! an idle timeout, or a watch stream that ended before it stayed open
//! [`Pacing::healthy_after`] — and starts over only after such a healthy
//! stream, so a server that accepts watches and closes them at once is not
//! hammered. Lists and watches ask for metadata only
//! (`PartialObjectMetadata`): consumers re-read what they need, and Secret
//! data never travels over a watch.
//!
//! kube-runtime's event stream is silent about a watch that closed and
//! resumed cleanly, about a watch request that succeeded, and about
//! bookmarks, so the watcher's `Api` runs over a [`Probe`]d client that
//! sees (and paces) its requests and their bodies. The idle timeout is
//! this module's: a read timeout on the shared client (`client.rs`) must
//! stay off, or above the idle timeout, for watch requests, or it would
//! end quiet healthy watches early.
//! Must not: interpret the objects.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

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
    /// When a silent watch is abandoned, when a stream counts as healthy.
    pub pacing: Pacing,
}

/// The default idle timeout: kube-apiserver sends a bookmark about once a
/// minute to a watch that asked for them, so three minutes without one
/// (or any event) means the connection is dead, not the collection quiet.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(180);

/// A watch stream open this long was healthy: the backoff starts over.
/// (client-go calls a watch under a second without events "very short"
/// and backs off; a server timeout ends a healthy one after ~5 minutes.)
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// How a watch is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    /// Nothing (no event, no bookmark, no response) for this long: the
    /// request is abandoned and the watch re-established.
    pub idle_timeout: Duration,
    /// A stream open this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self::with_idle_timeout(IDLE_TIMEOUT)
    }
}

impl Pacing {
    /// `idle_timeout` (the `watch_idle_timeout` setting; zero, as in a
    /// `Default` settings value: [`IDLE_TIMEOUT`]), the default health
    /// threshold.
    pub(crate) fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout: if idle_timeout.is_zero() {
                IDLE_TIMEOUT
            } else {
                idle_timeout
            },
            healthy_after: HEALTHY_AFTER,
        }
    }
}

impl Target {
    fn config(&self) -> watcher::Config {
        watcher::Config {
            field_selector: self.name.as_ref().map(|n| format!("metadata.name={n}")),
            label_selector: self.labels.clone(),
            // Servers end watches after at most this; the watcher resumes.
            timeout: Some(290),
            // Bookmarks keep the resume version fresh on quiet collections,
            // and show a quiet watch alive (the idle timeout).
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
    let probe = Arc::new(Probe::new(
        target.resource,
        target.pacing,
        on_open,
        metrics.clone(),
    ));
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
    loop {
        let next = tokio::select! {
            e = events.next() => e,
            _ = stop.changed() => return,
        };
        let e = match next {
            // The watcher's stream never ends on its own.
            None => return,
            Some(Ok(ev)) => {
                deliver(follower, ev);
                continue;
            }
            Some(Err(e)) => e,
        };
        // The wait this calls for happens in the probe, before the next
        // request (inside `events.next()`, so `stop` interrupts it).
        let idle = probe.errored();
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
                if !idle {
                    tracing::warn!(resource = target.resource, error = %e, "Kubernetes list/watch failed; retrying");
                    metrics.kubernetes_watch_restart(target.resource, "error");
                }
                follower.failing();
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

/// Sees the watcher's requests and paces them: a watch request right after
/// a watch that ended without an error is a clean resume (`closed`); a
/// watch answered 200 calls `on_open`; a wait is due before the next
/// request after a failure, an idle timeout, or a watch stream that ended
/// before it was healthy (so a server that accepts and closes at once is
/// retried with growing delays, not in a tight loop).
struct Probe {
    resource: &'static str,
    pacing: Pacing,
    /// The last request was a watch, and no error was reported since.
    watching_cleanly: AtomicBool,
    on_open: Option<OnOpen>,
    metrics: Arc<Metrics>,
    pace: Mutex<Pace>,
}

/// The pacing state: the one backoff of this watch and what decides it.
#[derive(Debug)]
struct Pace {
    backoff: Backoff,
    /// A wait is due before the next request.
    due: bool,
    /// The last watch stream: when it opened and, once over, when it ended.
    stream: Option<(Instant, Option<Instant>)>,
    /// The error the watcher reports next is an idle timeout (already
    /// counted as `idle`).
    idle: bool,
}

impl Probe {
    fn new(
        resource: &'static str,
        pacing: Pacing,
        on_open: Option<OnOpen>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            resource,
            pacing,
            watching_cleanly: AtomicBool::new(false),
            on_open,
            metrics,
            pace: Mutex::new(Pace {
                backoff: Backoff::default(),
                due: false,
                stream: None,
                idle: false,
            }),
        }
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, Pace> {
        // Plain fields: a panic elsewhere cannot leave them half-written.
        self.pace.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request is about to be sent; returns how long to wait first. The
    /// watcher sends one request at a time, and only when polled, so this
    /// never races [`Probe::errored`] (called before the stream is polled
    /// again) or the end of the previous stream (seen before the watcher
    /// asks again).
    fn request(&self, is_watch: bool) -> Option<Duration> {
        self.request_at(is_watch, Instant::now())
    }

    fn request_at(&self, is_watch: bool, now: Instant) -> Option<Duration> {
        let was_watching = self.watching_cleanly.swap(is_watch, Ordering::AcqRel);
        if is_watch && was_watching {
            self.metrics
                .kubernetes_watch_restart(self.resource, "closed");
        }
        let mut p = self.pace();
        // Only a stream that stayed open a while proves the server
        // healthy; one event, or a 200 that ends at once, does not.
        if let Some((opened, ended)) = p.stream.take() {
            if ended.unwrap_or(now).saturating_duration_since(opened) >= self.pacing.healthy_after {
                p.backoff.reset();
            }
        }
        std::mem::take(&mut p.due).then(|| p.backoff.next_wait())
    }

    /// The watcher reported an error; true when it was an idle timeout
    /// (counted already).
    fn errored(&self) -> bool {
        self.watching_cleanly.store(false, Ordering::Release);
        let mut p = self.pace();
        p.due = true;
        std::mem::take(&mut p.idle)
    }

    fn opened(&self) {
        self.opened_at(Instant::now());
    }

    fn opened_at(&self, now: Instant) {
        self.pace().stream = Some((now, None));
        if let Some(f) = &self.on_open {
            f();
        }
    }

    /// The watch stream ended (by the server, an error, or being dropped).
    fn ended(&self) {
        self.ended_at(Instant::now());
    }

    fn ended_at(&self, now: Instant) {
        let mut p = self.pace();
        if let Some((opened, ended @ None)) = p.stream.as_mut() {
            *ended = Some(now);
            if now.saturating_duration_since(*opened) < self.pacing.healthy_after {
                p.due = true;
            }
        }
    }

    /// Nothing arrived within the idle timeout: the request or stream is
    /// abandoned, and the next request waits a backoff.
    /// `fails`: the abandoned request or list body ends in an error the
    /// watcher will report (a silent watch stream just ends).
    fn went_idle(&self, fails: bool) {
        tracing::info!(
            resource = self.resource,
            after = ?self.pacing.idle_timeout,
            "Kubernetes watch: nothing from the API server (not even a bookmark); reconnecting"
        );
        self.metrics.kubernetes_watch_restart(self.resource, "idle");
        self.watching_cleanly.store(false, Ordering::Release);
        let mut p = self.pace();
        p.due = true;
        p.idle = fails;
    }
}

fn is_watch(uri: &http::Uri) -> bool {
    uri.query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true"))
}

/// The client under the watcher's `Api`: passes every request to the real
/// client after the wait the [`Probe`] asks for, bounds the wait for the
/// response headers and the gap between body frames by the idle timeout.
#[derive(Clone)]
struct Probed {
    client: kube::Client,
    probe: Arc<Probe>,
}

type Response = http::Response<Idle>;

impl tower::Service<http::Request<kube::client::Body>> for Probed {
    type Response = Response;
    type Error = kube::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, kube::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let watching = is_watch(req.uri());
        let wait = self.probe.request(watching);
        let (client, probe) = (self.client.clone(), self.probe.clone());
        Box::pin(async move {
            if let Some(d) = wait {
                tokio::time::sleep(d).await;
            }
            let idle = probe.pacing.idle_timeout;
            let Ok(r) = tokio::time::timeout(idle, client.send(req)).await else {
                probe.went_idle(true);
                return Err(kube::Error::Service(Box::new(idle_error(idle))));
            };
            let r = r?;
            let stream = watching && r.status().is_success();
            if stream {
                probe.opened();
            }
            Ok(r.map(|body| Idle::new(body, probe, stream)))
        })
    }
}

fn idle_error(after: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no data from the Kubernetes API server for {after:?}"),
    )
}

/// A response body that gives up when nothing arrives within the idle
/// timeout: a watch stream then ends (the watcher resumes from the last
/// resourceVersion, bookmarks included), any other body fails. Tells the
/// [`Probe`] when a watch stream ends, however it ends.
struct Idle<B = kube::client::Body> {
    inner: B,
    probe: Arc<Probe>,
    /// A watch stream (answered 200).
    stream: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl<B> Idle<B> {
    fn new(inner: B, probe: Arc<Probe>, stream: bool) -> Self {
        let deadline = Box::pin(tokio::time::sleep(probe.pacing.idle_timeout));
        Self {
            inner,
            probe,
            stream,
            deadline,
            done: false,
        }
    }

    fn finish(&mut self) {
        if !self.done && self.stream {
            self.probe.ended();
        }
        self.done = true;
    }
}

type Frame = hyper::body::Frame<hyper::body::Bytes>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> hyper::body::Body for Idle<B>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = hyper::body::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.probe.pacing.idle_timeout;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.probe.went_idle(!self.stream);
                self.finish();
                if self.stream {
                    Poll::Ready(None)
                } else {
                    let e = idle_error(self.probe.pacing.idle_timeout);
                    Poll::Ready(Some(Err(Box::new(e))))
                }
            }
        }
    }
}

impl<B> Drop for Idle<B> {
    fn drop(&mut self) {
        self.finish();
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

    fn restarts(m: &Metrics, reason: &str) -> u64 {
        m.render()
            .lines()
            .find(|l| {
                l.starts_with("meshca_kubernetes_watch_restarts_total{")
                    && l.contains("resource=\"secrets\"")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    }

    fn probe_idle(on_open: Option<OnOpen>, idle_timeout: Duration) -> Probe {
        let pacing = Pacing {
            idle_timeout,
            healthy_after: Duration::from_secs(10),
        };
        Probe::new("secrets", pacing, on_open, Arc::default())
    }

    fn probe(on_open: Option<OnOpen>) -> Probe {
        probe_idle(on_open, IDLE_TIMEOUT)
    }

    #[test]
    fn only_a_clean_resume_counts_as_closed_and_opens_call_back() {
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let o = opened.clone();
        let p = probe(Some(Arc::new(move || {
            o.fetch_add(1, Ordering::SeqCst);
        })));
        let closed = || restarts(&p.metrics, "closed");
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
        p.went_idle(false); // nothing arrived: abandoned, counted as idle
        p.request(true);
        assert_eq!((closed(), restarts(&p.metrics, "idle")), (1, 1));
        p.opened();
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    /// The wait before the next request (at `now`), checked against the
    /// jittered range `[nominal/2, nominal]`.
    fn waits(p: &Probe, now: Instant, nominal_ms: u64) {
        let w = p.request_at(true, now).expect("a wait is due");
        let n = Duration::from_millis(nominal_ms);
        assert!(w >= n / 2 && w <= n, "{w:?} vs nominal {n:?}");
    }

    #[test]
    fn a_stream_that_closes_at_once_backs_off_until_one_stays_healthy() {
        let p = probe(None);
        let t = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(p.request_at(false, t), None, "the first list goes at once");
        assert_eq!(p.request_at(true, t), None, "so does the watch after it");
        // 200, then EOF at once: each resume waits longer (an event in
        // between changes nothing: tests/kube_watch.rs).
        for nominal in [200, 400, 800, 1600, 3200] {
            p.opened_at(t);
            p.ended_at(t);
            waits(&p, t, nominal);
        }
        // Open 9 s is not yet healthy.
        p.opened_at(t);
        p.ended_at(t + s(9));
        waits(&p, t + s(9), 6400);
        // A stream that stays open 10 s proves the server healthy: the
        // next resume goes at once and the backoff starts over.
        p.opened_at(t);
        p.ended_at(t + s(10));
        assert_eq!(p.request_at(true, t + s(10)), None);
        p.opened_at(t);
        p.ended_at(t);
        waits(&p, t, 200);
        // A healthy stream that then fails: one short wait, and the
        // failures after it grow again (the old stream resets only once).
        p.opened_at(t);
        p.ended_at(t + s(60));
        assert!(!p.errored());
        waits(&p, t + s(60), 200);
        assert!(!p.errored());
        waits(&p, t + s(61), 400);
    }

    /// A body that never yields (a peer that went silent).
    struct Silent;

    impl hyper::body::Body for Silent {
        type Data = hyper::body::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame, Self::Error>>> {
            Poll::Pending
        }
    }

    // Real time, kept short: tokio's paused clock needs a feature meshca
    // does not build with.
    const IDLE: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_silent_stream_ends_after_the_idle_timeout_and_a_silent_list_fails() {
        use http_body_util::BodyExt;
        let p = Arc::new(probe_idle(None, IDLE));
        p.opened();
        let started = Instant::now();
        let mut stream = Idle::new(Silent, p.clone(), true);
        assert!(stream.frame().await.is_none(), "the watch stream ends");
        let took = started.elapsed();
        assert!(took >= IDLE && took < IDLE * 5, "{took:?}");
        assert_eq!(restarts(&p.metrics, "idle"), 1);
        // The stream just ended: the next error the watcher reports is a
        // real one, to be counted as such.
        assert!(!p.errored());
        let mut list = Idle::new(Silent, p.clone(), false);
        let e = list.frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no data"), "{e}");
        assert_eq!(restarts(&p.metrics, "idle"), 2);
        // The list failed: its error is the idle timeout, counted once.
        assert!(p.errored());
        assert!(!p.errored());
    }

    #[tokio::test]
    async fn data_keeps_a_stream_alive() {
        use http_body_util::BodyExt;
        let p = Arc::new(probe_idle(None, IDLE));
        let (tx, rx) = tokio::sync::mpsc::channel::<hyper::body::Bytes>(1);
        let frames =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
                Ok::<_, std::convert::Infallible>(Frame::data(b))
            });
        let mut body = Idle::new(http_body_util::StreamBody::new(frames), p.clone(), true);
        let feeder = tokio::spawn(async move {
            // A bookmark every IDLE/3, six times (twice the idle timeout
            // in all); then silence.
            for _ in 0..6 {
                tokio::time::sleep(IDLE / 3).await;
                tx.send("{}\n".into()).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        let started = Instant::now();
        let mut n = 0;
        while body.frame().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 6);
        assert!(started.elapsed() >= IDLE * 3, "{:?}", started.elapsed());
        assert_eq!(restarts(&p.metrics, "idle"), 1);
        feeder.abort();
    }
}
