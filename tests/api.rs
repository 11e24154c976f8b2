//! End-to-end tests of the three gRPC APIs against a real in-process server
//! over TLS, with chains checked by rustls-webpki and `openssl verify` and the
//! leaf profile checked field by field with x509-parser.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime};

use meshca::proto::{istio, linkerd, meshca as pb};
use support::*;
use tonic::Code;
use x509_parser::prelude::*;

const WEB_DNS: &str = "web.shop.serviceaccount.identity.meshca.cluster.local";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// Checks every field of the leaf profile.
fn check_leaf_profile(leaf: &[u8], issuer: &[u8], ttl: Duration) {
    let (rest, x) = X509Certificate::from_der(leaf).unwrap();
    assert!(rest.is_empty());
    let (_, iss) = X509Certificate::from_der(issuer).unwrap();
    assert_eq!(x.version(), X509Version::V3);
    let serial = x.raw_serial();
    assert_eq!(serial.len(), 16, "128-bit serial");
    assert!(serial[0] & 0x80 == 0, "positive serial");
    // Non-empty (simple_asn1 0.6, linkerd2-proxy's SVID parser, rejects an
    // empty one) and saying nothing the SANs do not: the trust domain and
    // go-spiffe's unique ID, hex(SHA-256(SPIFFE ID)[..16]).
    let subject: Vec<(String, String)> = x
        .subject()
        .iter_attributes()
        .map(|a| (a.attr_type().to_id_string(), a.as_str().unwrap().into()))
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, WEB_ID.as_bytes());
    assert_eq!(
        subject,
        vec![
            ("2.5.4.10".into(), "cluster.local".into()),
            ("2.5.4.45".into(), hex::encode(&digest.as_ref()[..16])),
        ],
        "subject O=<trust domain>, x500UniqueIdentifier=<hash of the SPIFFE ID>"
    );
    assert_eq!(x.issuer(), iss.subject());
    assert_eq!(
        x.signature_algorithm.algorithm.to_id_string(),
        "1.2.840.10045.4.3.2"
    );

    let now = SystemTime::now();
    let nb = meshca::ca::to_system_time(x.validity().not_before);
    let na = meshca::ca::to_system_time(x.validity().not_after);
    assert!(
        within(nb, now - Duration::from_secs(60), Duration::from_secs(5)),
        "notBefore = now - 60s"
    );
    assert!(
        within(na, now + ttl, Duration::from_secs(5)),
        "notAfter = now + ttl"
    );

    let mut seen = std::collections::HashSet::new();
    for ext in x.extensions() {
        seen.insert(ext.oid.to_id_string());
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                assert!(ext.critical);
                assert!(!bc.ca);
            }
            ParsedExtension::KeyUsage(ku) => {
                assert!(ext.critical);
                assert!(ku.digital_signature());
                assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                assert!(eku.server_auth && eku.client_auth);
                assert!(!eku.any);
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                // RFC 5280 §4.2.1.6: critical only with an empty subject.
                assert!(!ext.critical, "SAN not critical with a non-empty subject");
                let uris: Vec<_> = san
                    .general_names
                    .iter()
                    .filter_map(|g| {
                        if let GeneralName::URI(u) = g {
                            Some(*u)
                        } else {
                            None
                        }
                    })
                    .collect();
                let dns: Vec<_> = san
                    .general_names
                    .iter()
                    .filter_map(|g| {
                        if let GeneralName::DNSName(d) = g {
                            Some(*d)
                        } else {
                            None
                        }
                    })
                    .collect();
                assert_eq!(uris, vec![WEB_ID], "exactly one URI SAN");
                assert_eq!(dns, vec![WEB_DNS]);
                assert_eq!(san.general_names.len(), 2);
            }
            ParsedExtension::SubjectKeyIdentifier(_) => {}
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                let ski = iss
                    .extensions()
                    .iter()
                    .find_map(|e| match e.parsed_extension() {
                        ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                        _ => None,
                    })
                    .unwrap();
                assert_eq!(aki.key_identifier.as_ref().unwrap().0, ski.as_slice());
            }
            other => panic!("unexpected extension {other:?}"),
        }
    }
    for oid in [
        "2.5.29.19",
        "2.5.29.15",
        "2.5.29.37",
        "2.5.29.17",
        "2.5.29.14",
        "2.5.29.35",
    ] {
        assert!(seen.contains(oid), "extension {oid} present");
    }
}

#[tokio::test]
async fn native_api_issues_a_verifiable_svid() {
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let r = c
        .certify(pb::CertifyRequest {
            token: ca.token("shop", "web", "meshca"),
            csr: csr(),
            requested_ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.spiffe_id, WEB_ID);
    assert_eq!(r.dns_identity, WEB_DNS);
    assert!(!r.ttl_clamped);
    assert_eq!(r.cert_chain.len(), 2, "leaf + issuer");
    let bundle = r.trust_bundle.unwrap();
    assert_eq!(bundle.trust_domain, "cluster.local");
    assert_eq!(bundle.version, 1);
    check_leaf_profile(
        &r.cert_chain[0],
        &r.cert_chain[1],
        Duration::from_secs(3600),
    );
    meshca::client::verify_chain(
        &r.cert_chain[0],
        &r.cert_chain[1..],
        &bundle.roots,
        SystemTime::now(),
    )
    .unwrap();
    openssl_verify(
        tmp.path(),
        &r.cert_chain[0],
        &r.cert_chain[1..],
        &bundle.roots,
    );
    let not_after = r.not_after.unwrap().seconds;
    let refresh = r.refresh_at.unwrap().seconds;
    let now = now_s() as i64;
    assert!(
        refresh > now && refresh < not_after,
        "refresh between now and expiry"
    );
}

#[tokio::test]
async fn ttl_above_maximum_is_clamped_and_reported() {
    let ca = Ca::start_with(|c| c.set_max_ttl(Duration::from_secs(7200))).await;
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let r = c
        .certify(pb::CertifyRequest {
            token: ca.token("shop", "web", "meshca"),
            csr: csr(),
            requested_ttl: Some(prost_types::Duration {
                seconds: 86400 * 30,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.ttl_clamped);
    let life = r.not_after.unwrap().seconds - now_s() as i64;
    assert!((7190..=7205).contains(&life), "lifetime {life}");
}

#[tokio::test]
async fn linkerd_api_with_the_linkerd2_proxy_api_client() {
    // The crates.io linkerd2-proxy-api client: generated code we did not write.
    use linkerd2_proxy_api::identity as l5d;
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = l5d::identity_client::IdentityClient::new(ca.channel().await);
    // As linkerd2-proxy does: raw token bytes; DER CSR from a P-256 key with
    // CN and DNS SAN set to its identity.
    let csr = csr_with(&[WEB_DNS], &[], |p| {
        p.distinguished_name
            .push(rcgen::DnType::CommonName, WEB_DNS);
    });
    let r = c
        .certify(l5d::CertifyRequest {
            identity: WEB_DNS.into(),
            token: ca.token("shop", "web", "identity.l5d.io").into_bytes(),
            certificate_signing_request: csr,
        })
        .await
        .unwrap()
        .into_inner();
    let valid_until = r.valid_until.expect("valid_until is required by the proxy");
    let (_, leaf) = X509Certificate::from_der(&r.leaf_certificate).expect("DER leaf");
    assert_eq!(leaf.validity().not_after.timestamp(), valid_until.seconds);
    assert_eq!(r.intermediate_certificates.len(), 1);
    let roots = meshca::ca::pem_to_certs(ca.bundle_pem().as_bytes()).unwrap();
    let roots: Vec<Vec<u8>> = roots.iter().map(|r| r.to_vec()).collect();
    for i in &r.intermediate_certificates {
        assert!(!roots.contains(i), "intermediates exclude the root");
    }
    check_leaf_profile(
        &r.leaf_certificate,
        &r.intermediate_certificates[0],
        Duration::from_secs(86400),
    );
    meshca::client::verify_chain(
        &r.leaf_certificate,
        &r.intermediate_certificates,
        &roots,
        SystemTime::now(),
    )
    .unwrap();
    openssl_verify(
        tmp.path(),
        &r.leaf_certificate,
        &r.intermediate_certificates,
        &roots,
    );

    // Our own generated client speaks the same wire format.
    let mut ours = linkerd::identity_client::IdentityClient::new(ca.channel().await);
    let r2 = ours
        .certify(linkerd::CertifyRequest {
            identity: WEB_DNS.into(),
            token: ca.token("shop", "web", "identity.l5d.io").into_bytes(),
            certificate_signing_request: csr_with(&[WEB_DNS], &[], |_| {}),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r2.valid_until.is_some());
}

#[tokio::test]
async fn istio_api_returns_pem_chain_with_bundle_last() {
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
        ca.channel().await,
    );
    let csr_pem = meshca::util::pem::encode("CERTIFICATE REQUEST", &csr());
    let mut req = tonic::Request::new(istio::IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: 7200,
        metadata: None,
    });
    let tok = ca.token("shop", "web", "istio-ca");
    req.metadata_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    let r = c.create_certificate(req).await.unwrap().into_inner();
    assert_eq!(r.cert_chain.len(), 3, "leaf, issuer, root");
    let ders: Vec<Vec<u8>> = r
        .cert_chain
        .iter()
        .map(|p| meshca::ca::pem_to_certs(p.as_bytes()).unwrap()[0].to_vec())
        .collect();
    let bundle = meshca::ca::pem_to_certs(ca.bundle_pem().as_bytes()).unwrap();
    assert_eq!(ders[2], bundle[0].to_vec(), "trust bundle last");
    check_leaf_profile(&ders[0], &ders[1], Duration::from_secs(7200));
    openssl_verify(tmp.path(), &ders[0], &ders[1..2], &ders[2..]);
}

#[tokio::test]
async fn rsa_and_p384_csrs_from_openssl_are_accepted() {
    let ca = Ca::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    for (newkey, rsa) in [
        (vec!["-newkey", "rsa:2048"], true),
        (
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            false,
        ),
        (vec!["-newkey", "ed25519"], false),
    ] {
        let r = c
            .certify(pb::CertifyRequest {
                token: ca.token("shop", "web", "meshca"),
                csr: openssl_csr(tmp.path(), &newkey),
                requested_ttl: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{newkey:?}: {e}"))
            .into_inner();
        let (_, x) = X509Certificate::from_der(&r.cert_chain[0]).unwrap();
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature());
        assert_eq!(
            ku.key_encipherment(),
            rsa,
            "keyEncipherment only for RSA ({newkey:?})"
        );
        let roots = r.trust_bundle.unwrap().roots;
        openssl_verify(tmp.path(), &r.cert_chain[0], &r.cert_chain[1..], &roots);
    }
}

#[tokio::test]
async fn renewal_over_mtls_needs_no_token() {
    let ca = Ca::start().await;
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let (key, csr) = meshca::client::new_key_and_csr(None).unwrap();
    let first = c
        .certify(pb::CertifyRequest {
            token: ca.token("shop", "web", "meshca"),
            csr,
            requested_ttl: None,
        })
        .await
        .unwrap()
        .into_inner();
    let chain_pem: String = first
        .cert_chain
        .iter()
        .map(|c| meshca::ca::der_to_pem(c))
        .collect();
    let mtls = meshca::client::connect(
        &ca.addr(),
        &ca.bundle_pem(),
        &ca.running.server_name,
        Some((chain_pem, key.serialize_pem())),
    )
    .await
    .unwrap();
    let mut c2 = pb::identity_client::IdentityClient::new(mtls);
    let renewed = c2
        .certify(pb::CertifyRequest {
            token: String::new(),
            csr: meshca::client::new_key_and_csr(None).unwrap().1,
            requested_ttl: None,
        })
        .await
        .expect("the certificate authenticates the renewal")
        .into_inner();
    assert_eq!(renewed.spiffe_id, WEB_ID);
    assert_ne!(renewed.cert_chain[0], first.cert_chain[0]);

    // Without a certificate and without a token: refused.
    let mut anon = pb::identity_client::IdentityClient::new(ca.channel().await);
    let e = anon
        .certify(pb::CertifyRequest {
            token: String::new(),
            csr: meshca::client::new_key_and_csr(None).unwrap().1,
            requested_ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn trust_bundle_get_and_watch() {
    let ca = Ca::start().await;
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let b = c
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.version, 1);
    let pem_roots = meshca::ca::pem_to_certs(ca.bundle_pem().as_bytes()).unwrap();
    assert_eq!(b.roots, vec![pem_roots[0].to_vec()]);

    let mut stream = c
        .watch_trust_bundle(pb::WatchTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.version, 1, "current bundle at once");
    // A change (as rotation will make) reaches the watcher.
    let mut roots = pem_roots.clone();
    let extra = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    roots.push(extra.der().clone());
    ca.running.ca.set_bundle(meshca::ca::TrustBundle {
        version: 2,
        roots,
        ..Default::default()
    });
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("update arrives")
        .unwrap()
        .unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(second.roots.len(), 2);
}

#[tokio::test]
async fn admin_endpoint_serves_metrics_and_health() {
    let ca = Ca::start().await;
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    c.certify(pb::CertifyRequest {
        token: ca.token("shop", "web", "meshca"),
        csr: csr(),
        requested_ttl: None,
    })
    .await
    .unwrap();
    let _ = c
        .certify(pb::CertifyRequest {
            token: "garbage".into(),
            csr: csr(),
            requested_ttl: None,
        })
        .await
        .unwrap_err();
    let get = |path: &str| {
        let addr = ca.running.admin_addr;
        let path = path.to_string();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                // The admin endpoint answers only its own address (DNS-rebinding guard).
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let m = get("/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    // This server's registry saw exactly one grant and one refusal: every
    // value below is what a registry that missed (or double-counted) a
    // decision, or kept a stale gauge, would get wrong.
    let value = |sample: &str| {
        metric_value(&m, sample).unwrap_or_else(|| panic!("no sample {sample}:\n{m}"))
    };
    let native = |result: &str, reason: &str| {
        value(&format!(
            "meshca_issuance_total{{api=\"native\",result=\"{result}\",reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(native("granted", "ok"), 1.0);
    assert_eq!(native("refused", "bad_token"), 1.0);
    assert_eq!(
        value("meshca_issuance_duration_seconds_count{api=\"native\"}"),
        2.0,
        "one latency per decision"
    );
    assert_eq!(
        value("meshca_token_validations_total{method=\"dev_key\",result=\"ok\"}"),
        1.0
    );
    // Nothing in flight once both answers are in (the guard decrements).
    assert_eq!(value("meshca_in_flight_requests"), 0.0);
    // The gauges are the CA's actual state.
    let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64;
    let issuer = ca.running.ca.issuer();
    assert_eq!(
        value("meshca_issuer_expiry_timestamp_seconds"),
        unix(issuer.not_after)
    );
    let bundle = ca.running.ca.bundle();
    let (_, root) = X509Certificate::from_der(&bundle.roots[0]).unwrap();
    assert_eq!(
        value("meshca_root_expiry_timestamp_seconds"),
        root.validity().not_after.timestamp() as f64
    );
    assert_eq!(value("meshca_trust_bundle_version"), bundle.version as f64);
    assert!(get("/live").await.starts_with("HTTP/1.1 200"));
    assert!(get("/ready").await.starts_with("HTTP/1.1 200"));
}
