//! Leader election against the faults of a real API server
//! (tests/support/kubeapi.rs): a leader whose Lease calls stall, or are
//! throttled with `429 TooManyRequests`, steps down within its renew
//! deadline and strictly before a standby may take over — never two
//! leaders; a short throttle does not flap leadership; replicas whose
//! clocks are 15 s off neither take a healthy Lease nor wait 15 s too long
//! for a dead one; and a `serve --kubernetes` process stopped with SIGTERM
//! hands the Lease back (and deletes its propagation report) before it
//! exits, with the failover times measured against SIGKILL.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meshca::config::PublishConfig;
use serde_json::Value;
use support::kubeapi::{kubeconfig_for, Match, Store, Throttle};
use support::*;
use tokio::sync::watch;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/meshca/leases";
const CONFIGMAPS: &str = "/api/v1/namespaces/meshca/configmaps";
/// The token of the kubeconfig [`support::kubeapi::start`] writes.
const FIRST: &str = "meshca-sa-token";

/// An in-process replica electing over Lease `meshca-leader`.
async fn replica(kc: &Path, name: &str, lease: Duration) -> Ca {
    let kc = kc.to_path_buf();
    let name = name.to_string();
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.publish = Some(PublishConfig {
            namespace_labels: [("mesh".to_string(), "on".to_string())]
                .into_iter()
                .collect(),
            resync: Duration::from_secs(3600),
            lease: "meshca-leader".into(),
            lease_duration: lease,
        });
        c.replica = name;
    })
    .await
}

fn leading(ca: &Ca) -> watch::Receiver<bool> {
    ca.running.leading.clone().unwrap()
}

fn is_leading(ca: &Ca) -> bool {
    *ca.running.leading.as_ref().unwrap().borrow()
}

fn holder(api: &Store) -> Option<String> {
    api.get(LEASES, "meshca-leader")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

async fn until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    wait_until(what, limit, || std::future::ready(f())).await;
}

/// Every instant at which more than one replica said it leads: on each
/// change of any replica's published leadership, all of them are read at
/// once (under one lock), so an overlap is seen when it begins.
struct Overlaps {
    seen: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl Overlaps {
    fn track(replicas: &[&Ca]) -> Overlaps {
        let all: Arc<Vec<watch::Receiver<bool>>> =
            Arc::new(replicas.iter().map(|r| leading(r)).collect());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        for i in 0..all.len() {
            let (all, seen) = (all.clone(), seen.clone());
            let mut rx = all[i].clone();
            tokio::spawn(async move {
                loop {
                    rx.borrow_and_update();
                    {
                        let mut seen = seen.lock().unwrap();
                        let now: Vec<bool> = all.iter().map(|r| *r.borrow()).collect();
                        if now.iter().filter(|l| **l).count() > 1 {
                            seen.push(format!("{now:?} at {:?}", started.elapsed()));
                        }
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        Overlaps { seen, started }
    }

    fn assert_none(&self) {
        let seen = self.seen.lock().unwrap();
        assert!(
            seen.is_empty(),
            "two replicas led at once (after {:?}): {seen:?}",
            self.started.elapsed()
        );
    }
}

/// Waits until `ca` stops leading; returns when (it must within `limit`).
async fn stops_leading(ca: &Ca, limit: Duration) -> Instant {
    let mut rx = leading(ca);
    tokio::time::timeout(limit, rx.wait_for(|l| !*l))
        .await
        .expect("stepped down in time")
        .unwrap();
    Instant::now()
}

/// A leader whose Lease GETs and PUTs hang (accepted, never answered)
/// publishes `leading=false` within its renew deadline (2 s of a 3 s
/// Lease), and the standby takes over only after that: at no instant do
/// both lead. Before the fix the hung round kept the leader "leading"
/// forever while the standby took the expired Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_calls_stall_steps_down_before_the_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let lease = Duration::from_secs(3);
    let a = replica(&kc, "replica-a", lease).await;
    until("replica-a leads", Duration::from_secs(10), || {
        is_leading(&a)
    })
    .await;
    let b = replica(&kubeconfig_for(&kc, "token-b"), "replica-b", lease).await;
    let overlaps = Overlaps::track(&[&a, &b]);
    // b sees a renew for a while and stays a standby.
    tokio::time::sleep(lease + Duration::from_millis(500)).await;
    assert!(is_leading(&a) && !is_leading(&b));

    api.stalled.lock().unwrap().push(Match::from(FIRST, LEASES));
    let stalled = Instant::now();
    let stepped_down = stops_leading(&a, Duration::from_secs(10)).await;
    let after = stepped_down - stalled;
    println!("the stalled leader stepped down {after:?} after its calls began to hang");
    // The renew deadline (2 s) counts from the last renewal sent, which
    // was before the stall; 400 ms for a loaded machine's scheduling.
    assert!(after <= Duration::from_millis(2400), "{after:?}");
    until("replica-b takes over", Duration::from_secs(10), || {
        is_leading(&b)
    })
    .await;
    let took = stalled.elapsed();
    println!("replica-b led {took:?} after the leader's calls began to hang (3 s lease)");
    assert_eq!(holder(&api).as_deref(), Some("replica-b"));
    overlaps.assert_none();
    assert!(!is_leading(&a), "the stalled replica stays a standby");
    assert_eq!(a.metric("meshca_kubernetes_leader"), 0.0);
    assert_eq!(b.metric("meshca_kubernetes_leader"), 1.0);
}

/// The API server throttles the leader (`429`, `Retry-After: 1`). Two
/// refused renewals in a row (2 s, within the 4 s renew deadline of a 6 s
/// Lease): the leader retries and keeps leading, the standby never leads.
/// Throttled for good: the leader steps down within its renew deadline and
/// the standby takes over after that, never both at once. Before the fix
/// kube's own retry slept through the throttling with `leading` still true
/// while the standby took the expired Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_renewals_neither_flap_leadership_nor_make_two_leaders() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let lease = Duration::from_secs(6);
    let a = replica(&kc, "replica-a", lease).await;
    until("replica-a leads", Duration::from_secs(10), || {
        is_leading(&a)
    })
    .await;
    let b = replica(&kubeconfig_for(&kc, "token-b"), "replica-b", lease).await;
    let overlaps = Overlaps::track(&[&a, &b]);
    let mut a_rx = leading(&a);
    a_rx.borrow_and_update();

    api.throttled.lock().unwrap().push(Throttle {
        on: Match::from(FIRST, LEASES).method("PUT"),
        count: 2,
        retry_after: 1,
    });
    until(
        "both renewals were throttled",
        Duration::from_secs(10),
        || {
            api.throttled_served
                .load(std::sync::atomic::Ordering::SeqCst)
                == 2
        },
    )
    .await;
    let renewed = || {
        api.get(LEASES, "meshca-leader").unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let version = renewed();
    until("a renews again", Duration::from_secs(5), || {
        renewed() != version
    })
    .await;
    // A whole lease duration more: no flap on either side.
    tokio::time::sleep(lease).await;
    assert!(!a_rx.has_changed().unwrap(), "replica-a never stepped down");
    assert!(is_leading(&a) && !is_leading(&b));
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));

    api.throttled.lock().unwrap().push(Throttle {
        on: Match::from(FIRST, LEASES),
        count: usize::MAX,
        retry_after: 1,
    });
    let throttled = Instant::now();
    let after = stops_leading(&a, Duration::from_secs(15)).await - throttled;
    println!("the throttled leader stepped down {after:?} after the throttling began");
    assert!(after <= Duration::from_millis(4400), "{after:?}");
    until("replica-b takes over", Duration::from_secs(15), || {
        is_leading(&b)
    })
    .await;
    assert_eq!(holder(&api).as_deref(), Some("replica-b"));
    overlaps.assert_none();
}

/// Replica b's clock is 15 s ahead, c's 15 s behind (the fake shifts the
/// Lease times they write and read). b must not take a's healthy Lease
/// because its `renewTime` looks 15 s old; once a's calls hang, a steps
/// down and a standby takes over within a lease duration and a few rounds
/// — and when that one hangs too, c takes over as fast, not 15 s (or 30 s)
/// late because renewTime looks to lie in its future. Never two leaders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_neither_take_a_healthy_lease_nor_delay_failover() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    {
        let mut skew = api.skew.lock().unwrap();
        skew.insert("token-b".into(), 15_000);
        skew.insert("token-c".into(), -15_000);
    }
    let lease = Duration::from_secs(6);
    let a = replica(&kc, "replica-a", lease).await;
    until("replica-a leads", Duration::from_secs(10), || {
        is_leading(&a)
    })
    .await;
    let b = replica(&kubeconfig_for(&kc, "token-b"), "replica-b", lease).await;
    let c = replica(&kubeconfig_for(&kc, "token-c"), "replica-c", lease).await;
    let overlaps = Overlaps::track(&[&a, &b, &c]);
    // More than a lease duration plus a round: b (ahead) would have taken
    // the Lease at its first look if it trusted renewTime.
    tokio::time::sleep(lease + Duration::from_secs(2)).await;
    assert!(is_leading(&a) && !is_leading(&b) && !is_leading(&c));
    assert_eq!(holder(&api).as_deref(), Some("replica-a"));
    // The skew is real: b wrote nothing, but reads renewTime 15 s behind.
    overlaps.assert_none();

    // a hangs: a standby takes over once a's last renewal, as it observed
    // it, is a lease duration old (plus at most a round and a retry).
    api.stalled.lock().unwrap().push(Match::from(FIRST, LEASES));
    let hung = Instant::now();
    until("a standby takes over", Duration::from_secs(15), || {
        is_leading(&b) || is_leading(&c)
    })
    .await;
    let took = hung.elapsed();
    println!("failover with skewed standbys took {took:?} (6 s lease)");
    assert!(took <= Duration::from_secs(10), "{took:?}");
    let (next, next_token, last) = if is_leading(&b) {
        (&b, "token-b", &c)
    } else {
        (&c, "token-c", &b)
    };
    // And the other skewed standby replaces that one as fast.
    api.stalled
        .lock()
        .unwrap()
        .push(Match::from(next_token, LEASES));
    let hung = Instant::now();
    until(
        "the last standby takes over",
        Duration::from_secs(15),
        || is_leading(last),
    )
    .await;
    let took = hung.elapsed();
    println!("second failover with skewed clocks took {took:?} (6 s lease)");
    assert!(took <= Duration::from_secs(10), "{took:?}");
    assert!(!is_leading(next) && !is_leading(&a));
    overlaps.assert_none();
    // What the skewed writer wrote really is 15 s off (the fake is not a
    // no-op): the record's renewTime is far from the true time.
    let renew: k8s_openapi::jiff::Timestamp = api.get(LEASES, "meshca-leader").unwrap()["spec"]
        ["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let off = renew.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(
        off.as_secs().abs() >= 13,
        "renewTime {renew} is {off:?} off"
    );
}

fn lease_json(api: &Store) -> Value {
    api.get(LEASES, "meshca-leader").unwrap()
}

/// Three `meshca serve --kubernetes` processes (default 15 s Lease). The
/// leader stopped with SIGTERM while the API server answers it slowly has,
/// by the time it exited, handed the Lease back (no holder, a 1 s
/// duration) and deleted its propagation report; another replica leads
/// well within the lease duration. Then the
/// new leader is SIGKILLed: the last one takes over only once the Lease,
/// as it observed it, expired. Both failover times are printed (see
/// docs/kubernetes.md, "High availability").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_lease_over_before_exit_and_sigkill_waits_for_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let start = |name: &'static str, kc: std::path::PathBuf| {
        let data = dir.path().join(name);
        tokio::task::spawn_blocking(move || {
            support::spawn_serve(
                &data,
                &[
                    "--kubernetes",
                    "--kubeconfig",
                    kc.to_str().unwrap(),
                    "--replica-name",
                    name,
                ],
            )
        })
    };
    let r1 = start("r1", kc.clone()).await.unwrap();
    until("r1 leads", Duration::from_secs(20), || {
        holder(&api).as_deref() == Some("r1")
    })
    .await;
    let r2 = start("r2", kubeconfig_for(&kc, "token-r2")).await.unwrap();
    let r3 = start("r3", kubeconfig_for(&kc, "token-r3")).await.unwrap();
    let report = |r: &str| api.get(CONFIGMAPS, &format!("meshca-propagation-{r}"));
    until("every replica reports", Duration::from_secs(20), || {
        ["r1", "r2", "r3"].iter().all(|r| report(r).is_some())
    })
    .await;

    // An API server under load: each of r1's calls is answered 400 ms late,
    // so the hand-back (a GET and a PUT) and the report's deletion take
    // about a second. Shutdown must wait for them; a process that exits
    // at once leaves both behind.
    api.slow
        .lock()
        .unwrap()
        .push((Match::from(FIRST, "/"), Duration::from_millis(400)));
    let mut r1 = r1;
    support::signal(&r1.child, "TERM");
    let termed = Instant::now();
    let status = tokio::task::spawn_blocking(move || r1.child.wait().unwrap())
        .await
        .unwrap();
    let exited = termed.elapsed();
    assert!(status.success(), "{status:?}");
    // Checked at exit, before the survivors could have touched the Lease:
    // it is handed back, or already taken by the next replica.
    let l = lease_json(&api);
    let handed = l["spec"]["holderIdentity"].as_str().unwrap_or("");
    assert_ne!(handed, "r1", "r1 exited still holding the Lease: {l}");
    if handed.is_empty() {
        assert_eq!(l["spec"]["leaseDurationSeconds"], 1, "{l}");
    }
    assert!(report("r1").is_none(), "r1 exited leaving its report");
    until("a survivor leads", Duration::from_secs(15), || {
        matches!(holder(&api).as_deref(), Some("r2" | "r3"))
    })
    .await;
    let sigterm_failover = termed.elapsed();
    println!("SIGTERM: r1 exited after {exited:?}; a survivor held the Lease {sigterm_failover:?} after the signal (15 s lease)");
    assert!(
        sigterm_failover < Duration::from_secs(6),
        "well under the 15 s lease: {sigterm_failover:?}"
    );

    let next = holder(&api).unwrap();
    let (mut dead, mut survivor, last) = if next == "r2" {
        (r2, r3, "r3")
    } else {
        (r3, r2, "r2")
    };
    support::signal(&dead.child, "KILL");
    let killed = Instant::now();
    dead.child.wait().unwrap();
    until(
        "the last replica takes over",
        Duration::from_secs(40),
        || holder(&api).as_deref() == Some(last),
    )
    .await;
    let sigkill_failover = killed.elapsed();
    println!("SIGKILL: the last replica held the Lease {sigkill_failover:?} after the signal (15 s lease)");
    // Not before the dead holder's last renewal (at most a retry period,
    // 3 s, before the kill) had been observed for a whole lease duration.
    assert!(
        sigkill_failover >= Duration::from_secs(12),
        "{sigkill_failover:?}"
    );
    assert!(
        sigkill_failover <= Duration::from_secs(22),
        "{sigkill_failover:?}"
    );
    support::signal(&survivor.child, "KILL");
    survivor.child.wait().unwrap();
}

/// An operator forces a failover the usual ways, `kubectl delete lease`
/// and `kubectl edit` clearing `holderIdentity`, right after a renewal. The
/// old leader's belief lasts until its renew deadline, so nobody may create
/// or take the Lease at once: before the fix the standby did, and both led
/// for about 2.6 s (15 s Lease). Now nobody leads twice, and a leader is
/// back within a lease duration and a few rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_cleared_lease_never_makes_two_leaders() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let lease = Duration::from_secs(3);
    let a = replica(&kc, "replica-a", lease).await;
    // A first Lease is created only after it was seen absent for a lease
    // duration.
    until("replica-a leads", Duration::from_secs(20), || {
        is_leading(&a)
    })
    .await;
    let b = replica(&kubeconfig_for(&kc, "token-b"), "replica-b", lease).await;
    let overlaps = Overlaps::track(&[&a, &b]);
    let rv = |api: &Store| {
        api.get(LEASES, "meshca-leader")
            .map(|l| l["metadata"]["resourceVersion"].clone())
    };
    for edit in ["delete", "clear the holder", "delete", "clear the holder"] {
        let before = rv(&api);
        until("the leader renews", Duration::from_secs(10), || {
            rv(&api) != before
        })
        .await;
        if edit == "delete" {
            api.remove(LEASES, "meshca-leader");
        } else {
            let mut l = api.get(LEASES, "meshca-leader").unwrap();
            l["spec"]["holderIdentity"] = Value::Null;
            api.put(LEASES, "meshca-leader", l);
        }
        until(
            &format!("a leader again after the operator's {edit}"),
            Duration::from_secs(15),
            || holder(&api).is_some_and(|h| !h.is_empty()) && (is_leading(&a) || is_leading(&b)),
        )
        .await;
        overlaps.assert_none();
    }
    overlaps.assert_none();
}
