//! How the agent takes federated bundles from the CA's bundle stream: a
//! federation change arrives with the same `version` and a larger
//! `federation_version`; only that part of the held bundle changes.

use std::sync::Arc;

use tokio::sync::{watch, Notify};

use super::*;

fn inner() -> (Inner, watch::Receiver<State>) {
    let (state, rx) = watch::channel(State {
        svid: None,
        bundle: Arc::new(Bundle::default()),
    });
    let inner = Inner {
        cfg: AgentConfig {
            ca_address: "127.0.0.1:1".into(),
            server_name: "ca.invalid".into(),
            bootstrap_bundle: "/nonexistent".into(),
            token_file: "/nonexistent".into(),
            requested_ttl: None,
        },
        endpoints: Endpoints::parse("127.0.0.1:1").unwrap(),
        state,
        renew_now: Notify::new(),
        metrics: Arc::new(Metrics::new()),
    };
    (inner, rx)
}

fn fed(root: &[u8], sequence: u64) -> pb::FederatedBundle {
    pb::FederatedBundle {
        x509_authorities: vec![root.to_vec()],
        jwt_authorities: Vec::new(),
        sequence,
    }
}

fn msg(version: u64, fv: u64, federated: &[(&str, pb::FederatedBundle)]) -> pb::TrustBundle {
    pb::TrustBundle {
        version,
        trust_domain: "a.test".into(),
        roots: vec![format!("own root {version}").into_bytes()],
        federation_version: fv,
        federated_bundles: federated
            .iter()
            .map(|(td, b)| (td.to_string(), b.clone()))
            .collect(),
        ..Default::default()
    }
}

fn held(rx: &watch::Receiver<State>) -> Arc<Bundle> {
    rx.borrow().bundle.clone()
}

fn gauge(m: &Metrics) -> String {
    m.render()
        .lines()
        .find(|l| l.starts_with("meshca_agent_federated_bundles "))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_federation_change_with_the_same_version_is_adopted() {
    let (a, rx) = inner();
    a.adopt_bundle(msg(3, 1, &[]), true);
    assert!(held(&rx).federated.is_empty());
    assert_eq!(gauge(&a.metrics), "meshca_agent_federated_bundles 0");

    a.adopt_bundle(msg(3, 2, &[("b.test", fed(b"b root", 7))]), false);
    let b = held(&rx);
    assert_eq!(b.version, 3);
    assert_eq!(b.roots, vec![CertificateDer::from(b"own root 3".to_vec())]);
    assert_eq!(b.federation_version, 2);
    let fb = &b.federated["b.test"];
    assert_eq!(fb.x509_authorities[0].as_ref(), b"b root");
    assert_eq!(fb.sequence, 7);
    assert_eq!(gauge(&a.metrics), "meshca_agent_federated_bundles 1");

    // A second domain, then one removed: the held set is the message's.
    a.adopt_bundle(
        msg(
            3,
            3,
            &[("b.test", fed(b"b root", 7)), ("c.test", fed(b"c", 1))],
        ),
        false,
    );
    assert_eq!(gauge(&a.metrics), "meshca_agent_federated_bundles 2");
    a.adopt_bundle(msg(3, 4, &[("c.test", fed(b"c", 1))]), false);
    let b = held(&rx);
    assert_eq!(b.federated.keys().collect::<Vec<_>>(), ["c.test"]);
    assert_eq!(gauge(&a.metrics), "meshca_agent_federated_bundles 1");
}

#[test]
fn a_stale_federation_message_is_ignored_unless_it_opens_a_new_stream() {
    let (a, rx) = inner();
    a.adopt_bundle(msg(3, 5, &[("b.test", fed(b"new", 2))]), true);
    let before = held(&rx);
    // A Certify answer built before the last change, on the same replica.
    a.adopt_bundle(msg(3, 4, &[("b.test", fed(b"old", 1))]), false);
    assert_eq!(held(&rx), before);
    // The same counter with other content is not news either.
    a.adopt_bundle(msg(3, 5, &[("b.test", fed(b"other", 1))]), false);
    assert_eq!(held(&rx), before);
    // Another replica (or a restarted CA) counts from 1: its first message
    // on a new stream is the current view.
    a.adopt_bundle(msg(3, 1, &[("b.test", fed(b"replica 2", 3))]), true);
    let b = held(&rx);
    assert_eq!(
        b.federated["b.test"].x509_authorities[0].as_ref(),
        b"replica 2"
    );
    assert_eq!(b.federation_version, 1);
}

#[test]
fn an_older_own_bundle_brings_no_federation_with_it() {
    let (a, rx) = inner();
    a.adopt_bundle(msg(4, 1, &[]), true);
    a.adopt_bundle(msg(3, 9, &[("b.test", fed(b"b", 1))]), true);
    let b = held(&rx);
    assert_eq!(b.version, 4);
    assert!(b.federated.is_empty());
}

#[test]
fn a_newer_own_bundle_carries_the_federation_it_states() {
    let (a, rx) = inner();
    a.adopt_bundle(msg(3, 2, &[("b.test", fed(b"b", 1))]), true);
    a.adopt_bundle(msg(4, 2, &[("b.test", fed(b"b", 1))]), false);
    let b = held(&rx);
    assert_eq!((b.version, b.federation_version), (4, 2));
    assert_eq!(b.federated.len(), 1);
    assert_eq!(gauge(&a.metrics), "meshca_agent_federated_bundles 1");
}
