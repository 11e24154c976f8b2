//! Authentication edges (issue 11 §6), tried as an attacker would against a
//! running server and the fake Kubernetes API server (`support::kubeapi`):
//! a token outliving its deleted pod or service account (JWKS path and the
//! TokenReview cache), the fail-closed start before the pod watch syncs,
//! legacy tokens on the TokenReview path, tokens from foreign issuers that
//! must never cost a TokenReview, one caller starving the TokenReview budget
//! of another, and the memory the pod watch costs.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshca::config::AuthnSource;
use serde_json::{json, Value};
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

const SA_UID: &str = "0f6f8e5e-0000-4000-8000-000000000001";
const POD_UID: &str = "0f6f8e5e-0000-4000-8000-000000000002";
const POD: &str = "web-5d8f7";
const PODS: &str = "/api/v1/namespaces/shop/pods";
const SAS: &str = "/api/v1/namespaces/shop/serviceaccounts";
const POD_REFUSALS: &str = "meshca_token_binding_refusals_total{kind=\"pod\"}";

/// The cluster's service-account signing key: (private PEM, kid, JWKS file).
struct ClusterKey {
    pem: Vec<u8>,
    kid: String,
    jwks: std::path::PathBuf,
}

/// A fake cluster with shop/web and one pod, and a CA that checks tokens
/// against the JWKS and the pod watch; returned once the watch has synced
/// (the pod's token certifies).
struct Watched {
    api: std::sync::Arc<kubeapi::Store>,
    key: ClusterKey,
    ca: Ca,
    ch: Channel,
    token: String,
}

async fn jwks_ca_watching_one_pod(dir: &std::path::Path) -> Watched {
    let (api, kc) = kubeapi::start(dir).await;
    let key = cluster_key(dir);
    api.add_service_account("shop", "web", SA_UID);
    api.add_pod("shop", POD, POD_UID);
    let jwks = key.jwks.clone();
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.jwks_file = Some(jwks);
        c.authn.authn_order = vec![AuthnSource::Jwks];
        c.kubernetes.watch_token_bindings = true;
    })
    .await;
    let ch = ca.channel().await;
    let token = key.token((POD, POD_UID));
    until_ok("the pod watch syncs", Duration::from_secs(10), || async {
        certify_native(&ch, token.clone()).await.is_ok()
    })
    .await;
    Watched {
        api,
        key,
        ca,
        ch,
        token,
    }
}

fn cluster_key(dir: &std::path::Path) -> ClusterKey {
    let pem = rcgen::KeyPair::generate()
        .unwrap()
        .serialize_pem()
        .into_bytes();
    let signer = meshca::authn::devtoken::DevSigner::from_pem(
        &meshca::util::secret::SecretBytes::new(pem.clone()),
    )
    .unwrap();
    let set: Value = serde_json::from_str(signer.jwks()).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, signer.jwks()).unwrap();
    ClusterKey {
        pem,
        kid: set["keys"][0]["kid"].as_str().unwrap().to_string(),
        jwks,
    }
}

impl ClusterKey {
    /// A projected token for shop/web bound to pod `pod` (name, uid).
    fn token(&self, pod: (&str, &str)) -> String {
        let mut c = claims("shop", "web");
        c["kubernetes.io"]["pod"] = json!({"name": pod.0, "uid": pod.1});
        sign_es256(&self.pem, &self.kid, &c)
    }

    fn token_with(&self, edit: impl FnOnce(&mut Value)) -> String {
        let mut c = claims("shop", "web");
        edit(&mut c);
        sign_es256(&self.pem, &self.kid, &c)
    }
}

async fn until_ok<F, Fut>(what: &str, limit: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until(what, limit, f).await;
}

/// A sample of `ca`'s own registry (0 when absent).
fn metric(ca: &Ca, name_and_labels: &str) -> f64 {
    ca.metric(name_and_labels)
}

async fn ready(ca: &Ca) -> (u16, String) {
    meshca::client::admin::request(
        "GET",
        &format!("http://{}/ready", ca.running.admin_addr),
        None,
        None,
    )
    .await
    .unwrap()
}

/// A TLS channel to `ca` whose TCP connection comes from `local` (any
/// 127.0.0.0/8 address works on loopback): a second caller, by IP.
async fn channel_from(ca: &Ca, local: IpAddr) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.bundle_pem()))
        .domain_name(ca.running.server_name.clone());
    let addr = ca.running.grpc_addr;
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| async move {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(local, 0))?;
            let tcp = s.connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_dies_with_its_pod_or_service_account_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let Watched {
        api,
        key,
        ca: server,
        ch,
        token,
    } = jwks_ca_watching_one_pod(dir.path()).await;
    // The watch asked for metadata only: no pod spec crossed the wire.
    assert!(api.metadata_requests.load(Ordering::SeqCst) >= 4);
    assert_eq!(api.full_pod_or_sa_requests.load(Ordering::SeqCst), 0);
    let pod_refusals = metric(&server, POD_REFUSALS);

    // The pod is deleted: its still-unexpired token stops working.
    api.remove(PODS, POD);
    let t = Instant::now();
    let e = loop {
        match certify_native(&ch, token.clone()).await {
            Ok(_) => {
                assert!(t.elapsed() < Duration::from_secs(5), "still valid");
                // Poll interval (deadline above): the deletion arrives by watch.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    let took = t.elapsed();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("pod shop/web-5d8f7") && e.message().contains("no longer exists"),
        "{}",
        e.message()
    );
    eprintln!("a deleted pod's token was refused {took:?} after the deletion");
    assert_eq!(
        metric(&server, POD_REFUSALS) - pod_refusals,
        1.0,
        "one per refusal"
    );
    until_ok(
        "the cache-size gauge follows",
        Duration::from_secs(2),
        || async { metric(&server, "meshca_token_binding_objects{kind=\"pod\"}") == 0.0 },
    )
    .await;

    // Recreated under the same name: a new UID, so the old token stays dead
    // while a token for the new pod works.
    let new_uid = "0f6f8e5e-0000-4000-8000-0000000000aa";
    api.add_pod("shop", POD, new_uid);
    let fresh = key.token((POD, new_uid));
    until_ok("the new pod is seen", Duration::from_secs(5), || async {
        certify_native(&ch, fresh.clone()).await.is_ok()
    })
    .await;
    let pod_refusals = metric(&server, POD_REFUSALS);
    let e = certify_native(&ch, token.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(metric(&server, POD_REFUSALS) - pod_refusals, 1.0);
    assert_eq!(
        metric(&server, "meshca_token_binding_objects{kind=\"pod\"}"),
        1.0
    );

    // The service account is deleted: every token of it dies.
    api.remove(SAS, "web");
    until_ok(
        "the SA deletion is seen",
        Duration::from_secs(5),
        || async { certify_native(&ch, fresh.clone()).await.is_err() },
    )
    .await;
    let e = certify_native(&ch, fresh.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("serviceaccount shop/web"),
        "{}",
        e.message()
    );
    assert_eq!(
        metric(
            &server,
            "meshca_token_binding_objects{kind=\"serviceaccount\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_the_pod_watch_syncs_tokens_go_to_tokenreview_or_get_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key(dir.path());
    api.add_service_account("shop", "web", SA_UID);
    api.add_pod("shop", POD, POD_UID);
    // No RBAC for pods yet: the watch cannot sync.
    api.forbidden.lock().unwrap().push("/api/v1/pods".into());
    let start = |order: Vec<AuthnSource>| {
        let (kc, jwks) = (kc.clone(), key.jwks.clone());
        Ca::start_with(move |c| {
            c.kubernetes.kubeconfig = Some(kc);
            c.authn.jwks_file = Some(jwks);
            c.authn.authn_order = order;
            c.kubernetes.watch_token_bindings = true;
        })
    };
    let token = key.token((POD, POD_UID));
    let jwks_only = start(vec![AuthnSource::Jwks]).await;
    let e = certify_native(&jwks_only.channel().await, token.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("not synced"), "{}", e.message());
    let (code, text) = ready(&jwks_only).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("watch_token_bindings"), "{text}");

    // With TokenReview behind it, the API server decides instead.
    api.tokens
        .lock()
        .unwrap()
        .insert(token.clone(), ("shop".into(), "web".into()));
    let with_review = start(vec![AuthnSource::Jwks, AuthnSource::Tokenreview]).await;
    let r = certify_native(&with_review.channel().await, token.clone())
        .await
        .unwrap();
    assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 1);

    // RBAC granted: the watch syncs (after its backoff) and the JWKS alone decides.
    api.forbidden.lock().unwrap().clear();
    let ch = jwks_only.channel().await;
    until_ok("the watch syncs", Duration::from_secs(15), || async {
        certify_native(&ch, token.clone()).await.is_ok()
    })
    .await;
    assert_eq!(ready(&jwks_only).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_tokenreview_is_not_reused_once_the_pod_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key(dir.path());
    // The fake API server names service account UIDs uid-NS-SA.
    api.add_service_account("shop", "web", "uid-shop-web");
    api.add_pod("shop", POD, POD_UID);
    let token = key.token((POD, POD_UID));
    api.tokens
        .lock()
        .unwrap()
        .insert(token.clone(), ("shop".into(), "web".into()));
    api.token_pods
        .lock()
        .unwrap()
        .insert(token.clone(), (POD.into(), POD_UID.into()));
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.authn_order = vec![AuthnSource::Tokenreview];
        c.kubernetes.watch_token_bindings = true;
    })
    .await;
    let ch = ca.channel().await;
    certify_native(&ch, token.clone()).await.unwrap();
    until_ok("the watch syncs", Duration::from_secs(10), || async {
        api.metadata_requests.load(Ordering::SeqCst) >= 4
    })
    .await;
    certify_native(&ch, token.clone()).await.unwrap();
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 1, "cached");

    api.remove(PODS, POD);
    until_ok(
        "the cached review is dropped",
        Duration::from_secs(5),
        || async { certify_native(&ch, token.clone()).await.is_err() },
    )
    .await;
    let e = certify_native(&ch, token.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("no longer exists"), "{}", e.message());
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 1);
}

/// A legacy secret-based token, as the token controller mints them: no
/// `exp`, issuer `kubernetes/serviceaccount`.
fn legacy_token(key: &ClusterKey) -> String {
    sign_es256(
        &key.pem,
        &key.kid,
        &json!({
            "iss": "kubernetes/serviceaccount",
            "sub": "system:serviceaccount:shop:web",
            "kubernetes.io/serviceaccount/namespace": "shop",
            "kubernetes.io/serviceaccount/secret.name": "web-token-x7k2p",
            "kubernetes.io/serviceaccount/service-account.name": "web",
            "kubernetes.io/serviceaccount/service-account.uid": SA_UID,
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_tokens_are_refused_on_the_tokenreview_path_too() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key(dir.path());
    let legacy = legacy_token(&key);
    // A non-expiring token in the accepted issuer's name.
    let no_exp = key.token_with(|c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    // Not a JWT at all (say, a static token-file entry mapped to a service account).
    let opaque = "c3RhdGljLXRva2VuLWZvci13ZWI".to_string();
    // The API server would authenticate them all (the Secret still exists).
    for t in [&legacy, &no_exp, &opaque] {
        api.tokens
            .lock()
            .unwrap()
            .insert(t.clone(), ("shop".into(), "web".into()));
    }
    let start = |allow: bool| {
        let kc = kc.clone();
        Ca::start_with(move |c| {
            c.kubernetes.kubeconfig = Some(kc);
            c.authn.authn_order = vec![AuthnSource::Tokenreview];
            c.authn.allow_legacy_tokens = allow;
        })
    };
    let ca = start(false).await;
    let before = metric(
        &ca,
        "meshca_tokenreview_local_refusals_total{reason=\"legacy\"}",
    );
    let before_jwt = metric(
        &ca,
        "meshca_tokenreview_local_refusals_total{reason=\"not_jwt\"}",
    );
    let ch = ca.channel().await;
    let e = certify_native(&ch, legacy.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("legacy"), "{}", e.message());
    let e = certify_native(&ch, no_exp).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("never expires"), "{}", e.message());
    let e = certify_native(&ch, opaque).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("not a JWT"), "{}", e.message());
    assert_eq!(
        api.token_reviews.load(Ordering::SeqCst),
        0,
        "refused locally"
    );
    assert_eq!(
        metric(
            &ca,
            "meshca_tokenreview_local_refusals_total{reason=\"not_jwt\"}"
        ) - before_jwt,
        1.0
    );
    assert_eq!(
        metric(
            &ca,
            "meshca_tokenreview_local_refusals_total{reason=\"legacy\"}"
        ) - before,
        2.0
    );

    // The retired allow_legacy_tokens changes nothing: the API server would
    // not confirm a legacy token for meshca's audience (tests/kube_authn.rs).
    let lenient = start(true).await;
    let e = certify_native(&lenient.channel().await, legacy)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_foreign_issuers_never_reach_tokenreview() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key(dir.path());
    // The API server announces its own issuer (not the default one).
    let announced = "https://oidc.example-cluster.internal";
    api.publish_oidc(announced, &std::fs::read_to_string(&key.jwks).unwrap());
    let foreign = key.token_with(|c| c["iss"] = json!("https://evil.example"));
    let opaque = "Zm9vYmFyYmF6cXV4".to_string();
    let from_cluster = key.token_with(|c| c["iss"] = json!(announced));
    for t in [&foreign, &opaque, &from_cluster] {
        api.tokens
            .lock()
            .unwrap()
            .insert(t.clone(), ("shop".into(), "web".into()));
    }
    let jwks = key.jwks.clone();
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        // A JWKS that does not know the foreign issuer leaves it undecided
        // for TokenReview: the path the attack would take.
        c.authn.jwks_file = Some(jwks);
        c.authn.authn_order = vec![AuthnSource::Jwks, AuthnSource::Tokenreview];
    })
    .await;
    let before_issuer = metric(
        &ca,
        "meshca_tokenreview_local_refusals_total{reason=\"issuer\"}",
    );
    let ch = ca.channel().await;
    for t in [&foreign, &opaque] {
        let e = certify_native(&ch, t.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    let e = certify_native(&ch, foreign).await.unwrap_err();
    assert!(
        e.message()
            .contains("\"https://evil.example\" is not one this CA accepts"),
        "{}",
        e.message()
    );
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 0);
    assert_eq!(
        metric(
            &ca,
            "meshca_tokenreview_local_refusals_total{reason=\"issuer\"}"
        ) - before_issuer,
        2.0
    );
    // The issuer the API server announces is a configured issuer.
    let r = certify_native(&ch, from_cluster).await.unwrap();
    assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_cannot_spend_another_callers_tokenreview_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = kubeapi::start(dir.path()).await;
    let key = cluster_key(dir.path());
    let good = key.token((POD, POD_UID));
    api.tokens
        .lock()
        .unwrap()
        .insert(good.clone(), ("shop".into(), "web".into()));
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.authn_order = vec![AuthnSource::Tokenreview];
        // A budget that barely refills during the test.
        c.authn.tokenreview_qps = 0.01;
        c.authn.tokenreview_burst = 8;
    })
    .await;
    let before = metric(&ca, "meshca_tokenreview_throttled_total{scope=\"peer\"}");
    // The attacker: plausible tokens (accepted issuer, unexpired, JWT
    // shape), each one different so no cache helps.
    let attacker = channel_from(&ca, "127.0.0.1".parse().unwrap()).await;
    let mut unavailable = 0;
    for i in 0..30 {
        let junk = key.token_with(|c| c["jti"] = json!(format!("junk-{i}")));
        let junk = format!("{}x", &junk[..junk.len() - 1]);
        let e = certify_native(&attacker, junk).await.unwrap_err();
        match e.code() {
            Code::Unauthenticated => {}
            Code::Unavailable => unavailable += 1,
            other => panic!("{other:?}: {}", e.message()),
        }
    }
    // Its share (burst 8 / 4) was reviewed; the rest waited on its own budget.
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 2);
    assert_eq!(unavailable, 28);
    assert_eq!(
        metric(&ca, "meshca_tokenreview_throttled_total{scope=\"peer\"}") - before,
        28.0
    );
    // Another caller still gets its valid token reviewed.
    let victim = channel_from(&ca, "127.0.0.2".parse().unwrap()).await;
    let r = certify_native(&victim, good).await.unwrap();
    assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(api.token_reviews.load(Ordering::SeqCst), 3);
}

/// Counts the heap bytes that the thread that turned counting on holds.
struct Counting;

static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(|c| c.get()).unwrap_or(false)
}

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if counting() {
            LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if counting() {
            LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        if counting() {
            LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The figure in docs/kubernetes.md: heap held by the token-binding cache
/// per 10,000 pods (random UUIDs, as the API server assigns them), measured
/// with a counting allocator.
#[test]
fn the_binding_cache_costs_little_memory_per_10000_pods() {
    let objects = meshca::kubernetes::bindings::BoundObjects::new(Default::default());
    let uids: Vec<String> = (0..10_000u32)
        .map(|i| {
            let r: u128 = rand::random();
            let h = format!("{:032x}", r ^ u128::from(i));
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        })
        .collect();
    COUNTING.with(|c| c.set(true));
    let start = LIVE.load(Ordering::Relaxed);
    for (i, uid) in uids.iter().enumerate() {
        objects.pods.insert(uid, "shop", &format!("web-{i}"));
    }
    let held = LIVE.load(Ordering::Relaxed) - start;
    COUNTING.with(|c| c.set(false));
    assert_eq!(objects.pods.len(), 10_000);
    eprintln!(
        "token-binding cache: {held} bytes of heap for 10000 pods ({} bytes/pod)",
        held / 10_000
    );
    // A UUID key and a digest of namespace/name, nothing else: well under
    // 100 bytes a pod (a whole Pod object is kilobytes).
    assert!(held > 0 && held < 1_000_000, "{held}");
}

/// A deletion made while the watch was cut off, with the history compacted
/// away (so resuming gets 410 Gone), is still seen: the cache lists again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_missed_during_a_partition_is_caught_by_the_relist_after_410() {
    let dir = tempfile::tempdir().unwrap();
    let Watched {
        api,
        key: _,
        ca: _server,
        ch,
        token,
    } = jwks_ca_watching_one_pod(dir.path()).await;
    let gone_before = api.gone_served.load(Ordering::SeqCst);
    // The watch is cut (and its reconnection held) before the deletion.
    api.partition();
    // Real time: let the cut reach the server's open watch before the deletion.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.remove(PODS, POD);
    api.compact();
    api.heal();
    until_ok(
        "the relist drops the deleted pod",
        Duration::from_secs(10),
        || async { certify_native(&ch, token.clone()).await.is_err() },
    )
    .await;
    let e = certify_native(&ch, token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(api.gone_served.load(Ordering::SeqCst) > gone_before);
}
