//! Bundle watchers must not be able to hold rotation hostage (issue 11,
//! part 3). Each test reproduces the attack against a real server: a
//! `WatchTrustBundle` stream opened with an HTTP/2 stream window of 0, so
//! the server can never hand it a message.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use meshca::proto::meshca as pb;
use support::Ca;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// A new connection to `ca`, from `local` (any 127.x address), optionally
/// granting the server no flow-control window (a client that never reads).
async fn connect(ca: &Ca, zero_window: bool, local: Option<IpAddr>) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.bundle_pem()))
        .domain_name(ca.running.server_name.clone());
    let mut ep = Endpoint::from_shared(format!("https://{}", ca.addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .local_address(local);
    if zero_window {
        ep = ep.initial_stream_window_size(0);
    }
    ep.connect().await.expect("connects")
}

/// Opens a bundle stream on `ch`, with `token` as `authorization: Bearer`.
async fn watch(
    ch: &Channel,
    token: Option<&str>,
) -> Result<tonic::Streaming<pb::TrustBundle>, tonic::Status> {
    let mut req = tonic::Request::new(pb::WatchTrustBundleRequest {});
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    pb::identity_client::IdentityClient::new(ch.clone())
        .watch_trust_bundle(req)
        .await
        .map(|r| r.into_inner())
}

/// Waits until `rotation status` shows `f` true of its propagation block.
async fn until_status(ca: &Ca, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let st = ca.rotation_status().await;
        if f(&st["propagation"]) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: {}",
            st["propagation"]
        );
        // Poll interval (deadline above).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sample of this server's own registry.
fn metric(ca: &Ca, name_and_labels: &str) -> u64 {
    ca.metric(name_and_labels) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_watcher_that_never_reads_does_not_block_activation() {
    let ca = Ca::start_with(|c| c.trust.propagation_wait = Duration::ZERO).await;
    // The attack: an anonymous stream with a window of 0.
    let stuck_ch = connect(&ca, true, None).await;
    let _stuck = watch(&stuck_ch, None)
        .await
        .expect("anonymous watching is allowed");
    // A well-behaved anonymous watcher still gets every version.
    let good_ch = connect(&ca, false, None).await;
    let mut good = watch(&good_ch, None).await.unwrap();
    let v0 = good.message().await.unwrap().unwrap().version;
    until_status(&ca, "both streams are open", |p| {
        p["anonymous_watchers"].as_u64().unwrap_or(0) + p["watchers"].as_u64().unwrap_or(0) == 2
    })
    .await;

    let (code, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = ca.rotation("activate", "{}").await;
    assert_eq!(
        code, 200,
        "anonymous watchers must not count for the gate: {body}"
    );
    let p = &ca.rotation_status().await["propagation"];
    assert_eq!(
        (p["clients"].as_u64(), p["watchers"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
    assert_eq!(p["anonymous_watchers"], 2, "reported, not counted: {p}");
    let next = tokio::time::timeout(Duration::from_secs(5), good.message())
        .await
        .expect("the update arrives")
        .unwrap()
        .unwrap();
    assert!(next.version > v0 && next.roots.len() == 2, "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_authenticated_watcher_blocks_activation_until_it_stalls_out() {
    const STALL: Duration = Duration::from_secs(5);
    let ca = Ca::start_with(|c| {
        c.trust.propagation_wait = Duration::ZERO;
        c.api.limits.watch.stall_timeout = STALL;
    })
    .await;
    let token = ca.token("shop", "web", "meshca");
    let stalled_before = metric(&ca, "meshca_bundle_watch_refused_total{reason=\"stalled\"}");
    let closed_before = metric(
        &ca,
        "meshca_grpc_connections_closed_total{reason=\"stalled\"}",
    );

    let ch = connect(&ca, true, None).await;
    let opened = Instant::now();
    let mut stream = watch(&ch, Some(&token)).await.expect("authenticated watch");
    until_status(&ca, "the authenticated stream is tracked", |p| {
        p["watchers"] == 1
    })
    .await;
    let (code, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    // The gate's purpose: a known client that has not got the new root
    // blocks activation...
    let (code, body) = ca.rotation("activate", "{}").await;
    assert!(
        opened.elapsed() < STALL,
        "the machine is too slow for this test's timing"
    );
    assert_eq!(code, 409, "a lagging authenticated watcher blocks: {body}");
    assert!(body.contains("0/1"), "{body}");
    let st = ca.rotation_status().await;
    assert!(
        st["propagation"]["lagging"]
            .to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{st}"
    );

    // ...but not forever: after watch_stall_timeout its stream is closed.
    let end = tokio::time::timeout(STALL * 3, stream.message())
        .await
        .expect("the stalled stream is closed");
    assert!(end.is_err(), "the connection was cut: {end:?}");
    assert!(opened.elapsed() >= STALL, "not before the timeout");
    let (code, body) = ca.rotation("activate", "{}").await;
    assert_eq!(code, 200, "a stalled watcher stops counting: {body}");
    assert_eq!(
        metric(&ca, "meshca_bundle_watch_refused_total{reason=\"stalled\"}") - stalled_before,
        1
    );
    assert_eq!(
        metric(
            &ca,
            "meshca_grpc_connections_closed_total{reason=\"stalled\"}"
        ) - closed_before,
        1
    );

    // It reconnects and still does not read: it does not count again...
    let ch = connect(&ca, true, None).await;
    let _again = watch(&ch, Some(&token)).await.unwrap();
    // Real time: a negative check (the reconnected stalled watcher is not counted).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = &ca.rotation_status().await["propagation"];
    assert_eq!(
        (p["clients"].as_u64(), p["watchers"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
    // ...until it catches up.
    let ch = connect(&ca, false, None).await;
    let mut good = watch(&ch, Some(&token)).await.unwrap();
    good.message().await.unwrap().unwrap();
    until_status(&ca, "counted again once caught up", |p| {
        p["clients"] == 1 && p["acked"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_watchers_are_capped_per_address_and_in_total() {
    let ca = Ca::start_with(|c| {
        c.api.limits.watch.anonymous_per_ip = 2;
        c.api.limits.watch.anonymous_max = 3;
    })
    .await;
    let m = |r: &str| {
        metric(
            &ca,
            &format!("meshca_bundle_watch_refused_total{{reason=\"{r}\"}}"),
        )
    };
    let (per_ip, total, unauth) = (
        m("anonymous_per_ip"),
        m("anonymous_total"),
        m("unauthenticated"),
    );
    let one: IpAddr = "127.0.0.1".parse().unwrap();
    let two: IpAddr = "127.0.0.2".parse().unwrap();
    let a = connect(&ca, false, Some(one)).await;
    let _a1 = watch(&a, None).await.unwrap();
    let _a2 = watch(&a, None).await.unwrap();
    let e = watch(&a, None).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("127.0.0.1") && e.message().contains("watch_anonymous_per_ip"),
        "{}",
        e.message()
    );
    let b = connect(&ca, false, Some(two)).await;
    let _b1 = watch(&b, None).await.unwrap();
    let e = watch(&b, None).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("watch_anonymous_max"),
        "{}",
        e.message()
    );
    // Authenticated watchers are not capped this way, and a bad credential
    // is refused rather than treated as anonymous.
    let token = ca.token("shop", "web", "meshca");
    let mut authed = watch(&b, Some(&token)).await.expect("token watcher");
    assert!(authed.message().await.unwrap().is_some());
    let e = watch(&b, Some("not-a-token")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(m("anonymous_per_ip") - per_ip, 1);
    assert_eq!(m("anonymous_total") - total, 1);
    assert_eq!(m("unauthenticated") - unauth, 1);
    // A closed stream frees its place.
    drop(_a1);
    until_status(&ca, "the closed stream is gone", |p| {
        p["anonymous_watchers"] == 2
    })
    .await;
    watch(&b, None).await.expect("a place was freed");
}
