#![allow(clippy::unwrap_used)]
//! meshca's writes to a shared cluster (issue 13, defects 5, 6 and 7's
//! first item), against the fake API server modelling kube-apiserver:
//! server-side apply keeps what other writers put on the bundle ConfigMaps
//! and the issuer Secret; an issuer Secret of the wrong (immutable) type is
//! reported once; namespaces being deleted are skipped without failures;
//! publishing reads from watch caches (no quorum list per event) and writes
//! with bounded concurrency.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use meshca::config::PublishConfig;
use meshca::kubernetes::publish::{CONFIGMAP, KEY, WRITE_CONCURRENCY};
use serde_json::json;
use support::kubeapi::Store;
use support::*;

const SECRETS: &str = "/api/v1/namespaces/meshca/secrets";
const EVENTS: &str = "/api/v1/namespaces/meshca/events";
const ISSUER_SECRET: &str = "meshca-issuer";

fn cm_path(ns: &str) -> String {
    format!("/api/v1/namespaces/{ns}/configmaps")
}

async fn until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    wait_until(what, limit, || std::future::ready(f())).await;
}

/// A CA that publishes its bundle to the namespaces labelled `mesh=on`.
async fn publisher(kc: &std::path::Path) -> Ca {
    let kc = kc.to_path_buf();
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.publish = Some(PublishConfig {
            namespace_labels: [("mesh".to_string(), "on".to_string())].into(),
            // Long: everything must come from the watches.
            resync: Duration::from_secs(3600),
            lease: "meshca-publisher".into(),
            lease_duration: Duration::from_secs(2),
        });
        c.trust.propagation_wait = Duration::from_secs(0);
    })
    .await
}

/// A CA that keeps its issuer in Secret `meshca-issuer`.
async fn with_issuer_secret(kc: &std::path::Path) -> Ca {
    let kc = kc.to_path_buf();
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.issuer_secret = Some(ISSUER_SECRET.into());
        c.trust.propagation_wait = Duration::from_secs(0);
        c.replica = "replica-a".into();
    })
    .await
}

fn holds(api: &Store, ns: &str, pem: &str) -> bool {
    api.get(&cm_path(ns), CONFIGMAP)
        .is_some_and(|c| c["data"][KEY] == pem)
}

fn configmap_writes(api: &Store) -> usize {
    api.writes
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.contains("/configmaps"))
        .count()
}

/// A root rotation (prepare, then a forced activate): the bundle and the
/// issuer both change.
async fn rotate(ca: &Ca) {
    let (code, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = ca.rotation("activate", "{\"force\": true}").await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn others_fields_on_a_bundle_configmap_survive_a_republish() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.add_namespace("shop", json!({"mesh": "on"}));
    let p = publisher(&kc).await;
    let pem = p.running.ca.bundle().to_pem();
    until("published", Duration::from_secs(5), || {
        holds(&api, "shop", &pem)
    })
    .await;

    // An operator and a GitOps controller add their own fields.
    let mut cm = api.get(&cm_path("shop"), CONFIGMAP).unwrap();
    cm["metadata"]["labels"]["team"] = json!("payments");
    cm["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] = json!("1");
    let owner =
        json!([{"apiVersion": "v1", "kind": "Namespace", "name": "shop", "uid": "uid-shop"}]);
    cm["metadata"]["ownerReferences"] = owner.clone();
    cm["binaryData"] = json!({"logo.png": "iVBORw0KGgo="});
    cm["data"]["extra.pem"] = json!("theirs");
    api.put(&cm_path("shop"), CONFIGMAP, cm);

    // The bundle changes: meshca publishes it again.
    let (code, body) = p.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let two = p.running.ca.bundle().to_pem();
    assert_ne!(two, pem);
    until(
        "the new bundle is published",
        Duration::from_secs(5),
        || holds(&api, "shop", &two),
    )
    .await;
    let cm = api.get(&cm_path("shop"), CONFIGMAP).unwrap();
    let m = &cm["metadata"];
    assert_eq!(m["labels"]["team"], "payments", "{cm}");
    assert_eq!(
        m["labels"]["app.kubernetes.io/managed-by"], "meshca",
        "{cm}"
    );
    assert_eq!(
        m["annotations"]["argocd.argoproj.io/sync-wave"], "1",
        "{cm}"
    );
    assert_eq!(m["ownerReferences"], owner, "{cm}");
    assert_eq!(cm["binaryData"]["logo.png"], "iVBORw0KGgo=", "{cm}");
    assert_eq!(cm["data"]["extra.pem"], "theirs", "{cm}");

    // Someone overwrites `ca.crt` (keeping every annotation): the watch
    // shows a version meshca did not write; meshca reads it, finds the
    // content wrong and puts its own field right — theirs still stay.
    let mut cm = api.get(&cm_path("shop"), CONFIGMAP).unwrap();
    cm["data"][KEY] = json!("tampered");
    api.put(&cm_path("shop"), CONFIGMAP, cm);
    until("ca.crt is put right", Duration::from_secs(5), || {
        holds(&api, "shop", &two)
    })
    .await;
    let cm = api.get(&cm_path("shop"), CONFIGMAP).unwrap();
    assert_eq!(cm["data"]["extra.pem"], "theirs", "{cm}");
    assert_eq!(cm["metadata"]["labels"]["team"], "payments", "{cm}");
    assert_eq!(
        p.metric("meshca_bundle_configmap_writes_total{result=\"failed\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_managers_annotations_on_the_issuer_secret_survive_a_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let a = with_issuer_secret(&kc).await;
    let written = |fp: &str| {
        api.get(SECRETS, ISSUER_SECRET).is_some_and(|s| {
            s["type"] == "kubernetes.io/tls"
                && s["metadata"]["annotations"]["meshca.io/issuer-fingerprint"] == fp
        })
    };
    let first = a.running.ca.issuer().fingerprint.clone();
    until(
        "the issuer Secret is written",
        // The first leader is elected one lease duration (15 s) after
        // start-up: a Lease nobody has is created only once seen absent.
        Duration::from_secs(25),
        || written(&first),
    )
    .await;

    // cert-manager's bookkeeping on the Secret (its Certificate points here).
    let mut s = api.get(SECRETS, ISSUER_SECRET).unwrap();
    let theirs = [
        ("cert-manager.io/certificate-name", "meshca-issuer"),
        ("cert-manager.io/issuer-name", "meshca-root"),
        ("cert-manager.io/issuer-kind", "Issuer"),
        ("cert-manager.io/common-name", "meshca issuer"),
    ];
    for (k, v) in theirs {
        s["metadata"]["annotations"][k] = json!(v);
    }
    s["metadata"]["labels"]["controller.cert-manager.io/fao"] = json!("true");
    api.put(SECRETS, ISSUER_SECRET, s);

    // A rotation gives meshca a new issuer, which it writes to the Secret.
    rotate(&a).await;
    let second = a.running.ca.issuer().fingerprint.clone();
    assert_ne!(second, first);
    until("the new issuer is written", Duration::from_secs(5), || {
        written(&second)
    })
    .await;
    let s = api.get(SECRETS, ISSUER_SECRET).unwrap();
    for (k, v) in theirs {
        assert_eq!(s["metadata"]["annotations"][k], v, "{k} kept");
    }
    assert_eq!(
        s["metadata"]["labels"]["controller.cert-manager.io/fao"],
        "true"
    );
    let b64 = |v: &serde_json::Value| {
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            v.as_str().unwrap(),
        )
        .unwrap()
    };
    let crt = meshca::ca::pem_to_certs(&b64(&s["data"]["tls.crt"])).unwrap();
    assert_eq!(meshca::ca::fingerprint(&crt[0]), second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_secret_of_the_wrong_type_is_reported_once_and_recreated_when_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    // `kubectl create secret generic meshca-issuer --from-file=…`: Opaque.
    let opaque = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": ISSUER_SECRET, "namespace": "meshca"},
        "data": {"tls.crt": "bm90IGEgY2VydA=="}});
    api.put(SECRETS, ISSUER_SECRET, opaque);
    let a = with_issuer_secret(&kc).await;
    let wrong_type = || {
        api.list(EVENTS)
            .into_iter()
            .filter(|e| e["reason"] == "WrongSecretType")
            .collect::<Vec<_>>()
    };
    // After the first election, one lease duration (15 s) in.
    until("an Event says what to do", Duration::from_secs(25), || {
        !wrong_type().is_empty()
    })
    .await;
    assert_eq!(
        wrong_type()[0]["message"],
        "Secret meshca/meshca-issuer has type Opaque; meshca writes kubernetes.io/tls and `type` is immutable: delete it and meshca recreates it"
    );

    // More rounds: the Secret's watch fires (someone labels it) and the
    // issuer changes. Nothing new is reported and no write is tried.
    for i in 0..3 {
        let mut s = api.get(SECRETS, ISSUER_SECRET).unwrap();
        s["metadata"]["labels"] = json!({"poke": i.to_string()});
        api.put(SECRETS, ISSUER_SECRET, s);
    }
    rotate(&a).await;
    // Real time: a negative check (no second report, no write).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(wrong_type().len(), 1, "reported once");
    assert_eq!(api.immutable_type_refusals.load(Ordering::SeqCst), 0);
    assert_eq!(
        a.metric("meshca_kubernetes_secrets_refused_total{secret=\"issuer\"}"),
        1.0
    );
    let s = api.get(SECRETS, ISSUER_SECRET).unwrap();
    assert_eq!(s["type"], "Opaque");
    assert_eq!(s["data"]["tls.crt"], "bm90IGEgY2VydA==", "left alone");

    // Deleted: meshca creates it with the right type and its issuer.
    api.remove(SECRETS, ISSUER_SECRET);
    let fp = a.running.ca.issuer().fingerprint.clone();
    until(
        "recreated as kubernetes.io/tls",
        Duration::from_secs(5),
        || {
            api.get(SECRETS, ISSUER_SECRET).is_some_and(|s| {
                s["type"] == "kubernetes.io/tls"
                    && s["metadata"]["annotations"]["meshca.io/issuer-fingerprint"] == fp.as_str()
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_being_deleted_are_skipped_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    for ns in ["shop", "closing", "leaving"] {
        api.add_namespace(ns, json!({"mesh": "on"}));
    }
    api.terminate_namespace("leaving");
    let p = publisher(&kc).await;
    let pem = p.running.ca.bundle().to_pem();
    until("published", Duration::from_secs(5), || {
        holds(&api, "shop", &pem) && holds(&api, "closing", &pem)
    })
    .await;
    let failed = || p.metric("meshca_bundle_configmap_writes_total{result=\"failed\"}");
    // Known to be terminating: not even tried.
    assert!(api.get(&cm_path("leaving"), CONFIGMAP).is_none());
    assert_eq!(api.terminating_refusals.load(Ordering::SeqCst), 0);
    assert_eq!(failed(), 0.0);

    // A race: "closing" starts terminating (and its ConfigMap is deleted by
    // the namespace controller) while meshca's watches are cut off, so its
    // caches still show both. The bundle changes; the create gets 403
    // NamespaceTerminating, which is not a failure.
    until("both watches are open", Duration::from_secs(5), || {
        api.watches_opened.load(Ordering::SeqCst) >= 2
    })
    .await;
    api.partition();
    api.terminate_namespace("closing");
    api.remove(&cm_path("closing"), CONFIGMAP);
    let (code, body) = p.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let two = p.running.ca.bundle().to_pem();
    until("shop gets the new bundle", Duration::from_secs(5), || {
        holds(&api, "shop", &two)
    })
    .await;
    until(
        "the create in closing was refused",
        Duration::from_secs(5),
        || api.terminating_refusals.load(Ordering::SeqCst) == 1,
    )
    .await;
    api.heal();
    until("the watches resume", Duration::from_secs(5), || {
        api.watches_opened.load(Ordering::SeqCst) >= 4
    })
    .await;
    // Real time: a negative check (the resumed watches' events cause no retry).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(failed(), 0.0, "{}", p.running.metrics.render());
    assert_eq!(api.terminating_refusals.load(Ordering::SeqCst), 1);
    assert!(api.get(&cm_path("closing"), CONFIGMAP).is_none());
    assert!(api.get(&cm_path("leaving"), CONFIGMAP).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_events_cost_no_quorum_list_and_write_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let names: Vec<String> = (0..20).map(|i| format!("team-{i}")).collect();
    for ns in &names {
        api.add_namespace(ns, json!({"mesh": "on"}));
    }
    let p = publisher(&kc).await;
    let pem = p.running.ca.bundle().to_pem();
    until("published everywhere", Duration::from_secs(10), || {
        names.iter().all(|ns| holds(&api, ns, &pem))
    })
    .await;
    let lists_at_sync = api.lists.lock().unwrap().len();
    let quorum_at_sync = [
        api.quorum_lists("/api/v1/namespaces"),
        api.quorum_lists("/api/v1/configmaps"),
    ];
    let writes_at_sync = configmap_writes(&api);
    assert_eq!(writes_at_sync, 20);

    // 30 namespace events: 10 relabelled, 10 new ones outside the
    // selector, 5 new selected ones (and the 5 ConfigMap events meshca's
    // own writes cause).
    for ns in &names[..10] {
        let mut o = api.get("/api/v1/namespaces", ns).unwrap();
        o["metadata"]["labels"]["team"] = json!("x");
        api.put("/api/v1/namespaces", ns, o);
    }
    for i in 0..10 {
        api.add_namespace(&format!("other-{i}"), json!({}));
    }
    let new: Vec<String> = (0..5).map(|i| format!("new-{i}")).collect();
    for ns in &new {
        api.add_namespace(ns, json!({"mesh": "on"}));
    }
    until(
        "the new namespaces have the bundle",
        Duration::from_secs(5),
        || new.iter().all(|ns| holds(&api, ns, &pem)),
    )
    .await;
    // Real time: a negative check (no late writes or lists).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        [
            api.quorum_lists("/api/v1/namespaces"),
            api.quorum_lists("/api/v1/configmaps"),
        ],
        quorum_at_sync,
        "no quorum list after the initial sync"
    );
    let lists = api.lists.lock().unwrap().clone();
    assert_eq!(
        lists.len(),
        lists_at_sync,
        "no list after the initial sync: {lists:?}"
    );
    assert_eq!(
        configmap_writes(&api) - writes_at_sync,
        5,
        "only the missing ones"
    );
    assert!(names[..10].iter().all(|ns| holds(&api, ns, &pem)));
    assert!(api.get(&cm_path("other-0"), CONFIGMAP).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_namespaces_are_written_with_bounded_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let names: Vec<String> = (0..200).map(|i| format!("ns-{i:03}")).collect();
    for ns in &names {
        api.add_namespace(ns, json!({"mesh": "on"}));
    }
    // Each write takes 20 ms at the server: one at a time, 200 take 4 s.
    *api.configmap_write_delay.lock().unwrap() = Some(Duration::from_millis(20));
    let t = Instant::now();
    let p = publisher(&kc).await;
    let pem = p.running.ca.bundle().to_pem();
    until("published in all 200", Duration::from_secs(30), || {
        names.iter().all(|ns| holds(&api, ns, &pem))
    })
    .await;
    let took = t.elapsed();
    let max = api.max_configmap_writes_in_flight.load(Ordering::SeqCst);
    println!("200 namespaces published in {took:?}, at most {max} writes in flight");
    assert!(max <= WRITE_CONCURRENCY, "{max} in flight");
    assert!(max > 1, "the writes run concurrently ({max} at most)");
    assert_eq!(configmap_writes(&api), 200);
    assert_eq!(
        p.metric("meshca_bundle_configmap_writes_total{result=\"created\"}"),
        200.0
    );
}
