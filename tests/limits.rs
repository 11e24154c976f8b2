//! Limits and fairness (issue 11, part 7): the rate limit is per pod with a
//! per-service-account ceiling, and the gRPC listener has a connection cap,
//! a TLS handshake deadline, HTTP/2 keepalive, an idle timeout, a stream cap
//! and a header-size limit. Each test shows the limit acting against a real
//! server (and fails without it).
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshca::proto::meshca as pb;
use serde_json::json;
use support::{csr, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// A sample of this server's own registry.
fn metric(ca: &Ca, name_and_labels: &str) -> u64 {
    ca.metric(name_and_labels) as u64
}

/// A token of shop/web bound to pod `web-N` (its own pod UID).
fn pod_token(ca: &Ca, n: usize) -> String {
    ca.token_with("shop", "web", |c| {
        c["kubernetes.io"]["pod"] = json!({
            "name": format!("web-{n}"),
            "uid": format!("7d3c0f1e-0000-4000-8000-{n:012}"),
        });
    })
}

/// Certifies with each token at once; returns the results in order.
async fn certify_all(ca: &Ca, tokens: Vec<String>) -> Vec<Result<(), tonic::Status>> {
    // A few connections, as separate pods would use.
    let mut chans = Vec::new();
    for _ in 0..4 {
        chans.push(ca.channel().await);
    }
    let tasks: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let ch = chans[i % chans.len()].clone();
            let csr = csr();
            tokio::spawn(async move {
                pb::identity_client::IdentityClient::new(ch)
                    .certify(pb::CertifyRequest {
                        token: t,
                        csr,
                        requested_ttl: None,
                    })
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_pods_of_one_service_account_certify_at_once_while_one_hammering_pod_is_limited(
) {
    // Default limits: 5/s burst 20 per pod, 100/s burst 1000 per service account.
    let ca = Ca::start().await;
    let pod_limited = metric(&ca, "meshca_rate_limited_total{scope=\"pod\"}");
    let tokens: Vec<String> = (0..300).map(|n| pod_token(&ca, n)).collect();
    let start = Instant::now();
    let results = certify_all(&ca, tokens).await;
    // The figure docs/configuration.md quotes (run with --nocapture).
    eprintln!(
        "300 pods of one service account: all answered in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        refused.is_empty(),
        "{} of 300 pods refused, e.g. {:?}",
        refused.len(),
        refused.first()
    );

    // One pod hammering: its own bucket (burst 20, 5/s) runs dry.
    let start = Instant::now();
    let hammer = pod_token(&ca, 1000);
    let results = certify_all(&ca, vec![hammer; 60]).await;
    let took = start.elapsed().as_secs_f64();
    let granted = results.iter().filter(|r| r.is_ok()).count();
    let limited: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        granted >= 20 && (granted as f64) <= 20.0 + 5.0 * took + 1.0,
        "granted {granted} in {took:.1}s"
    );
    assert_eq!(granted + limited.len(), 60);
    for e in &limited {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("per pod") && e.message().contains("shop/web"),
            "{}",
            e.message()
        );
    }
    assert_eq!(
        metric(&ca, "meshca_rate_limited_total{scope=\"pod\"}") - pod_limited,
        limited.len() as u64
    );
    // Its siblings are not starved by it.
    let sibling = certify_all(&ca, vec![pod_token(&ca, 1001)]).await;
    assert!(sibling[0].is_ok(), "{:?}", sibling[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_account_ceiling_bounds_all_its_pods_together() {
    let ca = Ca::start_with(|c| {
        c.api.limits.identity_rate_burst = 30;
        c.api.limits.identity_rate_limit = 0.01;
    })
    .await;
    let before = metric(&ca, "meshca_rate_limited_total{scope=\"identity\"}");
    let tokens: Vec<String> = (0..40).map(|n| pod_token(&ca, n)).collect();
    let results = certify_all(&ca, tokens).await;
    let limited: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(limited.len(), 10, "40 pods, a ceiling of 30");
    for e in &limited {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("identity_rate_limit"),
            "{}",
            e.message()
        );
    }
    assert_eq!(
        metric(&ca, "meshca_rate_limited_total{scope=\"identity\"}") - before,
        10
    );
    // Another service account is not affected.
    let other = ca.token("shop", "db", "meshca");
    assert!(certify_all(&ca, vec![other]).await[0].is_ok());
}

/// Reads until the server closes the connection; the time it took, or None
/// if it was still open after `limit`.
async fn closed_within(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_accept() {
    let ca = Ca::start_with(|c| {
        c.api.limits.max_connections = 3;
        c.api.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let before = metric(
        &ca,
        "meshca_grpc_connections_refused_total{reason=\"limit\"}",
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(ca.addr()).await.unwrap());
    }
    // The server has taken all three before the fourth arrives.
    support::wait_until("three connections open", Duration::from_secs(5), || async {
        metric(&ca, "meshca_grpc_connections") == 3
    })
    .await;
    let mut fourth = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_secs(3))
            .await
            .is_some(),
        "the fourth connection is closed at once"
    );
    assert!(
        closed_within(&mut held[0], Duration::from_millis(200))
            .await
            .is_none(),
        "the first three stay open (in their handshake)"
    );
    assert_eq!(
        metric(
            &ca,
            "meshca_grpc_connections_refused_total{reason=\"limit\"}"
        ) - before,
        1
    );
    // A freed place is usable.
    held.pop();
    support::wait_until("the place is freed", Duration::from_secs(5), || async {
        metric(&ca, "meshca_grpc_connections") == 2
    })
    .await;
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    c.get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped_after_the_timeout() {
    let ca = Ca::start_with(|c| c.api.limits.handshake_timeout = Duration::from_millis(500)).await;
    let before = metric(
        &ca,
        "meshca_grpc_connections_closed_total{reason=\"handshake_timeout\"}",
    );
    // Connects and never sends a ClientHello (slowloris).
    let mut s = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let took = closed_within(&mut s, Duration::from_secs(4))
        .await
        .expect("dropped by the handshake timeout");
    assert!(
        took >= Duration::from_millis(400),
        "not before it: {took:?}"
    );
    assert_eq!(
        metric(
            &ca,
            "meshca_grpc_connections_closed_total{reason=\"handshake_timeout\"}"
        ) - before,
        1
    );
}

/// A TLS connection with ALPN h2 that sends the HTTP/2 preface and an empty
/// SETTINGS frame, then never answers anything (no SETTINGS ack, no PING ack).
async fn mute_h2_client(ca: &Ca) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let roots = meshca::ca::pem_to_certs(ca.bundle_pem().as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(meshca::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(meshca::tls::root_store(&roots))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(ca.running.server_name.clone()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // SETTINGS, length 0, no flags, stream 0.
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_answer_keepalive_pings_is_disconnected() {
    let ca = Ca::start_with(|c| {
        c.api.limits.keepalive_interval = Some(Duration::from_millis(300));
        c.api.limits.keepalive_timeout = Duration::from_millis(300);
        c.api.limits.idle_timeout = None;
    })
    .await;
    let mut s = mute_h2_client(&ca).await;
    // Reading does not answer the PINGs: the bytes are not parsed.
    assert!(
        closed_within(&mut s, Duration::from_secs(5))
            .await
            .is_some(),
        "closed after an unanswered PING"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_but_an_open_stream_keeps_its_connection() {
    let ca = Ca::start_with(|c| {
        c.api.limits.idle_timeout = Some(Duration::from_secs(1));
        c.trust.propagation_wait = Duration::ZERO;
    })
    .await;
    let before = metric(&ca, "meshca_grpc_connections_closed_total{reason=\"idle\"}");
    let mut once = pb::identity_client::IdentityClient::new(ca.channel().await);
    once.get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .unwrap();
    let mut watcher = pb::identity_client::IdentityClient::new(ca.channel().await);
    let mut stream = watcher
        .watch_trust_bundle(pb::WatchTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let v0 = stream.message().await.unwrap().unwrap().version;
    // Real time: the watcher's connection must outlive the idle timeout (a
    // negative check), and connections.rs measures idleness with Instant.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        metric(&ca, "meshca_grpc_connections_closed_total{reason=\"idle\"}") - before,
        1,
        "only the connection with no open request is idle"
    );
    let (code, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream's connection is still open")
        .unwrap()
        .unwrap();
    assert!(next.version > v0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_capped() {
    let ca = Ca::start_with(|c| c.api.limits.max_concurrent_streams = 2).await;
    let ch = ca.channel().await;
    let mut c = pb::identity_client::IdentityClient::new(ch);
    let w1 = c
        .watch_trust_bundle(pb::WatchTrustBundleRequest {})
        .await
        .unwrap();
    let _w2 = c
        .watch_trust_bundle(pb::WatchTrustBundleRequest {})
        .await
        .unwrap();
    let third = tokio::time::timeout(
        Duration::from_millis(1000),
        c.get_trust_bundle(pb::GetTrustBundleRequest {}),
    )
    .await;
    assert!(
        third.is_err(),
        "a third stream on the connection waits: {third:?}"
    );
    drop(w1);
    tokio::time::timeout(
        Duration::from_secs(5),
        c.get_trust_bundle(pb::GetTrustBundleRequest {}),
    )
    .await
    .expect("proceeds once a stream ends")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let ca = Ca::start_with(|c| c.api.limits.max_header_bytes = 4096).await;
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let call = |n: usize| {
        let mut req = tonic::Request::new(pb::GetTrustBundleRequest {});
        req.metadata_mut()
            .insert("x-padding", "a".repeat(n).parse().unwrap());
        req
    };
    c.get_trust_bundle(call(2048))
        .await
        .expect("under the limit");
    let e = c
        .get_trust_bundle(call(8192))
        .await
        .expect_err("over the limit");
    assert!(e.message().contains("431") || e.code() != Code::Ok, "{e:?}");
    // The connection still serves well-formed requests.
    c.get_trust_bundle(call(16)).await.unwrap();
}

#[tokio::test]
async fn a_message_over_the_limit_is_resource_exhausted_for_a_client_we_did_not_write() {
    use linkerd2_proxy_api::identity as l5d;
    let ca = Ca::start().await;
    let mut c = l5d::identity_client::IdentityClient::new(ca.channel().await);
    let e = c
        .certify(l5d::CertifyRequest {
            identity: "web.shop.serviceaccount.identity.meshca.cluster.local".into(),
            token: b"x".to_vec(),
            certificate_signing_request: vec![0x30; 70 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("65536-byte limit"), "{}", e.message());
}
