//! Issuer renewal in a running server: at 2/3 of its lifetime a new issuer
//! is made under the root and used at once, with no restart; the change is
//! recorded in the audit log.

mod support;

use std::time::{Duration, SystemTime};

use meshca::audit::store::{Filter, SqliteStore};
use meshca::ca::store::{DataDir, InitOptions};
use meshca::config::ServeConfig;
use support::*;

#[tokio::test]
async fn issuer_renews_itself_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts = InitOptions {
        issuer_lifetime: Duration::from_secs(6),
        ..Default::default()
    };
    DataDir::new(&data).init(&opts, SystemTime::now()).unwrap();
    let mut cfg = ServeConfig::for_tests(data.clone());
    cfg.issuance.min_ttl = Duration::from_secs(1);
    let running = meshca::server::start(cfg).await.unwrap();
    let first = running.ca.issuer().fingerprint.clone();

    let mut renewed = None;
    for _ in 0..60 {
        // Poll interval: the server renews its issuer on the system clock.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = running.ca.issuer().fingerprint.clone();
        if now != first {
            renewed = Some(now);
            break;
        }
    }
    let renewed = renewed.expect("a new issuer within 12 s (due at 4 s)");

    // New leaves chain through the new issuer to the same root.
    let bundle = DataDir::new(&data).bundle_pem().unwrap();
    let ch = meshca::client::connect(
        &running.grpc_addr.to_string(),
        &bundle,
        &running.server_name,
        None,
    )
    .await
    .unwrap();
    let r = certify_native(&ch, dev_token(&data, "shop", "web"))
        .await
        .unwrap();
    assert_eq!(meshca::ca::fingerprint(&r.cert_chain[1]), renewed);
    let roots = r.trust_bundle.unwrap().roots;
    assert_eq!(roots.len(), 1, "the root did not change");
    meshca::client::verify_chain(
        &r.cert_chain[0],
        &r.cert_chain[1..],
        &roots,
        SystemTime::now(),
    )
    .unwrap();

    // The renewal is in the audit log, and the new issuer is on disk.
    let log = running.audit.clone().unwrap();
    log.checkpoint().await.unwrap();
    let store = SqliteStore::open_read_only(log.db_path()).unwrap();
    let rows = meshca::audit::query::list(
        &store,
        &Filter {
            result: Some("issuer_renewed".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!rows.is_empty());
    assert_eq!(rows[0].entry.kind, "rotation");
    assert!(rows[0].entry.detail.as_deref().unwrap().contains(&first));
    drop(store);
    running.shutdown().await;
    let reloaded = DataDir::new(&data).load().unwrap();
    assert_ne!(
        reloaded.issuer.fingerprint, first,
        "persisted: a restart keeps the renewed issuer"
    );
}
