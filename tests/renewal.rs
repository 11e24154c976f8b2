//! Renewal over mTLS (native `Certify` with a client certificate and no
//! token), tried as an attacker would: leaves forged under a stolen root or
//! issuer key, from a foreign CA, with unknown or borrowed serials, and
//! renewal chains that outlive `renewal_max_age` (issue 11, section 1).
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime};

use meshca::ca::CaKey;
use meshca::proto::meshca as pb;
use rustls::pki_types::CertificateDer;
use support::*;
use tonic::Code;

const CA_OWN_ID: &str = "spiffe://cluster.local/ns/meshca/sa/meshca";
const CA_OWN_DNS: &str = "meshca.meshca.serviceaccount.identity.meshca.cluster.local";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const WEB_DNS: &str = "web.shop.serviceaccount.identity.meshca.cluster.local";

/// A certificate and its key, as a client presents them.
struct Held {
    chain: Vec<Vec<u8>>,
    key_pem: String,
}

impl Held {
    fn serial(&self) -> String {
        let (_, x) = x509_parser::parse_x509_certificate(&self.chain[0]).unwrap();
        hex::encode(x.raw_serial())
    }
}

/// Certify with a token for shop/`sa`.
async fn with_token(ca: &Ca, sa: &str) -> Held {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    let r = pb::identity_client::IdentityClient::new(ca.channel().await)
        .certify(pb::CertifyRequest {
            token: ca.token("shop", sa, "meshca"),
            csr,
            requested_ttl: None,
        })
        .await
        .expect("a token always works")
        .into_inner();
    Held {
        chain: r.cert_chain,
        key_pem: key.serialize_pem(),
    }
}

/// Native `Certify` over mTLS with `held` and no token.
async fn renew(ca: &Ca, held: &Held) -> Result<Held, tonic::Status> {
    let chain_pem: String = held
        .chain
        .iter()
        .map(|c| meshca::ca::der_to_pem(c))
        .collect();
    let ch = meshca::client::connect(
        &ca.addr(),
        &ca.bundle_pem(),
        &ca.running.server_name,
        Some((chain_pem, held.key_pem.clone())),
    )
    .await
    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    let r = pb::identity_client::IdentityClient::new(ch)
        .certify(pb::CertifyRequest {
            token: String::new(),
            csr,
            requested_ttl: None,
        })
        .await?
        .into_inner();
    Ok(Held {
        chain: r.cert_chain,
        key_pem: key.serialize_pem(),
    })
}

/// A leaf for `spiffe`/`dns` signed by `issuer` (DER) with `issuer_key`,
/// as someone holding a copy of that key would make it.
fn forge(issuer: &[u8], issuer_key: CaKey, spiffe: &str, dns: &str, serial: Option<&str>) -> Held {
    let signer =
        rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(issuer.to_vec()), issuer_key)
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::URI(spiffe.try_into().unwrap()));
    p.distinguished_name = rcgen::DistinguishedName::new();
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(60)).into();
    p.not_after = (now + Duration::from_secs(3600)).into();
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if let Some(s) = serial {
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&hex::decode(s).unwrap()));
    }
    let cert = p.signed_by(&key, &signer).unwrap();
    Held {
        chain: vec![cert.der().to_vec()],
        key_pem: key.serialize_pem(),
    }
}

/// A CA certificate (an intermediate meshca never made) under `parent`.
fn rogue_intermediate(parent: &[u8], parent_key: CaKey) -> (Vec<u8>, CaKey) {
    let signer =
        rcgen::Issuer::from_ca_cert_der(&CertificateDer::from(parent.to_vec()), parent_key)
            .unwrap();
    let key = CaKey::generate_p256().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "meshca issuer");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = (now - Duration::from_secs(60)).into();
    p.not_after = (now + Duration::from_secs(86400)).into();
    let cert = p.signed_by(&key, &signer).unwrap();
    (cert.der().to_vec(), key)
}

fn assert_refused_with_hint(r: Result<Held, tonic::Status>, why: &str, what: &str) {
    match r {
        Ok(_) => panic!("{what}: a certificate was granted"),
        Err(s) => {
            assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}");
            assert!(
                s.message().contains("present a service-account token")
                    && s.message().contains(why),
                "{what}: {}",
                s.message()
            );
        }
    }
}

#[tokio::test]
async fn a_leaf_forged_under_a_stolen_root_after_an_emergency_rotation_is_refused() {
    let ca = Ca::start().await;
    let old_root = ca.root_ids()[0].clone();
    // The attacker's copy of the root key.
    let (stolen_der, _) = ca.data().read_root(&old_root).unwrap();
    // A workload certified before the incident.
    let before = with_token(&ca, "web").await;
    // The operator's emergency rotation.
    let (code, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = ca.rotation("activate", r#"{"force": true}"#).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = ca
        .rotation("taint", &format!(r#"{{"root": "{old_root}"}}"#))
        .await;
    assert_eq!(code, 200, "{body}");
    assert!(
        ca.root_ids().contains(&old_root),
        "the tainted root is still in the bundle, so TLS accepts chains to it"
    );

    // The forged leaf for the CA's own identity, straight under the stolen root.
    let stolen_key = ca.data().read_root(&old_root).unwrap().1;
    let forged = forge(&stolen_der, stolen_key, CA_OWN_ID, CA_OWN_DNS, None);
    assert_refused_with_hint(
        renew(&ca, &forged).await,
        "was not issued by this CA",
        "forged leaf under the tainted root",
    );
    // Nor can it borrow a genuine serial (meshca's own, from before the rotation).
    let stolen_key = ca.data().read_root(&old_root).unwrap().1;
    let borrowed = forge(
        &stolen_der,
        stolen_key,
        WEB_ID,
        WEB_DNS,
        Some(&before.serial()),
    );
    assert_refused_with_hint(
        renew(&ca, &borrowed).await,
        "does not match the certificate meshca issued",
        "forged leaf with a genuine serial",
    );
    // A genuine leaf whose root is now tainted cannot renew either.
    assert_refused_with_hint(
        renew(&ca, &before).await,
        "tainted",
        "genuine leaf under the tainted root",
    );
    // A token still works, and the new leaf (under the new root) renews.
    let after = with_token(&ca, "web").await;
    let renewed = renew(&ca, &after)
        .await
        .expect("a leaf under the active root renews");
    let (_, leaf) = x509_parser::parse_x509_certificate(&renewed.chain[0]).unwrap();
    assert!(format!("{:?}", leaf.subject_alternative_name()).contains(WEB_ID));
}

#[tokio::test]
async fn leaves_from_issuers_meshca_did_not_make_are_refused() {
    let ca = Ca::start().await;
    let root = ca.root_ids()[0].clone();
    // An intermediate minted with a copy of the (still active) root key:
    // TLS accepts its chain, but meshca never made that issuer.
    let (root_der, root_key) = ca.data().read_root(&root).unwrap();
    let (rogue, rogue_key) = rogue_intermediate(&root_der, root_key);
    let mut leaf = forge(&rogue, rogue_key, WEB_ID, WEB_DNS, None);
    leaf.chain.push(rogue);
    assert_refused_with_hint(
        renew(&ca, &leaf).await,
        "was not issued by this CA",
        "leaf under a rogue intermediate",
    );
    // A wholly foreign CA with the right SPIFFE ID: refused (by TLS, or by us).
    let foreign_key = CaKey::generate_p256().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_root = p.self_signed(&foreign_key).unwrap().der().to_vec();
    let foreign = forge(&foreign_root, foreign_key, WEB_ID, WEB_DNS, None);
    assert!(
        renew(&ca, &foreign).await.is_err(),
        "a foreign CA's leaf never renews"
    );
}

#[tokio::test]
async fn unknown_serials_are_refused_even_when_signed_by_the_real_issuer() {
    let ca = Ca::start().await;
    let genuine = with_token(&ca, "web").await;
    let issuer_der = ca.data().issuer_chain().unwrap()[0].to_vec();
    let issuer_key = || CaKey::from_pem(&ca.data().read_key("issuer.key").unwrap()).unwrap();
    // The issuer key leaked: a serial meshca never issued.
    let mut unknown = forge(
        &issuer_der,
        issuer_key(),
        WEB_ID,
        WEB_DNS,
        Some("7a11ce0000000001"),
    );
    unknown.chain.push(issuer_der.clone());
    assert_refused_with_hint(
        renew(&ca, &unknown).await,
        "serial 7a11ce0000000001 was not issued by this CA",
        "unknown serial",
    );
    // The same key, reusing the genuine certificate's serial.
    let mut copy = forge(
        &issuer_der,
        issuer_key(),
        WEB_ID,
        WEB_DNS,
        Some(&genuine.serial()),
    );
    copy.chain.push(issuer_der);
    assert_refused_with_hint(
        renew(&ca, &copy).await,
        "does not match",
        "genuine serial, forged bytes",
    );
    // The genuine one renews.
    renew(&ca, &genuine).await.expect("genuine leaf renews");
}

#[tokio::test]
async fn renewal_is_bounded_by_renewal_max_age_and_a_token_then_works() {
    let ca = Ca::start_with(|c| c.authn.renewal_max_age = Duration::from_millis(2500)).await;
    let first = with_token(&ca, "web").await;
    let second = renew(&ca, &first).await.expect("renews within max age");
    let third = renew(&ca, &second).await.expect("a renewed leaf renews");
    // Each grant records the token authentication it descends from.
    let log = ca.running.audit.clone().unwrap();
    log.checkpoint().await.unwrap();
    let store = meshca::audit::store::SqliteStore::open_read_only(log.db_path()).unwrap();
    let entry = |serial: &str| -> meshca::audit::Entry {
        let e = meshca::audit::store::AuditStore::by_serial(&store, serial)
            .unwrap()
            .unwrap();
        serde_json::from_slice(&e.body).unwrap()
    };
    let (e1, e3) = (entry(&first.serial()), entry(&third.serial()));
    assert!(e1.auth_time.is_some());
    assert_eq!(e1.auth_time, e3.auth_time, "inherited along the chain");
    assert_eq!(e3.renewed_from.as_deref(), Some(second.serial().as_str()));
    assert_eq!(e3.auth_method.as_deref(), Some("certificate"));

    // Real time: past renewal_max_age, checked against the certificate times TLS sees.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    assert_refused_with_hint(
        renew(&ca, &third).await,
        "renewal_max_age",
        "chain older than renewal_max_age",
    );
    let fresh = with_token(&ca, "web").await;
    renew(&ca, &fresh)
        .await
        .expect("a new token authentication starts a new chain");
}

#[tokio::test]
async fn renewal_max_age_zero_turns_renewal_by_certificate_off() {
    let ca = Ca::start_with(|c| c.authn.renewal_max_age = Duration::ZERO).await;
    let first = with_token(&ca, "web").await;
    assert_refused_with_hint(renew(&ca, &first).await, "disabled", "renewal off");
}

/// Restarts the server of `ca` on the same data directory with `f` applied.
async fn restart(ca: Ca, f: impl FnOnce(&mut meshca::config::ServeConfig)) -> Ca {
    let Ca { running, dir } = ca;
    running.shutdown().await;
    let mut cfg = meshca::config::ServeConfig::for_tests(dir.path().join("data"));
    f(&mut cfg);
    let running = meshca::server::start(cfg).await.expect("server restarts");
    Ca { running, dir }
}

#[tokio::test]
async fn the_index_survives_a_restart_through_the_audit_log_and_fails_closed_without_it() {
    let ca = Ca::start().await;
    let held = with_token(&ca, "web").await;
    let renewed = renew(&ca, &held).await.unwrap();
    let ca = restart(ca, |_| {}).await;
    renew(&ca, &renewed)
        .await
        .expect("leaves granted before the restart still renew");
    // Without the audit log nothing survives a restart: every leaf is
    // unknown to the new process and its holder must present a token.
    let ca = restart(ca, |c| c.audit.audit_log = false).await;
    assert_refused_with_hint(
        renew(&ca, &held).await,
        "was not issued by this CA replica",
        "no audit log after restart",
    );
    let fresh = with_token(&ca, "web").await;
    renew(&ca, &fresh)
        .await
        .expect("without the audit log, leaves of this process renew");
}

#[tokio::test]
async fn the_agent_keeps_its_identity_with_its_token_when_certificates_cannot_renew() {
    // renewal_max_age = 0: every renewal by certificate is refused, as a
    // replica that never saw the serial would. The agent certifies with its
    // token each time, so it keeps renewing.
    let ca = Ca::start_with(|c| {
        c.authn.renewal_max_age = Duration::ZERO;
        c.issuance.min_ttl = Duration::from_secs(1);
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = ca.start_agent(tmp.path(), Duration::from_secs(3));
    let first = agent.ready(Duration::from_secs(10)).await.unwrap();
    let mut rx = agent.watch();
    let renewed = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| {
            s.svid
                .as_ref()
                .is_some_and(|v| v.chain[0] != first.chain[0])
        }),
    )
    .await
    .expect("the agent renewed within 10 s")
    .unwrap()
    .svid
    .clone()
    .unwrap();
    assert_eq!(renewed.spiffe_id, WEB_ID);
}
