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
use meshca::identity::Mesh;
use meshca::util::clock::{Clock, SystemClock};
use meshca::util::secret::SecretBytes;
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
        Method::Jwks,
    ))
    .expect("verifier");
    let authn = Arc::new(Authenticator::new(vec![Source::Jwks(Arc::new(verifier))]));
    let core = Arc::new(
        Core::new(
            ca.clone(),
            authn.clone(),
            Audiences::default(),
            1e9,
            u32::MAX,
            Default::default(),
        )
        .with_identity_limit(1e9, u32::MAX),
    );
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
    meshca::util::clock::unix_secs(SystemTime::now())
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
        csr_seeds_with_keys()
            .iter()
            .map(|(d, _)| d.clone())
            .collect()
    })
}

/// [`csr_seeds`] with the key that signed each (to re-sign mutations).
pub fn csr_seeds_with_keys() -> &'static [(Vec<u8>, CaKey)] {
    static S: OnceLock<Vec<(Vec<u8>, CaKey)>> = OnceLock::new();
    S.get_or_init(|| {
        let make = |alg: &'static rcgen::SignatureAlgorithm,
                    edit: &dyn Fn(&mut rcgen::CertificateParams)| {
            let key = rcgen::KeyPair::generate_for(alg).expect("key");
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            edit(&mut p);
            let der = p.serialize_request(&key).expect("csr").der().to_vec();
            let key =
                CaKey::from_pem(&SecretBytes::new(key.serialize_pem().into_bytes())).expect("key");
            (der, key)
        };
        let rsa = include_str!("../testdata/rsa2048-csr.pem");
        let rsa_key = CaKey::from_pem(&SecretBytes::new(
            include_bytes!("../../src/ca/testdata/rsa2048-pkcs1.pem").to_vec(),
        ))
        .expect("rsa key");
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
            (meshca::ca::csr::pem_to_der(rsa).expect("rsa csr"), rsa_key),
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

/// One DER TLV at the start of `b`: (whole TLV, rest). Test helper only.
pub fn der_split(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |a, x| (a << 8) | usize::from(*x));
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    (b.len() >= end).then(|| b.split_at(end))
}

/// A CSR from `info` (a CertificationRequestInfo, possibly mutated) signed
/// by `key` under `alg_id`: a mutation of the signed part that still carries
/// a valid signature, so it reaches the checks after proof of possession.
pub fn resign(info: &[u8], alg_id: &[u8], key: &CaKey) -> Vec<u8> {
    fn tlv(tag: u8, v: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if v.len() < 0x80 {
            out.push(v.len() as u8);
        } else {
            let be = v.len().to_be_bytes();
            let skip = be.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (be.len() - skip) as u8);
            out.extend_from_slice(&be[skip..]);
        }
        out.extend_from_slice(v);
        out
    }
    let sig = rcgen::SigningKey::sign(key, info).expect("sign");
    let mut bits = vec![0u8];
    bits.extend_from_slice(&sig);
    let mut body = info.to_vec();
    body.extend_from_slice(alg_id);
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// Each seed split into (CertificationRequestInfo, AlgorithmIdentifier).
pub fn csr_parts() -> &'static [(Vec<u8>, Vec<u8>)] {
    static S: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    S.get_or_init(|| {
        csr_seeds()
            .iter()
            .map(|d| {
                let (outer, _) = der_split(d).expect("csr");
                let hdr = if outer[1] < 0x80 {
                    2
                } else {
                    2 + usize::from(outer[1] & 0x7f)
                };
                let (info, rest) = der_split(&outer[hdr..]).expect("info");
                let (alg, _) = der_split(rest).expect("alg");
                (info.to_vec(), alg.to_vec())
            })
            .collect()
    })
}

/// How many of [`csr_seeds`] the CA accepts (they come first).
pub const GOOD_CSRS: usize = 4;
