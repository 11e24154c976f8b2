//! Shared, built-once fixtures: a real CA (data directory, issuer, bundle),
//! the development token signer and its JWKS, the authenticator and the
//! gRPC pipeline (`Core`) exactly as `serve` wires them, and valid seeds
//! (CSRs, tokens, keys) for the mutation strategies.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use meshca::api::{Audiences, Core};
use meshca::authn::devtoken::{DevSigner, DEV_ISSUER};
use meshca::authn::jwt::{JwksSource, JwksVerifier};
use meshca::authn::{Authenticator, Method, Source};
use meshca::ca::store::{DataDir, InitOptions};
use meshca::ca::{Authority, CaKey, Policy};
use meshca::clock::{Clock, SystemClock};
use meshca::identity::Mesh;
use meshca::secret::SecretBytes;
use serde_json::{json, Value};

use super::harness::block_on;

/// The workload every valid seed is for.
pub const NS: &str = "shop";
/// Its service account.
pub const SA: &str = "web";
/// Its DNS identity in the test mesh.
pub const WEB_DNS: &str = "web.shop.serviceaccount.identity.meshca.cluster.local";
/// Its SPIFFE ID.
pub const WEB_URI: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// Everything built once per test binary.
pub struct World {
    /// Keeps the CA's data directory alive.
    pub _dir: tempfile::TempDir,
    /// The data directory.
    pub data: DataDir,
    /// The CA.
    pub ca: Arc<Authority>,
    /// The issuer key PEM (PKCS#8).
    pub issuer_key: SecretBytes,
    /// The token signer key PEM.
    pub signer_pem: SecretBytes,
    /// The token signer's kid.
    pub kid: String,
    /// The JWKS that verifies the signer's tokens.
    pub jwks: String,
    /// The token chain, as `serve` builds it for a JWKS.
    pub authn: Arc<Authenticator>,
    /// The gRPC pipeline; the rate limit is out of the way so that every
    /// case reaches the parsers.
    pub core: Arc<Core>,
}

/// The world.
pub fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(build)
}

fn build() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = DataDir::new(dir.path().join("data"));
    data.init(&InitOptions::default(), SystemTime::now())
        .expect("init");
    // rotation.json, as `serve` writes it at first start.
    meshca::trust::manager::TrustManager::open(data.clone(), SystemTime::now())
        .expect("trust manager");
    let loaded = data.load().expect("load");
    let issuer_key = data.read_key("issuer.key").expect("issuer key");
    let policy = Policy {
        mesh: Mesh {
            trust_domain: "cluster.local".parse().expect("td"),
            control_plane_ns: "meshca".parse().expect("ns"),
        },
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
        min_ttl: Duration::from_secs(300),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ca = Arc::new(Authority::new(
        policy,
        clock.clone(),
        loaded.issuer,
        loaded.roots,
    ));
    let signer_pem = CaKey::generate_p256().expect("key").to_pem();
    let signer = DevSigner::from_pem(&signer_pem).expect("signer");
    let jwks = signer.jwks().to_string();
    let kid = serde_json::from_str::<Value>(&jwks).expect("jwks")["keys"][0]["kid"]
        .as_str()
        .expect("kid")
        .to_string();
    let verifier = block_on(JwksVerifier::new(
        JwksSource::Static(jwks.clone()),
        vec![DEV_ISSUER.to_string()],
        clock,
        false,
        Method::Jwks,
    ))
    .expect("verifier");
    let authn = Arc::new(Authenticator::new(vec![Source::Jwks(Arc::new(verifier))]));
    let core = Arc::new(Core::new(
        ca.clone(),
        authn.clone(),
        Audiences::default(),
        1e9,
        u32::MAX,
    ));
    World {
        _dir: dir,
        data,
        ca,
        issuer_key,
        signer_pem,
        kid,
        jwks,
        authn,
        core,
    }
}

/// Unix seconds now.
pub fn now_s() -> u64 {
    meshca::clock::unix_secs(SystemTime::now())
}

/// Claims of a valid projected token for shop/web with audience `aud`.
pub fn claims(aud: &str) -> Value {
    let now = now_s();
    json!({
        "iss": DEV_ISSUER,
        "sub": format!("system:serviceaccount:{NS}:{SA}"),
        "aud": [aud],
        "exp": now + 3600, "iat": now, "nbf": now,
        "kubernetes.io": {
            "namespace": NS,
            "serviceaccount": {"name": SA, "uid": "0f6f8e5e-0000-4000-8000-000000000001"},
            "pod": {"name": "web-5d8f7", "uid": "0f6f8e5e-0000-4000-8000-000000000002"}
        }
    })
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Signs `header` and `claims` (any JSON, however odd) with the signer key
/// as ES256, so header and claim mutations get past the signature check.
pub fn sign_raw(header: &[u8], claims: &[u8]) -> String {
    let w = world();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(w.signer_pem.expose()).expect("key");
    let msg = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, jsonwebtoken::Algorithm::ES256)
        .expect("sign");
    format!("{msg}.{sig}")
}

/// The valid header for the signer.
pub fn header() -> Value {
    json!({"alg": "ES256", "typ": "JWT", "kid": world().kid})
}

/// A valid token for shop/web with audience `aud`.
pub fn token(aud: &str) -> String {
    sign_raw(
        header().to_string().as_bytes(),
        claims(aud).to_string().as_bytes(),
    )
}

/// CSRs that the CA accepts for shop/web (P-256 bare, P-384 with both
/// allowed SANs, Ed25519 with a subject CN, RSA 2048 made by openssl), and
/// two it refuses for policy (a foreign SAN, CA powers): mutations of
/// those reach the policy checks.
pub fn csr_seeds() -> &'static [Vec<u8>] {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let make = |alg: &'static rcgen::SignatureAlgorithm,
                    edit: &dyn Fn(&mut rcgen::CertificateParams)| {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            edit(&mut p);
            p.serialize_request(&key).expect("csr").der().to_vec()
        };
        let rsa = include_str!("../testdata/rsa2048-csr.pem");
        vec![
            make(&rcgen::PKCS_ECDSA_P256_SHA256, &|_| {}),
            make(&rcgen::PKCS_ECDSA_P384_SHA384, &|p| {
                p.subject_alt_names = vec![
                    rcgen::SanType::DnsName(WEB_DNS.try_into().expect("dns")),
                    rcgen::SanType::URI(WEB_URI.try_into().expect("uri")),
                ];
            }),
            make(&rcgen::PKCS_ED25519, &|p| {
                p.distinguished_name
                    .push(rcgen::DnType::CommonName, WEB_DNS);
            }),
            meshca::ca::csr::pem_to_der(rsa).expect("rsa csr"),
            make(&rcgen::PKCS_ECDSA_P256_SHA256, &|p| {
                p.subject_alt_names = vec![rcgen::SanType::DnsName(
                    "evil.example.com".try_into().expect("dns"),
                )];
            }),
            make(&rcgen::PKCS_ECDSA_P256_SHA256, &|p| {
                p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
        ]
    })
}

/// How many of [`csr_seeds`] the CA accepts (they come first).
pub const GOOD_CSRS: usize = 4;
