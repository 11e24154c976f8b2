//! TokenReview through kube against a local HTTPS endpoint that speaks the
//! real `authentication.k8s.io/v1` JSON (no API server can run here), with
//! kube configured by a kubeconfig; and the outage case.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use meshca::proto::linkerd;
use serde_json::{json, Value};
use support::*;
use tonic::Code;

/// A token shaped like a projected service-account token (a JWT from the
/// default issuer, with an expiry): meshca refuses anything else before
/// asking TokenReview. This fake API server does not check signatures.
fn jwt_like(jti: &str) -> String {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2ln",
        b.encode(br#"{"alg":"RS256","kid":"k1"}"#),
        b.encode(
            json!({"iss": ISSUER, "sub": "system:serviceaccount:shop:web", "aud": ["meshca"],
                   "exp": 4102444800u64, "jti": jti})
            .to_string()
        )
    )
}

static GOOD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| jwt_like("good"));

/// A minimal API server: POST /apis/authentication.k8s.io/v1/tokenreviews.
struct FakeApiServer {
    addr: std::net::SocketAddr,
    ca_pem: String,
    reviews: Arc<AtomicUsize>,
    last_audiences: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn fake_api_server(fail_with: Option<u16>) -> FakeApiServer {
    let reviews = Arc::new(AtomicUsize::new(0));
    let last_audiences = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (r2, a2) = (reviews.clone(), last_audiences.clone());
    let handler: Handler = Arc::new(move |method, path, body| {
        if let Some(code) = fail_with {
            return (
                code,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcdserver: request timed out", "reason": "InternalError", "code": code}),
            );
        }
        if method != "POST" || path != "/apis/authentication.k8s.io/v1/tokenreviews" {
            return (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404}),
            );
        }
        r2.fetch_add(1, Ordering::SeqCst);
        let review: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(review["kind"], "TokenReview");
        assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let auds: Vec<String> =
            serde_json::from_value(review["spec"]["audiences"].clone()).unwrap_or_default();
        *a2.lock().unwrap() = auds.clone();
        let status = if token == GOOD.as_str() {
            json!({
                "authenticated": true,
                "audiences": auds,
                "user": {
                    "username": "system:serviceaccount:shop:web",
                    "uid": "5b9c0b1e-0000-4000-8000-000000000003",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:shop", "system:authenticated"],
                    "extra": {
                        "authentication.kubernetes.io/pod-name": ["web-5d8f7"],
                        "authentication.kubernetes.io/pod-uid": ["5b9c0b1e-0000-4000-8000-000000000004"]
                    }
                }
            })
        } else {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        };
        (
            201,
            json!({
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": null},
                "spec": review["spec"],
                "status": status
            }),
        )
    });
    let (addr, ca_pem) = https_json_server(handler).await;
    FakeApiServer {
        addr,
        ca_pem,
        reviews,
        last_audiences,
    }
}

fn kubeconfig(dir: &std::path::Path, server: &str, ca_pem: &str) -> std::path::PathBuf {
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {b64}\nusers:\n- name: meshca\n  user:\n    token: meshca-sa-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: meshca\ncurrent-context: test\n"
    );
    let p = dir.join("kubeconfig");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn tokenreview_authenticates_and_caches() {
    let api = fake_api_server(None).await;
    let tmp = tempfile::tempdir().unwrap();
    let kc = kubeconfig(
        tmp.path(),
        &format!("https://127.0.0.1:{}", api.addr.port()),
        &api.ca_pem,
    );
    let ca = Ca::start_with(|c| c.kubernetes.kubeconfig = Some(kc)).await;

    let ch = ca.channel().await;
    for _ in 0..3 {
        let r = certify_native(&ch, GOOD.as_str()).await.unwrap();
        assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    }
    assert_eq!(
        api.reviews.load(Ordering::SeqCst),
        1,
        "positive reviews are cached"
    );
    assert_eq!(
        *api.last_audiences.lock().unwrap(),
        vec!["meshca".to_string()]
    );

    // The Linkerd API reviews with its own audience.
    let mut l = linkerd::identity_client::IdentityClient::new(ca.channel().await);
    l.certify(linkerd::CertifyRequest {
        identity: "web.shop.serviceaccount.identity.meshca.cluster.local".into(),
        token: GOOD.as_bytes().to_vec(),
        certificate_signing_request: csr(),
    })
    .await
    .unwrap();
    assert_eq!(
        *api.last_audiences.lock().unwrap(),
        vec!["identity.l5d.io".to_string()]
    );

    // A token the API server does not authenticate.
    let other = jwt_like("some-other-token");
    let e = certify_native(&ch, other.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("did not authenticate"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains(&other));
}

#[tokio::test]
async fn api_server_outage_is_unavailable_not_unauthenticated() {
    // Nothing listens on this port.
    let port = closed_port();
    let tmp = tempfile::tempdir().unwrap();
    let api = fake_api_server(None).await;
    let kc = kubeconfig(
        tmp.path(),
        &format!("https://127.0.0.1:{port}"),
        &api.ca_pem,
    );
    let ca = Ca::start_with(|c| c.kubernetes.kubeconfig = Some(kc)).await;
    let e = certify_native(&ca.channel().await, GOOD.as_str())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());

    // An API server answering 500 is also an outage.
    let failing = fake_api_server(Some(500)).await;
    let tmp2 = tempfile::tempdir().unwrap();
    let kc2 = kubeconfig(
        tmp2.path(),
        &format!("https://127.0.0.1:{}", failing.addr.port()),
        &failing.ca_pem,
    );
    let ca2 = Ca::start_with(|c| c.kubernetes.kubeconfig = Some(kc2)).await;
    let e = certify_native(&ca2.channel().await, GOOD.as_str())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("500"), "{}", e.message());
}
