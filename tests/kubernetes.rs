//! Kubernetes coordination against a fake API server speaking the real
//! JSON (tests/support/kubeapi.rs): leader election over a Lease (one
//! leader; a crashed leader — in-process, and a SIGKILLed `serve
//! --kubernetes` process — is replaced once its Lease expires; a stopping
//! leader hands over at once); the trust-bundle ConfigMaps (published to
//! selected namespaces, recreated when deleted, updated on rotation); the CA
//! state and audit signing key shared through Secrets; watches that resume,
//! and list again after 410 Gone; and the start-up permission check.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use meshca::ca::store::DataDir;
use meshca::config::PublishConfig;
use meshca::kubernetes::publish::{CONFIGMAP, KEY};
use serde_json::json;
use support::*;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/meshca/leases";

fn cm_path(ns: &str) -> String {
    format!("/api/v1/namespaces/{ns}/configmaps")
}

/// Whether every namespace in `nss` holds the bundle ConfigMap.
fn published_in(api: &support::kubeapi::Store, nss: &[&str]) -> bool {
    nss.iter()
        .all(|ns| api.get(&cm_path(ns), CONFIGMAP).is_some())
}

async fn replica(kc: &std::path::Path, name: &str) -> Ca {
    let kc = kc.to_path_buf();
    let name = name.to_string();
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.publish = Some(PublishConfig {
            namespace_labels: [("mesh".to_string(), "on".to_string())]
                .into_iter()
                .collect(),
            // Long: changes must arrive through watches, not the resync.
            resync: Duration::from_secs(3600),
            lease: "meshca-leader".into(),
            lease_duration: Duration::from_secs(2),
        });
        c.replica = name;
        c.trust.propagation_wait = Duration::from_secs(0);
    })
    .await
}

async fn until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    wait_until(what, limit, || std::future::ready(f())).await;
}

fn leading(ca: &Ca) -> bool {
    *ca.running.leading.as_ref().unwrap().borrow()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_publishes_the_bundle_and_a_successor_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.add_namespace("shop", json!({"mesh": "on"}));
    api.add_namespace("ops", json!({"mesh": "on"}));
    api.add_namespace("kube-system", json!({}));

    let a = replica(&kc, "replica-a").await;
    until("replica-a leads", Duration::from_secs(5), || leading(&a)).await;
    let b = replica(&kc, "replica-b").await;
    // Real time: a negative check (b must not take the Lease within 600 ms).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!leading(&b), "exactly one leader");
    let lease = api.get(LEASES, "meshca-leader").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // The leader's bundle, in the selected namespaces only.
    let pem = a.running.ca.bundle().to_pem();
    for ns in ["shop", "ops"] {
        let path = cm_path(ns);
        until(
            &format!("ConfigMap in {ns}"),
            Duration::from_secs(5),
            || api.get(&path, CONFIGMAP).is_some(),
        )
        .await;
        let cm = api.get(&path, CONFIGMAP).unwrap();
        assert_eq!(cm["data"][KEY], pem.as_str());
    }
    assert!(
        api.get(&cm_path("kube-system"), CONFIGMAP).is_none(),
        "not selected"
    );

    // Deleted: recreated. Edited by someone else: put right (with a fresh
    // resourceVersion, not blindly). New namespace: gets one.
    api.remove(&cm_path("shop"), CONFIGMAP);
    let mut stale = api.get(&cm_path("ops"), CONFIGMAP).unwrap();
    stale["data"][KEY] = json!("tampered");
    api.put(&cm_path("ops"), CONFIGMAP, stale);
    api.add_namespace("billing", json!({"mesh": "on"}));
    for ns in ["shop", "ops", "billing"] {
        let path = cm_path(ns);
        let pem = pem.clone();
        until(&format!("{ns} in sync"), Duration::from_secs(5), || {
            api.get(&path, CONFIGMAP)
                .is_some_and(|c| c["data"][KEY] == pem.as_str())
        })
        .await;
    }

    // A rotation on the leader reaches every namespace.
    let (code, body) = a.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let two = a.running.ca.bundle().to_pem();
    assert_eq!(meshca::ca::pem_to_certs(two.as_bytes()).unwrap().len(), 2);
    let path = cm_path("shop");
    until("rotated bundle published", Duration::from_secs(5), || {
        api.get(&path, CONFIGMAP)
            .is_some_and(|c| c["data"][KEY] == two.as_str())
    })
    .await;

    // The leader stops gracefully: it releases the Lease, and b leads at
    // once (well before the 2 s Lease would expire).
    let t = Instant::now();
    a.running.shutdown().await;
    until(
        "replica-b leads after hand-over",
        Duration::from_secs(5),
        || leading(&b),
    )
    .await;
    let handover = t.elapsed();
    let lease = api.get(LEASES, "meshca-leader").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);

    // The new leader publishes its own bundle (this mode does not share
    // rotation state between replicas yet: see deploy/README.md).
    let pem_b = b.running.ca.bundle().to_pem();
    until("b's bundle published", Duration::from_secs(5), || {
        api.get(&path, CONFIGMAP)
            .is_some_and(|c| c["data"][KEY] == pem_b.as_str())
    })
    .await;

    // A leader that dies without releasing is replaced once its Lease expires.
    let c = replica(&kc, "replica-c").await;
    // Real time: a negative check (c must not lead while b holds the Lease).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!leading(&c));
    let mut lease = api.get(LEASES, "meshca-leader").unwrap();
    lease["spec"]["holderIdentity"] = json!("replica-dead");
    lease["spec"]["renewTime"] = json!(k8s_openapi::jiff::Timestamp::now().to_string());
    // b loses the Lease to a "dead" holder (as if b had been partitioned).
    api.put(LEASES, "meshca-leader", lease);
    let t = Instant::now();
    until(
        "a live replica takes over the dead holder's Lease",
        Duration::from_secs(8),
        || {
            api.get(LEASES, "meshca-leader")
                .is_some_and(|l| l["spec"]["holderIdentity"] != "replica-dead")
        },
    )
    .await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "waited for expiry: {took:?}"
    );
    println!("hand-over on shutdown: {handover:?}; takeover after a crash: {took:?}");
    let leaders = [leading(&b), leading(&c)].iter().filter(|x| **x).count();
    // Real time: a negative check (no second leader appears within 800 ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let leaders_now = [leading(&b), leading(&c)].iter().filter(|x| **x).count();
    assert!(
        leaders <= 1 && leaders_now == 1,
        "one leader: {leaders} then {leaders_now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_permissions_are_named_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.denied
        .lock()
        .unwrap()
        .extend(["list namespaces".to_string(), "update leases".to_string()]);
    let client = meshca::authn::tokenreview::TokenReviewer::client_from_kubeconfig(&kc)
        .await
        .unwrap();
    let uses = |u: meshca::kubernetes::rbac::Uses<'static>| meshca::kubernetes::rbac::needs(&u);
    let base = meshca::kubernetes::rbac::Uses {
        namespace: "meshca",
        ..Default::default()
    };
    let needs = uses(meshca::kubernetes::rbac::Uses {
        tokenreview: true,
        publish: true,
        lease: Some("meshca-leader"),
        ..base.clone()
    });
    let missing = meshca::kubernetes::rbac::missing(&client, &needs)
        .await
        .unwrap();
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(
        missing
            .iter()
            .any(|m| m.starts_with("list namespaces cluster-wide (publishing the trust bundle)")),
        "{missing:?}"
    );
    assert!(
        missing.iter().any(|m| m
            .contains("update leases.coordination.k8s.io/meshca-leader in namespace meshca")
            && m.contains("not allowed: no authorizer allows it (SelfSubjectAccessReview: allowed=false, no reason given)")),
        "{missing:?}"
    );
    // Shared state needs the Secret, Events and the Lease.
    let shared = uses(meshca::kubernetes::rbac::Uses {
        state_secret: Some("meshca-ca"),
        lease: Some("meshca-leader"),
        ..base.clone()
    });
    assert_eq!(shared.len(), 9, "{shared:?}");
    assert!(
        shared.iter().any(|n| n
            .to_string()
            .starts_with("watch secrets/meshca-ca in namespace meshca")),
        "{shared:?}"
    );
    let jw = uses(meshca::kubernetes::rbac::Uses {
        jwks: true,
        ..base.clone()
    });
    api.denied.lock().unwrap().push("get ".to_string());
    let missing = meshca::kubernetes::rbac::missing(&client, &jw)
        .await
        .unwrap();
    assert_eq!(
        missing.len(),
        2,
        "non-resource URLs are checked too: {missing:?}"
    );
    assert!(missing[1].starts_with("get /openid/v1/jwks"), "{missing:?}");
    api.denied.lock().unwrap().pop();
    // Only what the configuration uses is asked.
    assert_eq!(
        uses(meshca::kubernetes::rbac::Uses {
            tokenreview: true,
            ..base.clone()
        })
        .len(),
        1
    );
    // A server started with those gaps says so in its metrics.
    let ca = replica(&kc, "replica-x").await;
    assert_eq!(ca.metric("meshca_kubernetes_permissions_missing"), 2.0);
}

/// A cluster token signer (its JWKS is what the API server would publish).
/// A fake cluster: the API server, a kubeconfig for it, and the cluster's
/// service-account token signer, whose JWKS is also written to a file
/// replicas can trust.
struct Cluster {
    dir: tempfile::TempDir,
    api: std::sync::Arc<support::kubeapi::Store>,
    kc: std::path::PathBuf,
    signer: meshca::authn::devtoken::DevSigner,
    jwks: std::path::PathBuf,
}

async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let signer = cluster_signer();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, signer.jwks()).unwrap();
    Cluster {
        dir,
        api,
        kc,
        signer,
        jwks,
    }
}

fn cluster_signer() -> meshca::authn::devtoken::DevSigner {
    meshca::authn::devtoken::DevSigner::from_pem(
        &meshca::ca::CaKey::generate_p256().unwrap().to_pem(),
    )
    .unwrap()
}

/// A shop/web token for audience meshca from `signer` with issuer `iss`.
fn mint(signer: &meshca::authn::devtoken::DevSigner, iss: &str) -> String {
    signer
        .mint(
            &meshca::authn::devtoken::TokenSpec {
                workload: meshca::identity::Workload::new("shop", "web").unwrap(),
                audiences: vec!["meshca".into()],
                ttl: Duration::from_secs(600),
                issuer: iss.into(),
                pod: None,
            },
            std::time::SystemTime::now(),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_against_the_api_servers_own_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    // The cluster's service-account signer, as the API server publishes it.
    let signer = cluster_signer();
    let issuer = "https://oidc.example-cluster.internal";
    api.publish_oidc(issuer, signer.jwks());
    let kc2 = kc.clone();
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc2);
        c.authn.jwks_kubernetes = true;
        c.authn.authn_order = vec![meshca::config::AuthnSource::Jwks];
    })
    .await;
    let ch = ca.channel().await;
    let r = certify_native(&ch, mint(&signer, issuer)).await.unwrap();
    assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    // The issuer comes from the API server's discovery document: another is refused.
    let e = certify_native(&ch, mint(&signer, "https://evil.example"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A key the API server does not publish is refused.
    let forged = mint(&cluster_signer(), issuer);
    let e = certify_native(&ch, forged).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unauthenticated | tonic::Code::Unavailable
        ),
        "{e:?}"
    );
}

const SECRETS: &str = "/api/v1/namespaces/meshca/secrets";

async fn shared_replica(kc: &std::path::Path, name: &str, jwks: &std::path::Path) -> Ca {
    let kc = kc.to_path_buf();
    let name = name.to_string();
    let jwks = jwks.to_path_buf();
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.jwks_file = Some(jwks);
        c.authn.authn_order = vec![meshca::config::AuthnSource::Jwks];
        c.kubernetes.state_secret = Some("meshca-ca".into());
        c.kubernetes.audit_key_secret = Some("meshca-audit-key".into());
        c.kubernetes.propagation_report_interval = Duration::from_millis(200);
        // Long: changes must arrive through the watch, not the safety-net poll.
        c.kubernetes.state_poll_interval = Duration::from_secs(3600);
        c.replica = name;
        c.trust.propagation_wait = Duration::from_secs(0);
    })
    .await
}

/// The rotation journal in the shared state Secret.
fn shared_journal(api: &support::kubeapi::Store) -> meshca::trust::rotation::RotationState {
    let secret = api.get(SECRETS, "meshca-ca").unwrap();
    serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            secret["data"]["rotation.json"].as_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_ca_through_a_secret() {
    let Cluster {
        dir: _dir,
        api,
        kc,
        signer,
        jwks,
    } = cluster().await;
    let token = || mint(&signer, support::ISSUER);
    let a = shared_replica(&kc, "a", &jwks).await;
    assert!(
        api.get(SECRETS, "meshca-ca").is_some(),
        "the first replica shares its CA"
    );
    let b = shared_replica(&kc, "b", &jwks).await;
    assert_eq!(a.root_ids(), b.root_ids(), "one root");
    // One audit signing key: a created the Secret, b adopted it.
    let key_of = |ca: &Ca| meshca::audit::read_key(&ca.dir.path().join("data")).unwrap();
    assert_eq!(key_of(&a).expose(), key_of(&b).expose());
    let shared_key = api.get(SECRETS, "meshca-audit-key").unwrap();
    assert_eq!(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            shared_key["data"]["audit-signer.key"].as_str().unwrap()
        )
        .unwrap(),
        key_of(&a).expose()
    );
    // A Secret holding no usable key stops a replica at start-up, saying why.
    api.put(
        SECRETS,
        "bad-audit-key",
        json!({"metadata": {"name": "bad-audit-key", "namespace": "meshca"},
               "type": "Opaque", "data": {"audit-signer.key": "bm90IGEga2V5"}}),
    );
    let bad_dir = tempfile::tempdir().unwrap();
    let mut c = meshca::config::ServeConfig::for_tests(bad_dir.path().join("data"));
    c.kubernetes.kubeconfig = Some(kc.clone());
    c.kubernetes.audit_key_secret = Some("bad-audit-key".into());
    let Err(e) = meshca::server::start(c).await else {
        panic!("a replica started with an unusable audit key");
    };
    assert_eq!(e.step, meshca::server::Step::AuditLog);
    let e = e.to_string();
    assert!(
        e.contains("audit_key_secret") && e.contains("meshca/bad-audit-key"),
        "{e}"
    );
    assert_eq!(
        a.running.ca.issuer().fingerprint,
        b.running.ca.issuer().fingerprint,
        "one issuer"
    );

    // A rotation through a is seen and used by b.
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    let (code, body) = a.rotation("activate", "{}").await;
    assert_eq!(code, 200, "{body}");
    let new_root = a.running.ca.issuer().root_fingerprint.clone().unwrap();
    until("b follows the rotation", Duration::from_secs(5), || {
        b.running.ca.issuer().root_fingerprint.as_deref() == Some(new_root.as_str())
            && b.root_ids().len() == 2
    })
    .await;
    let ch = b.channel().await;
    let r = certify_native(&ch, token()).await.unwrap();
    let tb = r.trust_bundle.unwrap();
    assert_eq!(tb.version, a.running.ca.bundle().version);
    let new_der = a
        .running
        .ca
        .bundle()
        .roots
        .iter()
        .find(|x| meshca::ca::fingerprint(x) == new_root)
        .unwrap()
        .to_vec();
    meshca::client::verify_chain(
        &r.cert_chain[0],
        &r.cert_chain[1..],
        &[new_der],
        std::time::SystemTime::now(),
    )
    .expect("b issues under the new root");

    // And the other way round: a taint through b reaches a.
    let old_root = a.root_ids().into_iter().find(|x| *x != new_root).unwrap();
    let (code, body) = b
        .rotation("taint", &format!("{{\"root\": \"{}\"}}", &old_root[..16]))
        .await;
    assert_eq!(code, 200, "{body}");
    until("a sees the taint", Duration::from_secs(5), || {
        a.running.ca.bundle().tainted.len() == 1
    })
    .await;

    // Both replicas prepare at once: one wins, the other retries on the
    // winner's state and is refused (a root is already prepared), so the
    // shared journal holds exactly one prepared root.
    let (ra, rb) = tokio::join!(a.rotation("prepare", "{}"), b.rotation("prepare", "{}"));
    let codes = [ra.0, rb.0];
    assert!(
        codes.contains(&200) && codes.contains(&409),
        "{ra:?} {rb:?}"
    );
    let loser = if ra.0 == 409 { &ra.1 } else { &rb.1 };
    assert!(loser.contains("already prepared"), "{loser}");
    let journal = shared_journal(&api);
    assert_eq!(
        journal
            .roots
            .iter()
            .filter(|r| r.phase == meshca::trust::rotation::Phase::Prepared)
            .count(),
        1
    );
    until("both replicas agree", Duration::from_secs(5), || {
        a.root_ids() == b.root_ids()
    })
    .await;

    // A Secret that fails validation is refused with an Event; both keep
    // the last good state.
    let before = a.root_ids();
    let mut bad = api.get(SECRETS, "meshca-ca").unwrap();
    let other_key = meshca::ca::CaKey::generate_p256().unwrap().to_pem();
    bad["data"]["issuer.key"] = json!(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        other_key.expose()
    ));
    api.put(SECRETS, "meshca-ca", bad);
    until("an Event says why", Duration::from_secs(5), || {
        api.list("/api/v1/namespaces/meshca/events")
            .iter()
            .any(|e| {
                e["reason"] == "InvalidCAState"
                    && e["message"].as_str().unwrap_or("").contains("issuer")
            })
    })
    .await;
    // Real time: a negative check (a refused Secret is not adopted later).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.root_ids(), before);
    assert_eq!(b.root_ids(), before);
    let r = certify_native(&b.channel().await, token()).await;
    assert!(r.is_ok(), "b still issues with its last good state");
    let refusals = || {
        api.list("/api/v1/namespaces/meshca/events")
            .iter()
            .filter(|e| e["reason"] == "InvalidCAState")
            .count()
    };
    assert!(refusals() <= 2, "one Event per replica, not one per look");
    // While the bad state stands, steps fail closed and say why.
    let (code, body) = a.rotation("retire", "{}").await;
    assert_ne!(code, 200, "{body}");
    assert!(body.contains("refused"), "{body}");
    assert!(
        refusals() <= 2,
        "still one Event per replica: {}",
        refusals()
    );
    // The way back: delete the bad Secret; the replicas put their last good
    // state back.
    api.remove(SECRETS, "meshca-ca");
    until("the good state is back", Duration::from_secs(5), || {
        api.get(SECRETS, "meshca-ca").is_some_and(|s| {
            let key = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                s["data"]["issuer.key"].as_str().unwrap_or(""),
            )
            .unwrap_or_default();
            key != other_key.expose()
        })
    })
    .await;
    let (code, body) = a.rotation("retire", "{}").await;
    // The step now runs against the good state, and the state machine
    // answers (the retired root is not due yet): 409, not a storage error.
    assert_eq!(code, 409, "steps work again: {body}");
    assert!(!body.contains("refused"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_list_again_after_410_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.add_namespace("shop", json!({"mesh": "on"}));
    let signer = cluster_signer();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, signer.jwks()).unwrap();
    let a = shared_replica(&kc, "a", &jwks).await;
    let b = shared_replica(&kc, "b", &jwks).await;
    // A separate (unshared) CA publishing its bundle, under its own Lease
    // (a and b's shared CA holds "meshca-leader").
    let kc2 = kc.clone();
    let p = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc2);
        c.kubernetes.publish = Some(PublishConfig {
            namespace_labels: Default::default(),
            resync: Duration::from_secs(3600),
            lease: "meshca-publisher".into(),
            lease_duration: Duration::from_secs(2),
        });
        c.replica = "p".into();
    })
    .await;
    until("the bundle is published", Duration::from_secs(5), || {
        published_in(&api, &["shop"])
    })
    .await;
    until("every watch is open", Duration::from_secs(5), || {
        // a and b: the state Secret; p: namespaces and ConfigMaps.
        api.watches_opened.load(std::sync::atomic::Ordering::SeqCst) >= 4
    })
    .await;

    // While the watches are cut off, a rotates and someone deletes a
    // ConfigMap; then etcd compacts, so neither change can be replayed.
    api.partition();
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    api.remove(&cm_path("shop"), CONFIGMAP);
    api.add_namespace("billing", json!({"mesh": "on"}));
    api.compact();
    // Real time: a negative check (b must not see the change during the partition).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.root_ids().len(), 1, "b cannot have seen the change yet");
    api.heal();

    // The resumed watches get 410 Gone, list again, and catch up.
    until("b sees the prepared root", Duration::from_secs(5), || {
        b.root_ids().len() == 2
    })
    .await;
    until(
        "the deleted ConfigMap is back and the new namespace has one",
        Duration::from_secs(5),
        || published_in(&api, &["shop", "billing"]),
    )
    .await;
    assert!(
        api.gone_served.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the catch-up went through 410 Gone ({} served)",
        api.gone_served.load(std::sync::atomic::Ordering::SeqCst)
    );
    // Each replica counts its own restarts: b's state-Secret watch and p's
    // ConfigMap and namespace watches went through 410 Gone.
    let gone = |ca: &Ca, resource: &str| {
        ca.metric(&format!(
            "meshca_kubernetes_watch_restarts_total{{resource=\"{resource}\",reason=\"gone\"}}"
        ))
    };
    assert!(gone(&b, "secrets") >= 1.0, "{}", b.running.metrics.render());
    assert!(
        gone(&p, "configmaps") >= 1.0,
        "{}",
        p.running.metrics.render()
    );
    assert!(
        gone(&p, "namespaces") >= 1.0,
        "{}",
        p.running.metrics.render()
    );
    assert_eq!(gone(&p, "secrets"), 0.0, "p watches no Secret");
    drop(p);
}

/// A 410 can also come as the HTTP status of the watch request (not as an
/// `ERROR` event in a 200 stream). kube-runtime's watcher then retries the
/// same expired version forever, so the watch never comes back; meshca
/// must list again instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_answered_to_the_watch_request_also_lists_again() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.add_namespace("shop", json!({"mesh": "on"}));
    api.gone_as_status
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let p = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.publish = Some(PublishConfig {
            namespace_labels: Default::default(),
            resync: Duration::from_secs(3600),
            lease: "meshca-publisher".into(),
            lease_duration: Duration::from_secs(2),
        });
    })
    .await;
    until("the bundle is published", Duration::from_secs(5), || {
        published_in(&api, &["shop"])
    })
    .await;
    until("both watches are open", Duration::from_secs(5), || {
        api.watches_opened.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    let restarts = |resource: &str, reason: &str| {
        p.metric(&format!(
            "meshca_kubernetes_watch_restarts_total{{resource=\"{resource}\",reason=\"{reason}\"}}"
        ))
    };
    // Cut: both watches end, and their resumes wait for the server.
    api.partition();
    until(
        "both watches are cut and resuming",
        Duration::from_secs(5),
        || restarts("namespaces", "closed") == 1.0 && restarts("configmaps", "closed") == 1.0,
    )
    .await;
    api.remove(&cm_path("shop"), CONFIGMAP);
    api.add_namespace("billing", json!({"mesh": "on"}));
    api.compact();
    api.heal();
    // Each resumed watch is answered 410 once; after a fresh list, the
    // watch from the new version opens. (Retrying the expired version
    // would get 410 forever and never open a watch again.)
    until(
        "both watches are open again from a fresh list",
        Duration::from_secs(5),
        || api.watches_opened.load(std::sync::atomic::Ordering::SeqCst) >= 4,
    )
    .await;
    assert_eq!(api.gone_served.load(std::sync::atomic::Ordering::SeqCst), 2);
    until(
        "the deleted ConfigMap is back and the new namespace has one",
        Duration::from_secs(5),
        || published_in(&api, &["shop", "billing"]),
    )
    .await;
    // In p's own registry, per watch: one clean close (resumed), one 410
    // (listed again), no error.
    for resource in ["namespaces", "configmaps"] {
        assert_eq!(restarts(resource, "closed"), 1.0, "{resource}");
        assert_eq!(restarts(resource, "gone"), 1.0, "{resource}");
        assert_eq!(restarts(resource, "error"), 0.0, "{resource}");
    }
    drop(p);
}

/// Two `meshca serve --kubernetes` processes against the fake API server:
/// SIGKILL the one holding the Lease; the other must take it over once it
/// expires and carry on the singleton work (publishing the bundle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_process_hands_the_singleton_work_over() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.add_namespace("shop", json!({}));
    let signer = cluster_signer();
    api.publish_oidc(support::ISSUER, signer.jwks());
    let start = |name: &'static str| {
        let kc = kc.clone();
        let data = dir.path().join(name);
        tokio::task::spawn_blocking(move || {
            support::spawn_serve(
                &data,
                &[
                    "--kubernetes",
                    "--kubeconfig",
                    kc.to_str().unwrap(),
                    "--replica-name",
                    name,
                    "--leader-election-lease-duration",
                    "2s",
                ],
            )
        })
    };
    let mut r1 = start("r1").await.unwrap();
    let mut r2 = start("r2").await.unwrap();
    for p in [&r1, &r2] {
        assert!(
            p.startup_log.iter().any(|l| l.contains("in-cluster mode")),
            "{:?}",
            p.startup_log
        );
    }
    let holder = || {
        api.get(LEASES, "meshca-leader")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    until("a leader", Duration::from_secs(10), || holder().is_some()).await;
    until("the bundle is published", Duration::from_secs(10), || {
        published_in(&api, &["shop"])
    })
    .await;
    let first = holder().unwrap();
    let (leader, survivor, next) = if first == "r1" {
        (&mut r1, &mut r2, "r2")
    } else {
        (&mut r2, &mut r1, "r1")
    };
    support::signal(&leader.child, "KILL");
    leader.child.wait().unwrap();
    let killed = Instant::now();
    until(
        "the survivor holds the Lease",
        Duration::from_secs(15),
        || holder().as_deref() == Some(next),
    )
    .await;
    let took = killed.elapsed();
    println!("lease taken over {took:?} after SIGKILL of the leader (2s lease)");
    assert!(
        took >= Duration::from_millis(1500),
        "not before the dead holder's Lease expired: {took:?}"
    );

    // The singleton work continues on the new leader.
    api.add_namespace("billing", json!({}));
    api.remove(&cm_path("shop"), CONFIGMAP);
    until(
        "the new leader publishes to the new namespace and restores the deleted ConfigMap",
        Duration::from_secs(10),
        || published_in(&api, &["shop", "billing"]),
    )
    .await;
    // Its metrics say it leads and has written ConfigMaps.
    let (_, metrics) = meshca::client::admin::request(
        "GET",
        &format!("http://{}/metrics", survivor.admin_addr),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        metric_value(&metrics, "meshca_kubernetes_leader"),
        Some(1.0),
        "{metrics}"
    );
    // It created exactly the two missing ConfigMaps (the deleted one and the
    // new namespace's); every other one was its predecessor's.
    let writes = |r: &str| {
        metric_value(
            &metrics,
            &format!("meshca_bundle_configmap_writes_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!(writes("created"), Some(2.0), "{metrics}");
    assert_eq!(writes("failed").unwrap_or(0.0), 0.0, "{metrics}");

    // And it issues: a token signed by a key the JWKS does not hold (say,
    // one the API server just started using) goes to TokenReview, the
    // in-cluster fallback, which accepts it.
    let token = mint(&cluster_signer(), support::ISSUER);
    api.tokens
        .lock()
        .unwrap()
        .insert(token.clone(), ("shop".into(), "web".into()));
    let survivor_data = dir.path().join(next);
    let ch = meshca::client::connect(
        &survivor.grpc_addr,
        &DataDir::new(&survivor_data).bundle_pem().unwrap(),
        "meshca.meshca.serviceaccount.identity.meshca.cluster.local",
        None,
    )
    .await
    .unwrap();
    let r = certify_native(&ch, token).await.unwrap();
    assert_eq!(r.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert!(api.token_reviews.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    support::signal(&survivor.child, "TERM");
    assert!(survivor.child.wait().unwrap().success());
}

/// An intermediate CA certificate signed by root `root_id` of `ca`'s data
/// directory, as cert-manager's CA Issuer would make it.
fn intermediate(ca: &Ca, root_id: &str) -> (String, String) {
    let (root_der, root_key) = ca.data().read_root(root_id).unwrap();
    let root_kp =
        rcgen::KeyPair::from_pem(std::str::from_utf8(root_key.to_pem().expose()).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&root_der, root_kp).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::seconds(10);
    p.not_after = now + time::Duration::days(10);
    p.distinguished_name.push(
        rcgen::DnType::CommonName,
        "cert-manager issued intermediate",
    );
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The same key in SEC1 form, as `openssl ec` writes it.
fn to_sec1(pkcs8_pem: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["ec", "-inform", "PEM", "-outform", "PEM"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pkcs8_pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn tls_secret(name: &str, crt: &str, key: &str, ca: &str) -> serde_json::Value {
    use base64::Engine;
    let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "meshca"},
           "type": "kubernetes.io/tls",
           "data": {"tls.crt": b(crt), "tls.key": b(key), "ca.crt": b(ca)}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_written_to_its_tls_secret_is_checked_and_used_by_every_replica() {
    let Cluster {
        dir: _dir,
        api,
        kc,
        signer,
        jwks,
    } = cluster().await;
    let with_issuer_secret = |name: &'static str| {
        let (kc, jwks) = (kc.clone(), jwks.clone());
        Ca::start_with(move |c| {
            c.kubernetes.kubeconfig = Some(kc);
            c.authn.jwks_file = Some(jwks);
            c.authn.authn_order = vec![meshca::config::AuthnSource::Jwks];
            c.kubernetes.state_secret = Some("meshca-ca".into());
            c.kubernetes.issuer_secret = Some("meshca-issuer".into());
            c.kubernetes.state_poll_interval = Duration::from_secs(3600);
            c.replica = name.into();
        })
    };
    let a = with_issuer_secret("a").await;
    let b = with_issuer_secret("b").await;

    // meshca writes its issuer as a kubernetes.io/tls Secret.
    let current = a.running.ca.issuer().fingerprint.clone();
    let b64 = |v: &serde_json::Value| {
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v.as_str().unwrap(),
        )
        .unwrap()
    };
    until(
        "the issuer Secret is written",
        // The first leader is elected one lease duration (15 s) after
        // start-up: a Lease nobody has is created only once seen absent.
        Duration::from_secs(25),
        || {
            api.get(SECRETS, "meshca-issuer").is_some_and(|s| {
                s["type"] == "kubernetes.io/tls"
                    && s["metadata"]["annotations"]["meshca.io/issuer-fingerprint"]
                        == current.as_str()
            })
        },
    )
    .await;
    let s = api.get(SECRETS, "meshca-issuer").unwrap();
    let crt = meshca::ca::pem_to_certs(&b64(&s["data"]["tls.crt"])).unwrap();
    assert_eq!(meshca::ca::fingerprint(&crt[0]), current);
    let root_id = a.running.ca.issuer().root_fingerprint.clone().unwrap();
    let root_pem = String::from_utf8(b64(&s["data"]["ca.crt"])).unwrap();
    assert_eq!(
        meshca::ca::fingerprint(&meshca::ca::pem_to_certs(root_pem.as_bytes()).unwrap()[0]),
        root_id
    );

    // An operator (or cert-manager) writes a newer intermediate under the
    // active root: every replica issues under it.
    let (crt, key) = intermediate(&a, &root_id);
    // cert-manager writes ECDSA keys in SEC1 ("EC PRIVATE KEY") by default.
    let key = to_sec1(&key);
    assert!(key.starts_with("-----BEGIN EC PRIVATE KEY-----"), "{key}");
    let new_fp = meshca::ca::fingerprint(&meshca::ca::pem_to_certs(crt.as_bytes()).unwrap()[0]);
    api.put(
        SECRETS,
        "meshca-issuer",
        tls_secret("meshca-issuer", &crt, &key, &root_pem),
    );
    until(
        "both replicas use the new issuer",
        Duration::from_secs(5),
        || {
            a.running.ca.issuer().fingerprint == new_fp
                && b.running.ca.issuer().fingerprint == new_fp
        },
    )
    .await;
    let r = certify_native(&b.channel().await, mint(&signer, support::ISSUER))
        .await
        .unwrap();
    assert_eq!(meshca::ca::fingerprint(&r.cert_chain[1]), new_fp);
    let root_der = meshca::ca::pem_to_certs(root_pem.as_bytes()).unwrap()[0].to_vec();
    meshca::client::verify_chain(
        &r.cert_chain[0],
        &r.cert_chain[1..],
        &[root_der],
        std::time::SystemTime::now(),
    )
    .expect("a leaf under the installed issuer verifies");

    // A newer certificate whose key does not match is refused with an
    // Event; the replicas keep the last good issuer.
    let (crt2, _) = intermediate(&a, &root_id);
    let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
    api.put(
        SECRETS,
        "meshca-issuer",
        tls_secret("meshca-issuer", &crt2, &other_key, &root_pem),
    );
    until("an Event says why", Duration::from_secs(5), || {
        api.list("/api/v1/namespaces/meshca/events")
            .iter()
            .any(|e| {
                e["reason"] == "InvalidIssuer"
                    && e["message"]
                        .as_str()
                        .unwrap_or("")
                        .contains("tls.key does not belong to tls.crt")
            })
    })
    .await;
    // One signed by another CA is refused too.
    let stranger = Ca::start().await;
    let stranger_root = stranger
        .running
        .ca
        .issuer()
        .root_fingerprint
        .clone()
        .unwrap();
    let (crt3, key3) = intermediate(&stranger, &stranger_root);
    api.put(
        SECRETS,
        "meshca-issuer",
        tls_secret("meshca-issuer", &crt3, &key3, &root_pem),
    );
    until(
        "an Event about the foreign CA",
        Duration::from_secs(5),
        || {
            api.list("/api/v1/namespaces/meshca/events")
                .iter()
                .any(|e| {
                    e["reason"] == "InvalidIssuer"
                        && e["message"]
                            .as_str()
                            .unwrap_or("")
                            .contains("not signed by the active root")
                })
        },
    )
    .await;
    assert_eq!(a.running.ca.issuer().fingerprint, new_fp);
    assert_eq!(b.running.ca.issuer().fingerprint, new_fp);
    // The leader (one of the two) refused the Secret version.
    let refused = |ca: &Ca| ca.metric("meshca_kubernetes_secrets_refused_total{secret=\"issuer\"}");
    assert!(refused(&a) + refused(&b) >= 1.0);
    assert!(
        certify_native(&a.channel().await, mint(&signer, support::ISSUER))
            .await
            .is_ok()
    );

    // A root rotation makes meshca's new issuer (under the new root) newer
    // than anything in the Secret: meshca writes it there.
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    let (code, body) = a.rotation("activate", "{\"force\": true}").await;
    assert_eq!(code, 200, "{body}");
    let rotated = a.running.ca.issuer().fingerprint.clone();
    assert_ne!(rotated, new_fp);
    until(
        "the Secret holds the issuer under the new root",
        Duration::from_secs(5),
        || {
            api.get(SECRETS, "meshca-issuer").is_some_and(|s| {
                s["metadata"]["annotations"]["meshca.io/issuer-fingerprint"] == rotated.as_str()
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writes_from_two_replicas_both_land() {
    let Cluster {
        dir: _dir,
        api,
        kc,
        signer: _,
        jwks,
    } = cluster().await;
    let a = shared_replica(&kc, "a", &jwks).await;
    let b = shared_replica(&kc, "b", &jwks).await;
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    assert_eq!(a.rotation("activate", "{}").await.0, 200);
    let old_root = a.running.ca.bundle().roots[0].clone();
    let old_id = meshca::ca::fingerprint(&old_root);
    until("b follows", Duration::from_secs(5), || {
        b.root_ids() == a.root_ids()
    })
    .await;

    // a taints the old root while b prepares a third one. Whichever write
    // reaches the API server first is held back, so the other lands first
    // and the held one is stale: it must get 409, re-read, and redo its step
    // on top — never overwrite the other's change.
    *api.delay_next_put.lock().unwrap() =
        Some((format!("{SECRETS}/meshca-ca"), Duration::from_millis(400)));
    let taint = format!("{{\"root\": \"{}\"}}", &old_id[..16]);
    let (ra, rb) = tokio::join!(a.rotation("taint", &taint), b.rotation("prepare", "{}"));
    assert_eq!(ra.0, 200, "{ra:?}");
    assert_eq!(rb.0, 200, "{rb:?}");
    assert!(
        api.conflicts.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the race happened"
    );
    let journal = shared_journal(&api);
    let old = journal.roots.iter().find(|r| r.id == old_id).unwrap();
    assert!(old.tainted, "a's taint survived: {journal:?}");
    assert_eq!(
        journal
            .roots
            .iter()
            .filter(|r| r.phase == meshca::trust::rotation::Phase::Prepared)
            .count(),
        1,
        "b's prepare survived: {journal:?}"
    );
    until(
        "both replicas hold the merged state",
        Duration::from_secs(5),
        || {
            a.root_ids() == b.root_ids()
                && a.running.ca.bundle().tainted.len() == 1
                && b.running.ca.bundle().tainted.len() == 1
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_activation_gate_counts_the_clients_of_every_replica() {
    let Cluster {
        dir: _dir,
        api,
        kc,
        signer,
        jwks,
    } = cluster().await;
    let a = shared_replica(&kc, "a", &jwks).await;
    let b = shared_replica(&kc, "b", &jwks).await;

    // A workload renews through b only, and does not watch the bundle.
    let ch = b.channel().await;
    certify_native(&ch, mint(&signer, support::ISSUER))
        .await
        .unwrap();
    until("b's report reaches a", Duration::from_secs(5), || {
        api.get(
            "/api/v1/namespaces/meshca/configmaps",
            "meshca-propagation-b",
        )
        .is_some()
    })
    .await;
    let t = Instant::now();
    loop {
        let st = a.rotation_status().await;
        if st["propagation"]["clients"] == 1 {
            assert_eq!(st["propagation"]["other_replicas"], json!(["b"]), "{st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "a never counted b's client"
        );
        // Poll interval (deadline above): reports travel through ConfigMaps.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A new root through a: a must not activate while b's client has not
    // seen the bundle carrying it.
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    // Real time: past the replicas' report interval, so the refusal below is the gate's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, body) = a.rotation("activate", "{}").await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("0/1 live clients"), "{body}");
    let st = a.rotation_status().await;
    assert!(
        st["propagation"]["lagging"]
            .to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/web"),
        "a's status names b's lagging client: {st}"
    );
    // It renews through b and gets the new bundle; then a may activate.
    let r = certify_native(&ch, mint(&signer, support::ISSUER))
        .await
        .unwrap();
    assert_eq!(
        r.trust_bundle.unwrap().version,
        a.running.ca.bundle().version
    );
    let t = Instant::now();
    loop {
        let (code, body) = a.rotation("activate", "{}").await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 409, "{body}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never allowed: {body}"
        );
        // Poll interval (deadline above): the gate is decided on the server's clock.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A replica that stops takes its report with it.
    drop(b);
    until("b's report is gone", Duration::from_secs(5), || {
        api.get(
            "/api/v1/namespaces/meshca/configmaps",
            "meshca-propagation-b",
        )
        .is_none()
    })
    .await;
}
