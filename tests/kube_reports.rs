//! Propagation reports between replicas against the fake API server
//! (tests/support/kubeapi.rs) with the real server's limits: a report of
//! 20,000 clients fits the 1 MiB object limit and is counted by the other
//! replicas; the activation gate refuses (fail closed) while a replica's
//! report is stale or unreadable, naming the replica in the refusal and in
//! `rotation status`; freshness is judged by when the reader observed a
//! change, so a writer whose clock is off is neither ignored nor kept
//! alive; an unchanged report is not rewritten; a stopping replica deletes
//! its report within a bound, even when the API server does not answer.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshca::kubernetes::reports;
use meshca::trust::propagation::Tracker;
use meshca::util::clock::Clock;
use serde_json::json;
use support::*;

const CONFIGMAPS: &str = "/api/v1/namespaces/meshca/configmaps";

async fn until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    wait_until(what, limit, || std::future::ready(f())).await;
}

/// A replica sharing its CA through the state Secret, exchanging reports
/// every `interval`.
async fn replica(kc: &std::path::Path, name: &str, interval: Duration) -> Ca {
    let kc = kc.to_path_buf();
    let name = name.to_string();
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.state_secret = Some("meshca-ca".into());
        c.kubernetes.propagation_report_interval = interval;
        c.kubernetes.state_poll_interval = Duration::from_secs(3600);
        c.replica = name;
        c.trust.propagation_wait = Duration::from_secs(0);
    })
    .await
}

/// Report settings for a replica driven by the test itself.
fn settings(replica: &str, interval: Duration) -> reports::Settings {
    reports::Settings::new(
        "meshca",
        replica,
        interval,
        Arc::new(meshca::util::clock::SystemClock),
    )
}

/// A replica's report loop driven by the test (its tracker filled
/// directly, no gRPC clients): stops when the returned sender flips.
struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    async fn start(kc: &std::path::Path, s: reports::Settings, tracker: Arc<Tracker>) -> Writer {
        let client = meshca::kubernetes::client::connect(kc).await.unwrap();
        Self::with_client(client, s, tracker)
    }

    fn with_client(client: kube::Client, s: reports::Settings, tracker: Arc<Tracker>) -> Writer {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(meshca::metrics::Metrics::new());
        let task = tokio::spawn(reports::run(client, s, tracker, None, rx, metrics));
        Writer { stop, task }
    }

    /// Flips stop; how long `run` took to return (None: not within `limit`).
    async fn stop(self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        self.stop.send_replace(true);
        tokio::time::timeout(limit, self.task)
            .await
            .ok()
            .map(|_| t.elapsed())
    }
}

/// A tracker with `n` renewing clients that have seen bundle `version`.
fn clients(n: usize, version: u64) -> Arc<Tracker> {
    let t = Arc::new(Tracker::default());
    let until = SystemTime::now() + Duration::from_secs(3600);
    for i in 0..n {
        t.certified(
            &format!(
                "spiffe://cluster.local/ns/team-{}/sa/workload-{i} 10.{}.{}.{}",
                i % 97,
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            ),
            version,
            until,
            Some(&"ab".repeat(32)),
        );
    }
    t
}

fn report_of(api: &support::kubeapi::Store, replica: &str) -> Option<serde_json::Value> {
    api.get(CONFIGMAPS, &format!("meshca-propagation-{replica}"))
}

/// `POST /rotation/activate` until it answers 200 or `limit` passes; the
/// last answer.
async fn activate(ca: &Ca) -> (u16, String) {
    ca.rotation("activate", "{}").await
}

// ---- the 1 MiB object limit ------------------------------------------------

/// Before: a report of 20,000 clients (~190 bytes each) was refused with
/// 422 (over 1 MiB), only logged, and the other replica counted nothing of
/// it: its gate activated with 20,000 clients that had not seen the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_clients_on_one_replica_are_counted_by_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let a = replica(&kc, "a", Duration::from_millis(200)).await;
    let t = Instant::now();
    let b = Writer::start(
        &kc,
        settings("b", Duration::from_millis(200)),
        clients(20_000, 1),
    )
    .await;
    until("b's report is stored", Duration::from_secs(10), || {
        report_of(&api, "b").is_some()
    })
    .await;
    let wrote = t.elapsed();
    let cm = report_of(&api, "b").unwrap();
    // What the API server counts against its limit: keys, values, and
    // binaryData decoded.
    let rows = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        cm["binaryData"][reports::ROWS_KEY].as_str().unwrap(),
    )
    .unwrap();
    let header = cm["data"][reports::KEY].as_str().unwrap();
    let size = reports::KEY.len() + header.len() + reports::ROWS_KEY.len() + rows.len();
    assert!(size < support::kubeapi::MAX_DATA_SIZE / 3, "{size} bytes");
    let mut st = a.rotation_status().await;
    let t = Instant::now();
    while st["propagation"]["clients"] != 20_000 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a never counted b's clients: {}",
            st["propagation"]
        );
        // Poll interval (deadline above): reports travel through ConfigMaps.
        tokio::time::sleep(Duration::from_millis(100)).await;
        st = a.rotation_status().await;
    }
    assert_eq!(st["propagation"]["other_replicas"], json!(["b"]));
    // A new root: none of b's 20,000 clients has seen it, so a refuses.
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    let (code, body) = activate(&a).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("0/20000 live clients"), "{body}");
    eprintln!("20,000 clients: report data {size} bytes, first write after {wrote:?}");
    b.stop(Duration::from_secs(10)).await.unwrap();
}

// ---- the gate fails closed --------------------------------------------------

/// Before: a replica whose report stopped changing (it lost the API server,
/// or died without removing it) was dropped after three intervals and the
/// gate counted only the rest: it activated with b's lagging client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_refuses_while_a_replicas_report_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let interval = Duration::from_millis(100);
    let a = replica(&kc, "a", interval).await;
    let b = Writer::start(&kc, settings("b", interval), clients(1, 1)).await;
    wait_until("a counts b's client", Duration::from_secs(10), || async {
        a.rotation_status().await["propagation"]["clients"] == 1
    })
    .await;
    // b can no longer write its report (as if it died, or lost the API).
    api.forbidden
        .lock()
        .unwrap()
        .push(format!("{CONFIGMAPS}/meshca-propagation-b"));
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    // Real time: well past the staleness window of a 100 ms interval.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (code, body) = activate(&a).await;
    assert_eq!(code, 409, "a activated while b's report was stale: {body}");
    assert!(
        body.contains("replica b") && body.contains("stale"),
        "{body}"
    );
    let st = a.rotation_status().await;
    let problems = &st["propagation"]["replica_problems"];
    assert_eq!(problems[0]["replica"], "b", "{st}");
    assert_eq!(problems[0]["problem"], "stale", "{st}");
    // b stops; its report cannot be deleted (still forbidden), and stays
    // refused until an operator deletes it: then b counts as gone.
    assert!(b.stop(Duration::from_secs(10)).await.is_some());
    assert_eq!(activate(&a).await.0, 409);
    api.forbidden.lock().unwrap().clear();
    api.remove(CONFIGMAPS, "meshca-propagation-b").unwrap();
    wait_until(
        "a activates once b's report is gone",
        Duration::from_secs(10),
        || async { activate(&a).await.0 == 200 },
    )
    .await;
}

/// Before: an unreadable report was skipped with a log line, and the gate
/// counted every replica but that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_refuses_while_a_replicas_report_is_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let a = replica(&kc, "a", Duration::from_millis(100)).await;
    api.put(
        CONFIGMAPS,
        "meshca-propagation-c",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "meshca-propagation-c", "namespace": "meshca",
                            "labels": {"meshca.io/propagation-report": "true"}},
               "data": {"report.json": "{\"replica\": \"c\", \"updated\": 17"}}),
    );
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    wait_until("a has read c's report", Duration::from_secs(10), || async {
        a.rotation_status().await["propagation"]["replica_problems"][0]["replica"] == "c"
    })
    .await;
    let (code, body) = activate(&a).await;
    assert_eq!(code, 409, "a activated without c's clients: {body}");
    assert!(
        body.contains("replica c") && body.contains("unreadable"),
        "{body}"
    );
    let st = a.rotation_status().await;
    assert_eq!(
        st["propagation"]["replica_problems"][0]["problem"], "unreadable",
        "{st}"
    );
    // The operator's commands say the same: the table names the replica,
    // the activate command fails with the gate's sentence.
    let cli = |args: &[&str]| {
        let out = meshca_bin()
            .args(["rotation"])
            .args(args)
            .args(["--server", &format!("http://{}", a.running.admin_addr)])
            .args(["--data-dir", a.dir.path().join("data").to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, table) = cli(&["status"]);
    assert!(ok, "{table}");
    assert!(
        table.contains("clients not counted (activation refused): replica c: report unreadable"),
        "{table}"
    );
    assert!(table.contains("REFUSED"), "the next step says so: {table}");
    assert!(!table.contains("safe from"), "{table}");
    let (ok, text) = cli(&["activate"]);
    assert!(
        !ok && text.contains("cannot count every replica's clients (replica c: report unreadable"),
        "{text}"
    );
}

// ---- clock skew ---------------------------------------------------------------

/// Before: freshness was the writer's own `updated` against the reader's
/// clock: a live writer 15 s behind looked older than three intervals and
/// its clients were not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_report_from_a_writer_15s_behind_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let a = replica(&kc, "a", Duration::from_secs(1)).await;
    let now = now_s();
    // What an earlier meshca replica whose clock is 15 s behind writes.
    let report = json!({"replica": "c", "updated": now - 15, "clients": [
        {"key": "spiffe://cluster.local/ns/shop/sa/web 10.0.0.7", "version": 1,
         "live_until": now + 3600, "watching": true}]});
    api.put(
        CONFIGMAPS,
        "meshca-propagation-c",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "meshca-propagation-c", "namespace": "meshca",
                            "labels": {"meshca.io/propagation-report": "true"}},
               "data": {"report.json": report.to_string()}}),
    );
    // Real time: past three 1 s intervals (the old freshness window).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let st = a.rotation_status().await;
    assert_eq!(st["propagation"]["clients"], 1, "{st}");
    assert_eq!(st["propagation"]["other_replicas"], json!(["c"]), "{st}");
}

// ---- polite writes --------------------------------------------------------------

/// Before: every interval rewrote the report, changed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_report_is_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let writes = || api.writes.lock().unwrap().len();
    let tracker = clients(50, 1);
    let b = Writer::start(
        &kc,
        settings("b", Duration::from_millis(100)),
        tracker.clone(),
    )
    .await;
    until("b's report is stored", Duration::from_secs(10), || {
        writes() == 1
    })
    .await;
    // Real time: 25 intervals of 100 ms with nothing changed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let idle = writes();
    // The heartbeat (12 intervals) may rewrite it twice in 2.5 s; no more.
    assert!(
        idle <= 3,
        "{idle} writes of an unchanged report: {:?}",
        api.writes.lock().unwrap()
    );
    // A client sees a new version: one write, within a few intervals.
    tracker.certified(
        "spiffe://cluster.local/ns/team-0/sa/workload-0 10.0.0.0",
        2,
        SystemTime::now() + Duration::from_secs(3600),
        None,
    );
    until("the change is written", Duration::from_secs(2), || {
        writes() > idle
    })
    .await;
    b.stop(Duration::from_secs(10)).await.unwrap();
}

// ---- stopping ------------------------------------------------------------------------

/// A stopping replica deletes its report (it is gone, not stale), promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_deletes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let b = Writer::start(
        &kc,
        settings("b", Duration::from_millis(100)),
        clients(3, 1),
    )
    .await;
    until("b's report is stored", Duration::from_secs(10), || {
        report_of(&api, "b").is_some()
    })
    .await;
    let took = b.stop(Duration::from_secs(10)).await.expect("run returns");
    assert!(report_of(&api, "b").is_none(), "the report was deleted");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// Before: with an API server that accepts and never answers, `run` hung
/// in its final delete (kube's read timeout is minutes), and the shutdown
/// with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_returns_within_a_bound_when_the_api_server_hangs() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn); // accepted, never answered
        }
    });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let b = Writer::with_client(
        client,
        settings("b", Duration::from_millis(100)),
        clients(3, 1),
    );
    // Real time: let it get stuck in its first API calls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let took = b.stop(Duration::from_secs(10)).await;
    let took = took.expect("run returned within 10 s of stop");
    assert!(took < Duration::from_secs(4), "{took:?}");
}

// ---- reports that cannot be published -------------------------------------------

/// A report the API server refuses (here: a lowered object limit, as a
/// 422 for any reason would) is replaced by a small refusal that the other
/// replicas see: they refuse to activate, naming the replica and the
/// server's reason, and the writer says so about itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_the_api_server_refuses_becomes_a_refusal_the_gate_honours() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let a = replica(&kc, "a", Duration::from_millis(100)).await;
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    // From now on (the state Secret is bigger than that too).
    *api.object_limit.lock().unwrap() = Some(2048);
    let tracker = clients(500, 1);
    let b = Writer::start(
        &kc,
        settings("b", Duration::from_millis(100)),
        tracker.clone(),
    )
    .await;
    until("b's refusal is stored", Duration::from_secs(10), || {
        report_of(&api, "b").is_some()
    })
    .await;
    let own = tracker.reports().own_report.unwrap_or_default();
    assert!(
        own.contains("Too long: must have at most 2048 bytes"),
        "{own}"
    );
    // Once a has read b's refusal (activating earlier would find no
    // replica b at all: a report that never existed is not a member).
    wait_until("a reads b's refusal", Duration::from_secs(10), || async {
        a.rotation_status().await["propagation"]["replica_problems"][0]["problem"] == "refused"
    })
    .await;
    let (code, body) = activate(&a).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("replica b: report refused") && body.contains("Too long"),
        "{body}"
    );
    let st = a.rotation_status().await;
    assert_eq!(
        st["propagation"]["replica_problems"][0]["problem"], "refused",
        "{st}"
    );
    // The limit is lifted (or the replica sheds clients): counted again.
    *api.object_limit.lock().unwrap() = None;
    tracker.certified(
        "spiffe://cluster.local/ns/x/sa/new 10.9.9.9",
        1,
        SystemTime::now() + Duration::from_secs(3600),
        None,
    );
    wait_until(
        "a counts b's 501 clients",
        Duration::from_secs(10),
        || async { a.rotation_status().await["propagation"]["clients"] == 501 },
    )
    .await;
    assert_eq!(tracker.reports().own_report, None);
    b.stop(Duration::from_secs(10)).await.unwrap();
}

/// More clients than one ConfigMap holds (~80,000 rows): the writer does
/// not send a report the server would refuse; it publishes a refusal, and
/// the gate refuses rather than count the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_clients_than_one_report_holds_refuse_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let a = replica(&kc, "a", Duration::from_millis(100)).await;
    let tracker = clients(90_000, 1);
    // A longer interval: 90,000 rows are exported at every round.
    let b = Writer::start(
        &kc,
        settings("b", Duration::from_millis(500)),
        tracker.clone(),
    )
    .await;
    until("b's refusal is stored", Duration::from_secs(10), || {
        report_of(&api, "b").is_some()
    })
    .await;
    let own = tracker.reports().own_report.unwrap_or_default();
    assert!(own.contains("90000 clients need a report of"), "{own}");
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    wait_until("a reads b's refusal", Duration::from_secs(10), || async {
        a.rotation_status().await["propagation"]["replica_problems"][0]["problem"] == "refused"
    })
    .await;
    let (code, body) = activate(&a).await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("replica b: report refused") && body.contains("90000 clients"),
        "{body}"
    );
    assert!(
        !api.writes.lock().unwrap().is_empty(),
        "the refusal was written"
    );
    b.stop(Duration::from_secs(10)).await.unwrap();
}

/// A live replica whose report someone deleted writes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_replica_rewrites_its_deleted_report() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let b = Writer::start(
        &kc,
        settings("b", Duration::from_millis(100)),
        clients(3, 1),
    )
    .await;
    until("b's report is stored", Duration::from_secs(10), || {
        report_of(&api, "b").is_some()
    })
    .await;
    api.remove(CONFIGMAPS, "meshca-propagation-b").unwrap();
    until("b's report is back", Duration::from_secs(2), || {
        report_of(&api, "b").is_some()
    })
    .await;
    b.stop(Duration::from_secs(10)).await.unwrap();
}

// ---- clocks ---------------------------------------------------------------------------

/// A test clock at real time + `skew` seconds that can be moved forward.
fn skewed(skew: i64) -> Arc<meshca::util::clock::ManualClock> {
    let now = SystemTime::now();
    let t = if skew >= 0 {
        now + Duration::from_secs(skew as u64)
    } else {
        now - Duration::from_secs(skew.unsigned_abs())
    };
    Arc::new(meshca::util::clock::ManualClock::new(t))
}

fn settings_with(replica: &str, clock: Arc<meshca::util::clock::ManualClock>) -> reports::Settings {
    reports::Settings::new("meshca", replica, Duration::from_millis(100), clock)
}

/// Writers 15 s ahead and 15 s behind the reader are both counted while
/// they write; when one stops writing (without removing its report), the
/// reader finds it stale after the staleness window on the reader's own
/// clock — the writer's clock being ahead keeps nothing alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_writers_are_counted_while_alive_and_stale_once_dead() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let ahead = Writer::start(&kc, settings_with("ahead", skewed(15)), clients(1, 1)).await;
    let behind_clients = Arc::new(Tracker::default());
    behind_clients.certified(
        "spiffe://cluster.local/ns/b/sa/b 10.0.0.2",
        1,
        SystemTime::now() + Duration::from_secs(3600),
        None,
    );
    let behind = Writer::start(&kc, settings_with("behind", skewed(-15)), behind_clients).await;
    let clock = skewed(0);
    let s = settings_with("reader", clock.clone());
    let stale_after = s.stale_after;
    let reader = Arc::new(Tracker::default());
    let r = Writer::start(&kc, s, reader.clone()).await;
    until("the reader counts both", Duration::from_secs(10), || {
        let p = reader.summary(clock.now(), 1);
        p.clients == 2 && p.replica_problems.is_empty()
    })
    .await;
    // "ahead" dies without removing its report.
    api.forbidden
        .lock()
        .unwrap()
        .push(format!("{CONFIGMAPS}/meshca-propagation-ahead"));
    // Not stale while the reader's clock has not passed the window...
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        reader.reports().problems.is_empty(),
        "{:?}",
        reader.reports()
    );
    // ...stale once it has, by the reader's clock alone; "behind" (still
    // writing) is fresh again at its next heartbeat.
    clock.advance(stale_after + Duration::from_secs(1));
    until(
        "the reader finds only 'ahead' stale",
        Duration::from_secs(10),
        || {
            let p = reader.reports().problems;
            p.len() == 1 && p[0].replica == "ahead" && p[0].problem == "stale"
        },
    )
    .await;
    assert_eq!(
        reader.summary(clock.now(), 1).clients,
        1,
        "only behind's client counts"
    );
    for w in [r, behind] {
        w.stop(Duration::from_secs(10)).await.unwrap();
    }
    api.forbidden.lock().unwrap().clear();
    ahead.stop(Duration::from_secs(10)).await.unwrap();
}

/// The leader deletes a report nobody has seen change for an hour, by its
/// own clock; a non-leader does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_deletes_a_report_abandoned_for_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.put(
        CONFIGMAPS,
        "meshca-propagation-gone",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "meshca-propagation-gone", "namespace": "meshca",
                            "labels": {"meshca.io/propagation-report": "true"}},
               "data": {"report.json": json!({"replica": "gone", "updated": 1, "clients": []}).to_string()}}),
    );
    let client = meshca::kubernetes::client::connect(&kc).await.unwrap();
    let start = |leading: bool, clock: Arc<meshca::util::clock::ManualClock>| {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let leader = tokio::sync::watch::channel(leading).1;
        let task = tokio::spawn(reports::run(
            client.clone(),
            settings_with(if leading { "leader" } else { "follower" }, clock),
            Arc::new(Tracker::default()),
            Some(leader),
            rx,
            Arc::new(meshca::metrics::Metrics::new()),
        ));
        Writer { stop, task }
    };
    let (fc, lc) = (skewed(0), skewed(0));
    let follower = start(false, fc.clone());
    let leader = start(true, lc.clone());
    // Real time: a few rounds, so both have observed it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fc.advance(Duration::from_secs(3601));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        report_of(&api, "gone").is_some(),
        "a follower does not delete"
    );
    lc.advance(Duration::from_secs(3500));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(report_of(&api, "gone").is_some(), "not yet an hour");
    lc.advance(Duration::from_secs(101));
    until("the leader deletes it", Duration::from_secs(10), || {
        report_of(&api, "gone").is_none()
    })
    .await;
    for w in [leader, follower] {
        w.stop(Duration::from_secs(10)).await.unwrap();
    }
}

/// Anyone who may create ConfigMaps in the CA's namespace could add a
/// report in another replica's name with no clients. Keyed by the name
/// inside the body, it replaced that replica's 50 clients with none and
/// activation answered 200 (found by a review). A report now speaks only
/// for the replica its ConfigMap is named after; a misnamed one is a
/// problem that holds the gate shut and names the object to delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_forged_in_another_replicas_name_neither_hides_it_nor_opens_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let interval = Duration::from_millis(100);
    let a = replica(&kc, "a", interval).await;
    let b = Writer::start(&kc, settings("b", interval), clients(50, 1)).await;
    wait_until("a counts b's clients", Duration::from_secs(10), || async {
        a.rotation_status().await["propagation"]["clients"] == 50
    })
    .await;
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    assert_eq!(activate(&a).await.0, 409, "b's clients still run version 1");
    // The forger keeps its report fresh, as a live replica would.
    let forger = {
        let api = api.clone();
        tokio::spawn(async move {
            loop {
                api.put(
                    CONFIGMAPS,
                    "meshca-propagation-zzz",
                    json!({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": "meshca-propagation-zzz", "namespace": "meshca",
                                        "labels": {"meshca.io/propagation-report": "true"}},
                           "data": {"report.json": "{\"replica\": \"b\", \"updated\": 17, \"clients\": []}"}}),
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    wait_until(
        "a names the misnamed report",
        Duration::from_secs(10),
        || async {
            let p = &a.rotation_status().await["propagation"]["replica_problems"];
            p.as_array().is_some_and(|ps| {
                ps.iter().any(|x| {
                    x["problem"] == "misnamed"
                        && x["detail"]
                            .as_str()
                            .unwrap_or("")
                            .contains("meshca-propagation-zzz")
                })
            })
        },
    )
    .await;
    let st = a.rotation_status().await;
    assert_eq!(st["propagation"]["clients"], 50, "{st}");
    let (code, body) = activate(&a).await;
    assert_eq!(code, 409, "a forged report opened the gate: {body}");
    forger.abort();
    b.stop(Duration::from_secs(10)).await;
}

/// A heartbeat cut short by the stop can still land on the server, leaving
/// the version the replica remembers behind. Its final delete then failed
/// its precondition (409) and the report stayed, stale, holding the gate
/// shut for an hour (found by a review). It is now deleted all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_deletes_its_report_even_after_a_late_write_landed() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let b = Writer::start(&kc, settings("b", Duration::from_secs(1)), clients(3, 1)).await;
    until("b's report is stored", Duration::from_secs(10), || {
        report_of(&api, "b").is_some()
    })
    .await;
    // The late write: the same report, stored again under a new version.
    let cm = report_of(&api, "b").unwrap();
    let name = cm["metadata"]["name"].as_str().unwrap().to_string();
    api.put(CONFIGMAPS, &name, cm);
    let conflicts = api.conflicts.load(std::sync::atomic::Ordering::SeqCst);
    b.stop(Duration::from_secs(10)).await.expect("run returns");
    assert!(
        report_of(&api, "b").is_none(),
        "the report outlived its replica"
    );
    assert!(
        api.conflicts.load(std::sync::atomic::Ordering::SeqCst) > conflicts,
        "the stale precondition was tried first (the fake checks it)"
    );
}
