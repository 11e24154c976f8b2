//! Kubernetes watches and the shared-state Secret against a fake API
//! server that misbehaves as real ones do (tests/support/kubeapi.rs): a
//! watch whose connection went silent (a dead peer behind a NAT: no FIN, no
//! RST, no bookmark) is abandoned after the idle timeout and a change made
//! meanwhile still arrives, while bookmarks keep a quiet healthy watch open;
//! a list the server accepts and never answers is abandoned the same way;
//! a server that answers watches 200 and closes them at once is retried
//! with growing delays, not in a tight loop; and a stalled read of the
//! state Secret holds up neither a rotation step (the background re-read
//! holds no lock while it waits) nor, for longer than its deadline, the
//! step's own read.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use support::*;

const STATE: &str = "/api/v1/namespaces/meshca/secrets/meshca-ca";

struct Cluster {
    dir: tempfile::TempDir,
    api: std::sync::Arc<support::kubeapi::Store>,
    kc: std::path::PathBuf,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let signer = meshca::authn::devtoken::DevSigner::from_pem(
        &meshca::ca::CaKey::generate_p256().unwrap().to_pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("jwks.json"), signer.jwks()).unwrap();
    Cluster { dir, api, kc }
}

/// A replica sharing its CA through Secret `meshca-ca`, with the given
/// watch idle timeout and state poll period.
async fn replica(c: &Cluster, name: &str, idle: Duration, poll: Duration) -> Ca {
    let kc = c.kc.clone();
    let jwks = c.dir.path().join("jwks.json");
    let name = name.to_string();
    Ca::start_with(move |cfg| {
        cfg.kubernetes.kubeconfig = Some(kc);
        cfg.authn.jwks_file = Some(jwks);
        cfg.authn.authn_order = vec![meshca::config::AuthnSource::Jwks];
        cfg.kubernetes.state_secret = Some("meshca-ca".into());
        cfg.kubernetes.propagation_report_interval = Duration::from_millis(200);
        cfg.kubernetes.state_poll_interval = poll;
        cfg.kubernetes.watch_idle_timeout = idle;
        cfg.replica = name;
        cfg.trust.propagation_wait = Duration::from_secs(0);
    })
    .await
}

fn restarts(ca: &Ca, resource: &str, reason: &str) -> f64 {
    ca.metric(&format!(
        "meshca_kubernetes_watch_restarts_total{{resource=\"{resource}\",reason=\"{reason}\"}}"
    ))
}

async fn until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    wait_until(what, limit, || std::future::ready(f())).await;
}

/// Before: the watch of the state Secret waited on a silent connection
/// until kube-runtime's own timeout (290 s + 5 s), so b saw a's rotation
/// only at its next poll. After: the watch is abandoned after the idle
/// timeout and re-established, and the change arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_after_a_watch_went_silent_arrives_within_the_idle_timeout() {
    let c = cluster().await;
    // Quiet but healthy watches get a bookmark every 200 ms.
    c.api.set_bookmark_interval(Duration::from_millis(200));
    // Ten bookmark periods: a loaded test machine does not starve a
    // healthy watch into an idle timeout.
    let idle = Duration::from_secs(2);
    // The poll is out of the picture: only the watch can bring the change.
    let hour = Duration::from_secs(3600);
    let a = replica(&c, "a", idle, hour).await;
    let b = replica(&c, "b", idle, hour).await;
    until("every watch is open", Duration::from_secs(5), || {
        // a and b: the state Secret and the propagation reports.
        c.api.watches_opened.load(SeqCst) >= 4
    })
    .await;
    // Real time, two idle timeouts: bookmarks keep quiet watches open.
    tokio::time::sleep(idle * 2).await;
    assert!(c.api.bookmarks_sent.load(SeqCst) >= 4);
    assert_eq!(
        restarts(&b, "secrets", "idle"),
        0.0,
        "bookmarks are signs of life"
    );
    assert_eq!(restarts(&b, "secrets", "closed"), 0.0);

    // The connections die silently; then a rotates.
    c.api.silence_open_watches();
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    let changed = Instant::now();
    until(
        "b sees the prepared root through a re-established watch",
        idle + Duration::from_secs(4),
        || b.root_ids().len() == 2,
    )
    .await;
    let took = changed.elapsed();
    eprintln!("the change reached b {took:?} after it was made (idle timeout {idle:?})");
    assert!(restarts(&b, "secrets", "idle") >= 1.0);
    // Abandoned for silence: neither an error nor a clean close.
    assert_eq!(restarts(&b, "secrets", "error"), 0.0);
    assert_eq!(restarts(&b, "secrets", "closed"), 0.0);
}

/// Before: kube-runtime resumes a watch that ended cleanly at once, so a
/// server (or proxy) that answers every watch 200 and closes it got a
/// tight loop of watch requests. After: a stream that did not stay open
/// for a while is no success, even when it delivered an event; each
/// resume waits longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_closed_at_once_is_retried_with_growing_delays() {
    let c = cluster().await;
    c.api.close_watches.store(true, SeqCst);
    let a = replica(&c, "a", Duration::from_secs(180), Duration::from_secs(3600)).await;
    until(
        "both watches were closed at once",
        Duration::from_secs(5),
        || c.api.watches_closed_at_once.load(SeqCst) >= 2,
    )
    .await;
    // Someone edits the state Secret every 100 ms, so most resumed watches
    // of it deliver an event before they close: one event is no sign of
    // health either.
    let api = c.api.clone();
    let editor = tokio::spawn(async move {
        for i in 0.. {
            let mut s = api
                .get("/api/v1/namespaces/meshca/secrets", "meshca-ca")
                .unwrap();
            s["metadata"]["annotations"] = serde_json::json!({"example.com/edit": i.to_string()});
            api.put("/api/v1/namespaces/meshca/secrets", "meshca-ca", s);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let from = c.api.watches_closed_at_once.load(SeqCst);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let n = c.api.watches_closed_at_once.load(SeqCst) - from;
    editor.abort();
    eprintln!("{n} watch requests in {window:?} against a server closing every watch at once");
    // Two watches, each waiting 0.1-0.2 s, 0.2-0.4 s, … (doubling): at
    // most 6 each in 3 s. A tight loop makes thousands.
    assert!(n <= 12, "{n} watch requests in {window:?}");
    assert!(n >= 2, "the watches are still retried ({n})");
    let closed = restarts(&a, "secrets", "closed") + restarts(&a, "configmaps", "closed");
    assert!(
        closed >= n as f64,
        "every retry is counted as closed ({closed})"
    );

    // The server recovers: the next retry opens watches that stay.
    c.api.close_watches.store(false, SeqCst);
    let opened = c.api.watches_opened.load(SeqCst);
    until(
        "the watches are open again",
        Duration::from_secs(10),
        || c.api.watches_opened.load(SeqCst) >= opened + 2,
    )
    .await;
}

/// Before: the background re-read of the state Secret held the rotation
/// steps lock across its GET, which had no deadline: one stalled GET hung
/// every later step (and the admin API answering it) for good. After: the
/// re-read reads without the lock, and every call for the Secret gives up
/// after its deadline with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_state_read_holds_up_no_rotation_step() {
    let c = cluster().await;
    let a = replica(
        &c,
        "a",
        Duration::from_secs(180),
        Duration::from_millis(200),
    )
    .await;
    *c.api.stall_gets.lock().unwrap() = Some((STATE.into(), 1));
    until(
        "the re-read's GET is stalled",
        Duration::from_secs(5),
        || c.api.gets_stalled.load(SeqCst) == 1,
    )
    .await;
    let started = Instant::now();
    // Well under the 10 s deadline the re-read's GET will hit.
    let (code, body) = tokio::time::timeout(Duration::from_secs(5), a.rotation("prepare", "{}"))
        .await
        .expect("the step answers while the re-read's GET hangs");
    assert_eq!(code, 200, "{body}");
    eprintln!("the step answered in {:?}", started.elapsed());
    assert_eq!(a.root_ids().len(), 2);

    // Every read stalls now: the step's own read gives up after its
    // deadline (10 s) and the operator gets a sentence, not a hang.
    *c.api.stall_gets.lock().unwrap() = Some((STATE.into(), usize::MAX));
    let started = Instant::now();
    let (code, body) = tokio::time::timeout(Duration::from_secs(20), a.rotation("activate", "{}"))
        .await
        .expect("the step answers within its read's deadline");
    eprintln!(
        "with every read stalled the step answered {code} in {:?}: {body}",
        started.elapsed()
    );
    assert_ne!(code, 200, "{body}");
    assert!(
        body.contains("reading Secret meshca/meshca-ca: no answer from the API server within 10s"),
        "{body}"
    );
    assert_eq!(a.root_ids().len(), 2, "nothing changed");
}

/// The idle timeout also bounds the wait for an answer: a list (or watch)
/// request the server accepts and never answers is abandoned and retried.
/// Before: b's watch of the state Secret waited for its first list
/// forever, so a's rotation never reached it (the poll being off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_is_never_answered_is_abandoned_after_the_idle_timeout() {
    let c = cluster().await;
    c.api.set_bookmark_interval(Duration::from_millis(200));
    let hour = Duration::from_secs(3600);
    let a = replica(&c, "a", Duration::from_secs(180), hour).await;
    until("a's watches are open", Duration::from_secs(5), || {
        c.api.watches_opened.load(SeqCst) >= 2
    })
    .await;
    // The next list (or watch) of the Secrets collection is never answered.
    *c.api.stall_gets.lock().unwrap() = Some(("/api/v1/namespaces/meshca/secrets".into(), 1));
    let idle = Duration::from_secs(2);
    let b = replica(&c, "b", idle, hour).await;
    until("b's list is stalled", Duration::from_secs(5), || {
        c.api.gets_stalled.load(SeqCst) == 1
    })
    .await;
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    until(
        "b sees the prepared root once its list is retried",
        idle + Duration::from_secs(4),
        || b.root_ids().len() == 2,
    )
    .await;
    assert_eq!(restarts(&b, "secrets", "idle"), 1.0);
    assert_eq!(restarts(&b, "secrets", "error"), 0.0);
}
