//! The SPIFFE bundle document (SPIFFE Trust Domain and Bundle §4; X509-SVID
//! §6; JWT-SVID §6): a JWK Set whose `x509-svid` keys carry one CA
//! certificate each in `x5c` and whose `jwt-svid` keys carry a `kid`, plus
//! `spiffe_sequence` and `spiffe_refresh_hint`.
//!
//! Owns: writing this trust domain's bundle as that JSON, and reading a
//! foreign one strictly (size limits, unknown `use`/`kty` ignored as the spec
//! requires, malformed keys refused with a [`BundleError`] that names the key
//! and what is wrong, CA certificates naming another trust domain refused).
//! Pure: no files, no network, no clock. Must not: decide whether a bundle is
//! newer than another (that is the follower's job) or hold private keys.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ca::{JwtPublicKey, TrustBundle};
use crate::identity::TrustDomain;

/// The largest bundle document read (SPIRE's bundle endpoint client allows
/// the same order of size; a real bundle is a few KiB).
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// The most JWK entries one document may hold.
pub const MAX_KEYS: usize = 256;
/// The largest single `x5c` certificate accepted (DER bytes).
pub const MAX_CERTIFICATE_BYTES: usize = 16 * 1024;
/// The longest `kid` accepted.
pub const MAX_KEY_ID_LEN: usize = 256;
/// The `use` of X509-SVID authorities.
pub const USE_X509_SVID: &str = "x509-svid";
/// The `use` of JWT-SVID signing keys.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// Why a bundle document was refused or could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The document is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("the bundle document is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON, or not the JWK Set shape (e.g. no `keys` array).
    #[error("the bundle document is not a SPIFFE bundle (a JWK Set): {0}")]
    Syntax(String),
    /// More than [`MAX_KEYS`] entries.
    #[error("the bundle document has {count} keys, more than the limit of {max}")]
    TooManyKeys {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A key with a use meshca understands is malformed.
    #[error("key #{index} ({key_use}) is malformed: {reason}")]
    MalformedKey {
        /// Its position in `keys`.
        index: usize,
        /// Its `use`.
        key_use: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An X.509 authority names another trust domain in its URI SAN.
    #[error(
        "key #{index} is a CA certificate of trust domain {found:?}, not of {expected:?}: \
         the endpoint serves another trust domain's bundle"
    )]
    WrongTrustDomain {
        /// Its position in `keys`.
        index: usize,
        /// The trust domain this bundle was fetched for.
        expected: String,
        /// The one the certificate names.
        found: String,
    },
    /// Two `jwt-svid` keys share a `kid`, so a token's key would be ambiguous.
    #[error("two jwt-svid keys have the kid {0:?}")]
    DuplicateKeyId(String),
    /// Writing: a key of a type the JWK encoding here does not cover.
    #[error("cannot publish {0}: unsupported public key type")]
    UnsupportedKey(String),
}

/// A SPIFFE bundle: what a JWK Set document says about one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpiffeBundle {
    /// The X.509 authorities (CA certificates, DER).
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// The JWT-SVID verification keys.
    pub jwt_keys: Vec<JwtPublicKey>,
    /// `spiffe_sequence`, when stated.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, when stated.
    pub refresh_hint: Option<Duration>,
}

#[derive(Serialize, Deserialize)]
struct Document {
    keys: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    spiffe_refresh_hint: Option<u64>,
}

impl SpiffeBundle {
    /// This trust domain's bundle: its roots and JWT keys, with the given
    /// sequence number and refresh hint.
    pub fn from_trust_bundle(b: &TrustBundle, sequence: u64, refresh_hint: Duration) -> Self {
        Self {
            x509_authorities: b.roots.clone(),
            jwt_keys: b.jwt_keys.clone(),
            sequence: Some(sequence),
            refresh_hint: Some(refresh_hint),
        }
    }

    /// The document, pretty-printed JSON (what the bundle endpoint serves).
    pub fn to_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_keys.len());
        for (i, der) in self.x509_authorities.iter().enumerate() {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|e| BundleError::UnsupportedKey(format!("X.509 authority #{i}: {e}")))?;
            let mut jwk = jwk_params(cert.public_key().raw)
                .ok_or_else(|| BundleError::UnsupportedKey(format!("X.509 authority #{i}")))?;
            jwk.insert("use".into(), USE_X509_SVID.into());
            jwk.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(der).into()]),
            );
            keys.push(Value::Object(jwk));
        }
        for k in &self.jwt_keys {
            let mut jwk = jwk_params(&k.spki_der)
                .ok_or_else(|| BundleError::UnsupportedKey(format!("JWT key {:?}", k.key_id)))?;
            jwk.insert("use".into(), USE_JWT_SVID.into());
            jwk.insert("kid".into(), k.key_id.clone().into());
            keys.push(Value::Object(jwk));
        }
        let doc = Document {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint.map(|d| d.as_secs()),
        };
        serde_json::to_string_pretty(&doc).map_err(|e| BundleError::Syntax(e.to_string()))
    }

    /// Reads a foreign bundle fetched for `trust_domain`, strictly. Entries
    /// with a missing or unknown `use` or `kty` are ignored (Trust Domain
    /// and Bundle §4.2.1-2), as is an `x509-svid` entry without `x5c`
    /// (X509-SVID §6.2); anything else that is wrong refuses the whole
    /// document, so a half-understood bundle is never adopted.
    pub fn parse(bytes: &[u8], trust_domain: &TrustDomain) -> Result<Self, BundleError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(BundleError::TooLarge {
                size: bytes.len(),
                max: MAX_DOCUMENT_BYTES,
            });
        }
        // serde refuses a duplicated `keys` / `spiffe_*` member (§6.3).
        let doc: Document =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Syntax(e.to_string()))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(BundleError::TooManyKeys {
                count: doc.keys.len(),
                max: MAX_KEYS,
            });
        }
        let mut out = Self {
            sequence: doc.spiffe_sequence,
            refresh_hint: doc.spiffe_refresh_hint.map(Duration::from_secs),
            ..Self::default()
        };
        for (index, key) in doc.keys.iter().enumerate() {
            let Value::Object(key) = key else {
                return Err(BundleError::Syntax(format!(
                    "key #{index} is not an object"
                )));
            };
            match key.get("use").and_then(Value::as_str) {
                Some(USE_X509_SVID) => {
                    if let Some(der) = x509_entry(index, key, trust_domain)? {
                        if !out.x509_authorities.contains(&der) {
                            out.x509_authorities.push(der);
                        }
                    }
                }
                Some(USE_JWT_SVID) => {
                    if let Some(k) = jwt_entry(index, key)? {
                        if out.jwt_keys.iter().any(|o| o.key_id == k.key_id) {
                            return Err(BundleError::DuplicateKeyId(k.key_id));
                        }
                        out.jwt_keys.push(k);
                    }
                }
                _ => {} // missing or unknown use: ignored (§4.2.2)
            }
        }
        Ok(out)
    }
}

fn malformed(index: usize, key_use: &'static str, reason: impl Into<String>) -> BundleError {
    BundleError::MalformedKey {
        index,
        key_use,
        reason: reason.into(),
    }
}

/// An `x509-svid` entry: its CA certificate, checked, or `None` when the
/// spec says to ignore the entry.
fn x509_entry(
    index: usize,
    key: &Map<String, Value>,
    td: &TrustDomain,
) -> Result<Option<CertificateDer<'static>>, BundleError> {
    let bad = |r: &str| malformed(index, USE_X509_SVID, r);
    if !known_kty(key) {
        return Ok(None);
    }
    let first = match key.get("x5c") {
        None => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        // All but the first value are ignored (X509-SVID §6.2).
        Some(Value::Array(a)) => &a[0],
        Some(_) => return Err(bad("x5c is not an array")),
    };
    let b64 = first
        .as_str()
        .ok_or_else(|| bad("x5c[0] is not a string"))?;
    if b64.len() > MAX_CERTIFICATE_BYTES * 4 / 3 + 4 {
        return Err(bad("x5c[0] is larger than 16 KiB"));
    }
    let der = STANDARD
        .decode(b64)
        .map_err(|e| bad(&format!("x5c[0] is not base64: {e}")))?;
    let (rest, cert) = X509Certificate::from_der(&der)
        .map_err(|e| bad(&format!("x5c[0] is not a DER certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("x5c[0] has bytes after the certificate"));
    }
    if !cert.is_ca() {
        return Err(bad(
            "x5c[0] is not a CA certificate (basicConstraints cA is not true)",
        ));
    }
    check_params_match(key, cert.public_key().raw).map_err(|r| bad(&r))?;
    if let Some(found) = spiffe_trust_domain(&cert) {
        if found != td.as_str() {
            return Err(BundleError::WrongTrustDomain {
                index,
                expected: td.to_string(),
                found,
            });
        }
    }
    Ok(Some(CertificateDer::from(der)))
}

/// The trust domain a CA certificate names in a `spiffe://` URI SAN (a
/// signing certificate SHOULD be an SVID, X509-SVID §3.2; SPIRE's are).
fn spiffe_trust_domain(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u.strip_prefix("spiffe://").map(|rest| {
            rest.split('/')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        }),
        _ => None,
    })
}

/// The key parameters an entry states (`crv`/`x`/`y`, `n`/`e`) must be those
/// of the certificate's key: a JWK whose parameters disagree with its `x5c`
/// means different things to different readers.
fn check_params_match(key: &Map<String, Value>, spki: &[u8]) -> Result<(), String> {
    // A key we could not publish again is one we do not understand either.
    let expected = jwk_params(spki)
        .ok_or("the certificate's key is not P-256, P-384, Ed25519 or RSA (2048 to 8192 bits)")?;
    if key.get("kty") != expected.get("kty") {
        return Err("kty does not match the certificate in x5c".into());
    }
    for (name, want) in &expected {
        if let Some(got) = key.get(name) {
            if got != want {
                return Err(format!("{name} does not match the certificate in x5c"));
            }
        }
    }
    Ok(())
}

fn known_kty(key: &Map<String, Value>) -> bool {
    matches!(
        key.get("kty").and_then(Value::as_str),
        Some("EC" | "RSA" | "OKP")
    )
}

/// A `jwt-svid` entry as a verification key, or `None` when ignored.
fn jwt_entry(index: usize, key: &Map<String, Value>) -> Result<Option<JwtPublicKey>, BundleError> {
    let bad = |r: String| malformed(index, USE_JWT_SVID, r);
    if !known_kty(key) {
        return Ok(None);
    }
    let kid = match key.get("kid") {
        Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KEY_ID_LEN => k.clone(),
        Some(Value::String(_)) => return Err(bad("kid is empty or longer than 256".into())),
        Some(_) => return Err(bad("kid is not a string".into())),
        None => return Err(bad("no kid (JWT-SVID §6.1 requires one)".into())),
    };
    let spki_der = spki_from_jwk(key).map_err(|r| bad(format!("{r} (kid {kid:?})")))?;
    Ok(Some(JwtPublicKey {
        key_id: kid,
        spki_der,
        expires_at: None,
    }))
}

fn b64url_param(key: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let s = key
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{name} is missing or not a string"))?;
    if s.len() > 2048 {
        return Err(format!("{name} is too long"));
    }
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("{name} is not base64url: {e}"))
}

// ---- SubjectPublicKeyInfo <-> JWK parameters (RFC 7518 §6) ------------------

/// SPKI prefixes of the fixed-size keys (the DER is canonical for these):
/// everything before the key bytes.
const P256_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
];
const P384_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00, 0x04,
];
const ED25519_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// AlgorithmIdentifier { rsaEncryption, NULL }.
const RSA_ALG: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

fn obj(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

fn b64(bytes: &[u8]) -> Value {
    URL_SAFE_NO_PAD.encode(bytes).into()
}

/// The JWK key parameters (`kty` and its members) of a DER SPKI, for P-256,
/// P-384, Ed25519 and RSA keys; `None` for any other.
pub fn jwk_params(spki: &[u8]) -> Option<Map<String, Value>> {
    let ec = |crv: &str, point: &[u8], n: usize| {
        (point.len() == 2 * n).then(|| {
            obj(&[
                ("kty", "EC".into()),
                ("crv", crv.into()),
                ("x", b64(&point[..n])),
                ("y", b64(&point[n..])),
            ])
        })
    };
    if let Some(point) = spki.strip_prefix(P256_PREFIX) {
        return ec("P-256", point, 32);
    }
    if let Some(point) = spki.strip_prefix(P384_PREFIX) {
        return ec("P-384", point, 48);
    }
    if let Some(x) = spki.strip_prefix(ED25519_PREFIX) {
        return (x.len() == 32).then(|| {
            obj(&[
                ("kty", "OKP".into()),
                ("crv", "Ed25519".into()),
                ("x", b64(x)),
            ])
        });
    }
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).ok()?;
    match info.parsed().ok()? {
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            let (n, e) = (strip_zeros(rsa.modulus), strip_zeros(rsa.exponent));
            ((256..=1024).contains(&n.len()) && (1..=8).contains(&e.len()))
                .then(|| obj(&[("kty", "RSA".into()), ("n", b64(n)), ("e", b64(e))]))
        }
        _ => None,
    }
}

fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

/// The DER SPKI a JWK's key parameters describe.
fn spki_from_jwk(key: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let kty = key.get("kty").and_then(Value::as_str).unwrap_or_default();
    let crv = key.get("crv").and_then(Value::as_str);
    match (kty, crv) {
        ("EC", Some(c @ ("P-256" | "P-384"))) => {
            let (prefix, n) = if c == "P-256" {
                (P256_PREFIX, 32)
            } else {
                (P384_PREFIX, 48)
            };
            let (x, y) = (b64url_param(key, "x")?, b64url_param(key, "y")?);
            if x.len() != n || y.len() != n {
                return Err(format!("x and y of a {c} key must be {n} bytes each"));
            }
            Ok([prefix, &x, &y].concat())
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64url_param(key, "x")?;
            if x.len() != 32 {
                return Err("x of an Ed25519 key must be 32 bytes".into());
            }
            Ok([ED25519_PREFIX, &x].concat())
        }
        ("EC" | "OKP", c) => Err(format!("unsupported curve {c:?} for kty {kty}")),
        _ => rsa_spki(key),
    }
}

fn rsa_spki(key: &Map<String, Value>) -> Result<Vec<u8>, String> {
    let (n, e) = (b64url_param(key, "n")?, b64url_param(key, "e")?);
    let n = strip_zeros(&n);
    let e = strip_zeros(&e);
    if n.len() < 256 || n.len() > 1024 {
        return Err(format!(
            "an RSA modulus of {} bits (2048 to 8192 allowed)",
            n.len() * 8
        ));
    }
    if e.is_empty() || e.len() > 8 {
        return Err("the RSA exponent is empty or too long".into());
    }
    let body = [der_uint(n), der_uint(e)].concat();
    let rsa_key = der(0x30, &body);
    let bits = der(0x03, &[&[0u8][..], &rsa_key].concat());
    Ok(der(0x30, &[RSA_ALG, &bits].concat()))
}

fn der_uint(v: &[u8]) -> Vec<u8> {
    if v[0] & 0x80 != 0 {
        der(0x02, &[&[0u8][..], v].concat())
    } else {
        der(0x02, v)
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    fn td(s: &str) -> TrustDomain {
        s.parse().unwrap()
    }

    fn ca_cert(uri: Option<&str>, is_ca: bool) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        if is_ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        if let Some(u) = uri {
            p.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
        }
        p.self_signed(&key).unwrap().der().clone()
    }

    fn p256_spki() -> Vec<u8> {
        rcgen::KeyPair::generate()
            .unwrap()
            .subject_public_key_info()
    }

    fn rsa_spki_fixture() -> Vec<u8> {
        // A 2048-bit RSA SPKI built from fixed n/e (the key need not be usable).
        let mut n = vec![0xc3u8; 256];
        n[255] = 0x01;
        let jwk = obj(&[
            ("kty", "RSA".into()),
            ("n", b64(&n)),
            ("e", b64(&[1, 0, 1])),
        ]);
        spki_from_jwk(&jwk).unwrap()
    }

    fn sample() -> SpiffeBundle {
        SpiffeBundle {
            x509_authorities: vec![ca_cert(Some("spiffe://a.org"), true), ca_cert(None, true)],
            jwt_keys: vec![
                JwtPublicKey {
                    key_id: "k1".into(),
                    spki_der: p256_spki(),
                    expires_at: None,
                },
                JwtPublicKey {
                    key_id: "k2".into(),
                    spki_der: rsa_spki_fixture(),
                    expires_at: None,
                },
            ],
            sequence: Some(7),
            refresh_hint: Some(Duration::from_secs(300)),
        }
    }

    #[test]
    fn round_trips_and_follows_the_spec_shape() {
        let b = sample();
        let json = b.to_json().unwrap();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0]["use"], "x509-svid");
        assert_eq!(keys[0]["kty"], "EC");
        assert!(
            keys[0].get("kid").is_none(),
            "x509-svid keys MUST NOT carry kid"
        );
        assert_eq!(keys[0]["x5c"].as_array().unwrap().len(), 1);
        assert_eq!(keys[2]["use"], "jwt-svid");
        assert_eq!(keys[2]["kid"], "k1");
        assert_eq!(keys[3]["kty"], "RSA");
        assert_eq!(keys[3]["e"], "AQAB");
        assert_eq!(
            SpiffeBundle::parse(json.as_bytes(), &td("a.org")).unwrap(),
            b
        );
    }

    #[test]
    fn ignores_unknown_use_kty_and_missing_x5c() {
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "use": "future-svid", "kid": "x"},
            {"kty": "EC", "kid": "no-use"},
            {"kty": "oct", "use": "jwt-svid", "kid": "sym", "k": "AAAA"},
            {"kty": "EC", "use": "x509-svid"},
            {"kty": "EC", "use": "x509-svid", "x5c": []},
        ]});
        let b = SpiffeBundle::parse(doc.to_string().as_bytes(), &td("a.org")).unwrap();
        assert!(b.x509_authorities.is_empty() && b.jwt_keys.is_empty());
        assert_eq!(b.sequence, None);
    }

    fn parse_err(doc: Value) -> BundleError {
        SpiffeBundle::parse(doc.to_string().as_bytes(), &td("a.org")).unwrap_err()
    }

    #[test]
    fn refuses_malformed_keys_with_a_specific_error() {
        let cert = STANDARD.encode(ca_cert(None, true));
        let leaf = STANDARD.encode(ca_cert(None, false));
        let cases = [
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["!!"]}]}),
                "not base64",
            ),
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "x509-svid", "x5c": ["AAAA"]}]}),
                "not a DER certificate",
            ),
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "x509-svid", "x5c": [leaf]}]}),
                "not a CA certificate",
            ),
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "x509-svid", "x5c": [cert], "x": "AAAA"}]}),
                "x does not match",
            ),
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "jwt-svid", "crv": "P-256", "x": "AA", "y": "AA"}]}),
                "no kid",
            ),
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "jwt-svid", "kid": "a", "crv": "P-256", "x": "AA", "y": "AA"}]}),
                "must be 32 bytes",
            ),
            (
                serde_json::json!({"keys": [{"kty": "EC", "use": "jwt-svid", "kid": "a", "crv": "P-521"}]}),
                "unsupported curve",
            ),
            (
                serde_json::json!({"keys": [{"kty": "RSA", "use": "jwt-svid", "kid": "a", "n": "AQAB", "e": "AQAB"}]}),
                "RSA modulus of 24 bits",
            ),
        ];
        for (doc, want) in cases {
            let e = parse_err(doc.clone());
            assert!(matches!(e, BundleError::MalformedKey { .. }), "{doc}: {e}");
            assert!(e.to_string().contains(want), "{doc}: {e}");
        }
    }

    #[test]
    fn refuses_bad_shapes_sizes_and_duplicates() {
        assert!(matches!(
            parse_err(serde_json::json!({"kes": []})),
            BundleError::Syntax(_)
        ));
        assert!(matches!(
            parse_err(serde_json::json!({"keys": [], "spiffe_sequence": -1})),
            BundleError::Syntax(_)
        ));
        let dup = br#"{"keys": [], "keys": [{"kty":"EC"}]}"#;
        assert!(matches!(
            SpiffeBundle::parse(dup, &td("a.org")),
            Err(BundleError::Syntax(_))
        ));
        let big = vec![b' '; MAX_DOCUMENT_BYTES + 1];
        assert!(matches!(
            SpiffeBundle::parse(&big, &td("a.org")),
            Err(BundleError::TooLarge { .. })
        ));
        let many: Vec<Value> = (0..=MAX_KEYS).map(|_| serde_json::json!({})).collect();
        assert!(matches!(
            parse_err(serde_json::json!({"keys": many})),
            BundleError::TooManyKeys { .. }
        ));
        let k = |kid: &str| JwtPublicKey {
            key_id: kid.into(),
            spki_der: p256_spki(),
            expires_at: None,
        };
        let b = SpiffeBundle {
            jwt_keys: vec![k("same"), k("same")],
            ..Default::default()
        };
        let json = b.to_json().unwrap();
        assert_eq!(
            SpiffeBundle::parse(json.as_bytes(), &td("a.org")),
            Err(BundleError::DuplicateKeyId("same".into()))
        );
    }

    /// Found by tests/fuzz_parsers (spiffe_bundle_mutated): a CA whose key
    /// bytes were mangled parsed as a certificate, was adopted, and could
    /// then not be written back. Such an entry is now refused on reading.
    #[test]
    fn refuses_a_ca_whose_key_it_cannot_read_or_whose_kty_disagrees() {
        let der = ca_cert(None, true).to_vec();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let spki = cert.public_key().raw;
        let at = der.windows(spki.len()).position(|w| w == spki).unwrap();
        let mut mangled = der.clone();
        mangled[at + spki.len() - 40] ^= 0xff; // inside the EC point: still a certificate
        mangled[at + 5] ^= 0x01; // the algorithm OID: no longer id-ecPublicKey
        let doc = serde_json::json!({"keys": [{"kty": "EC", "use": "x509-svid", "x5c": [STANDARD.encode(&mangled)]}]});
        let e = parse_err(doc);
        assert!(
            e.to_string().contains("not P-256, P-384, Ed25519 or RSA"),
            "{e}"
        );
        let doc = serde_json::json!({"keys": [{"kty": "RSA", "use": "x509-svid", "x5c": [STANDARD.encode(&der)]}]});
        assert!(parse_err(doc).to_string().contains("kty does not match"));
    }

    #[test]
    fn refuses_a_ca_of_another_trust_domain() {
        let b = SpiffeBundle {
            x509_authorities: vec![ca_cert(Some("spiffe://evil.org"), true)],
            ..Default::default()
        };
        let e = SpiffeBundle::parse(b.to_json().unwrap().as_bytes(), &td("a.org")).unwrap_err();
        assert!(
            matches!(e, BundleError::WrongTrustDomain { ref found, .. } if found == "evil.org"),
            "{e}"
        );
    }

    #[test]
    fn spki_round_trips_through_jwk() {
        for spki in [p256_spki(), rsa_spki_fixture()] {
            let jwk = jwk_params(&spki).unwrap();
            assert_eq!(spki_from_jwk(&jwk).unwrap(), spki);
        }
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let spki = p384.subject_public_key_info();
        assert_eq!(spki_from_jwk(&jwk_params(&spki).unwrap()).unwrap(), spki);
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let spki = ed.subject_public_key_info();
        assert_eq!(spki_from_jwk(&jwk_params(&spki).unwrap()).unwrap(), spki);
        // The RSA SPKI we build is what x509-parser reads back.
        let rsa = rsa_spki_fixture();
        let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&rsa).unwrap();
        assert!(matches!(
            info.parsed().unwrap(),
            x509_parser::public_key::PublicKey::RSA(_)
        ));
    }
}
