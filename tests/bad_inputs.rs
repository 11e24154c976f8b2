//! A table of bad inputs, each with the exact gRPC code it must get; the
//! server must keep serving afterwards.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use meshca::proto::{istio, linkerd, meshca as pb};
use serde_json::json;
use support::*;
use tonic::{Code, Request};

const WEB_DNS: &str = "web.shop.serviceaccount.identity.meshca.cluster.local";

enum Call {
    Native {
        token: String,
        csr: Vec<u8>,
        ttl: Option<i64>,
    },
    Linkerd {
        identity: String,
        token: Vec<u8>,
        csr: Vec<u8>,
    },
    Istio {
        auth: Option<String>,
        csr: String,
        ttl: i64,
    },
}

struct Case {
    name: &'static str,
    call: Call,
    code: Code,
    /// A fragment the message must contain (so it tells a human what is wrong).
    says: &'static str,
}

fn native(token: String, csr: Vec<u8>) -> Call {
    Call::Native {
        token,
        csr,
        ttl: None,
    }
}

async fn run(ca: &Ca, call: Call) -> Result<(), tonic::Status> {
    let ch = ca.channel().await;
    match call {
        Call::Native { token, csr, ttl } => pb::identity_client::IdentityClient::new(ch)
            .certify(pb::CertifyRequest {
                token,
                csr,
                requested_ttl: ttl.map(|s| prost_types::Duration {
                    seconds: s,
                    nanos: 0,
                }),
            })
            .await
            .map(|_| ()),
        Call::Linkerd {
            identity,
            token,
            csr,
        } => linkerd::identity_client::IdentityClient::new(ch)
            .certify(linkerd::CertifyRequest {
                identity,
                token,
                certificate_signing_request: csr,
            })
            .await
            .map(|_| ()),
        Call::Istio { auth, csr, ttl } => {
            let mut req = Request::new(istio::IstioCertificateRequest {
                csr,
                validity_duration: ttl,
                metadata: None,
            });
            if let Some(a) = auth {
                req.metadata_mut()
                    .insert("authorization", a.parse().unwrap());
            }
            istio::istio_certificate_service_client::IstioCertificateServiceClient::new(ch)
                .create_certificate(req)
                .await
                .map(|_| ())
        }
    }
}

#[tokio::test]
async fn bad_inputs_get_the_right_codes_and_the_server_keeps_serving() {
    let ca = Ca::start_with(|c| {
        c.api.rate_limit = 0.01;
        c.api.rate_burst = 200;
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let good = || ca.token("shop", "web", "meshca");
    let (pem, kid) = ca.signer();
    let now = now_s();

    let valid_csr = csr();
    let mut truncated = valid_csr.clone();
    truncated.truncate(valid_csr.len() / 2);
    let mut bad_sig = valid_csr.clone();
    let last = bad_sig.len() - 3;
    bad_sig[last] ^= 0x55;

    // Tokens signed with the right key but wrong claims.
    let expired = ca.token_with("shop", "web", |c| {
        c["exp"] = json!(now - 3600);
        c["iat"] = json!(now - 7200);
        c["nbf"] = json!(now - 7200);
    });
    let future = ca.token_with("shop", "web", |c| {
        c["nbf"] = json!(now + 3600);
        c["iat"] = json!(now + 3600);
    });
    let wrong_aud = ca.token_with("shop", "web", |c| c["aud"] = json!(["someone-else"]));
    let wrong_iss = ca.token_with("shop", "web", |c| c["iss"] = json!("https://evil.example"));
    let legacy = ca.token_with("shop", "web", |c| {
        c["iss"] = json!("kubernetes/serviceaccount")
    });
    let inconsistent = ca.token_with("shop", "web", |c| {
        c["kubernetes.io"]["namespace"] = json!("other")
    });
    let not_sa = ca.token_with("shop", "web", |c| c["sub"] = json!("system:admin"));
    let no_k8s = ca.token_with("shop", "web", |c| {
        c.as_object_mut().unwrap().remove("kubernetes.io");
    });
    // Signed by another key under a kid the JWKS does not know.
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let unknown_kid = sign_es256(
        other_key.serialize_pem().as_bytes(),
        "no-such-kid",
        &claims("shop", "web"),
    );
    // Signed by another key under the right kid.
    let forged = sign_es256(
        other_key.serialize_pem().as_bytes(),
        &kid,
        &claims("shop", "web"),
    );
    // alg: none.
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT", "kid": kid})
            .to_string()
            .as_bytes()),
        b64(claims("shop", "web").to_string().as_bytes())
    );
    // HS256 keyed with the public key (the classic algorithm-confusion attack).
    let public_pem = {
        let k = meshca::ca::CaKey::from_pem(&meshca::util::secret::SecretBytes::new(pem.clone()))
            .unwrap();
        meshca::util::pem::encode("PUBLIC KEY", &k.spki_der())
    };
    let hs256 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &h,
            &claims("shop", "web"),
            &jsonwebtoken::EncodingKey::from_secret(public_pem.as_bytes()),
        )
        .unwrap()
    };
    let tampered = {
        let t = good();
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims("shop", "web");
        c["sub"] = json!("system:serviceaccount:kube-system:admin");
        c["kubernetes.io"]["namespace"] = json!("kube-system");
        c["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
        format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        )
    };

    let cases = vec![
        Case {
            name: "garbage CSR",
            call: native(good(), b"not a csr at all".to_vec()),
            code: Code::InvalidArgument,
            says: "CSR",
        },
        Case {
            name: "empty CSR",
            call: native(good(), vec![]),
            code: Code::InvalidArgument,
            says: "empty",
        },
        Case {
            name: "truncated CSR",
            call: native(good(), truncated),
            code: Code::InvalidArgument,
            says: "CSR",
        },
        Case {
            name: "CSR with a bad signature",
            call: native(good(), bad_sig),
            code: Code::InvalidArgument,
            says: "signature",
        },
        Case {
            name: "CSR for another identity",
            call: native(
                good(),
                csr_with(
                    &["db.shop.serviceaccount.identity.meshca.cluster.local"],
                    &[],
                    |_| {},
                ),
            ),
            code: Code::PermissionDenied,
            says: "db.shop",
        },
        Case {
            name: "CSR with an extra DNS SAN",
            call: native(
                good(),
                csr_with(&[WEB_DNS, "evil.example.com"], &[], |_| {}),
            ),
            code: Code::PermissionDenied,
            says: "evil.example.com",
        },
        Case {
            name: "CSR with another SPIFFE ID",
            call: native(
                good(),
                csr_with(
                    &[],
                    &["spiffe://cluster.local/ns/kube-system/sa/admin"],
                    |_| {},
                ),
            ),
            code: Code::PermissionDenied,
            says: "kube-system",
        },
        Case {
            name: "CSR with an IP SAN",
            call: native(
                good(),
                csr_with(&[], &[], |p| {
                    p.subject_alt_names
                        .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()))
                }),
            ),
            code: Code::PermissionDenied,
            says: "IP SAN",
        },
        Case {
            name: "CSR with a foreign CN",
            call: native(
                good(),
                csr_with(&[], &[], |p| {
                    p.distinguished_name
                        .push(rcgen::DnType::CommonName, "root.example")
                }),
            ),
            code: Code::PermissionDenied,
            says: "root.example",
        },
        Case {
            name: "CSR asking CA:true",
            call: native(
                good(),
                csr_with(&[], &[], |p| {
                    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
                }),
            ),
            code: Code::InvalidArgument,
            says: "CA",
        },
        Case {
            name: "CSR asking keyCertSign",
            call: native(
                good(),
                csr_with(&[], &[], |p| {
                    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign]
                }),
            ),
            code: Code::InvalidArgument,
            says: "keyCertSign",
        },
        Case {
            name: "RSA-1024 CSR",
            call: native(good(), openssl_csr(tmp.path(), &["-newkey", "rsa:1024"])),
            code: Code::InvalidArgument,
            says: "RSA 1024",
        },
        Case {
            name: "P-521 CSR",
            call: native(
                good(),
                openssl_csr(
                    tmp.path(),
                    &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
                ),
            ),
            code: Code::InvalidArgument,
            says: "curve",
        },
        Case {
            name: "oversize CSR",
            call: native(good(), vec![0x30; 20 * 1024]),
            code: Code::InvalidArgument,
            says: "16384",
        },
        Case {
            name: "oversize token",
            call: native("a".repeat(20 * 1024), csr()),
            code: Code::InvalidArgument,
            says: "16384",
        },
        Case {
            name: "message over 64 KiB",
            call: native(good(), vec![0x30; 70 * 1024]),
            // gRPC's code for a message over the limit (grpc-go, grpc-java).
            code: Code::ResourceExhausted,
            says: "65536-byte limit",
        },
        Case {
            name: "missing token",
            call: native(String::new(), csr()),
            code: Code::Unauthenticated,
            says: "token",
        },
        Case {
            name: "garbage token",
            call: native("abc".into(), csr()),
            code: Code::Unauthenticated,
            says: "JWT",
        },
        Case {
            name: "expired token",
            call: native(expired, csr()),
            code: Code::Unauthenticated,
            says: "expired",
        },
        Case {
            name: "not-yet-valid token",
            call: native(future, csr()),
            code: Code::Unauthenticated,
            says: "not valid yet",
        },
        Case {
            name: "wrong-audience token",
            call: native(wrong_aud, csr()),
            code: Code::Unauthenticated,
            says: "audience",
        },
        Case {
            name: "wrong-issuer token",
            call: native(wrong_iss, csr()),
            code: Code::Unauthenticated,
            says: "issuer",
        },
        Case {
            name: "unknown-kid token",
            call: native(unknown_kid, csr()),
            code: Code::Unauthenticated,
            says: "kid",
        },
        Case {
            name: "token forged with another key",
            call: native(forged, csr()),
            code: Code::Unauthenticated,
            says: "signature",
        },
        Case {
            name: "alg none token",
            call: native(alg_none, csr()),
            code: Code::Unauthenticated,
            says: "",
        },
        Case {
            name: "HS256 keyed with the public key",
            call: native(hs256, csr()),
            code: Code::Unauthenticated,
            says: "HS256",
        },
        Case {
            name: "tampered payload",
            call: native(tampered, csr()),
            code: Code::Unauthenticated,
            says: "signature",
        },
        Case {
            name: "legacy secret-based token",
            call: native(legacy, csr()),
            code: Code::Unauthenticated,
            says: "legacy",
        },
        Case {
            name: "sub inconsistent with kubernetes.io",
            call: native(inconsistent, csr()),
            code: Code::Unauthenticated,
            says: "kubernetes.io",
        },
        Case {
            name: "sub not a service account",
            call: native(not_sa, csr()),
            code: Code::Unauthenticated,
            says: "system:serviceaccount",
        },
        Case {
            name: "no kubernetes.io claim",
            call: native(no_k8s, csr()),
            code: Code::Unauthenticated,
            says: "kubernetes.io",
        },
        Case {
            name: "negative TTL",
            call: Call::Native {
                token: good(),
                csr: csr(),
                ttl: Some(-5),
            },
            code: Code::InvalidArgument,
            says: "negative",
        },
        Case {
            name: "TTL below the minimum",
            call: Call::Native {
                token: good(),
                csr: csr(),
                ttl: Some(10),
            },
            code: Code::InvalidArgument,
            says: "minimum",
        },
        Case {
            name: "Linkerd: token for another service account than identity",
            call: Call::Linkerd {
                identity: "db.shop.serviceaccount.identity.meshca.cluster.local".into(),
                token: ca.token("shop", "web", "identity.l5d.io").into_bytes(),
                csr: csr(),
            },
            code: Code::PermissionDenied,
            says: "db.shop",
        },
        Case {
            name: "Linkerd: empty identity",
            call: Call::Linkerd {
                identity: String::new(),
                token: ca.token("shop", "web", "identity.l5d.io").into_bytes(),
                csr: csr(),
            },
            code: Code::InvalidArgument,
            says: "identity",
        },
        Case {
            name: "Linkerd: native-audience token",
            call: Call::Linkerd {
                identity: WEB_DNS.into(),
                token: good().into_bytes(),
                csr: csr(),
            },
            code: Code::Unauthenticated,
            says: "identity.l5d.io",
        },
        Case {
            name: "Linkerd: missing token",
            call: Call::Linkerd {
                identity: WEB_DNS.into(),
                token: vec![],
                csr: csr(),
            },
            code: Code::Unauthenticated,
            says: "token",
        },
        Case {
            name: "Istio: missing authorization",
            call: Call::Istio {
                auth: None,
                csr: pem_csr(),
                ttl: 3600,
            },
            code: Code::Unauthenticated,
            says: "token",
        },
        Case {
            name: "Istio: non-Bearer authorization",
            call: Call::Istio {
                auth: Some("Basic dXNlcjpwYXNz".into()),
                csr: pem_csr(),
                ttl: 3600,
            },
            code: Code::Unauthenticated,
            says: "Bearer",
        },
        Case {
            name: "Istio: garbage PEM",
            call: Call::Istio {
                auth: Some(format!("Bearer {}", ca.token("shop", "web", "istio-ca"))),
                csr: "-----BEGIN NOTHING-----".into(),
                ttl: 3600,
            },
            code: Code::InvalidArgument,
            says: "PEM",
        },
        Case {
            name: "Istio: negative validity",
            call: Call::Istio {
                auth: Some(format!("Bearer {}", ca.token("shop", "web", "istio-ca"))),
                csr: pem_csr(),
                ttl: -1,
            },
            code: Code::InvalidArgument,
            says: "negative",
        },
    ];
    assert!(cases.len() >= 25);
    let token_fragments: Vec<String> = vec![good()];
    for case in cases {
        let e = run(&ca, case.call).await.expect_err(case.name);
        assert_eq!(
            e.code(),
            case.code,
            "{}: got {:?}: {}",
            case.name,
            e.code(),
            e.message()
        );
        assert!(
            e.message().contains(case.says),
            "{}: message {:?} should mention {:?}",
            case.name,
            e.message(),
            case.says
        );
        for t in &token_fragments {
            assert!(
                !e.message().contains(t.as_str()),
                "{}: message echoes a token",
                case.name
            );
        }
    }

    // Flood past the per-identity rate limit (burst 200, refill ~0).
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let tok = ca.token("shop", "flood", "meshca");
    let mut exhausted = None;
    for i in 0..205 {
        match c
            .certify(pb::CertifyRequest {
                token: tok.clone(),
                csr: csr(),
                requested_ttl: None,
            })
            .await
        {
            Ok(_) => {}
            Err(e) => {
                exhausted = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = exhausted.expect("flood is stopped");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert_eq!(i, 200, "exactly the burst passes");
    assert!(e.message().contains("shop/flood"));

    // Still serving.
    let ok = run(&ca, native(good(), csr())).await;
    assert!(ok.is_ok(), "server keeps serving: {ok:?}");
}

fn pem_csr() -> String {
    meshca::util::pem::encode("CERTIFICATE REQUEST", &csr())
}
