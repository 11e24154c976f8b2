//! The operator's kill switch (issue 11, section 2): `meshca revoke` over the
//! admin endpoint and offline, enforced on every API, persisted, audited,
//! counted, and an agent that backs off instead of retrying hot.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use meshca::proto::{istio, linkerd, meshca as pb};
use serde_json::Value;
use support::*;
use tonic::Code;

const WEB_DNS: &str = "web.shop.serviceaccount.identity.meshca.cluster.local";

async fn admin(
    ca: &Ca,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: bool,
) -> (u16, Value) {
    let t = std::fs::read_to_string(ca.dir.path().join("data/admin.token")).unwrap();
    let (code, text) = meshca::client::admin::request(
        method,
        &format!("http://{}{path}", ca.running.admin_addr),
        token.then_some(t.trim()),
        body.map(|b| b.to_string()),
    )
    .await
    .unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The value of one sample in /metrics (0 when absent).
async fn metric(ca: &Ca, sample: &str) -> f64 {
    let (_, text) = meshca::client::admin::request(
        "GET",
        &format!("http://{}/metrics", ca.running.admin_addr),
        None,
        None,
    )
    .await
    .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

struct Held {
    chain: Vec<Vec<u8>>,
    key_pem: String,
}

impl Held {
    fn pem(&self) -> (String, String) {
        (
            self.chain
                .iter()
                .map(|c| meshca::ca::der_to_pem(c))
                .collect(),
            self.key_pem.clone(),
        )
    }
    fn serial(&self) -> String {
        let (_, x) = x509_parser::parse_x509_certificate(&self.chain[0]).unwrap();
        hex::encode(x.raw_serial())
    }
}

fn new_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    (key, csr)
}

async fn certify(ch: tonic::transport::Channel, token: String) -> Result<Held, tonic::Status> {
    let (key, csr) = new_csr();
    let r = pb::identity_client::IdentityClient::new(ch)
        .certify(pb::CertifyRequest {
            token,
            csr,
            requested_ttl: None,
        })
        .await?
        .into_inner();
    Ok(Held {
        chain: r.cert_chain,
        key_pem: key.serialize_pem(),
    })
}

async fn mtls(ca: &Ca, held: &Held) -> tonic::transport::Channel {
    meshca::client::connect(
        &ca.addr(),
        &ca.bundle_pem(),
        &ca.running.server_name,
        Some(held.pem()),
    )
    .await
    .unwrap()
}

async fn audit_entries(ca: &Ca, kind: &str) -> Vec<meshca::audit::Entry> {
    let log = ca.running.audit.clone().unwrap();
    log.checkpoint().await.unwrap();
    let store = meshca::audit::store::SqliteStore::open_read_only(log.db_path()).unwrap();
    meshca::audit::store::AuditStore::query(&store, &Default::default())
        .unwrap()
        .into_iter()
        .map(|e| serde_json::from_slice::<meshca::audit::Entry>(&e.body).unwrap())
        .filter(|e| e.kind == kind)
        .collect()
}

#[tokio::test]
async fn a_denied_identity_is_refused_on_every_api_until_lifted() {
    let ca = Ca::start().await;
    let web = certify(ca.channel().await, ca.token("shop", "web", "meshca"))
        .await
        .unwrap();
    // Every revocation route needs the admin token, GET included.
    assert_eq!(admin(&ca, "GET", "/revocations", None, false).await.0, 401);
    let deny = serde_json::json!({"identity": "shop/web", "reason": "compromised node"});
    assert_eq!(
        admin(
            &ca,
            "POST",
            "/revocations/revoke",
            Some(deny.clone()),
            false
        )
        .await
        .0,
        401
    );
    let refused0 = metric(&ca, "meshca_revocation_refusals_total{kind=\"identity\"}").await;
    let (code, v) = admin(&ca, "POST", "/revocations/revoke", Some(deny.clone()), true).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        metric(&ca, "meshca_revocations{kind=\"identity\"}").await,
        1.0
    );
    let (code, v) = admin(&ca, "POST", "/revocations/revoke", Some(deny), true).await;
    assert_eq!(code, 409, "already denied: {v}");

    let denied = |r: Result<(), tonic::Status>, what: &str| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
        assert!(
            s.message().contains("shop/web is denied"),
            "{what}: {}",
            s.message()
        );
        // The operator's reason is for the audit log, not for the workload
        // (a compromised workload learns nothing about the investigation).
        assert!(
            !s.message().contains("compromised"),
            "{what}: {}",
            s.message()
        );
    };
    // Native Certify with a token, and renewal with its certificate.
    denied(
        certify(ca.channel().await, ca.token("shop", "web", "meshca"))
            .await
            .map(|_| ()),
        "native token",
    );
    denied(
        certify(mtls(&ca, &web).await, String::new())
            .await
            .map(|_| ()),
        "native certificate",
    );
    // Linkerd and Istio.
    let (_, csr) = new_csr();
    denied(
        linkerd::identity_client::IdentityClient::new(ca.channel().await)
            .certify(linkerd::CertifyRequest {
                identity: WEB_DNS.into(),
                token: ca.token("shop", "web", "identity.l5d.io").into_bytes(),
                certificate_signing_request: csr,
            })
            .await
            .map(|_| ()),
        "linkerd",
    );
    let (_, csr) = new_csr();
    let mut req = tonic::Request::new(istio::IstioCertificateRequest {
        csr: meshca::util::pem::encode("CERTIFICATE REQUEST", &csr),
        validity_duration: 3600,
        metadata: None,
    });
    let tok = ca.token("shop", "web", "istio-ca");
    req.metadata_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    denied(
        istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
            ca.channel().await,
        )
        .create_certificate(req)
        .await
        .map(|_| ()),
        "istio",
    );
    // The bundle APIs, called as that identity.
    let mut as_web = pb::identity_client::IdentityClient::new(mtls(&ca, &web).await);
    denied(
        as_web
            .get_trust_bundle(pb::GetTrustBundleRequest {})
            .await
            .map(|_| ()),
        "GetTrustBundle",
    );
    denied(
        as_web
            .watch_trust_bundle(pb::WatchTrustBundleRequest {})
            .await
            .map(|_| ()),
        "WatchTrustBundle",
    );
    assert_eq!(
        metric(&ca, "meshca_revocation_refusals_total{kind=\"identity\"}").await - refused0,
        6.0,
        "every refusal counted"
    );
    // Others, and anonymous bundle readers, are unaffected.
    certify(ca.channel().await, ca.token("shop", "db", "meshca"))
        .await
        .expect("another identity");
    pb::identity_client::IdentityClient::new(ca.channel().await)
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .expect("anonymous bundle");

    let (code, list) = admin(&ca, "GET", "/revocations", None, true).await;
    assert_eq!(code, 200);
    assert_eq!(list["identities"][0]["identity"], "shop/web");
    assert_eq!(list["identities"][0]["reason"], "compromised node");
    let lift = serde_json::json!({"identity": "shop/web"});
    let (code, v) = admin(&ca, "POST", "/revocations/lift", Some(lift.clone()), true).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        admin(&ca, "POST", "/revocations/lift", Some(lift), true)
            .await
            .0,
        404
    );
    assert_eq!(
        metric(&ca, "meshca_revocations{kind=\"identity\"}").await,
        0.0
    );
    certify(ca.channel().await, ca.token("shop", "web", "meshca"))
        .await
        .expect("lifted");
    let changes: Vec<String> = audit_entries(&ca, "revocation")
        .await
        .into_iter()
        .map(|e| format!("{} {}", e.result, e.identity()))
        .collect();
    assert_eq!(
        changes,
        ["identity_denied shop/web", "identity_lifted shop/web"]
    );
}

#[tokio::test]
async fn a_revoked_serial_and_certificates_renewed_from_it_can_no_longer_renew() {
    let ca = Ca::start().await;
    let first = certify(ca.channel().await, ca.token("shop", "web", "meshca"))
        .await
        .unwrap();
    let second = certify(mtls(&ca, &first).await, String::new())
        .await
        .unwrap();
    let refused0 = metric(&ca, "meshca_revocation_refusals_total{kind=\"serial\"}").await;
    // Operators paste serials as openssl prints them.
    let pasted = first
        .serial()
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let (code, v) = admin(
        &ca,
        "POST",
        "/revocations/revoke",
        Some(serde_json::json!({"serial": pasted, "reason": "key leaked"})),
        true,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["list"]["serials"][0]["serial"], first.serial());
    assert_eq!(
        metric(&ca, "meshca_revocations{kind=\"serial\"}").await,
        1.0
    );
    for (held, what) in [
        (&first, "the revoked leaf"),
        (&second, "a leaf renewed from it"),
    ] {
        let s = certify(mtls(&ca, held).await, String::new())
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} renewed"));
        assert_eq!(s.code(), Code::Unauthenticated, "{what}");
        assert!(
            s.message().contains("revoked")
                && s.message().contains("present a service-account token"),
            "{what}: {}",
            s.message()
        );
    }
    assert_eq!(
        metric(&ca, "meshca_revocation_refusals_total{kind=\"serial\"}").await - refused0,
        2.0
    );
    // The identity is not denied: its token starts a fresh chain.
    let fresh = certify(ca.channel().await, ca.token("shop", "web", "meshca"))
        .await
        .unwrap();
    certify(mtls(&ca, &fresh).await, String::new())
        .await
        .expect("a fresh chain renews");
    // Bad input is refused with a reason.
    let (code, v) = admin(
        &ca,
        "POST",
        "/revocations/revoke",
        Some(serde_json::json!({"serial": "not-hex"})),
        true,
    )
    .await;
    assert_eq!(code, 400);
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("not a certificate serial"));
    let (code, _) = admin(
        &ca,
        "POST",
        "/revocations/lift",
        Some(serde_json::json!({"serial": first.serial()})),
        true,
    )
    .await;
    assert_eq!(code, 200);
    certify(mtls(&ca, &second).await, String::new())
        .await
        .expect("lifted: the chain renews again");
}

#[tokio::test]
async fn offline_revocations_need_the_data_dir_lock_and_survive_restarts() {
    let ca = Ca::start().await;
    let data = ca.dir.path().join("data");
    let args = |identity: &str| meshca::cli::revoke::RevokeArgs {
        serial: None,
        identity: Some(identity.into()),
        reason: "offline".into(),
        lift: false,
        list: false,
        server: None,
        data_dir: data.clone(),
        admin_token_file: None,
        trust_domain: "cluster.local".into(),
        output: meshca::cli::Output::Json,
    };
    let e = meshca::cli::revoke::run(args("shop/web"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("in use by another meshca process"),
        "{e}"
    );
    // A held lock is "unavailable" (retry, or use --server), not a failure.
    assert_eq!(e.exit_code(), meshca::cli::EXIT_UNAVAILABLE, "{e:?}");
    let Ca { running, dir } = ca;
    running.shutdown().await;
    meshca::cli::revoke::run(args("shop/web")).await.unwrap();
    let running = meshca::server::start(meshca::config::ServeConfig::for_tests(data.clone()))
        .await
        .unwrap();
    let ca = Ca { running, dir };
    let s = certify(ca.channel().await, ca.token("shop", "web", "meshca"))
        .await
        .err()
        .expect("denied after the restart");
    assert_eq!(s.code(), Code::PermissionDenied);
    let entries = audit_entries(&ca, "revocation").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].reason, "operator (offline)");
}

#[tokio::test]
async fn a_denied_agent_backs_off_and_stops_serving_its_certificate_at_expiry() {
    let ca = Ca::start_with(|c| c.issuance.min_ttl = Duration::from_secs(1)).await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = ca.start_agent(tmp.path(), Duration::from_secs(4));
    let svid = agent.ready(Duration::from_secs(10)).await.unwrap();
    let (code, v) = admin(
        &ca,
        "POST",
        "/revocations/revoke",
        Some(serde_json::json!({"identity": "shop/web"})),
        true,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    // Counted from the metric: the audit log folds identical refusals.
    const DENIED: &str =
        "meshca_issuance_total{api=\"native\",result=\"refused\",reason=\"identity_denied\"}";
    let denied0 = metric(&ca, DENIED).await;
    // The held certificate is dropped once it expires, not served on.
    let mut rx = agent.watch();
    let left = svid
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::timeout(
        left + Duration::from_secs(2),
        rx.wait_for(|s| s.svid.is_none()),
    )
    .await
    .expect("the expired certificate is no longer served")
    .unwrap();
    // Three more seconds of being refused: at most a couple of attempts
    // (a hot loop would make one every few hundred milliseconds).
    // Real time: count a real agent's retries over 3 s (a negative check on its backoff).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refusals = (metric(&ca, DENIED).await - denied0) as u64;
    assert!(
        (1..=2).contains(&refusals),
        "{refusals} refused attempts in ~{}s",
        left.as_secs() + 3
    );
}
