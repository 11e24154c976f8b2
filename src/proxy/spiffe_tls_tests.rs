//! Attacks on the trust-domain-aware verifiers: a peer is checked against
//! the bundle of the trust domain its SPIFFE ID names, and no other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::agent::{Bundle, FederatedBundle, Svid};
use crate::util::secret::SecretBytes;

/// A test CA: its root certificate and a signer.
struct TestCa {
    root: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> TestCa {
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

/// A leaf from `ca` carrying `uris` as URI SANs.
fn leaf(ca: &TestCa, uris: &[&str]) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    let cert = p.signed_by(&key, &ca.issuer).unwrap().der().clone();
    (cert, key)
}

/// An agent state: a leaf for `id` from `ca`, our bundle `roots`, and the
/// federated bundles `fed` (trust domain, roots).
fn state(ca: &TestCa, id: &str, roots: &[&TestCa], fed: &[(&str, &TestCa)]) -> State {
    state_with(leaf(ca, &[id]), id, roots, fed)
}

fn state_with(
    (cert, key): (CertificateDer<'static>, KeyPair),
    id: &str,
    roots: &[&TestCa],
    fed: &[(&str, &TestCa)],
) -> State {
    let far = SystemTime::now() + Duration::from_secs(3600);
    let federated: BTreeMap<String, FederatedBundle> = fed
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
        .collect();
    State {
        svid: Some(Arc::new(Svid {
            spiffe_id: id.to_string(),
            chain: vec![cert],
            key_pkcs8: SecretBytes::new(key.serialize_der()),
            key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
            not_after: far,
            renew_at: far,
        })),
        bundle: Arc::new(Bundle {
            version: 1,
            roots: roots.iter().map(|c| c.root.clone()).collect(),
            federated,
            ..Default::default()
        }),
    }
}

/// Runs one handshake in memory: `client` dials `server` expecting the
/// SPIFFE ID `expected`. Ok: the server's view of the client's ID. Err: the
/// reason (`failure_reason`) of the side that refused.
async fn handshake(server: &State, client: &State, expected: &str) -> Result<String, String> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(server).unwrap());
    let connector = tokio_rustls::TlsConnector::from(client_config(client, expected).unwrap());
    let name = ServerName::try_from("peer.invalid").unwrap();
    let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
    match (s, c) {
        (Ok(mut s), Ok(mut c)) => {
            // TLS 1.3: the server's verdict on the client certificate
            // arrives after the client's handshake completes; one exchange
            // makes it visible to both.
            c.write_all(b"x").await.unwrap();
            let mut buf = [0u8; 1];
            s.read_exact(&mut buf)
                .await
                .map_err(|e| failure_reason(&e).to_string())?;
            let id = s.get_ref().1.peer_certificates().unwrap()[0].clone();
            Ok(crate::ca::uri_san(&id).unwrap())
        }
        // The client checks the server first: when it refused, the
        // server only saw its alert.
        (_, Err(e)) => Err(format!("client: {}", failure_reason(&e))),
        (Err(e), _) => Err(format!("server: {}", failure_reason(&e))),
    }
}

const A_API: &str = "spiffe://a.test/ns/shop/sa/api";
const B_WEB: &str = "spiffe://b.test/ns/shop/sa/web";

#[tokio::test]
async fn a_foreign_peer_verifies_to_its_own_domains_bundle_both_ways() {
    let (a, b) = (ca("a"), ca("b"));
    let server = state(&a, A_API, &[&a], &[("b.test", &b)]);
    let client = state(&b, B_WEB, &[&b], &[("a.test", &a)]);
    assert_eq!(handshake(&server, &client, A_API).await, Ok(B_WEB.into()));
    // And the other way round (the B side serving).
    assert_eq!(handshake(&client, &server, B_WEB).await, Ok(A_API.into()));
}

/// The attack federation opens: B's CA (trusted for b.test) mints a
/// certificate claiming an a.test identity. It must not verify to A's
/// roots, inbound or outbound, even though B's root is held.
#[tokio::test]
async fn a_certificate_from_bs_ca_claiming_an_a_identity_is_refused() {
    let (a, b) = (ca("a"), ca("b"));
    let server = state(&a, A_API, &[&a], &[("b.test", &b)]);
    // (The forger trusts A's roots to complete its side.)
    let forged = state(&b, "spiffe://a.test/ns/shop/sa/web", &[&a], &[]);
    assert_eq!(
        handshake(&server, &forged, A_API).await,
        Err("server: unknown_ca".into())
    );
    // Outbound: an upstream forging the expected a.test ID with B's CA.
    let forged_server = state(&b, A_API, &[&b], &[("a.test", &a)]);
    let client = state(
        &a,
        "spiffe://a.test/ns/shop/sa/web",
        &[&a],
        &[("b.test", &b)],
    );
    assert_eq!(
        handshake(&forged_server, &client, A_API).await,
        Err("client: unknown_ca".into())
    );
}

/// A federated entry that names our own trust domain does not add anchors
/// for it: only our own CA vouches for our domain.
#[tokio::test]
async fn a_federated_bundle_for_our_own_domain_is_ignored() {
    let (a, b) = (ca("a"), ca("b"));
    let server = state(&a, A_API, &[&a], &[("a.test", &b), ("b.test", &b)]);
    // (The forger trusts A's roots to complete its side.)
    let forged = state(&b, "spiffe://a.test/ns/shop/sa/web", &[&a], &[]);
    assert_eq!(
        handshake(&server, &forged, A_API).await,
        Err("server: unknown_ca".into())
    );
}

#[tokio::test]
async fn a_foreign_domain_without_a_bundle_is_refused_both_ways() {
    let (a, b) = (ca("a"), ca("b"));
    let server = state(&a, A_API, &[&a], &[]);
    let client = state(&b, B_WEB, &[&b], &[("a.test", &a)]);
    assert_eq!(
        handshake(&server, &client, A_API).await,
        Err("server: unknown_trust_domain".into())
    );
    // A bundle for another foreign domain does not stand in for it.
    let c = ca("c");
    let server = state(&a, A_API, &[&a], &[("c.test", &c)]);
    assert_eq!(
        handshake(&server, &client, A_API).await,
        Err("server: unknown_trust_domain".into())
    );
    // Outbound to a b.test upstream without b.test's bundle.
    let upstream = state(&b, B_WEB, &[&b], &[("a.test", &a)]);
    let ours = state(&a, A_API, &[&a], &[]);
    assert_eq!(
        handshake(&upstream, &ours, B_WEB).await,
        Err("client: unknown_trust_domain".into())
    );
}

#[tokio::test]
async fn a_peer_with_no_or_two_spiffe_ids_is_refused() {
    let (a, b) = (ca("a"), ca("b"));
    let server = state(&a, A_API, &[&a], &[("b.test", &b)]);
    let two = leaf(&b, &[B_WEB, "spiffe://a.test/ns/shop/sa/web"]);
    let client = state_with(two, B_WEB, &[&b], &[("a.test", &a)]);
    assert_eq!(
        handshake(&server, &client, A_API).await,
        Err("server: no_spiffe_id".into())
    );
    let bad = leaf(&b, &["https://b.test/web"]);
    let client = state_with(bad, B_WEB, &[&b], &[("a.test", &a)]);
    assert_eq!(
        handshake(&server, &client, A_API).await,
        Err("server: no_spiffe_id".into())
    );
}

#[tokio::test]
async fn a_foreign_upstream_with_another_id_is_refused() {
    let (a, b) = (ca("a"), ca("b"));
    let upstream = state(
        &b,
        "spiffe://b.test/ns/shop/sa/other",
        &[&b],
        &[("a.test", &a)],
    );
    let ours = state(&a, A_API, &[&a], &[("b.test", &b)]);
    assert_eq!(
        handshake(&upstream, &ours, B_WEB).await,
        Err("client: identity_mismatch".into())
    );
}
