//! Documents meshca reads from the cluster or the network: the shared-state
//! Secret (`kubernetes::state::apply`), other replicas' propagation reports
//! (`kubernetes::reports::Report`, then the activation gate's summary),
//! JWKS documents (`JwksVerifier::new`) and OIDC discovery documents
//! (`Fetcher::discover_jwks_uri`, over real HTTPS).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use meshca::authn::devtoken::DEV_ISSUER;
use meshca::authn::jwt::{JwksSource, JwksVerifier};
use meshca::authn::{Method, Verdict};
use meshca::ca::store::{DataDir, InitOptions};
use meshca::kubernetes::reports::Report;
use meshca::kubernetes::state::{self, Snapshot};
use meshca::trust::propagation::{ClientView, Tracker};
use meshca::util::clock::SystemClock;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::json;

use super::fixtures::{token, world};
use super::harness::{
    apply, block_on, bytes, cases, measure, mutated, mutations, Mutation, IO_TIME_BUDGET,
};

const FIXED: usize = 256 * 1024;

// ---- the shared-state Secret ----------------------------------------------

/// Every file of a directory tree, with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

fn copy_tree(from: &Path, to: &Path) {
    for (rel, _) in tree(from) {
        let dst = to.join(&rel);
        std::fs::create_dir_all(dst.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from.join(&rel), &dst).expect("copy");
    }
}

/// A second, initialized data directory the mutated Secrets are applied to.
fn target_template() -> &'static Path {
    static T: OnceLock<tempfile::TempDir> = OnceLock::new();
    T.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        let data = DataDir::new(d.path());
        data.init(&InitOptions::default(), SystemTime::now())
            .expect("init");
        meshca::trust::manager::TrustManager::open(data, SystemTime::now()).expect("journal");
        d
    })
    .path()
}

fn secret_seed() -> &'static BTreeMap<String, Vec<u8>> {
    static S: OnceLock<BTreeMap<String, Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        state::snapshot(&world().data)
            .expect("snapshot")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
}

#[derive(Debug, Clone)]
enum SecretEdit {
    Value(usize, Vec<Mutation>),
    Remove(usize),
    Rename(usize, String),
    Add(String, Vec<u8>),
}

fn secret_edit() -> impl Strategy<Value = SecretEdit> {
    prop_oneof![
        6 => (any::<usize>(), mutations()).prop_map(|(i, m)| SecretEdit::Value(i, m)),
        1 => any::<usize>().prop_map(SecretEdit::Remove),
        1 => (any::<usize>(), "[a-z0-9./]{0,20}").prop_map(|(i, n)| SecretEdit::Rename(i, n)),
        1 => ("[a-z0-9./]{0,20}", bytes(100)).prop_map(|(k, v)| SecretEdit::Add(k, v)),
    ]
}

proptest! {
    // Each case copies a data directory and may write it.
    #![proptest_config(cases(400))]

    #[test]
    fn state_secret_mutated(edits in vec(secret_edit(), 1..3)) {
        let seed = secret_seed();
        let mut m = seed.clone();
        for e in edits {
            let keys: Vec<String> = m.keys().cloned().collect();
            let pick = |i: usize| keys[i % keys.len()].clone();
            match e {
                SecretEdit::Value(i, ms) => {
                    let k = pick(i);
                    let v = apply(m[&k].clone(), &ms);
                    m.insert(k, v);
                }
                SecretEdit::Remove(i) => { m.remove(&pick(i)); }
                SecretEdit::Rename(i, n) => {
                    let v = m.remove(&pick(i)).expect("present");
                    m.insert(n, v);
                }
                SecretEdit::Add(k, v) => { m.insert(k, v); }
            }
            if m.is_empty() { break; }
        }
        let mut snap = Snapshot::default();
        snap.extend(m.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        copy_tree(target_template(), dir.path());
        let before = tree(dir.path());
        let data = DataDir::new(dir.path());
        let size: usize = m.values().map(Vec::len).sum();
        let (r, cost) = measure(|| state::apply(&data, &snap));
        cost.check_within(IO_TIME_BUDGET, "state::apply", size, FIXED)?;
        match r {
            Err(why) => {
                prop_assert!(!why.is_empty());
                // A refused Secret leaves the replica's own state untouched.
                prop_assert!(tree(dir.path()) == before, "a refused Secret changed the data directory: {why}");
            }
            Ok(()) => {
                // What was adopted is a CA that loads and can sign.
                let loaded = data.load();
                prop_assert!(loaded.is_ok(), "adopted state does not load: {:?}", loaded.err());
            }
        }
    }
}

#[test]
fn the_genuine_secret_applies() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(target_template(), dir.path());
    let mut snap = Snapshot::default();
    snap.extend(secret_seed().clone());
    state::apply(&DataDir::new(dir.path()), &snap).unwrap();
    DataDir::new(dir.path()).load().unwrap();
}

// ---- propagation reports ---------------------------------------------------

fn report_seed() -> Vec<u8> {
    let now = meshca::util::clock::unix_secs(SystemTime::now());
    serde_json::to_vec(&Report {
        replica: "meshca-1".into(),
        updated: now,
        clients: vec![
            ClientView {
                key: "spiffe://cluster.local/ns/shop/sa/web 10.0.0.7".into(),
                version: 3,
                live_until: now + 3600,
                watching: true,
                root: Some("ab".repeat(32)),
            },
            ClientView {
                key: "anonymous 10.0.0.8:4431".into(),
                version: 2,
                live_until: now + 60,
                watching: false,
                root: None,
            },
        ],
    })
    .expect("report")
}

fn check_report(text: &[u8]) -> Result<(), TestCaseError> {
    let tracker = Tracker::default();
    let (r, cost) = measure(|| {
        // What reports::load does with each ConfigMap, then what the
        // activation gate and `rotation status` compute from it.
        let r: Report = serde_json::from_slice(text).ok()?;
        tracker.set_remote(&r.replica, r.clients.clone());
        Some((r, tracker.summary(SystemTime::now(), 3)))
    });
    cost.check("propagation report", text.len(), FIXED)?;
    if let Some((r, p)) = r {
        prop_assert!(p.clients <= r.clients.len());
        prop_assert!(p.acked <= p.clients && p.watchers <= p.clients);
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn propagation_report_mutated(seed_and_text in mutated(vec![report_seed()])) {
        check_report(&seed_and_text.1)?;
    }

    #[test]
    fn propagation_report_values(
        clients in vec((".{0,30}", any::<u64>(), prop_oneof![any::<u64>(), Just(u64::MAX)], any::<bool>()), 0..8),
        updated in any::<u64>(),
    ) {
        let r = json!({
            "replica": "meshca-2",
            "updated": updated,
            "clients": clients.iter().map(|(k, v, l, w)| json!({
                "key": k, "version": v, "live_until": l, "watching": w
            })).collect::<Vec<_>>(),
        });
        check_report(r.to_string().as_bytes())?;
    }
}

// ---- JWKS and OIDC discovery ----------------------------------------------

fn jwks_seeds() -> Vec<Vec<u8>> {
    use base64::Engine;
    use x509_parser::prelude::FromDer;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let csr =
        meshca::ca::csr::pem_to_der(include_str!("../testdata/rsa2048-csr.pem")).expect("csr");
    let (_, c) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&csr).expect("csr");
    let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) =
        c.certification_request_info.subject_pki.parsed()
    else {
        panic!("not RSA");
    };
    let mut dev: serde_json::Value = serde_json::from_str(&world().jwks).expect("jwks");
    let ec = dev["keys"][0].clone();
    dev["keys"].as_array_mut().expect("keys").push(json!({
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "rsa-1",
        "n": b64.encode(rsa.modulus), "e": b64.encode(rsa.exponent),
    }));
    vec![
        world().jwks.clone().into_bytes(),
        dev.to_string().into_bytes(),
        json!({"keys": [ec, {"kty": "oct", "k": "c2VjcmV0"}, {"kty": "OKP", "crv": "Ed25519", "x": "AA"}]})
            .to_string()
            .into_bytes(),
    ]
}

fn check_jwks(doc: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(doc).into_owned();
    let t = token("meshca");
    let (r, cost) = measure(|| {
        block_on(async {
            let v = JwksVerifier::new(
                JwksSource::Static(text),
                vec![DEV_ISSUER.to_string()],
                Arc::new(SystemClock),
                Method::Jwks,
            )
            .await?;
            Ok::<_, String>(v.verify(&t, "meshca").await)
        })
    });
    cost.check("JWKS", doc.len(), FIXED)?;
    match r {
        Err(why) => prop_assert!(!why.is_empty()),
        // A static JWKS is never "unavailable": its answer is a decision.
        Ok(v) => prop_assert!(!matches!(v, Verdict::Unavailable(_)), "{v:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn jwks_mutated(seed_and_doc in mutated(jwks_seeds())) {
        check_jwks(&seed_and_doc.1)?;
    }

    #[test]
    fn jwks_arbitrary(doc in bytes(20_000)) {
        check_jwks(&doc)?;
    }
}

/// An HTTPS server answering every request with the current `BODY`.
struct Discovery {
    rt: tokio::runtime::Runtime,
    url: String,
    fetcher: meshca::authn::fetch::Fetcher,
}

static BODY: Mutex<(u16, Vec<u8>)> = Mutex::new((200, Vec::new()));

fn discovery() -> &'static Discovery {
    static D: OnceLock<Discovery> = OnceLock::new();
    D.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let respond: super::support::Respond = Arc::new(|_req| {
            Box::pin(async {
                use http_body_util::BodyExt;
                let (status, body) = BODY.lock().expect("body").clone();
                hyper::Response::builder()
                    .status(status)
                    .body(
                        http_body_util::Full::new(hyper::body::Bytes::from(body))
                            .map_err(|e| match e {})
                            .boxed(),
                    )
                    .expect("response")
            })
        });
        let (addr, ca_pem) = rt.block_on(super::support::https_server(respond));
        let fetcher = meshca::authn::fetch::Fetcher::new(Some(ca_pem.as_bytes())).expect("fetcher");
        Discovery {
            rt,
            url: format!("https://127.0.0.1:{}", addr.port()),
            fetcher,
        }
    })
}

fn discovery_seed() -> Vec<u8> {
    json!({
        "issuer": DEV_ISSUER,
        "jwks_uri": "https://127.0.0.1:6443/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"]
    })
    .to_string()
    .into_bytes()
}

proptest! {
    // Each case is an HTTPS round trip.
    #![proptest_config(cases(500))]

    #[test]
    fn oidc_discovery_documents(
        body in prop_oneof![
            3 => mutated(vec![discovery_seed()]).prop_map(|(_, b)| b),
            1 => bytes(4096),
            // Larger than the 1 MiB document cap.
            1 => Just(vec![b' '; 1024 * 1024 + 1]),
        ],
        status in prop_oneof![4 => Just(200u16), 1 => Just(404u16), 1 => Just(500u16)],
    ) {
        let d = discovery();
        *BODY.lock().expect("body") = (status, body.clone());
        let started = std::time::Instant::now();
        let r = d.rt.block_on(d.fetcher.discover_jwks_uri(&d.url));
        prop_assert!(started.elapsed() < Duration::from_secs(10));
        match r {
            Ok(uri) => {
                prop_assert_eq!(status, 200);
                prop_assert!(body.len() <= 1024 * 1024);
                let v: serde_json::Value = serde_json::from_slice(&body).expect("was JSON");
                prop_assert_eq!(Some(uri.as_str()), v["jwks_uri"].as_str());
            }
            Err(why) => prop_assert!(why.contains(&d.url[8..]) || why.contains("127.0.0.1"), "{why}"),
        }
    }
}

/// Found by `propagation_report_values`: a report whose `live_until` is
/// past ~2^62 s (another replica's ConfigMap, so data from the cluster)
/// panicked the activation gate's summary while converting to
/// `SystemTime`. Now it is clamped to 9999-12-31.
#[test]
fn regression_a_report_with_an_absurd_live_until_is_summarized() {
    let tracker = Tracker::default();
    tracker.set_remote(
        "meshca-2",
        vec![ClientView {
            key: "spiffe://cluster.local/ns/shop/sa/web 10.0.0.9".into(),
            version: 1,
            live_until: u64::MAX,
            watching: false,
            root: None,
        }],
    );
    let p = tracker.summary(SystemTime::now(), 2);
    assert_eq!((p.clients, p.acked), (1, 0));
}

// ---- an issuer from outside (the issuer Secret's tls.crt / tls.key) -------

/// A genuine new issuer under the template's active root, as cert-manager
/// would put it in the issuer Secret: (tls.crt, tls.key).
fn foreign_issuer() -> &'static (Vec<u8>, Vec<u8>) {
    static I: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    I.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        copy_tree(target_template(), d.path());
        let data = DataDir::new(d.path());
        let mgr = meshca::trust::manager::TrustManager::open(data.clone(), SystemTime::now())
            .expect("open");
        mgr.renew_issuer(Duration::from_secs(7 * 86400), SystemTime::now())
            .expect("renew");
        (
            std::fs::read(data.file("issuer.crt")).expect("crt"),
            data.read_key("issuer.key").expect("key").expose().to_vec(),
        )
    })
}

fn install_foreign(crt: &[u8], key: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_tree(target_template(), dir.path());
    let data = DataDir::new(dir.path());
    let mgr =
        meshca::trust::manager::TrustManager::open(data.clone(), SystemTime::now()).expect("open");
    let before = tree(dir.path());
    let key = meshca::util::secret::SecretBytes::new(key.to_vec());
    let (r, cost) = measure(|| mgr.install_external_issuer(crt, &key, SystemTime::now()));
    cost.check_within(
        IO_TIME_BUDGET,
        "install_external_issuer",
        crt.len() + key.expose().len(),
        FIXED,
    )?;
    match r {
        Err(why) => {
            // A refused foreign issuer is the input's fault, never storage.
            prop_assert!(
                matches!(why, meshca::trust::manager::TrustError::BadInput(_)),
                "{why:?}"
            );
            prop_assert!(!why.to_string().is_empty());
            prop_assert!(
                tree(dir.path()) == before,
                "a refused issuer changed the data directory: {why}"
            );
        }
        Ok(fp) => {
            // What was installed is a CA that loads, under the active root.
            let loaded = data.load();
            prop_assert!(
                loaded.is_ok(),
                "installed issuer does not load: {:?}",
                loaded.err()
            );
            let issuer = loaded.expect("loaded").issuer;
            prop_assert_eq!(&issuer.fingerprint, &fp);
            let root = &DataDir::new(target_template())
                .load()
                .expect("template")
                .roots[0];
            prop_assert!(meshca::ca::signed_by(&issuer.chain[0], root));
        }
    }
    Ok(())
}

proptest! {
    // Each case copies a data directory and may write it.
    #![proptest_config(cases(300))]

    #[test]
    fn issuer_secret_mutated(
        crt in mutated(vec![foreign_issuer().0.clone()]),
        key in mutated(vec![foreign_issuer().1.clone()]),
        which in 0..3u8,
    ) {
        let (good_crt, good_key) = foreign_issuer();
        match which {
            0 => install_foreign(&crt.1, good_key)?,
            1 => install_foreign(good_crt, &key.1)?,
            _ => install_foreign(&crt.1, &key.1)?,
        }
    }
}

#[test]
fn the_genuine_foreign_issuer_installs() {
    let (crt, key) = foreign_issuer();
    let dir = tempfile::tempdir().unwrap();
    copy_tree(target_template(), dir.path());
    let mgr =
        meshca::trust::manager::TrustManager::open(DataDir::new(dir.path()), SystemTime::now())
            .unwrap();
    mgr.install_external_issuer(
        crt,
        &meshca::util::secret::SecretBytes::new(key.clone()),
        SystemTime::now(),
    )
    .unwrap();
}
