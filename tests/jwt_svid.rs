//! JWT-SVIDs, CA side (issue 14, part 2): `Identity.MintJWTSVID` over a
//! token and over mTLS, verified by PyJWT (a verifier we did not write)
//! against a JWKS it builds from the keys the CA publishes; the attacks it
//! must refuse; the signing key's rotation with its root; RS256 mode.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use base64::Engine;
use meshca::proto::meshca as pb;
use serde_json::{json, Value};
use support::interop;
use support::*;
use tonic::Code;

const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn mint_req(token: String, audience: &[&str]) -> pb::MintJwtsvidRequest {
    pb::MintJwtsvidRequest {
        token,
        audience: audience.iter().map(|s| s.to_string()).collect(),
        requested_ttl: None,
    }
}

async fn mint(
    ch: &tonic::transport::Channel,
    req: pb::MintJwtsvidRequest,
) -> Result<pb::MintJwtsvidResponse, tonic::Status> {
    pb::identity_client::IdentityClient::new(ch.clone())
        .mint_jwtsvid(req)
        .await
        .map(|r| r.into_inner())
}

async fn bundle(ca: &Ca) -> pb::TrustBundle {
    pb::identity_client::IdentityClient::new(ca.channel().await)
        .get_trust_bundle(pb::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// PyJWT verifies each (token, audience) with the JWKS it builds from
/// `keys`; returns its per-token results.
async fn pyjwt(keys: &[pb::JwtAuthority], tokens: &[(&str, &str)]) -> Vec<Value> {
    interop::python();
    let input = json!({
        "keys": keys.iter().map(|k| json!({
            "kid": k.key_id,
            "spki": base64::engine::general_purpose::STANDARD.encode(&k.public_key),
        })).collect::<Vec<_>>(),
        "tokens": tokens.iter().map(|(t, a)| json!({"token": t, "audience": a})).collect::<Vec<_>>(),
    });
    let path = std::env::temp_dir().join(format!("jwt-svid-{}.json", rand_suffix()));
    std::fs::write(&path, input.to_string()).unwrap();
    let mut cmd = interop::python_script("jwt_svid_pyjwt.py");
    cmd.stdin(std::fs::File::open(&path).unwrap());
    let out = interop::output(&mut cmd, Duration::from_secs(60)).await;
    let _ = std::fs::remove_file(&path);
    interop::last_json(&out)["results"]
        .as_array()
        .unwrap()
        .clone()
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A client certificate for shop/web, and a channel presenting it.
async fn mtls_channel(ca: &Ca) -> tonic::transport::Channel {
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let (key, csr) = meshca::client::new_key_and_csr(None).unwrap();
    let r = c
        .certify(pb::CertifyRequest {
            token: ca.token("shop", "web", "meshca"),
            csr,
            requested_ttl: None,
        })
        .await
        .unwrap()
        .into_inner();
    let chain_pem: String = r
        .cert_chain
        .iter()
        .map(|c| meshca::ca::der_to_pem(c))
        .collect();
    meshca::client::connect(
        &ca.addr(),
        &ca.bundle_pem(),
        &ca.running.server_name,
        Some((chain_pem, key.serialize_pem())),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn minted_with_a_token_and_over_mtls_pyjwt_verifies_against_the_published_keys() {
    let ca = Ca::start().await;
    let ch = ca.channel().await;
    let by_token = mint(
        &ch,
        mint_req(ca.token("shop", "web", "meshca"), &["billing"]),
    )
    .await
    .unwrap();
    assert_eq!(by_token.spiffe_id, WEB_ID);
    let life = by_token.expires_at.unwrap().seconds - by_token.issued_at.unwrap().seconds;
    assert_eq!(life, 300, "default lifetime 5 minutes");

    let mtls = mtls_channel(&ca).await;
    let by_cert = mint(&mtls, mint_req(String::new(), &["billing", "ledger"]))
        .await
        .expect("the client certificate authenticates the request");
    assert_eq!(by_cert.spiffe_id, WEB_ID);

    let b = bundle(&ca).await;
    assert_eq!(b.jwt_authorities.len(), 1, "one root, one key");
    let kid = b.jwt_authorities[0].key_id.clone();
    assert_eq!(
        b.jwt_authorities[0].expires_at.as_ref().unwrap().seconds as u64,
        meshca::util::clock::unix_secs(ca.running.ca.jwt_key().unwrap().not_after),
        "published expiry is the root's"
    );

    let r = pyjwt(
        &b.jwt_authorities,
        &[
            (&by_token.token, "billing"),
            (&by_cert.token, "ledger"),
            // The wrong audience is refused by the verifier.
            (&by_token.token, "ledger"),
        ],
    )
    .await;
    for ok in &r[..2] {
        assert_eq!(ok["ok"], true, "{ok}");
        assert_eq!(ok["claims"]["sub"], WEB_ID);
        assert_eq!(ok["kid"], kid.as_str());
        assert_eq!(ok["alg"], "ES256");
        assert_eq!(ok["typ"], "JWT");
    }
    assert_eq!(r[1]["claims"]["aud"], json!(["billing", "ledger"]));
    assert_eq!(r[2]["ok"], false);
    assert!(
        r[2]["error"].as_str().unwrap().contains("Audience"),
        "{}",
        r[2]
    );

    // Counted by API and result, and audited with subject, audiences, kid
    // and expiry — never the token.
    assert_eq!(
        ca.metric(r#"meshca_jwt_svid_decisions_total{api="native",result="granted",reason="ok"}"#),
        2.0
    );
    let store = meshca::audit::store::SqliteStore::open_read_only(
        &ca.dir.path().join("data").join(meshca::audit::DB_FILE),
    )
    .unwrap();
    let all = meshca::audit::query::list(&store, &Default::default()).unwrap();
    let jwt: Vec<_> = all.iter().filter(|l| l.entry.kind == "jwt_svid").collect();
    assert_eq!(jwt.len(), 2);
    let e = &jwt[1].entry;
    assert_eq!(e.subject.as_deref(), Some(WEB_ID));
    assert_eq!(e.audiences, vec!["billing", "ledger"]);
    assert_eq!(e.key_id.as_deref(), Some(kid.as_str()));
    assert_eq!(e.auth_method.as_deref(), Some("certificate"));
    let logged_exp = meshca::audit::query::parse_time(
        e.not_after.as_deref().unwrap(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert_eq!(
        logged_exp / 1000,
        by_cert.expires_at.unwrap().seconds as u64
    );
    let text = serde_json::to_string(&all.iter().map(|l| &l.entry).collect::<Vec<_>>()).unwrap();
    for t in [&by_token.token, &by_cert.token] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!text.contains(sig), "a token reached the audit log");
    }
}

#[tokio::test]
async fn attacks_are_refused_with_the_right_codes() {
    let ca = Ca::start().await;
    let ch = ca.channel().await;
    let web = || ca.token("shop", "web", "meshca");

    // No audience, an empty one, too many.
    for aud in [vec![], vec![""], (0..17).map(|_| "a").collect::<Vec<_>>()] {
        let e = mint(&ch, mint_req(web(), &aud)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{aud:?}: {e:?}");
        assert!(e.message().contains("audience"), "{}", e.message());
    }
    // A negative lifetime.
    let mut req = mint_req(web(), &["a"]);
    req.requested_ttl = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    assert_eq!(
        mint(&ch, req).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // No credential at all, a garbage token, a token for another API's
    // audience, an expired token, a token signed by another key.
    let e = mint(&ch, mint_req(String::new(), &["a"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let bad = [
        "not-a-jwt".to_string(),
        ca.token("shop", "web", "identity.l5d.io"),
        ca.token_with("shop", "web", |c| {
            c["exp"] = json!(now_s() - 3600);
            c["iat"] = json!(now_s() - 7200);
            c["nbf"] = json!(now_s() - 7200);
        }),
        {
            let other = rcgen::KeyPair::generate().unwrap();
            sign_es256(
                other.serialize_pem().as_bytes(),
                &ca.signer().1,
                &claims("shop", "web"),
            )
        },
    ];
    for t in bad {
        let e = mint(&ch, mint_req(t.clone(), &["a"])).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{t:.30}: {e:?}");
    }

    // A token for another identity gets that identity, never the one the
    // caller might want: there is no field to ask for another subject.
    let db = mint(&ch, mint_req(ca.token("shop", "db", "meshca"), &["a"]))
        .await
        .unwrap();
    assert_eq!(db.spiffe_id, "spiffe://cluster.local/ns/shop/sa/db");

    // A denied identity: refused with its token and with its certificate.
    let mtls = mtls_channel(&ca).await;
    mint(&mtls, mint_req(String::new(), &["a"])).await.unwrap();
    let t = std::fs::read_to_string(ca.dir.path().join("data/admin.token")).unwrap();
    let (code, body) = meshca::client::admin::request(
        "POST",
        &format!("http://{}/revocations/revoke", ca.running.admin_addr),
        Some(t.trim()),
        Some(json!({"identity": "shop/web", "reason": "test"}).to_string()),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    for c in [&ch, &mtls] {
        let tok = if std::ptr::eq(c, &ch) {
            web()
        } else {
            String::new()
        };
        let e = mint(c, mint_req(tok, &["a"])).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // Others are unaffected.
    mint(&ch, mint_req(ca.token("shop", "db", "meshca"), &["a"]))
        .await
        .unwrap();

    let refused = |reason: &str| {
        ca.metric(&format!(
            r#"meshca_jwt_svid_decisions_total{{api="native",result="refused",reason="{reason}"}}"#
        ))
    };
    assert_eq!(refused("bad_audience"), 3.0);
    assert_eq!(refused("identity_denied"), 2.0);
    assert_eq!(refused("missing_credential"), 1.0);
    assert_eq!(refused("bad_token"), 4.0);
}

#[tokio::test]
async fn the_signing_key_rotates_with_its_root() {
    let ca = Ca::start_with(|c| c.trust.propagation_wait = Duration::ZERO).await;
    let ch = ca.channel().await;
    let web = || ca.token("shop", "web", "meshca");
    let before = bundle(&ca).await;
    let old_kid = before.jwt_authorities[0].key_id.clone();
    let old_token = mint(&ch, mint_req(web(), &["a"])).await.unwrap().token;

    // Prepare: both keys published under a new version; the old one signs.
    assert_eq!(ca.rotation("prepare", "{}").await.0, 200);
    let prepared = bundle(&ca).await;
    assert!(prepared.version > before.version);
    assert_eq!(prepared.jwt_authorities.len(), 2);
    let new_kid = prepared
        .jwt_authorities
        .iter()
        .map(|k| k.key_id.clone())
        .find(|k| *k != old_kid)
        .unwrap();
    let t = mint(&ch, mint_req(web(), &["a"])).await.unwrap().token;
    assert_eq!(
        jsonwebtoken::decode_header(&t).unwrap().kid.unwrap(),
        old_kid
    );

    // Activate: the new key signs; the old one is still published.
    let (code, body) = ca.rotation("activate", r#"{"force": true}"#).await;
    assert_eq!(code, 200, "{body}");
    let active = bundle(&ca).await;
    assert_eq!(active.jwt_authorities.len(), 2);
    let new_token = mint(&ch, mint_req(web(), &["a"])).await.unwrap().token;
    assert_eq!(
        jsonwebtoken::decode_header(&new_token)
            .unwrap()
            .kid
            .unwrap(),
        new_kid
    );

    // A verifier holding the published set accepts both; one holding only
    // the set from before the prepare step cannot verify the new token.
    let r = pyjwt(
        &active.jwt_authorities,
        &[(&old_token, "a"), (&new_token, "a")],
    )
    .await;
    assert!(r.iter().all(|x| x["ok"] == true), "{r:?}");
    let r = pyjwt(&before.jwt_authorities, &[(&new_token, "a")]).await;
    assert_eq!(r[0]["ok"], false);

    // Taint the retired root: its key is withdrawn at once (a new version).
    let old_root = ca
        .running
        .ca
        .bundle()
        .roots
        .iter()
        .map(|r| meshca::ca::fingerprint(r))
        .find(|id| *id != ca.running.ca.jwt_key().unwrap().root)
        .unwrap();
    let (code, body) = ca
        .rotation("taint", &json!({"root": old_root}).to_string())
        .await;
    assert_eq!(code, 200, "{body}");
    let tainted = bundle(&ca).await;
    assert!(tainted.version > active.version);
    let kids: Vec<_> = tainted
        .jwt_authorities
        .iter()
        .map(|k| k.key_id.clone())
        .collect();
    assert_eq!(kids, vec![new_kid.clone()]);

    // `rotation status` says which key signs and which was withdrawn.
    let st = ca.rotation_status().await;
    let row = |fp: &str| {
        st["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["fingerprint"] == fp)
            .unwrap()["jwt_key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let new_root = ca.running.ca.jwt_key().unwrap().root.clone();
    assert_eq!(row(&new_root), format!("ES256 kid {new_kid} (signing)"));
    assert_eq!(row(&old_root), format!("ES256 kid {old_kid} (withdrawn)"));
}

#[tokio::test]
async fn rs256_mode_mints_tokens_pyjwt_verifies() {
    let ca = Ca::start_with(|c| c.jwt.key_type = meshca::ca::jwt::JwtKeyType::Rs256).await;
    let ch = ca.channel().await;
    let m = mint(&ch, mint_req(ca.token("shop", "web", "meshca"), &["svc"]))
        .await
        .unwrap();
    let b = bundle(&ca).await;
    let r = pyjwt(&b.jwt_authorities, &[(&m.token, "svc")]).await;
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
    assert_eq!(r[0]["alg"], "RS256");
    assert_eq!(r[0]["claims"]["sub"], WEB_ID);
}

const SECRETS: &str = "/api/v1/namespaces/meshca/secrets";

/// A replica sharing its CA through Secret `meshca-ca` on the fake API
/// server, trusting tokens from `jwks`.
async fn shared_replica(kc: &std::path::Path, name: &str, jwks: &std::path::Path) -> Ca {
    let (kc, name, jwks) = (kc.to_path_buf(), name.to_string(), jwks.to_path_buf());
    Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.authn.jwks_file = Some(jwks);
        c.authn.authn_order = vec![meshca::config::AuthnSource::Jwks];
        c.kubernetes.state_secret = Some("meshca-ca".into());
        c.kubernetes.audit_key_secret = Some("meshca-audit-key".into());
        c.kubernetes.state_poll_interval = Duration::from_secs(3600);
        c.replica = name;
        c.trust.propagation_wait = Duration::ZERO;
    })
    .await
}

async fn until<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    let end = std::time::Instant::now() + limit;
    while !f() {
        assert!(std::time::Instant::now() < end, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sign_with_and_publish_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    let signer = meshca::authn::devtoken::DevSigner::from_pem(
        &meshca::ca::CaKey::generate_p256().unwrap().to_pem(),
    )
    .unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, signer.jwks()).unwrap();
    let token = || {
        signer
            .mint(
                &meshca::authn::devtoken::TokenSpec {
                    workload: meshca::identity::Workload::new("shop", "web").unwrap(),
                    audiences: vec!["meshca".into()],
                    ttl: Duration::from_secs(600),
                    issuer: ISSUER.into(),
                    pod: None,
                },
                std::time::SystemTime::now(),
            )
            .unwrap()
    };
    let a = shared_replica(&kc, "a", &jwks).await;
    let secret = api.get(SECRETS, "meshca-ca").unwrap();
    let jwt_entries: Vec<String> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.ends_with(".jwt.key"))
        .cloned()
        .collect();
    assert_eq!(jwt_entries.len(), 1, "the root's JWT key is shared");

    // Upgrade from a version without JWT keys: the Secret has none, and the
    // next replica to start makes them, shares them, and a adopts them.
    let mut stripped = secret.clone();
    for k in &jwt_entries {
        stripped["data"].as_object_mut().unwrap().remove(k);
    }
    stripped["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    api.put(SECRETS, "meshca-ca", stripped);
    let b = shared_replica(&kc, "b", &jwks).await;
    let b_kid = b.running.ca.jwt_key().unwrap().key.key_id().to_string();
    until("a adopts the key b shared", Duration::from_secs(10), || {
        a.running.ca.jwt_key().unwrap().key.key_id() == b_kid
    })
    .await;
    let (ca_, cb) = (a.channel().await, b.channel().await);
    let ta = mint(&ca_, mint_req(token(), &["x"])).await.unwrap().token;
    let tb = mint(&cb, mint_req(token(), &["x"])).await.unwrap().token;
    assert_eq!(kid_of(&ta), kid_of(&tb));
    let (ba, bb) = (bundle(&a).await, bundle(&b).await);
    assert_eq!(ba.version, bb.version);
    assert_eq!(ba.jwt_authorities, bb.jwt_authorities);
    // Each replica's token verifies with the other's published keys.
    let r = pyjwt(&bb.jwt_authorities, &[(&ta, "x")]).await;
    assert_eq!(r[0]["ok"], true, "{}", r[0]);

    // A rotation through a: b publishes the new key, then signs with it.
    assert_eq!(a.rotation("prepare", "{}").await.0, 200);
    until(
        "b publishes the prepared key",
        Duration::from_secs(10),
        || b.running.ca.bundle().jwt_keys.len() == 2,
    )
    .await;
    let (code, body) = a.rotation("activate", r#"{"force": true}"#).await;
    assert_eq!(code, 200, "{body}");
    let new_kid = a.running.ca.jwt_key().unwrap().key.key_id().to_string();
    assert_ne!(new_kid, b_kid);
    until("b signs with the new key", Duration::from_secs(10), || {
        b.running.ca.jwt_key().unwrap().key.key_id() == new_kid
    })
    .await;
    let tb = mint(&cb, mint_req(token(), &["x"])).await.unwrap().token;
    assert_eq!(kid_of(&tb), new_kid);
    let r = pyjwt(&bundle(&a).await.jwt_authorities, &[(&tb, "x")]).await;
    assert_eq!(r[0]["ok"], true, "{}", r[0]);
}

/// The `jwt-svid` kids of the SPIFFE bundle document in a namespace's
/// `meshca-trust-bundle` ConfigMap (None while there is none).
fn configmap_kids(api: &support::kubeapi::Store, ns: &str) -> Option<Vec<String>> {
    let cm = api.get(
        &format!("/api/v1/namespaces/{ns}/configmaps"),
        "meshca-trust-bundle",
    )?;
    let doc: Value = serde_json::from_str(cm["data"]["bundle.spiffe.json"].as_str()?).unwrap();
    let mut kids: Vec<String> = doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    Some(kids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_configmap_publishes_the_jwt_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (api, kc) = support::kubeapi::start(dir.path()).await;
    api.add_namespace("shop", json!({"mesh": "on"}));
    let ca = Ca::start_with(move |c| {
        c.kubernetes.kubeconfig = Some(kc);
        c.kubernetes.publish = Some(meshca::config::PublishConfig {
            namespace_labels: [("mesh".to_string(), "on".to_string())]
                .into_iter()
                .collect(),
            resync: Duration::from_secs(3600),
            lease: "meshca-leader".into(),
            lease_duration: Duration::from_secs(2),
        });
        c.trust.propagation_wait = Duration::ZERO;
    })
    .await;
    let kids = |ca: &Ca| {
        let mut k: Vec<String> = ca
            .running
            .ca
            .bundle()
            .jwt_keys
            .iter()
            .map(|k| k.key_id.clone())
            .collect();
        k.sort();
        k
    };
    let want = kids(&ca);
    assert_eq!(want.len(), 1);
    until(
        "the ConfigMap carries the JWT key",
        Duration::from_secs(10),
        || configmap_kids(&api, "shop") == Some(want.clone()),
    )
    .await;
    // A prepared root's key reaches the ConfigMap before it signs.
    assert_eq!(ca.rotation("prepare", "{}").await.0, 200);
    let want = kids(&ca);
    assert_eq!(want.len(), 2);
    until(
        "the ConfigMap carries both keys",
        Duration::from_secs(10),
        || configmap_kids(&api, "shop") == Some(want.clone()),
    )
    .await;
}
