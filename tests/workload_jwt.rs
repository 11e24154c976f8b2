//! JWT-SVIDs on the agent's SPIFFE Workload API, against a real CA
//! in-process (its `MintJWTSVID` and published JWT keys), through clients we
//! did not write: the crates.io `spiffe` crate (workload-api-jwt),
//! `jsonwebtoken`, the Python SPIFFE library and PyJWT
//! (tests/interop/spiffe_jwt.py, through tests/support/interop.rs).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::agent::{self, AgentConfig};
use meshca::proto::meshca as mpb;
use meshca::proto::spiffe as pb;
use serde_json::Value;
use support::*;
use tonic::Code;

const TD: &str = "cluster.local";

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

/// An agent for shop/`sa` (waiting for its first certificate) serving the
/// Workload API at `dir/agent.sock`.
async fn agent_with_socket(ca: &Ca, dir: &Path, sa: &str) -> (agent::Agent, PathBuf) {
    let data = ca.dir.path().join("data");
    let token = dir.join(format!("{sa}.token"));
    std::fs::write(&token, dev_token(&data, "shop", sa)).unwrap();
    let a = agent::start(
        AgentConfig {
            ca_address: ca.addr(),
            server_name: ca.running.server_name.clone(),
            bootstrap_bundle: data.join("bundle.pem"),
            token_file: token,
            requested_ttl: None,
        },
        Arc::default(),
    )
    .unwrap();
    a.ready(Duration::from_secs(20)).await.unwrap();
    let sock = dir.join("agent.sock");
    agent::workload_api::serve(
        sock.clone(),
        a.workload_source(),
        TD.into(),
        std::future::pending(),
    )
    .await
    .unwrap();
    (a, sock)
}

async fn spiffe_client(sock: &Path) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(format!("unix://{}", sock.display()))
        .await
        .unwrap()
}

/// A raw tonic client of the socket (to send what the `spiffe` crate will not).
async fn raw(
    sock: &Path,
) -> pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let path = sock.to_path_buf();
    let ch = tonic::transport::Endpoint::try_from("http://workload-api.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
}

fn with_header<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// The CA's own view of its JWT keys (kids), over the native API.
async fn ca_kids(ca: &Ca) -> Vec<String> {
    let b = mpb::identity_client::IdentityClient::new(ca.channel().await)
        .get_trust_bundle(mpb::GetTrustBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut kids: Vec<String> = b.jwt_authorities.into_iter().map(|k| k.key_id).collect();
    kids.sort();
    kids
}

/// The payload of a compact JWS, unverified (to read what a client got).
fn payload(token: &str) -> Value {
    use base64::Engine;
    let p = token.split('.').nth(1).unwrap();
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(p)
        .unwrap();
    serde_json::from_slice(&b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_fetches_a_jwt_svid_that_verifies_with_the_fetched_bundle() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let client = spiffe_client(&sock).await;

    let svid = client.fetch_jwt_svid(["api"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), id("web"));
    assert_eq!(svid.audience(), ["api".to_string()]);
    let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(svid.expiry().unix_timestamp() as u64);
    // The CA's default JWT-SVID lifetime is 5 minutes.
    assert!(within(
        exp,
        SystemTime::now() + Duration::from_secs(300),
        Duration::from_secs(10)
    ));

    // The bundle: the CA's keys, as the CA itself publishes them.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let bundle = bundles.get(&td).expect("our trust domain's JWT bundle");
    let mut kids: Vec<String> = bundle
        .jwt_authorities()
        .map(|k| k.key_id().to_string())
        .collect();
    kids.sort();
    assert!(!kids.is_empty());
    assert_eq!(kids, ca_kids(&ca).await);

    // jsonwebtoken (not our code) verifies the token with the JWK the
    // spiffe crate took from FetchJWTBundles, for the token's kid.
    let jwk = bundle
        .find_jwt_authority(svid.key_id())
        .expect("kid in bundle");
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_slice(jwk.jwk_json()).unwrap();
    assert_eq!(
        jwk.common.public_key_use,
        Some(jsonwebtoken::jwk::PublicKeyUse::Other("jwt-svid".into()))
    );
    let header = jsonwebtoken::decode_header(svid.token()).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&["api"]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Value>(
        svid.token(),
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap();
    assert_eq!(data.claims["sub"], id("web"));

    // ValidateJWTSVID through the crate: the right audience passes...
    let checked = client
        .validate_jwt_token("api", svid.token())
        .await
        .unwrap();
    assert_eq!(checked.spiffe_id().to_string(), id("web"));
    // ...and the token replayed to another audience is refused.
    let e = client
        .validate_jwt_token("db", svid.token())
        .await
        .unwrap_err();
    assert!(e.is_invalid_argument(), "{e:?}");
    assert!(
        format!("{e}").contains("audience \"db\" is not in the token's aud"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_cached_per_audience_set_and_served_while_the_ca_is_down() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let client = spiffe_client(&sock).await;

    let t1 = client.fetch_jwt_token(["api", "db"], None).await.unwrap();
    assert_eq!(payload(&t1)["aud"], serde_json::json!(["api", "db"]));
    let again = client.fetch_jwt_token(["db", "api"], None).await.unwrap();
    assert_eq!(again, t1, "the same audience set: the cached token");
    let other = client.fetch_jwt_token(["api"], None).await.unwrap();
    assert_ne!(other, t1);

    // The CA goes away: the cached token is still served, a new audience
    // set gets UNAVAILABLE with a sentence.
    let Ca {
        running,
        dir: _keep,
    } = ca;
    running.shutdown().await;
    let cached = client.fetch_jwt_token(["api", "db"], None).await.unwrap();
    assert_eq!(cached, t1);
    let mut c = raw(&sock).await;
    let e = c
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["new".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("the CA is unavailable for JWT-SVIDs"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_spec_refuses_get_its_error_codes() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let mut c = raw(&sock).await;
    let fetch = |aud: Vec<&str>, id: &str| {
        with_header(pb::JwtsvidRequest {
            audience: aud.into_iter().map(String::from).collect(),
            spiffe_id: id.into(),
        })
    };
    let e = c.fetch_jwtsvid(fetch(vec![], "")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    // Another workload's identity: PermissionDenied (Workload API §6.2.1).
    let e = c
        .fetch_jwtsvid(fetch(vec!["api"], &id("admin")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    // Our own, named explicitly: fine.
    let r = c
        .fetch_jwtsvid(fetch(vec!["api"], &id("web")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.svids[0].spiffe_id, id("web"));
    // Without the security header: INVALID_ARGUMENT on every JWT method.
    let e = c
        .fetch_jwtsvid(tonic::Request::new(pb::JwtsvidRequest {
            audience: vec!["api".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .validate_jwtsvid(tonic::Request::new(pb::ValidateJwtsvidRequest {
            audience: "api".into(),
            svid: r.svids[0].svid.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A token that is not one.
    let e = c
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: "api".into(),
            svid: "not.a.token".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("JWT-SVID refused: "),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_bundle_stream_sends_the_next_key_when_a_rotation_is_prepared() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let mut c = raw(&sock).await;
    let mut s = c
        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let keys = |m: &pb::JwtBundlesResponse| -> Vec<String> {
        let doc: Value = serde_json::from_slice(&m.bundles[&format!("spiffe://{TD}")]).unwrap();
        let mut k: Vec<String> = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                assert_eq!(k["use"], "jwt-svid");
                k["kid"].as_str().unwrap().to_string()
            })
            .collect();
        k.sort();
        k
    };
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(keys(&first).len(), 1);
    let (status, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(status, 200, "{body}");
    let next = tokio::time::timeout(Duration::from_secs(20), s.message())
        .await
        .expect("a new JWT bundle within 20s")
        .unwrap()
        .unwrap();
    assert_eq!(keys(&next).len(), 2, "the prepared root's key is published");
    assert_eq!(keys(&next), ca_kids(&ca).await);
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_spiffe_and_pyjwt_fetch_validate_and_refuse_the_wrong_audience() {
    let python = support::interop::python();
    assert!(python.exists());
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    // What the Rust crate gets for the same audience (the Python client must
    // get the cached token, byte for byte).
    let rust_token = spiffe_client(&sock)
        .await
        .fetch_jwt_token(["py-audience"], None)
        .await
        .unwrap();
    let out = support::interop::output(
        support::interop::python_script("spiffe_jwt.py")
            .arg(&sock)
            .arg(TD)
            .arg("py-audience"),
        Duration::from_secs(60),
    )
    .await;
    let r = support::interop::last_json(&out);
    let f = &r["fetch_jwt_svid"];
    assert_eq!(f["spiffe_id"], id("web"));
    assert_eq!(f["audience"], serde_json::json!(["py-audience"]));
    assert_eq!(f["token_sha256"], sha256_hex(rust_token.as_bytes()));
    assert_eq!(
        r["fetch_jwt_bundles"],
        serde_json::to_value(ca_kids(&ca).await).unwrap()
    );
    assert_eq!(r["validate_jwt_svid"], id("web"));
    assert_eq!(r["parse_and_validate"], id("web"));
    let w = &r["wrong_audience"];
    assert_eq!(w["refused"], true, "{w}");
    assert!(
        w["error"]
            .as_str()
            .unwrap()
            .contains("not in the token's aud"),
        "{w}"
    );
    assert_eq!(
        r["raw_bundle_keys"],
        serde_json::json!([format!("spiffe://{TD}")])
    );
    let p = &r["pyjwt"];
    assert_eq!(p["sub"], id("web"));
    assert_eq!(p["use"], "jwt-svid");
    assert_eq!(p["wrong_audience_refused"], true);
    assert_eq!(p["kid"], payload_kid(&rust_token));
}

fn payload_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

/// `ca`'s current JWT keys as a federated bundle for `td`.
fn federated_jwt(td: &str, ca: &Ca) -> (String, agent::FederatedBundle) {
    let keys = ca
        .running
        .ca
        .bundle()
        .jwt_keys
        .iter()
        .map(|k| agent::JwtKey {
            key_id: k.key_id.clone(),
            public_key: k.spki_der.clone(),
            expires_at: k.expires_at,
        })
        .collect();
    (
        td.to_string(),
        agent::FederatedBundle {
            jwt_authorities: keys,
            ..Default::default()
        },
    )
}

/// `agent`'s Workload API source with `fed` added to every state it
/// publishes (the bundle a federating CA would stream; injected here so the
/// test needs no bundle endpoints).
fn with_federated(
    agent: &agent::Agent,
    fed: Vec<(String, agent::FederatedBundle)>,
) -> agent::workload_api::Source {
    let src = agent.workload_source();
    let mut rx = src.state.clone();
    let (tx, out) = tokio::sync::watch::channel(rx.borrow().clone());
    tokio::spawn(async move {
        loop {
            let mut st = rx.borrow_and_update().clone();
            let mut b = (*st.bundle).clone();
            b.federated = fed.iter().cloned().collect();
            st.bundle = Arc::new(b);
            if tx.send(st).is_err() || rx.changed().await.is_err() {
                return;
            }
        }
    });
    agent::workload_api::Source {
        state: out,
        jwt: src.jwt,
    }
}

/// A workload in b.test presents its JWT-SVID to a service in a.test: the
/// a.test agent validates it with b.test's federated JWT bundle, and hands
/// that bundle out on FetchJWTBundles. Without it, the token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_trust_domains_token_validates_only_with_its_bundle() {
    let at = |td: &'static str| {
        Ca::start_with(move |c| c.issuance.mesh.trust_domain = td.parse().unwrap())
    };
    let (ca_a, ca_b) = (at("a.test").await, at("b.test").await);
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    let (_b, sock_b) = agent_with_socket(&ca_b, &db, "billing").await;
    let token = spiffe_client(&sock_b)
        .await
        .fetch_jwt_token(["spiffe://a.test/ns/shop/sa/api"], None)
        .await
        .unwrap();
    assert_eq!(payload(&token)["sub"], "spiffe://b.test/ns/shop/sa/billing");

    // a.test's agent, federated with b.test.
    let data = ca_a.dir.path().join("data");
    std::fs::write(da.join("t"), dev_token(&data, "shop", "api")).unwrap();
    let a = agent::start(
        AgentConfig {
            ca_address: ca_a.addr(),
            server_name: ca_a.running.server_name.clone(),
            bootstrap_bundle: data.join("bundle.pem"),
            token_file: da.join("t"),
            requested_ttl: None,
        },
        Arc::default(),
    )
    .unwrap();
    a.ready(Duration::from_secs(20)).await.unwrap();
    let (fed_sock, plain_sock) = (da.join("fed.sock"), da.join("plain.sock"));
    let fed = with_federated(&a, vec![federated_jwt("b.test", &ca_b)]);
    agent::workload_api::serve(
        fed_sock.clone(),
        fed,
        "a.test".into(),
        std::future::pending(),
    )
    .await
    .unwrap();
    agent::workload_api::serve(
        plain_sock.clone(),
        a.workload_source(),
        "a.test".into(),
        std::future::pending(),
    )
    .await
    .unwrap();

    let client = spiffe_client(&fed_sock).await;
    let ok = client
        .validate_jwt_token("spiffe://a.test/ns/shop/sa/api", &token)
        .await
        .unwrap();
    assert_eq!(
        ok.spiffe_id().to_string(),
        "spiffe://b.test/ns/shop/sa/billing"
    );
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let b_td = spiffe::TrustDomain::new("b.test").unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert!(bundles
        .get(&b_td)
        .unwrap()
        .find_jwt_authority(&kid)
        .is_some());
    assert!(bundles
        .get(&spiffe::TrustDomain::new("a.test").unwrap())
        .is_some());

    // The same token where b.test is not federated: untrusted.
    let e = spiffe_client(&plain_sock)
        .await
        .validate_jwt_token("spiffe://a.test/ns/shop/sa/api", &token)
        .await
        .unwrap_err();
    assert!(e.is_invalid_argument(), "{e:?}");
    assert!(
        format!("{e}").contains("no JWT bundle for trust domain \"b.test\""),
        "{e}"
    );
}
