//! Token authentication against the fake API server behaving as a real
//! kube-apiserver does (issue 13, defect 7): the service-account issuer
//! discovery that fails at first and must be retried; legacy secret-based
//! tokens, which the API server authenticates only for its own audiences;
//! `jwks_url` / `oidc_issuer_url` pointed at the API server, whose discovery
//! endpoints demand the pod's bearer token and present the cluster CA (and
//! the token never going anywhere else); the real 403 Status text an
//! operator sees when RBAC refuses TokenReview.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshca::config::AuthnSource;
use serde_json::{json, Value};
use support::*;
use tonic::Code;

/// The cluster's service-account signing key.
struct ClusterKey {
    pem: Vec<u8>,
    kid: String,
    jwks: String,
}

fn cluster_key() -> ClusterKey {
    let pem = rcgen::KeyPair::generate()
        .unwrap()
        .serialize_pem()
        .into_bytes();
    let signer = meshca::authn::devtoken::DevSigner::from_pem(
        &meshca::util::secret::SecretBytes::new(pem.clone()),
    )
    .unwrap();
    let set: Value = serde_json::from_str(signer.jwks()).unwrap();
    ClusterKey {
        kid: set["keys"][0]["kid"].as_str().unwrap().to_string(),
        jwks: signer.jwks().to_string(),
        pem,
    }
}

static SERIAL: AtomicUsize = AtomicUsize::new(0);

impl ClusterKey {
    /// A fresh projected token for shop/web from `iss` (a new `jti` each
    /// time, so TokenReview's cache cannot hide a review).
    fn token(&self, iss: &str) -> String {
        let mut c = claims("shop", "web");
        c["iss"] = json!(iss);
        c["jti"] = json!(format!("t{}", SERIAL.fetch_add(1, Ordering::SeqCst)));
        sign_es256(&self.pem, &self.kid, &c)
    }
}

/// The fake API server's URL and CA (PEM), from the kubeconfig it wrote.
fn api_server(kc: &std::path::Path) -> (String, Vec<u8>) {
    use base64::Engine;
    let text = std::fs::read_to_string(kc).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    let ca = base64::engine::general_purpose::STANDARD
        .decode(field("certificate-authority-data:"))
        .unwrap();
    (field("server:"), ca)
}

/// Registers `token` with the fake's TokenReview (as shop/web).
fn reviewable(api: &kubeapi::Store, token: &str) {
    api.tokens
        .lock()
        .unwrap()
        .insert(token.to_string(), ("shop".into(), "web".into()));
}

/// An EKS-style issuer: not the in-cluster default, so it is known only
/// through the API server's discovery document.
const ANNOUNCED: &str = "https://oidc.eks.eu-west-1.amazonaws.com/id/5C0FFEE";

/// A CA checking tokens against the API server's JWKS, then TokenReview,
/// while discovery answers `faults` first. Certifies fresh tokens until
/// three in a row pass with no TokenReview; returns the codes seen before.
async fn discovery_recovers(faults: &[u16]) -> Vec<Code> {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key();
    api.publish_oidc(ANNOUNCED, &key.jwks);
    api.discovery_faults.lock().unwrap().extend(faults);
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.jwks_kubernetes = true;
        c.authn.authn_order = vec![AuthnSource::Jwks, AuthnSource::Tokenreview];
    })
    .await;
    let ch = ca.channel().await;
    let mut early = Vec::new();
    let mut local_in_a_row = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while local_in_a_row < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "faults {faults:?}: JWTs never verified locally (codes before: {early:?}, TokenReviews: {})",
            api.token_reviews.load(Ordering::SeqCst)
        );
        let token = key.token(ANNOUNCED);
        reviewable(&api, &token);
        let reviews = api.token_reviews.load(Ordering::SeqCst);
        match certify_native(&ch, token).await {
            Ok(_) if api.token_reviews.load(Ordering::SeqCst) == reviews => local_in_a_row += 1,
            Ok(_) => {
                local_in_a_row = 0;
                early.push(Code::Ok);
            }
            Err(e) => {
                local_in_a_row = 0;
                early.push(e.code());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        api.discovery_faults.lock().unwrap().is_empty(),
        "every fault was served"
    );
    early
}

/// Before: the JWKS source and TokenReview each asked once at start-up;
/// with the first request refused (401: the API server restarting, or RBAC
/// being applied) the JWKS never learned the issuer and every token went to
/// TokenReview until a restart. (401, not 503: kube's client retries a 503
/// by itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_discovery_is_retried_until_it_succeeds_then_jwts_are_verified_locally() {
    let started = std::time::Instant::now();
    let early = discovery_recovers(&[401]).await;
    assert!(
        early.iter().all(|c| *c == Code::Unavailable),
        "while undiscovered: retry, never a pass through TokenReview: {early:?}"
    );
    println!(
        "recovered from one refused discovery in {:?}",
        started.elapsed()
    );
}

/// Before: with both start-up requests failing, every token was refused
/// UNAUTHENTICATED until a restart. Now: UNAVAILABLE (retry) while the
/// discovery is retried, never a false rejection, then local verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_discovery_keeps_failing_tokens_get_unavailable_then_recover() {
    let started = std::time::Instant::now();
    let early = discovery_recovers(&[401, 503, 401, 401]).await;
    assert!(!early.is_empty(), "the first attempts fall in the outage");
    assert!(
        early.iter().all(|c| *c == Code::Unavailable),
        "while undiscovered: {early:?}"
    );
    println!(
        "recovered from repeated failures in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_tokens_are_refused_even_with_the_retired_allow_legacy_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key();
    let legacy = sign_es256(
        &key.pem,
        &key.kid,
        &json!({
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:shop:web",
            "kubernetes.io/serviceaccount/namespace": "shop",
            "kubernetes.io/serviceaccount/secret.name": "web-token-x7k2p",
            "kubernetes.io/serviceaccount/service-account.name": "web",
        }),
    );
    reviewable(&api, &legacy);
    // What the real API server does with such a review: not authenticated
    // for any audience but its own.
    let (code, answer) = api.handle(
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        json!({"spec": {"token": legacy, "audiences": ["meshca"]}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(code, 201);
    assert_eq!(answer["status"]["authenticated"], false, "{answer}");
    api.token_reviews.store(0, Ordering::SeqCst);

    // The setting is still accepted (configurations naming it start) but
    // changes nothing: refused locally, with the reason, never reviewed.
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.authn_order = vec![AuthnSource::Tokenreview];
        c.authn.allow_legacy_tokens = true;
    })
    .await;
    let e = certify_native(&ca.channel().await, legacy)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("only its own audiences")
            && e.message().contains("projected service-account token"),
        "{}",
        e.message()
    );
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 0, "never sent");
}

/// A CA verifying tokens against a JWKS fetched from `jwks_url` or through
/// `oidc_issuer_url`, with the fake as its kubeconfig.
async fn ca_fetching(
    kc: std::path::PathBuf,
    edit: impl FnOnce(&mut meshca::config::ServeConfig) + Send + 'static,
) -> Ca {
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.authn_order = vec![AuthnSource::Jwks];
        edit(c);
    })
    .await
}

/// The API server's JWKS by URL, with `jwks_ca_file` set to the cluster CA
/// (`None`: not set) and a kubeconfig for the fake. Returns the certify
/// result and the fake's store.
async fn certify_with_jwks_url_on_the_api_server(
    with_ca_file: bool,
) -> (Result<(), tonic::Status>, Arc<kubeapi::Store>) {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let (server, ca_pem) = api_server(&kc);
    let key = cluster_key();
    api.publish_oidc(ISSUER, &key.jwks);
    let ca_file = dir.path().join("cluster-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let url = format!("{server}/openid/v1/jwks");
    let ca = ca_fetching(kc, move |c| {
        c.authn.jwks_url = Some(url);
        c.authn.jwks_ca_file = with_ca_file.then_some(ca_file);
    })
    .await;
    let r = certify_native(&ca.channel().await, key.token(ISSUER)).await;
    (r.map(|_| ()), api)
}

/// Before: the fetcher trusted only the system roots, so the cluster CA's
/// certificate failed the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_on_the_api_server_trusts_the_cluster_ca_of_the_kubeconfig() {
    let (r, api) = certify_with_jwks_url_on_the_api_server(false).await;
    assert!(r.is_ok(), "jwks_url on the API server: {r:?}");
    assert_eq!(api.discovery_unauthenticated.load(Ordering::SeqCst), 0);
}

/// Before: with the cluster CA given as `jwks_ca_file` (what the old
/// documentation led to), the fetch sent no token and the API server
/// answered 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_on_the_api_server_sends_the_pods_token() {
    let (r, api) = certify_with_jwks_url_on_the_api_server(true).await;
    assert!(r.is_ok(), "jwks_url on the API server: {r:?}");
    assert_eq!(
        api.discovery_unauthenticated.load(Ordering::SeqCst),
        0,
        "every request to the discovery paths carried the token"
    );
    assert!(api.discovery_requests.load(Ordering::SeqCst) >= 1);
}

/// OIDC discovery at the API server: the issuer is the server's URL and
/// the document names the advertised address (https://10.0.0.1:6443/…,
/// unreachable here, as from many pods); the JWKS is read from the API
/// server the discovery came from, with the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_issuer_url_at_the_api_server_reads_its_jwks_there_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let (server, _) = api_server(&kc);
    let key = cluster_key();
    api.publish_oidc(&server, &key.jwks);
    let issuer = server.clone();
    let ca = ca_fetching(kc, move |c| {
        c.authn.oidc_issuer_url = Some(issuer.clone());
        c.authn.jwt_issuers = vec![issuer];
    })
    .await;
    let r = certify_native(&ca.channel().await, key.token(&server)).await;
    assert!(r.is_ok(), "oidc_issuer_url at the API server: {r:?}");
    assert_eq!(api.discovery_unauthenticated.load(Ordering::SeqCst), 0);
    assert!(api.discovery_requests.load(Ordering::SeqCst) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_elsewhere_never_receives_the_service_account_token() {
    let dir = tempfile::tempdir().unwrap();
    let (_api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key();
    // Another HTTPS server on the API server's host (127.0.0.1), another
    // port: it must not get the pod's token, whatever it asks.
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let (s, jwks) = (seen.clone(), key.jwks.clone());
    let (addr, other_ca) = https_server(Arc::new(move |req| {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        s.lock().unwrap().push(auth);
        let doc: Value = serde_json::from_str(&jwks).unwrap();
        Box::pin(async move { json_response(200, &doc) })
    }))
    .await;
    let ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, other_ca).unwrap();
    let url = format!("https://127.0.0.1:{}/keys", addr.port());
    let ca = ca_fetching(kc, move |c| {
        c.authn.jwks_url = Some(url);
        c.authn.jwks_ca_file = Some(ca_file);
    })
    .await;
    let r = certify_native(&ca.channel().await, key.token(ISSUER)).await;
    assert!(r.is_ok(), "{r:?}");
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "the JWKS was fetched there");
    assert!(
        seen.iter().all(Option::is_none),
        "a non-API-server URL got credentials: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rbac_refusal_of_tokenreview_shows_the_api_servers_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key();
    api.forbidden
        .lock()
        .unwrap()
        .push("/apis/authentication.k8s.io/v1/tokenreviews".into());
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.authn_order = vec![AuthnSource::Tokenreview];
    })
    .await;
    let token = key.token(ISSUER);
    reviewable(&api, &token);
    let e = certify_native(&ca.channel().await, token)
        .await
        .unwrap_err();
    // UNAVAILABLE (retry once RBAC is fixed), naming exactly what the API
    // server refused, in its words.
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains(
            "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:meshca:meshca\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"
        ),
        "{}",
        e.message()
    );
}
