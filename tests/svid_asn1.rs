//! Every certificate meshca hands out parses with `simple_asn1` 0.6, the DER
//! parser linkerd2-proxy's SPIRE mode uses on the SVIDs it fetches (issue 14,
//! part 1). That parser fails on any empty constructed value ("Encountered an
//! empty buffer decoding ASN1 block"), so a leaf with an empty subject DN
//! never becomes a linkerd identity. Each chain is taken from one wire API
//! (native, Linkerd, Istio), from the agent (what the Workload API serves),
//! and from the CA's own TLS server, and is also checked with `openssl
//! verify` so the new subject did not break path validation.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use meshca::proto::{istio, meshca as pb};
use support::*;

const WEB_DNS: &str = "web.shop.serviceaccount.identity.meshca.cluster.local";

/// Parses `der` as linkerd2-proxy does and checks the result is one
/// certificate SEQUENCE whose TBSCertificate has a non-empty subject.
fn parse_like_linkerd(what: &str, der: &[u8]) {
    let blocks = simple_asn1::from_der(der)
        .unwrap_or_else(|e| panic!("{what}: simple_asn1 0.6 cannot parse it: {e}"));
    assert_eq!(blocks.len(), 1, "{what}: one top-level block");
    let simple_asn1::ASN1Block::Sequence(_, cert) = &blocks[0] else {
        panic!("{what}: not a SEQUENCE");
    };
    let simple_asn1::ASN1Block::Sequence(_, tbs) = &cert[0] else {
        panic!("{what}: no TBSCertificate");
    };
    // version [0], serial, signature, issuer, validity, subject
    let simple_asn1::ASN1Block::Sequence(_, subject) = &tbs[5] else {
        panic!("{what}: no subject at TBSCertificate[5]: {:?}", tbs[5]);
    };
    assert!(!subject.is_empty(), "{what}: empty subject");
}

/// Parses every certificate of a chain and its roots.
fn parse_all(api: &str, chain: &[Vec<u8>], roots: &[Vec<u8>]) {
    for (i, der) in chain.iter().enumerate() {
        parse_like_linkerd(&format!("{api} chain[{i}]"), der);
    }
    for (i, der) in roots.iter().enumerate() {
        parse_like_linkerd(&format!("{api} root[{i}]"), der);
    }
}

fn roots_of(ca: &Ca) -> Vec<Vec<u8>> {
    meshca::ca::pem_to_certs(ca.bundle_pem().as_bytes())
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

#[tokio::test]
async fn native_api_chains_parse_with_simple_asn1() {
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    // The agent's P-256 key, and RSA from openssl (its SPKI carries a NULL
    // parameter, another zero-length value simple_asn1 must accept).
    let csrs = [
        ("p256", csr()),
        ("rsa", openssl_csr(tmp.path(), &["-newkey", "rsa:2048"])),
    ];
    for (kind, csr) in csrs {
        let r = c
            .certify(pb::CertifyRequest {
                token: ca.token("shop", "web", "meshca"),
                csr,
                requested_ttl: None,
            })
            .await
            .unwrap()
            .into_inner();
        let roots = r.trust_bundle.unwrap().roots;
        parse_all(&format!("native/{kind}"), &r.cert_chain, &roots);
        openssl_verify(tmp.path(), &r.cert_chain[0], &r.cert_chain[1..], &roots);
    }
}

#[tokio::test]
async fn linkerd_api_chain_parses_with_simple_asn1() {
    use linkerd2_proxy_api::identity as l5d;
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = l5d::identity_client::IdentityClient::new(ca.channel().await);
    let r = c
        .certify(l5d::CertifyRequest {
            identity: WEB_DNS.into(),
            token: ca.token("shop", "web", "identity.l5d.io").into_bytes(),
            certificate_signing_request: csr_with(&[WEB_DNS], &[], |p| {
                p.distinguished_name
                    .push(rcgen::DnType::CommonName, WEB_DNS);
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut chain = vec![r.leaf_certificate.clone()];
    chain.extend(r.intermediate_certificates.iter().cloned());
    let roots = roots_of(&ca);
    parse_all("linkerd", &chain, &roots);
    openssl_verify(tmp.path(), &chain[0], &chain[1..], &roots);
}

#[tokio::test]
async fn istio_api_chain_parses_with_simple_asn1() {
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
        ca.channel().await,
    );
    let mut req = tonic::Request::new(istio::IstioCertificateRequest {
        csr: meshca::util::pem::encode("CERTIFICATE REQUEST", &csr()),
        validity_duration: 3600,
        metadata: None,
    });
    let tok = ca.token("shop", "web", "istio-ca");
    req.metadata_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    let r = c.create_certificate(req).await.unwrap().into_inner();
    let ders: Vec<Vec<u8>> = r
        .cert_chain
        .iter()
        .map(|p| meshca::ca::pem_to_certs(p.as_bytes()).unwrap()[0].to_vec())
        .collect();
    assert_eq!(ders.len(), 3, "leaf, issuer, root");
    parse_all("istio", &ders[..2], &ders[2..]);
    openssl_verify(tmp.path(), &ders[0], &ders[1..2], &ders[2..]);
}

#[tokio::test]
async fn agent_svid_parses_with_simple_asn1() {
    // What the Workload API (and so linkerd2-proxy in SPIRE mode) receives.
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = ca.start_agent(tmp.path(), Duration::from_secs(3600));
    let svid = agent.ready(Duration::from_secs(20)).await.unwrap();
    let chain: Vec<Vec<u8>> = svid.chain.iter().map(|c| c.to_vec()).collect();
    let roots = roots_of(&ca);
    parse_all("agent", &chain, &roots);
    openssl_verify(tmp.path(), &chain[0], &chain[1..], &roots);
    agent.stop();
}

#[tokio::test]
async fn ca_server_certificate_parses_with_simple_asn1() {
    // The CA's own serving certificate is a leaf from the same profile.
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let roots = roots_of(&ca);
    let mut store = rustls::RootCertStore::empty();
    for r in &roots {
        store.add(r.clone().into()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(ca.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(ca.running.server_name.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let chain: Vec<Vec<u8>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect();
    assert!(chain.len() >= 2, "leaf and issuer");
    parse_all("ca-server", &chain, &roots);
    openssl_verify(tmp.path(), &chain[0], &chain[1..], &roots);
}
