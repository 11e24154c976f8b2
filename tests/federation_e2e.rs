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
