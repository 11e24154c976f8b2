//! The workload side: `meshca agent` (files, SPIFFE Workload API) and
//! `meshca proxy`, against a real CA in-process.
//!
//! The Workload API is checked with the crates.io `spiffe` crate's client,
//! which validates the SVID per the X509-SVID specification.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use meshca::agent::{self, AgentConfig, State};
use meshca::proxy::{self, ProxyConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use meshca::metrics::Metrics;
use support::*;

const TD: &str = "cluster.local";

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

/// A CA with short leaves (renewals within seconds).
async fn short_lived_ca() -> Ca {
    Ca::start_with(|c| {
        c.set_max_ttl(Duration::from_secs(3));
        c.issuance.default_ttl = Duration::from_secs(3);
        c.issuance.min_ttl = Duration::from_secs(1);
        c.trust.propagation_wait = Duration::from_secs(3);
    })
    .await
}

/// Starts an agent for shop/`sa` and waits for its first certificate.
async fn agent_for(ca: &Ca, dir: &Path, sa: &str) -> agent::Agent {
    let data = ca.dir.path().join("data");
    let token = dir.join(format!("{sa}.token"));
    std::fs::write(&token, dev_token(&data, "shop", sa)).unwrap();
    let a = agent::start(
        AgentConfig {
            // A closed port first: the agent fails over to the live replica.
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

fn leaf_of(rx: &watch::Receiver<State>) -> Vec<u8> {
    rx.borrow().svid.as_ref().unwrap().chain[0].to_vec()
}

/// Waits until the agent holds a certificate other than `old`.
async fn next_leaf(rx: &mut watch::Receiver<State>, old: &[u8]) -> Vec<u8> {
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.svid.as_ref().is_some_and(|v| v.chain[0].as_ref() != old)),
    )
    .await
    .expect("renewed in time")
    .unwrap();
    leaf_of(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_reads_svids_and_bundles_from_the_agent_and_sees_renewals() {
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let a = agent_for(&ca, dir.path(), "web").await;
    let sock = dir.path().join("agent/api.sock");
    let _api =
        agent::workload_api::serve(sock.clone(), a.watch(), TD.into(), std::future::pending())
            .await
            .unwrap();

    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), id("web"));
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let roots: Vec<Vec<u8>> = bundles
        .get(&td)
        .expect("a bundle for the trust domain")
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    assert_eq!(roots.len(), 1);
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    meshca::client::verify_chain(&chain[0], &chain[1..], &roots, SystemTime::now()).unwrap();

    // The stream sends the state at once, then the renewed SVID.
    let mut stream = client.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an update after the renewal")
        .unwrap()
        .unwrap();
    assert_ne!(
        first.leaf().as_ref(),
        second.leaf().as_ref(),
        "a renewal reaches Workload API clients"
    );
    assert_eq!(second.spiffe_id().to_string(), id("web"));
    let key = second.private_key().as_ref().to_vec();
    assert_ne!(key, first.private_key().as_ref(), "a new key per renewal");

    // Without the security header: INVALID_ARGUMENT, per the specification.
    let ch = tonic::transport::Endpoint::try_from("http://x.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = sock.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let e = meshca::proto::spiffe::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
        .fetch_x509svid(meshca::proto::spiffe::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("workload.spiffe.io"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_writes_files_atomically_and_runs_the_update_command() {
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let a = agent_for(&ca, dir.path(), "web").await;
    let out = dir.path().join("certs");
    tokio::spawn(agent::files::follow(
        out.clone(),
        Some("echo x >> \"$MESHCA_OUT_DIR/updates.log\"".into()),
        a.watch(),
    ));
    let mut n = 0;
    for _ in 0..100 {
        n = std::fs::read_to_string(out.join("updates.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        // Poll interval: the update command runs in a child process.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(n >= 2, "written at start and again after a renewal ({n})");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let chain = meshca::ca::pem_to_certs(&std::fs::read(out.join("chain.pem")).unwrap()).unwrap();
    let roots = meshca::ca::pem_to_certs(&std::fs::read(out.join("bundle.pem")).unwrap()).unwrap();
    let chain: Vec<Vec<u8>> = chain.iter().map(|c| c.to_vec()).collect();
    let roots: Vec<Vec<u8>> = roots.iter().map(|c| c.to_vec()).collect();
    meshca::client::verify_chain(&chain[0], &chain[1..], &roots, SystemTime::now()).unwrap();
    openssl_verify(dir.path(), &chain[0], &chain[1..], &roots);
}

/// An echo service.
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

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    (buf == msg)
        .then_some(())
        .ok_or_else(|| "wrong echo".into())
}

/// A direct mTLS client with an agent's identity, trusting `roots`; returns
/// the server's leaf once the connection is established and `data` echoed.
async fn direct(
    st: &State,
    roots: &[CertificateDer<'static>],
    to: std::net::SocketAddr,
) -> Result<Vec<u8>, String> {
    let svid = st.svid.as_ref().unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.expose().to_vec()));
    let cfg = rustls::ClientConfig::builder_with_provider(meshca::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(meshca::tls::root_store(roots))
        .with_client_auth_cert(svid.chain.clone(), key)
        .unwrap();
    let tcp = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    let name =
        ServerName::try_from("api.shop.serviceaccount.identity.meshca.cluster.local").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(leaf),
        Ok(Ok(_)) => Err("wrong echo".into()),
        Ok(Err(e)) => Err(format!("closed: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_carry_traffic_with_identity_checks_through_renewals() {
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let echo_addr = echo().await;

    // "api": agent + Workload API; its proxy takes identity from the socket.
    let api_agent = agent_for(&ca, dir.path(), "api").await;
    let sock = dir.path().join("api.sock");
    let _api = agent::workload_api::serve(
        sock.clone(),
        api_agent.watch(),
        TD.into(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let api_identity = proxy::identity::follow(sock);
    // Each proxy reports to its own registry, as separate processes would.
    let (in_metrics, out_metrics, wrong_metrics): (Arc<Metrics>, Arc<Metrics>, Arc<Metrics>) =
        Default::default();
    let inbound = proxy::start(
        ProxyConfig {
            inbound: Some(("127.0.0.1:0".parse().unwrap(), echo_addr.to_string())),
            allow: vec![id("web"), format!("spiffe://{TD}/ns/ops/")],
            ..Default::default()
        },
        api_identity,
        in_metrics.clone(),
    )
    .await
    .unwrap();
    let in_addr = inbound.inbound_addr.unwrap();

    // "web": in-process agent; its proxy dials "localhost" (re-resolved).
    let web_agent = agent_for(&ca, dir.path(), "web").await;
    let outbound = proxy::start(
        ProxyConfig {
            outbound: Some((
                "127.0.0.1:0".parse().unwrap(),
                format!("localhost:{}", in_addr.port()),
            )),
            upstream_identity: Some(id("api")),
            resolve_interval: Duration::from_millis(500),
            ..Default::default()
        },
        web_agent.watch(),
        out_metrics.clone(),
    )
    .await
    .unwrap();
    let out_addr = outbound.outbound_addr.unwrap();

    // Traffic flows: app → web proxy → (mTLS) → api proxy → echo.
    let mut held = None;
    for _ in 0..50 {
        if let Ok(mut s) = TcpStream::connect(out_addr).await {
            if roundtrip(&mut s, b"hello").await.is_ok() {
                held = Some(s);
                break;
            }
        }
        // Poll interval: until the proxies have their certificates.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut held = held.expect("traffic flows through both proxies");

    // Through renewals of both sides: the long-lived connection survives,
    // new connections keep working, and new handshakes use new certificates.
    let roots = ca.running.ca.bundle().roots.clone();
    let web_state = web_agent.watch().borrow().clone();
    let first_served = direct(&web_state, &roots, in_addr).await.unwrap();
    let mut rx = api_agent.watch();
    let old = leaf_of(&rx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut new_conns = 0;
    while tokio::time::Instant::now() < deadline {
        roundtrip(&mut held, b"still here")
            .await
            .expect("long-lived connection survives");
        let mut s = TcpStream::connect(out_addr).await.unwrap();
        roundtrip(&mut s, b"new")
            .await
            .expect("new connections keep working");
        new_conns += 1;
        // Pacing: new connections through the renewals.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    next_leaf(&mut rx, &old).await;
    // The proxy rebuilds its config from the new certificate: polled.
    let web_state = web_agent.watch().borrow().clone();
    wait_until(
        "new handshakes present the renewed certificate",
        Duration::from_secs(5),
        || async { direct(&web_state, &roots, in_addr).await.unwrap() != first_served },
    )
    .await;
    assert!(new_conns > 20, "{new_conns}");

    // A root rotation mid-traffic: the new bundle reaches both agents (and so
    // both proxies) before the new root signs; afterwards both sides hold
    // certificates under the new root, and nothing dropped.
    let admin = |step: &'static str| ca.rotation(step, "{}");
    assert_eq!(admin("prepare").await.0, 200);
    let new_root = ca.running.ca.bundle().roots[1].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        roundtrip(&mut held, b"during rotation")
            .await
            .expect("survives the rotation");
        let mut s = TcpStream::connect(out_addr).await.unwrap();
        roundtrip(&mut s, b"new")
            .await
            .expect("new connections work during the rotation");
        let (code, body) = admin("activate").await;
        if code == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "activation never allowed: {body}"
        );
        // Poll interval (deadline above): the gate opens on the server's clock.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rx = api_agent.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| {
            let issuer = &s.svid.as_ref().unwrap().chain[1];
            let (_, i) = x509_parser::parse_x509_certificate(issuer).unwrap();
            let (_, r) = x509_parser::parse_x509_certificate(&new_root).unwrap();
            i.verify_signature(Some(r.public_key())).is_ok()
        }),
    )
    .await
    .expect("api renewed under the new root")
    .unwrap();
    for _ in 0..20 {
        roundtrip(&mut held, b"after rotation")
            .await
            .expect("survives");
        let mut s = TcpStream::connect(out_addr).await.unwrap();
        roundtrip(&mut s, b"new")
            .await
            .expect("works under the new root");
        // Pacing: traffic after the rotation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let roots = ca.running.ca.bundle().roots.clone();

    // A workload whose identity is not allowed is refused.
    let batch = agent_for(&ca, dir.path(), "batch").await;
    let e = direct(&batch.watch().borrow().clone(), &roots, in_addr)
        .await
        .unwrap_err();
    assert!(!e.is_empty());
    // A client with a certificate from another CA is refused at the handshake.
    let other = short_lived_ca().await;
    let stranger = agent_for(&other, dir.path(), "web").await;
    let e = direct(&stranger.watch().borrow().clone(), &roots, in_addr)
        .await
        .unwrap_err();
    assert!(!e.is_empty());
    // An upstream with the wrong identity is refused by the outbound side.
    let wrong = proxy::start(
        ProxyConfig {
            outbound: Some(("127.0.0.1:0".parse().unwrap(), in_addr.to_string())),
            upstream_identity: Some(id("db")),
            resolve_interval: Duration::from_secs(5),
            ..Default::default()
        },
        web_agent.watch(),
        wrong_metrics.clone(),
    )
    .await
    .unwrap();
    let handshakes = |m: &Metrics, labels: &str| {
        let text = m.render();
        metric_value(&text, &format!("meshca_proxy_handshakes_total{{{labels}}}")).unwrap_or(0.0)
    };
    // Until its first certificate arrives the new proxy refuses with
    // no_certificate_yet; after that, for the identity. Never does a
    // connection get through. (The proxy counts before it closes the
    // application's connection, so a failed round trip has been counted.)
    const MISMATCH: &str = "direction=\"outbound\",result=\"refused\",reason=\"identity_mismatch\"";
    const NO_CERT: &str = "direction=\"outbound\",result=\"refused\",reason=\"no_certificate_yet\"";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut attempts = 0.0;
    while handshakes(&wrong_metrics, MISMATCH) == 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refused for its identity"
        );
        let mut s = TcpStream::connect(wrong.outbound_addr.unwrap())
            .await
            .unwrap();
        assert!(roundtrip(&mut s, b"x").await.is_err());
        attempts += 1.0;
    }
    // Every attempt is counted exactly once, under one of the two reasons.
    // The count of the last attempt may land just after the application saw
    // its connection close, so the total is polled, not read once.
    wait_until(
        "every attempt counted once",
        Duration::from_secs(5),
        || async {
            handshakes(&wrong_metrics, MISMATCH) + handshakes(&wrong_metrics, NO_CERT) >= attempts
        },
    )
    .await;
    assert_eq!(
        handshakes(&wrong_metrics, MISMATCH) + handshakes(&wrong_metrics, NO_CERT),
        attempts
    );
    assert!(handshakes(&wrong_metrics, MISMATCH) >= 1.0);
    assert_eq!(
        handshakes(
            &wrong_metrics,
            "direction=\"outbound\",result=\"ok\",reason=\"ok\""
        ),
        0.0
    );

    // The inbound proxy counts each refusal once, with its reason (its side
    // of a handshake may end after the client saw the alert: polled).
    for labels in [
        "direction=\"inbound\",result=\"refused\",reason=\"identity_not_allowed\"",
        "direction=\"inbound\",result=\"refused\",reason=\"unknown_ca\"",
    ] {
        wait_until(labels, Duration::from_secs(5), || async {
            handshakes(&in_metrics, labels) >= 1.0
        })
        .await;
        assert_eq!(handshakes(&in_metrics, labels), 1.0, "{labels}");
    }
    // The other proxies refused nothing for those reasons.
    assert_eq!(
        handshakes(
            &out_metrics,
            "direction=\"outbound\",result=\"refused\",reason=\"identity_mismatch\""
        ),
        0.0
    );
    // Established connections: the outbound proxy's handshakes (all to
    // api) and the inbound proxy's peers (web, through the proxy or
    // directly) are counted by identity; batch never got in.
    let out_text = out_metrics.render();
    let out_ok = handshakes(
        &out_metrics,
        "direction=\"outbound\",result=\"ok\",reason=\"ok\"",
    );
    assert!(out_ok >= f64::from(new_conns), "{out_ok} < {new_conns}");
    assert_eq!(
        metric_value(
            &out_text,
            &format!(
                "meshca_proxy_peer_connections_total{{direction=\"outbound\",peer=\"{}\"}}",
                id("api")
            )
        ),
        Some(out_ok),
        "{out_text}"
    );
    let in_text = in_metrics.render();
    let in_peer = |sa: &str| {
        metric_value(
            &in_text,
            &format!(
                "meshca_proxy_peer_connections_total{{direction=\"inbound\",peer=\"{}\"}}",
                id(sa)
            ),
        )
    };
    assert!(in_peer("web").unwrap_or(0.0) >= out_ok, "{in_text}");
    assert_eq!(in_peer("batch"), None, "{in_text}");
    assert!(
        metric_value(
            &out_text,
            "meshca_proxy_bytes_total{direction=\"outbound\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{out_text}"
    );
    roundtrip(&mut held, b"bye").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_recertifies_at_once_when_its_root_is_tainted() {
    // Long leaves: a renewal within the test can only come from the taint.
    let ca = Ca::start_with(|c| c.trust.propagation_wait = Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let a = agent_for(&ca, dir.path(), "web").await;
    let mut rx = a.watch();
    let old_leaf = leaf_of(&rx);
    let post = |step: &'static str, body: String| {
        let ca = &ca;
        async move {
            let (code, text) = ca.rotation(step, &body).await;
            assert_eq!(code, 200, "{text}");
        }
    };
    let old_root = meshca::ca::fingerprint(&ca.running.ca.bundle().roots[0]);
    post("prepare", "{}".into()).await;
    post("activate", "{\"force\": true}".into()).await;
    // Activation alone does not make the agent renew (its leaf is valid for 24 h).
    // Real time: a negative check (the agent does not renew on activation).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leaf_of(&rx), old_leaf);
    let t = std::time::Instant::now();
    post("taint", format!("{{\"root\": \"{}\"}}", &old_root[..16])).await;
    let new_leaf = next_leaf(&mut rx, &old_leaf).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "re-certified {took:?} after the taint"
    );
    let st = rx.borrow().clone();
    assert_eq!(st.bundle.tainted.len(), 1);
    let roots: Vec<Vec<u8>> = st
        .bundle
        .roots
        .iter()
        .filter(|r| meshca::ca::fingerprint(r) != old_root)
        .map(|r| r.to_vec())
        .collect();
    let chain = &st.svid.as_ref().unwrap().chain;
    meshca::client::verify_chain(
        &new_leaf,
        &chain[1..].iter().map(|c| c.to_vec()).collect::<Vec<_>>(),
        &roots,
        SystemTime::now(),
    )
    .expect("the new leaf chains to the new root alone");
    // The agent's own registry: two certificates (the first, and the one
    // the taint forced), the expiry of the one it holds, the bundle it holds.
    let value = |sample: &str| metric_value(&a.metrics().render(), sample);
    let ok = "meshca_agent_renewals_total{result=\"ok\"}";
    // Counted after the new certificate is published: polled.
    wait_until(
        "the second renewal is counted",
        Duration::from_secs(5),
        || async { value(ok) == Some(2.0) },
    )
    .await;
    assert_eq!(value("meshca_agent_renewals_total{result=\"error\"}"), None);
    let svid = st.svid.as_ref().unwrap();
    let not_after = svid
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(
        value("meshca_agent_certificate_expiry_timestamp_seconds"),
        Some(not_after as f64)
    );
    assert_eq!(
        value("meshca_agent_trust_bundle_version"),
        Some(st.bundle.version as f64)
    );
}
