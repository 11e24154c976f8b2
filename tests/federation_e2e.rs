//! SPIFFE federation on the workload side (issue 14, part 4).
//!
//! What a workload in trust domain A gets of trust domain B: B's X.509
//! authorities through the Workload API (`X509SVIDResponse.federated_bundles`
//! and `FetchX509Bundles`, read with the crates.io `spiffe` crate, a client we
//! did not write), and proxies that accept B's identities when their chains
//! verify to B's bundle.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use meshca::agent::{self, Bundle, FederatedBundle, State, Svid};
use meshca::util::secret::SecretBytes;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;

/// A self-signed root and its signer.
struct TestCa {
    root: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

fn test_ca(name: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} root"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = p.self_signed(&key).unwrap().der().clone();
    TestCa {
        root,
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// An X509-SVID for `id` from `ca`.
fn svid(ca: &TestCa, id: &str) -> Svid {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    let cert = p.signed_by(&key, &ca.issuer).unwrap().der().clone();
    let far = SystemTime::now() + Duration::from_secs(3600);
    Svid {
        spiffe_id: id.into(),
        chain: vec![cert],
        key_pkcs8: SecretBytes::new(key.serialize_der()),
        key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
        not_after: far,
        renew_at: far,
    }
}

fn federated(entries: &[(&str, &TestCa)]) -> BTreeMap<String, FederatedBundle> {
    entries
        .iter()
        .map(|(td, c)| {
            (
                td.to_string(),
                FederatedBundle {
                    x509_authorities: vec![c.root.clone()],
                    ..Default::default()
                },
            )
        })
        .collect()
}

fn authorities(set: &spiffe::X509BundleSet, td: &str) -> Option<Vec<Vec<u8>>> {
    let td = spiffe::TrustDomain::new(td).unwrap();
    set.get(&td).map(|b| {
        b.authorities()
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    })
}

const WEB_A: &str = "spiffe://a.test/ns/shop/sa/web";

/// The Workload API hands every federated domain's X.509 authorities to a
/// client we did not write (the `spiffe` crate) and to our proxy's
/// identity source, on both X.509 methods, and sends again when only the
/// federation changed. A federated entry naming our own trust domain never
/// reaches the workload (the `spiffe` crate would let it replace our own
/// bundle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_api_hands_federated_bundles_to_clients_and_streams_their_changes() {
    let (a, b, c, evil) = (test_ca("a"), test_ca("b"), test_ca("c"), test_ca("evil"));
    let (tx, rx) = watch::channel(State {
        svid: Some(Arc::new(svid(&a, WEB_A))),
        bundle: Arc::new(Bundle {
            version: 1,
            trust_domain: "a.test".into(),
            roots: vec![a.root.clone()],
            federated: federated(&[("b.test", &b), ("a.test", &evil)]),
            federation_version: 1,
            ..Default::default()
        }),
    });
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _api =
        agent::workload_api::serve(sock.clone(), rx, "a.test".into(), std::future::pending())
            .await
            .unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", sock.display()))
        .await
        .unwrap();

    let ctx = client.fetch_x509_context().await.unwrap();
    let set = ctx.bundle_set();
    assert_eq!(authorities(set, "b.test"), Some(vec![b.root.to_vec()]));
    assert_eq!(authorities(set, "a.test"), Some(vec![a.root.to_vec()]));
    assert_eq!(set.len(), 2);
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(authorities(&bundles, "b.test"), Some(vec![b.root.to_vec()]));
    assert_eq!(authorities(&bundles, "a.test"), Some(vec![a.root.to_vec()]));
    assert_eq!(bundles.len(), 2);

    // Our proxy's identity source reads the same response.
    let mut proxy_view = meshca::proxy::identity::follow(sock.clone());
    let st = tokio::time::timeout(
        Duration::from_secs(10),
        proxy_view.wait_for(|s| s.svid.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(st.bundle.trust_domain, "a.test");
    assert_eq!(st.bundle.federated, federated(&[("b.test", &b)]));

    // A federation change alone (same own bundle, same SVID) is sent again
    // on both streams; B removed and C added.
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let mut sets = client.stream_x509_bundles().await.unwrap();
    let first = contexts.next().await.unwrap().unwrap();
    assert!(authorities(first.bundle_set(), "b.test").is_some());
    let first = sets.next().await.unwrap().unwrap();
    assert!(authorities(&first, "b.test").is_some());
    tx.send_modify(|s| {
        let mut b = (*s.bundle).clone();
        b.federated = federated(&[("c.test", &c)]);
        b.federation_version = 2;
        s.bundle = Arc::new(b);
    });
    let next = tokio::time::timeout(Duration::from_secs(10), contexts.next())
        .await
        .expect("FetchX509SVID sends again on a federation change")
        .unwrap()
        .unwrap();
    assert_eq!(
        authorities(next.bundle_set(), "c.test"),
        Some(vec![c.root.to_vec()])
    );
    assert_eq!(authorities(next.bundle_set(), "b.test"), None);
    let next = tokio::time::timeout(Duration::from_secs(10), sets.next())
        .await
        .expect("FetchX509Bundles sends again on a federation change")
        .unwrap()
        .unwrap();
    assert_eq!(authorities(&next, "c.test"), Some(vec![c.root.to_vec()]));
    assert_eq!(authorities(&next, "b.test"), None);
    assert_eq!(authorities(&next, "a.test"), Some(vec![a.root.to_vec()]));
    tokio::time::timeout(
        Duration::from_secs(10),
        proxy_view.wait_for(|s| s.bundle.federated == federated(&[("c.test", &c)])),
    )
    .await
    .expect("the proxy's identity source follows the change")
    .unwrap();
}

// ---------------------------------------------------------------------------
// Two CAs, two trust domains, agents and proxies on each side.

use meshca::metrics::Metrics;
use meshca::proxy::{self, ProxyConfig};
use support::{closed_port, dev_token, metric_value, Ca};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CA of trust domain `td`.
async fn ca_of(td: &'static str) -> Ca {
    Ca::start_with(|c| c.issuance.mesh.trust_domain = td.parse().unwrap()).await
}

/// Starts an agent for shop/`sa` of `ca` and waits for its certificate.
async fn agent_of(ca: &Ca, dir: &std::path::Path, sa: &str) -> agent::Agent {
    let data = ca.dir.path().join("data");
    let token = dir.join(format!("{sa}.{}.token", ca.addr().replace(':', "_")));
    std::fs::write(&token, dev_token(&data, "shop", sa)).unwrap();
    let a = agent::start(
        agent::AgentConfig {
            ca_address: format!("127.0.0.1:{},{}", closed_port(), ca.addr()),
            server_name: ca.running.server_name.clone(),
            bootstrap_bundle: data.join("bundle.pem"),
            token_file: token,
            requested_ttl: None,
        },
        Arc::default(),
    )
    .unwrap();
    a.ready(Duration::from_secs(20)).await.unwrap();
    a
}

/// An echo service that prefixes nothing: what comes in goes back.
async fn echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends `msg` through `to` and expects it back.
async fn roundtrip(to: std::net::SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("closed: {e}"))?;
    (buf == msg)
        .then_some(())
        .ok_or_else(|| "wrong echo".into())
}

/// Round trips until one succeeds (the proxies build their TLS
/// configurations from the first identity asynchronously).
async fn flows(to: std::net::SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..50 {
        match roundtrip(to, msg).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        // Poll interval, bounded by the loop: until the proxies are ready.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// Round trips through `to`, each of which must fail, until the inbound
/// proxy behind it has counted a refusal for `reason`.
async fn refused(to: std::net::SocketAddr, m: &Metrics, reason: &str) {
    let before = handshakes(m, "inbound", reason);
    for _ in 0..50 {
        let r = roundtrip(to, b"must not pass").await;
        assert!(r.is_err(), "a connection got through (expected {reason})");
        if handshakes(m, "inbound", reason) > before {
            return;
        }
        // Poll interval, bounded by the loop: until the proxies are ready.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {reason} refusal counted");
}

fn handshakes(m: &Metrics, direction: &str, reason: &str) -> f64 {
    let result = if reason == "ok" { "ok" } else { "refused" };
    metric_value(
        &m.render(),
        &format!(
            "meshca_proxy_handshakes_total{{direction=\"{direction}\",result=\"{result}\",reason=\"{reason}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

fn sid(td: &str, sa: &str) -> String {
    format!("spiffe://{td}/ns/shop/sa/{sa}")
}

/// One trust domain's side: an `api` workload behind an inbound proxy that
/// takes its identity over the Workload API, and a `web` workload whose
/// outbound proxy runs on an in-process agent's identity.
struct Side {
    td: &'static str,
    /// The inbound proxy (allows `web` of the other domain).
    inbound: proxy::Proxy,
    in_metrics: Arc<Metrics>,
    _api_agent: agent::Agent,
    web_agent: agent::Agent,
    /// The api agent's Workload API socket.
    sock: std::path::PathBuf,
    _sock_dir: tempfile::TempDir,
}

/// Sets up `td`'s side: its api agent serves the Workload API from
/// `api_state` (the agent's view, federated), its inbound proxy follows
/// the socket and allows `allow`.
async fn side(
    td: &'static str,
    api_agent: agent::Agent,
    api_state: watch::Receiver<State>,
    web_agent: agent::Agent,
    allow: Vec<String>,
) -> Side {
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("api.sock");
    let _api =
        agent::workload_api::serve(sock.clone(), api_state, td.into(), std::future::pending())
            .await
            .unwrap();
    let in_metrics: Arc<Metrics> = Arc::default();
    let inbound = proxy::start(
        ProxyConfig {
            inbound: Some(("127.0.0.1:0".parse().unwrap(), echo().await.to_string())),
            allow,
            ..Default::default()
        },
        proxy::identity::follow(sock),
        in_metrics.clone(),
    )
    .await
    .unwrap();
    Side {
        td,
        inbound,
        in_metrics,
        _api_agent: api_agent,
        web_agent,
        sock: sock_dir.path().join("api.sock"),
        _sock_dir: sock_dir,
    }
}

/// An outbound proxy for `from`'s web workload to `to`'s inbound proxy,
/// which must present `to`'s api identity.
async fn outbound_to(
    from: &watch::Receiver<State>,
    to: &Side,
    metrics: Arc<Metrics>,
) -> proxy::Proxy {
    proxy::start(
        ProxyConfig {
            outbound: Some((
                "127.0.0.1:0".parse().unwrap(),
                to.inbound.inbound_addr.unwrap().to_string(),
            )),
            upstream_identity: Some(sid(to.td, "api")),
            resolve_interval: Duration::from_secs(5),
            ..Default::default()
        },
        from.clone(),
        metrics,
    )
    .await
    .unwrap()
}

/// The agent's state with `foreign` CAs' current roots added as federated
/// bundles, for a side whose CA does not follow them (the attacker's own
/// setup below).
fn with_foreign(agent: &agent::Agent, foreign: &[(&str, &Ca)]) -> watch::Receiver<State> {
    let fed: BTreeMap<String, FederatedBundle> = foreign
        .iter()
        .map(|(td, ca)| {
            let roots = ca.running.ca.bundle().roots.clone();
            (
                td.to_string(),
                FederatedBundle {
                    x509_authorities: roots,
                    ..Default::default()
                },
            )
        })
        .collect();
    let mut rx = agent.watch();
    let (tx, out) = watch::channel(rx.borrow().clone());
    tokio::spawn(async move {
        loop {
            let mut st = rx.borrow_and_update().clone();
            let mut b = (*st.bundle).clone();
            b.federated = fed.clone();
            st.bundle = Arc::new(b);
            if tx.send(st).is_err() || rx.changed().await.is_err() {
                return;
            }
        }
    });
    out
}

/// A data directory initialized before its server starts, so the other CA
/// can be configured with its bundle.pem as the bootstrap bundle.
fn init_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    meshca::ca::store::DataDir::new(&data)
        .init(&Default::default(), SystemTime::now())
        .unwrap();
    (dir, data)
}

/// Following `td`'s bundle endpoint on `port` over https_spiffe, the CA's
/// own SVID authenticated by `td`'s bundle (bootstrap: its bundle.pem).
fn spiffe_follow(td: &str, port: u16, data: &std::path::Path) -> String {
    format!(
        "td={td},url=https://127.0.0.1:{port}/,profile=https_spiffe,\
         endpoint_spiffe_id=spiffe://{td}/ns/meshca/sa/meshca,bundle={}",
        data.join("bundle.pem").display()
    )
}

/// A self-signed CA certificate naming `uri` (a trust domain's SPIFFE ID).
fn ca_naming(uri: &str) -> CertificateDer<'static> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .clone()
}

/// An https_web bundle endpoint that serves, for whoever asks, a bundle
/// whose authority is b.test's: followed as `c.test`, it is a bundle for
/// the wrong trust domain. Returns the follow spec (its CA file in `dir`).
async fn wrong_domain_endpoint(dir: &std::path::Path) -> String {
    let doc = meshca::trust::spiffe_bundle::SpiffeBundle {
        x509_authorities: vec![ca_naming("spiffe://b.test")],
        sequence: Some(1),
        ..Default::default()
    }
    .to_json()
    .unwrap();
    let (addr, ca_pem) = support::https_server(Arc::new(move |_req| {
        let doc = doc.clone();
        Box::pin(async move {
            use http_body_util::BodyExt;
            hyper::Response::builder()
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(hyper::body::Bytes::from(doc)).boxed())
                .unwrap()
        })
    }))
    .await;
    let ca_file = dir.join("wrong-endpoint-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    format!(
        "td=c.test,url=https://127.0.0.1:{}/,profile=https_web,ca={}",
        addr.port(),
        ca_file.display()
    )
}

async fn start_ca(
    (dir, data): (tempfile::TempDir, std::path::PathBuf),
    td: &str,
    listen: u16,
    follow: Vec<String>,
) -> Ca {
    let mut cfg = meshca::config::ServeConfig::for_tests(data);
    cfg.issuance.mesh.trust_domain = td.parse().unwrap();
    cfg.federation.listen = Some(([127, 0, 0, 1], listen).into());
    // Followers clamp it to their minimum (5 s): a rotation crosses over soon.
    cfg.federation.refresh_hint = Duration::from_secs(1);
    cfg.federation.follow = follow.iter().map(|f| f.parse().unwrap()).collect();
    let running = meshca::server::start(cfg).await.expect("server starts");
    Ca { running, dir }
}

/// Two `meshca serve` in a.test and b.test that federate through their
/// bundle endpoints (https_spiffe, each bootstrapped with the other's
/// bundle.pem); a.test also follows c.test at an endpoint that serves a
/// bundle for another trust domain.
async fn federated_cas() -> (Ca, Ca) {
    let (dir_a, dir_b) = (init_dir(), init_dir());
    let (port_a, port_b) = (closed_port(), closed_port());
    let follow_a = spiffe_follow("a.test", port_a, &dir_a.1);
    let follow_b = spiffe_follow("b.test", port_b, &dir_b.1);
    let wrong = wrong_domain_endpoint(dir_a.0.path()).await;
    let b = start_ca(dir_b, "b.test", port_b, vec![follow_a]).await;
    let a = start_ca(dir_a, "a.test", port_a, vec![follow_b, wrong]).await;
    (a, b)
}

/// The agent's state once it holds `other`'s current roots as the
/// federated bundle of `td` (from its CA's bundle stream).
async fn federated_view(agent: &agent::Agent, (td, other): (&str, &Ca)) -> watch::Receiver<State> {
    let roots = other.running.ca.bundle().roots.clone();
    let mut rx = agent.watch();
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| {
            s.bundle
                .federated
                .get(td)
                .is_some_and(|b| b.x509_authorities == roots)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("the agent never received {td}'s bundle"))
    .unwrap();
    rx
}

/// Two CAs federated through their bundle endpoints; an agent and proxies
/// per domain. A workload in a.test and one in b.test complete mTLS with
/// each other through their proxies, both ways, with bytes echoed; the
/// proxies verify each foreign peer against its own domain's bundle, which
/// reached them CA → agent → (Workload API →) proxy. A bundle for the wrong
/// trust domain never reaches a workload; a proxy whose allow-list lacks
/// the foreign ID refuses it; a domain whose bundle a proxy does not hold is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_in_two_trust_domains_talk_through_their_proxies() {
    let (ca_a, ca_b) = federated_cas().await;
    let dir = tempfile::tempdir().unwrap();
    let (a_api, a_web) = (
        agent_of(&ca_a, dir.path(), "api").await,
        agent_of(&ca_a, dir.path(), "web").await,
    );
    let (b_api, b_web) = (
        agent_of(&ca_b, dir.path(), "api").await,
        agent_of(&ca_b, dir.path(), "web").await,
    );
    let a_api_view = federated_view(&a_api, ("b.test", &ca_b)).await;
    let a_web_view = federated_view(&a_web, ("b.test", &ca_b)).await;
    let b_api_view = federated_view(&b_api, ("a.test", &ca_a)).await;
    let b_web_view = federated_view(&b_web, ("a.test", &ca_a)).await;
    // (c.test is allowed in: only the missing bundle keeps it out below.)
    let allow_a = vec![sid("b.test", "web"), "spiffe://c.test/".to_string()];
    let side_a = side("a.test", a_api, a_api_view, a_web, allow_a).await;
    let side_b = side(
        "b.test",
        b_api,
        b_api_view,
        b_web,
        vec![sid("a.test", "web")],
    )
    .await;

    // The endpoint serving a bundle for the wrong trust domain is refused by
    // a.test's CA (tests/federation.rs covers the CA side), and no workload
    // of a.test ever sees c.test: not the agents, not the Workload API.
    let wrong = "meshca_federation_refresh_failures_total{trust_domain=\"c.test\",reason=\"wrong_trust_domain\"}";
    support::wait_until(
        "the wrong-domain bundle is refused",
        Duration::from_secs(20),
        || async { ca_a.metric(wrong) >= 1.0 },
    )
    .await;
    let held: Vec<String> = a_web_view
        .borrow()
        .bundle
        .federated
        .keys()
        .cloned()
        .collect();
    assert_eq!(held, ["b.test"]);
    let gauge = metric_value(
        &side_a.web_agent.metrics().render(),
        "meshca_agent_federated_bundles",
    );
    assert_eq!(gauge, Some(1.0));
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", side_a.sock.display()))
        .await
        .unwrap();
    let b_roots: Vec<Vec<u8>> = ca_b
        .running
        .ca
        .bundle()
        .roots
        .iter()
        .map(|r| r.to_vec())
        .collect();
    let seen = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(seen.len(), 2, "a.test and b.test only");
    assert_eq!(authorities(&seen, "b.test"), Some(b_roots.clone()));
    assert_eq!(authorities(&seen, "c.test"), None);
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.bundle_set().len(), 2, "a.test and b.test only");
    assert_eq!(authorities(ctx.bundle_set(), "b.test"), Some(b_roots));

    // b.test web → (its outbound proxy) → mTLS → a.test api's inbound proxy → echo.
    let b_out_metrics: Arc<Metrics> = Arc::default();
    let b_out = outbound_to(&b_web_view, &side_a, b_out_metrics.clone()).await;
    flows(b_out.outbound_addr.unwrap(), b"from b.test to a.test")
        .await
        .expect("b.test web reaches a.test api");
    // And the other way round.
    let a_out_metrics: Arc<Metrics> = Arc::default();
    let a_out = outbound_to(&a_web_view, &side_b, a_out_metrics.clone()).await;
    flows(a_out.outbound_addr.unwrap(), b"from a.test to b.test")
        .await
        .expect("a.test web reaches b.test api");
    let peers = |m: &Metrics, direction: &str, peer: &str| {
        metric_value(
            &m.render(),
            &format!(
                "meshca_proxy_peer_connections_total{{direction=\"{direction}\",peer=\"{peer}\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    assert!(peers(&side_a.in_metrics, "inbound", &sid("b.test", "web")) >= 1.0);
    assert!(peers(&side_b.in_metrics, "inbound", &sid("a.test", "web")) >= 1.0);
    assert!(peers(&b_out_metrics, "outbound", &sid("a.test", "api")) >= 1.0);
    assert!(peers(&a_out_metrics, "outbound", &sid("b.test", "api")) >= 1.0);

    // A root rotation in b.test (a second root joins its bundle) reaches
    // a.test's agents as a federation-only change (a.test's own version
    // stays), and its Workload API clients with it.
    let a_version = a_web_view.borrow().bundle.version;
    let (status, body) = ca_b.rotation("prepare", "{}").await;
    assert_eq!(status, 200, "{body}");
    let b_roots = ca_b.running.ca.bundle().roots.clone();
    assert_eq!(b_roots.len(), 2);
    let mut rx = a_web_view.clone();
    let st = tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.bundle.federated["b.test"].x509_authorities == b_roots),
    )
    .await
    .expect("b.test's rotation reaches a.test's agent")
    .unwrap()
    .clone();
    assert_eq!(st.bundle.version, a_version);
    let b_roots: Vec<Vec<u8>> = b_roots.iter().map(|r| r.to_vec()).collect();
    support::wait_until(
        "the rotated b.test bundle on a.test's Workload API",
        Duration::from_secs(10),
        || async {
            authorities(&client.fetch_x509_bundles().await.unwrap(), "b.test")
                == Some(b_roots.clone())
        },
    )
    .await;
    // Traffic still flows both ways (new handshakes on the new bundles).
    flows(b_out.outbound_addr.unwrap(), b"after b.test's rotation")
        .await
        .unwrap();
    flows(a_out.outbound_addr.unwrap(), b"after b.test's rotation")
        .await
        .unwrap();

    // An a.test proxy whose allow-list lacks the foreign ID refuses it.
    let strict_metrics: Arc<Metrics> = Arc::default();
    let strict = proxy::start(
        ProxyConfig {
            inbound: Some(("127.0.0.1:0".parse().unwrap(), echo().await.to_string())),
            allow: vec![format!("spiffe://a.test/ns/shop/"), sid("b.test", "api")],
            ..Default::default()
        },
        a_web_view.clone(),
        strict_metrics.clone(),
    )
    .await
    .unwrap();
    let to_strict = proxy::start(
        ProxyConfig {
            outbound: Some((
                "127.0.0.1:0".parse().unwrap(),
                strict.inbound_addr.unwrap().to_string(),
            )),
            upstream_identity: Some(sid("a.test", "web")),
            ..Default::default()
        },
        b_web_view.clone(),
        Arc::default(),
    )
    .await
    .unwrap();
    refused(
        to_strict.outbound_addr.unwrap(),
        &strict_metrics,
        "identity_not_allowed",
    )
    .await;
    assert_eq!(handshakes(&strict_metrics, "inbound", "ok"), 0.0);

    // A third domain whose bundle a.test does not hold: its workload,
    // trusting a.test (so its own side completes), is refused at a.test's
    // proxy for want of a bundle (its ID is on the allow-list).
    let ca_c = ca_of("c.test").await;
    let c_web = agent_of(&ca_c, dir.path(), "web").await;
    let c_web_view = with_foreign(&c_web, &[("a.test", &ca_a)]);
    let c_out = proxy::start(
        ProxyConfig {
            outbound: Some((
                "127.0.0.1:0".parse().unwrap(),
                side_a.inbound.inbound_addr.unwrap().to_string(),
            )),
            upstream_identity: Some(sid("a.test", "api")),
            ..Default::default()
        },
        c_web_view,
        Arc::default(),
    )
    .await
    .unwrap();
    refused(
        c_out.outbound_addr.unwrap(),
        &side_a.in_metrics,
        "unknown_trust_domain",
    )
    .await;
    assert_eq!(
        peers(&side_a.in_metrics, "inbound", &sid("c.test", "web")),
        0.0
    );
    drop((
        b_out,
        a_out,
        strict,
        to_strict,
        side_a.web_agent,
        side_b.web_agent,
    ));
}

fn fingerprint(der: &[u8]) -> String {
    meshca::ca::fingerprint(der)
}

/// The Python SPIFFE library (PyPI `spiffe`, pinned in
/// tests/interop/requirements.txt) sees the federated trust domain with its
/// authorities on both X.509 methods, and our own domain with our roots
/// (not the hostile federated entry that names it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_spiffe_library_sees_federated_bundles() {
    support::interop::python();
    let (a, b, evil) = (test_ca("a"), test_ca("b"), test_ca("evil"));
    let (_tx, rx) = watch::channel(State {
        svid: Some(Arc::new(svid(&a, WEB_A))),
        bundle: Arc::new(Bundle {
            version: 1,
            trust_domain: "a.test".into(),
            roots: vec![a.root.clone()],
            federated: federated(&[("b.test", &b), ("a.test", &evil)]),
            federation_version: 1,
            ..Default::default()
        }),
    });
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let _api =
        agent::workload_api::serve(sock.clone(), rx, "a.test".into(), std::future::pending())
            .await
            .unwrap();
    let out = support::interop::output(
        support::interop::python_script("spiffe_federated.py").arg(&sock),
        Duration::from_secs(60),
    )
    .await;
    let seen = support::interop::last_json(&out);
    let expected = serde_json::json!({
        "a.test": [fingerprint(&a.root)],
        "b.test": [fingerprint(&b.root)],
    });
    assert_eq!(seen["spiffe_id"], WEB_A);
    assert_eq!(seen["fetch_x509_context"], expected, "{out}");
    assert_eq!(seen["fetch_x509_bundles"], expected, "{out}");
}
