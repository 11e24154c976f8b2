#![allow(clippy::unwrap_used)]
//! SPIFFE federation between two meshca CAs in different trust domains
//! (issue 14, part 4): each serves its bundle endpoint and follows the
//! other's; the native bundle stream carries the foreign bundle; a rotation
//! in one reaches the other on the refresh hint; and the attacks: a bundle
//! for another trust domain, an endpoint with the wrong SPIFFE ID or from
//! another trust domain, an https_web certificate that does not verify,
//! oversized, malformed and older bundles. Each is refused and the last
//! good bundle kept.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::ca::store::{DataDir, InitOptions};
use meshca::config::ServeConfig;
use meshca::federation::settings::{Follow, ServeProfile};
use meshca::proto::meshca as pb;
use meshca::trust::spiffe_bundle::SpiffeBundle;
use support::{closed_port, wait_until, Ca};

const A: &str = "a.example";
const B: &str = "b.example";

fn spiffe_id(td: &str) -> String {
    format!("spiffe://{td}/ns/meshca/sa/meshca")
}

/// A data directory initialized before its server starts, so a peer can
/// be configured with its bundle.pem as the bootstrap bundle.
fn init_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    DataDir::new(&data)
        .init(&InitOptions::default(), SystemTime::now())
        .unwrap();
    (dir, data)
}

fn follow(spec: &str) -> Follow {
    spec.parse().unwrap()
}

fn spiffe_follow(td: &str, port: u16, bootstrap: &Path) -> Follow {
    follow(&format!(
        "td={td},url=https://127.0.0.1:{port}/,profile=https_spiffe,endpoint_spiffe_id={},bundle={}",
        spiffe_id(td),
        bootstrap.join("bundle.pem").display()
    ))
}

async fn start(
    dir: tempfile::TempDir,
    data: PathBuf,
    td: &str,
    edit: impl FnOnce(&mut ServeConfig),
) -> Ca {
    let mut cfg = ServeConfig::for_tests(data);
    cfg.issuance.mesh.trust_domain = td.parse().unwrap();
    edit(&mut cfg);
    let running = meshca::server::start(cfg).await.expect("server starts");
    Ca { running, dir }
}

async fn watch(ca: &Ca) -> tonic::Streaming<pb::TrustBundle> {
    pb::identity_client::IdentityClient::new(ca.channel().await)
        .watch_trust_bundle(pb::WatchTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn get(ca: &Ca) -> pb::TrustBundle {
    pb::identity_client::IdentityClient::new(ca.channel().await)
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner()
}

fn roots_of(ca: &Ca) -> Vec<Vec<u8>> {
    ca.running
        .ca
        .bundle()
        .roots
        .iter()
        .map(|r| r.to_vec())
        .collect()
}

/// Reads the stream until a message whose `td` bundle has `roots`.
async fn until_federated(
    stream: &mut tonic::Streaming<pb::TrustBundle>,
    td: &str,
    roots: &[Vec<u8>],
    limit: Duration,
) -> pb::TrustBundle {
    tokio::time::timeout(limit, async {
        loop {
            let m = stream.message().await.unwrap().expect("stream open");
            if m.federated_bundles.get(td).map(|b| &b.x509_authorities[..]) == Some(roots) {
                return m;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no bundle of {td} with the expected roots within {limit:?}"))
}

fn failures(ca: &Ca, td: &str, reason: &str) -> f64 {
    ca.metric(&format!(
        "meshca_federation_refresh_failures_total{{trust_domain=\"{td}\",reason=\"{reason}\"}}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cas_follow_each_other_and_a_rotation_reaches_the_other_on_the_hint() {
    let (dir_a, data_a) = init_dir();
    let (dir_b, data_b) = init_dir();
    let (port_a, port_b) = (closed_port(), closed_port());
    let follow_b = spiffe_follow(B, port_b, &data_b);
    let follow_a = spiffe_follow(A, port_a, &data_a);
    let b = start(dir_b, data_b, B, |c| {
        c.federation.listen = Some(([127, 0, 0, 1], port_b).into());
        c.federation.refresh_hint = Duration::from_secs(1); // followers clamp to 5 s
        c.federation.follow = vec![follow_a];
    })
    .await;
    let a = start(dir_a, data_a.clone(), A, |c| {
        c.federation.listen = Some(([127, 0, 0, 1], port_a).into());
        c.federation.follow = vec![follow_b];
    })
    .await;

    // Each side's native stream carries the other's bundle, fetched (sequence
    // = the other's version, where the PEM bootstrap has none).
    let mut on_a = watch(&a).await;
    let first = until_federated(&mut on_a, B, &roots_of(&b), Duration::from_secs(20)).await;
    wait_until(
        "A has fetched B's bundle",
        Duration::from_secs(20),
        || async { get(&a).await.federated_bundles.get(B).map(|f| f.sequence) == Some(1) },
    )
    .await;
    let mut on_b = watch(&b).await;
    until_federated(&mut on_b, A, &roots_of(&a), Duration::from_secs(20)).await;
    // The metric is recorded just after the bundle is adopted.
    let refreshed =
        format!("meshca_federation_last_refresh_timestamp_seconds{{trust_domain=\"{B}\"}}");
    wait_until(
        "the refresh time metric",
        Duration::from_secs(5),
        || async { a.metric(&refreshed) > 1.7e9 },
    )
    .await;
    // The last good bundle is kept in A's data directory.
    let kept = std::fs::read(data_a.join("federation").join(format!("{B}.json"))).unwrap();
    let kept = SpiffeBundle::parse(&kept, &B.parse().unwrap()).unwrap();
    assert_eq!(kept.sequence, Some(1));

    // A rotation in B (a new root joins its bundle) reaches A's workloads on
    // B's refresh hint, without changing A's own version.
    let (status, body) = b.rotation("prepare", "{}").await;
    assert_eq!(status, 200, "{body}");
    let b_roots = roots_of(&b);
    assert_eq!(b_roots.len(), 2);
    let after = until_federated(&mut on_a, B, &b_roots, Duration::from_secs(30)).await;
    assert_eq!(
        after.version, first.version,
        "federated changes do not move our own version"
    );
    assert!(after.federation_version > first.federation_version);
    assert_eq!(after.federated_bundles[B].sequence, 2);

    // The served document is what a SPIFFE client expects.
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.dir.path().join("data/bundle.spiffe.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["spiffe_sequence"], 2);
    assert_eq!(doc["spiffe_refresh_hint"], 1);
    let uses = |u: &str| {
        doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == u)
            .count()
    };
    assert_eq!(uses("x509-svid"), 2, "both roots during the rotation");
    // B's JWT-SVID keys travel too, and reach A with their kids.
    let jwt = b.running.ca.bundle().jwt_keys.clone();
    assert_eq!(uses("jwt-svid"), jwt.len());
    let got: Vec<&str> = after.federated_bundles[B]
        .jwt_authorities
        .iter()
        .map(|k| k.key_id.as_str())
        .collect();
    let want: Vec<&str> = jwt.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_spiffe_endpoint_with_the_wrong_id_or_from_another_domain_is_refused() {
    let (dir_b, data_b) = init_dir();
    let (dir_c, data_c) = init_dir();
    let (port_b, port_c) = (closed_port(), closed_port());
    let b = start(dir_b, data_b.clone(), B, |c| {
        c.federation.listen = Some(([127, 0, 0, 1], port_b).into());
    })
    .await;
    // C is another trust domain's CA; its endpoint sits where A expects B's.
    let _c = start(dir_c, data_c, "c.example", |c| {
        c.federation.listen = Some(([127, 0, 0, 1], port_c).into());
    })
    .await;
    let wrong_id = follow(&format!(
        "td={B},url=https://127.0.0.1:{port_b}/,profile=https_spiffe,endpoint_spiffe_id=spiffe://{B}/ns/meshca/sa/other,bundle={}",
        data_b.join("bundle.pem").display()
    ));
    // d.example's endpoint is to be authenticated by B's bundle (not
    // self-serving), but C answers there with its own SVID.
    let other_domain = follow(&format!(
        "td=d.example,url=https://127.0.0.1:{port_c}/,profile=https_spiffe,endpoint_spiffe_id=spiffe://{B}/ns/meshca/sa/meshca"
    ));
    let (dir_a, data_a) = init_dir();
    let a = start(dir_a, data_a, A, |c| {
        c.federation.follow = vec![wrong_id, other_domain];
    })
    .await;
    wait_until("both refusals", Duration::from_secs(20), || async {
        failures(&a, B, "tls") >= 1.0 && failures(&a, "d.example", "tls") >= 1.0
    })
    .await;
    let held = get(&a).await;
    // B: only the bootstrap bundle (PEM: no sequence); d.example: nothing.
    assert_eq!(held.federated_bundles[B].sequence, 0);
    assert_eq!(held.federated_bundles[B].x509_authorities, roots_of(&b));
    assert!(!held.federated_bundles.contains_key("d.example"));
}

/// The operator's certificate for the https_web endpoint, and a CA file
/// that verifies it.
fn web_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let (c, k, ca) = (
        dir.join("web.crt"),
        dir.join("web.key"),
        dir.join("web-ca.pem"),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    (c, k, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_web_is_followed_with_its_ca_and_refused_when_the_certificate_does_not_verify() {
    let (dir_b, data_b) = init_dir();
    let (cert, key, ca_file) = web_pki(dir_b.path());
    let other = tempfile::tempdir().unwrap();
    let (_, _, other_ca) = web_pki(other.path());
    let port_b = closed_port();
    let b = start(dir_b, data_b, B, |c| {
        c.federation.listen = Some(([127, 0, 0, 1], port_b).into());
        c.federation.profile = ServeProfile::HttpsWeb {
            cert_file: cert,
            key_file: key,
        };
    })
    .await;
    let url = format!("https://127.0.0.1:{port_b}/");
    let good = follow(&format!(
        "td={B},url={url},profile=https_web,ca={}",
        ca_file.display()
    ));
    let bad = follow(&format!(
        "td=c.example,url={url},profile=https_web,ca={}",
        other_ca.display()
    ));
    let (dir_a, data_a) = init_dir();
    let a = start(dir_a, data_a, A, |c| c.federation.follow = vec![good, bad]).await;
    let mut on_a = watch(&a).await;
    until_federated(&mut on_a, B, &roots_of(&b), Duration::from_secs(20)).await;
    wait_until(
        "the unverifiable endpoint is refused",
        Duration::from_secs(20),
        || async { failures(&a, "c.example", "tls") >= 1.0 },
    )
    .await;
    assert!(!get(&a).await.federated_bundles.contains_key("c.example"));
}

/// What the fake endpoint serves, by phase.
fn fake_bundle(phase: usize, good: &SpiffeBundle, evil: &SpiffeBundle) -> (u16, Vec<u8>) {
    match phase {
        0 => (200, good.to_json().unwrap().into_bytes()),
        1 => (200, evil.to_json().unwrap().into_bytes()),
        2 => {
            let older = SpiffeBundle {
                sequence: Some(4),
                ..good.clone()
            };
            (200, older.to_json().unwrap().into_bytes())
        }
        3 => (
            200,
            vec![b' '; meshca::trust::spiffe_bundle::MAX_DOCUMENT_BYTES + 10],
        ),
        _ => (
            200,
            br#"{"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["bm90IGEgY2VydA=="]}]}"#
                .to_vec(),
        ),
    }
}

fn ca_with_uri(uri: &str) -> rustls::pki_types::CertificateDer<'static> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bundles_are_refused_with_their_reason_and_the_last_good_one_is_kept() {
    let good = SpiffeBundle {
        x509_authorities: vec![ca_with_uri(&format!("spiffe://{B}"))],
        sequence: Some(5),
        refresh_hint: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let evil = SpiffeBundle {
        x509_authorities: vec![ca_with_uri("spiffe://evil.example")],
        sequence: Some(6),
        ..good.clone()
    };
    let phase = Arc::new(AtomicUsize::new(0));
    let p = phase.clone();
    let (g, e) = (good.clone(), evil.clone());
    let (addr, ca_pem) = support::https_server(Arc::new(move |_req| {
        let (status, body) = fake_bundle(p.load(Ordering::SeqCst), &g, &e);
        Box::pin(async move {
            use http_body_util::BodyExt;
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)).boxed())
                .unwrap()
        })
    }))
    .await;
    let (dir_a, data_a) = init_dir();
    let ca_file = dir_a.path().join("endpoint-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let f = follow(&format!(
        "td={B},url=https://127.0.0.1:{}/,profile=https_web,ca={}",
        addr.port(),
        ca_file.display()
    ));
    let a = start(dir_a, data_a, A, |c| c.federation.follow = vec![f]).await;
    let good_roots: Vec<Vec<u8>> = good.x509_authorities.iter().map(|c| c.to_vec()).collect();
    let mut on_a = watch(&a).await;
    until_federated(&mut on_a, B, &good_roots, Duration::from_secs(20)).await;

    for (i, reason) in [
        (1, "wrong_trust_domain"),
        (2, "sequence_regressed"),
        (3, "too_large"),
        (4, "malformed"),
    ] {
        phase.store(i, Ordering::SeqCst);
        wait_until(reason, Duration::from_secs(30), || async {
            failures(&a, B, reason) >= 1.0
        })
        .await;
        let held = &get(&a).await.federated_bundles[B];
        assert_eq!(
            held.x509_authorities, good_roots,
            "after {reason}: the last good bundle is kept"
        );
        assert_eq!(held.sequence, 5);
    }
    // The operator sees the state, and the last refusal in words.
    let (code, text) = meshca::client::admin::request(
        "GET",
        &format!("http://{}/federation", a.running.admin_addr),
        Some(&a.admin_token()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let d = &v["trust_domains"][0];
    assert_eq!(d["trust_domain"], B);
    assert_eq!(d["sequence"], 5);
    assert!(d["consecutive_failures"].as_u64().unwrap() >= 1, "{d}");
    assert!(
        d["last_error"].as_str().unwrap().contains("malformed"),
        "{d}"
    );
    let (code, _) = meshca::client::admin::request(
        "GET",
        &format!("http://{}/federation", a.running.admin_addr),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 401, "the status needs the admin token");
}
