//! JWKS fetched over HTTPS through OIDC discovery (as from the Kubernetes API
//! server's `/.well-known/openid-configuration` and `/openid/v1/jwks`): key
//! rotation picked up on an unknown `kid`, RS256 keys, the refresh rate limit,
//! and an unreachable JWKS answering UNAVAILABLE.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use meshca::proto::meshca as pb;
use serde_json::{json, Value};
use support::*;
use tonic::Code;

/// An ES256 key: its PEM and its JWK (with kid) from meshca's own JWK export.
fn es256_key() -> (Vec<u8>, Value) {
    let pem = rcgen::KeyPair::generate()
        .unwrap()
        .serialize_pem()
        .into_bytes();
    let signer = meshca::authn::devtoken::DevSigner::from_pem(
        &meshca::util::secret::SecretBytes::new(pem.clone()),
    )
    .unwrap();
    let jwks: Value = serde_json::from_str(signer.jwks()).unwrap();
    (pem, jwks["keys"][0].clone())
}

/// An RS256 key made by openssl, and its JWK.
fn rs256_key(dir: &std::path::Path) -> (Vec<u8>, Value) {
    let key = dir.join("rsa.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = std::process::Command::new("openssl")
        .args(["rsa", "-noout", "-modulus", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let modulus = hex::decode(text.trim().trim_start_matches("Modulus=")).unwrap();
    let jwk = json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "rsa-1", "n": b64(&modulus), "e": "AQAB"});
    (std::fs::read(key).unwrap(), jwk)
}

fn sign(alg: jsonwebtoken::Algorithm, pem: &[u8], kid: &str, claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = Some(kid.into());
    let key = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(pem).unwrap(),
    };
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

#[tokio::test]
async fn oidc_discovery_jwks_with_rotation_and_rs256() {
    let tmp = tempfile::tempdir().unwrap();
    let (pem_a, jwk_a) = es256_key();
    let (pem_b, jwk_b) = es256_key();
    let (pem_r, jwk_r) = rs256_key(tmp.path());
    let keys = Arc::new(Mutex::new(vec![jwk_a.clone(), jwk_r.clone()]));
    let fetches = Arc::new(AtomicUsize::new(0));
    let port = Arc::new(Mutex::new(0u16));
    let (k2, f2, p2) = (keys.clone(), fetches.clone(), port.clone());
    let handler: Handler = Arc::new(move |method, path, _| {
        let base = format!("https://127.0.0.1:{}", p2.lock().unwrap());
        match (method, path) {
            ("GET", "/.well-known/openid-configuration") => (
                200,
                json!({
                    "issuer": base,
                    "jwks_uri": format!("{base}/openid/v1/jwks"),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"]
                }),
            ),
            ("GET", "/openid/v1/jwks") => {
                f2.fetch_add(1, Ordering::SeqCst);
                (200, json!({"keys": *k2.lock().unwrap()}))
            }
            _ => (404, json!({})),
        }
    });
    let (addr, ca_pem) = https_json_server(handler).await;
    *port.lock().unwrap() = addr.port();
    let issuer = format!("https://127.0.0.1:{}", addr.port());
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    let ca = Ca::start_with(|c| {
        c.authn.oidc_issuer_url = Some(issuer.clone());
        c.authn.jwt_issuers = vec![issuer.clone()];
        c.authn.jwks_ca_file = Some(ca_file.clone());
    })
    .await;
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched once at start");
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let claims_for = |ns: &str, sa: &str| {
        let mut cl = claims(ns, sa);
        cl["iss"] = json!(issuer);
        cl
    };
    let certify = |token: String| pb::CertifyRequest {
        token,
        csr: csr(),
        requested_ttl: None,
    };

    // ES256 and RS256 keys from the fetched JWKS.
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        &pem_a,
        jwk_a["kid"].as_str().unwrap(),
        &claims_for("shop", "web"),
    );
    c.certify(certify(t))
        .await
        .expect("ES256 token from the JWKS");
    let t = sign(
        jsonwebtoken::Algorithm::RS256,
        &pem_r,
        "rsa-1",
        &claims_for("shop", "web"),
    );
    c.certify(certify(t))
        .await
        .expect("RS256 token from the JWKS");

    // The issuer rotates its signing key: a token with the new kid makes
    // meshca refresh the JWKS once.
    keys.lock().unwrap().push(jwk_b.clone());
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        &pem_b,
        jwk_b["kid"].as_str().unwrap(),
        &claims_for("shop", "db"),
    );
    let r = c
        .certify(certify(t))
        .await
        .expect("new key picked up on unknown kid")
        .into_inner();
    assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/db");
    assert_eq!(fetches.load(Ordering::SeqCst), 2);

    // Another unknown kid right away: the refresh is rate-limited, so no fetch.
    let (pem_c, _) = es256_key();
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        &pem_c,
        "kid-c",
        &claims_for("shop", "web"),
    );
    let e = c.certify(certify(t)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("kid"), "{}", e.message());
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "refresh is rate-limited");

    // The development signer is not trusted once a real source is configured.
    let dev = ca.token("shop", "web", "meshca");
    let e = c.certify(certify(dev)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn unreachable_jwks_is_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let (pem_a, jwk_a) = es256_key();
    let url = format!("https://127.0.0.1:{}/openid/v1/jwks", closed_port());
    let ca = Ca::start_with(|c| c.authn.jwks_url = Some(url)).await;
    let t = sign(
        jsonwebtoken::Algorithm::ES256,
        &pem_a,
        jwk_a["kid"].as_str().unwrap(),
        &claims("shop", "web"),
    );
    let e = certify_native(&ca.channel().await, t).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("JWKS"), "{}", e.message());
    // Readiness says the CA cannot check tokens, and why.
    let (code, body) = meshca::client::admin::request(
        "GET",
        &format!("http://{}/ready", ca.running.admin_addr),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("token validation unavailable") && body.contains("no keys loaded"),
        "{body}"
    );
    drop(tmp);
}
