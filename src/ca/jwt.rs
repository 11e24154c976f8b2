//! JWT-SVID signing keys, and minting a JWT-SVID.
//!
//! Owns: [`JwtKey`], the only type that holds a JWT-SVID signing key in
//! memory (ES256 on P-256, or RS256), its `kid` (derived from the public key,
//! so every replica holding the same key names it the same), and the
//! JWT-SVID itself (JOSE header `alg`/`kid`/`typ`, claims `sub`/`aud`/`iat`/
//! `exp`, per the SPIFFE JWT-SVID spec), signed with ring (constant-time).
//! The serialized key is zeroized on drop and never printed. Must not: touch
//! files (see `ca::store`), decide which root's key signs (see
//! `trust::manager`), or authenticate callers (see `api`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use serde::Serialize;

use super::{Authority, CaError, JwtPublicKey};
use crate::identity::{SpiffeId, Workload};
use crate::util::secret::SecretBytes;

/// Most audiences one JWT-SVID may carry.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 256;

/// The JWS algorithm (and so the key type) of the signing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JwtKeyType {
    /// ECDSA P-256 with SHA-256 (RFC 7518 §3.4).
    #[default]
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys (RFC 7518 §3.3).
    Rs256,
}

impl JwtKeyType {
    /// The JWS `alg` value.
    pub fn alg(self) -> &'static str {
        match self {
            JwtKeyType::Es256 => "ES256",
            JwtKeyType::Rs256 => "RS256",
        }
    }

    /// The setting's spelling (`es256`, `rs256`).
    pub fn as_str(self) -> &'static str {
        match self {
            JwtKeyType::Es256 => "es256",
            JwtKeyType::Rs256 => "rs256",
        }
    }
}

impl FromStr for JwtKeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "es256" => Ok(JwtKeyType::Es256),
            "rs256" => Ok(JwtKeyType::Rs256),
            other => Err(format!(
                "{other:?} is not a JWT-SVID key type; use es256 or rs256"
            )),
        }
    }
}

/// Why a JWT-SVID key could not be made or loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("JWT-SVID key: {0}")]
pub struct JwtKeyError(String);

impl JwtKeyError {
    pub(crate) fn new(why: String) -> Self {
        Self(why)
    }
}

enum Signer {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// A JWT-SVID signing key.
pub struct JwtKey {
    signer: Signer,
    pkcs8: SecretBytes,
    spki_der: Vec<u8>,
    kid: String,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("alg", &self.key_type().alg())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// DER SubjectPublicKeyInfo prefix of an uncompressed P-256 point
/// (id-ecPublicKey, prime256v1, BIT STRING of 66 bytes).
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// rsaEncryption AlgorithmIdentifier (with its NULL parameters).
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

impl JwtKey {
    /// Generates a fresh key of `kind`.
    pub fn generate(kind: JwtKeyType) -> Result<Self, JwtKeyError> {
        match kind {
            JwtKeyType::Es256 => {
                // rcgen's generator keeps the PKCS#8 in zeroized memory.
                let k = super::CaKey::generate_p256().map_err(|e| JwtKeyError(e.to_string()))?;
                Self::from_pkcs8(k.to_pkcs8_der())
            }
            JwtKeyType::Rs256 => Self::from_pkcs8(super::keys::generate_rsa_pkcs8()?),
        }
    }

    /// Loads a PKCS#8 DER key (P-256 ECDSA or RSA of 2048+ bits).
    pub fn from_pkcs8(pkcs8: SecretBytes) -> Result<Self, JwtKeyError> {
        let der = pkcs8.expose();
        let rng = SystemRandom::new();
        let (signer, spki_der) =
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
                let mut spki = P256_SPKI_PREFIX.to_vec();
                spki.extend_from_slice(k.public_key().as_ref());
                (Signer::Ecdsa(k), spki)
            } else {
                let k = RsaKeyPair::from_pkcs8(der).map_err(|e| {
                    JwtKeyError(format!(
                        "not a P-256 ECDSA or RSA (2048 bits or more) PKCS#8 key: {e}"
                    ))
                })?;
                let spki = rsa_spki(k.public().as_ref());
                (Signer::Rsa(k), spki)
            };
        let kid = key_id(&spki_der);
        Ok(Self {
            signer,
            pkcs8,
            spki_der,
            kid,
        })
    }

    /// Loads a `PRIVATE KEY` PEM block.
    pub fn from_pem(pem: &SecretBytes) -> Result<Self, JwtKeyError> {
        use rustls::pki_types::PrivateKeyDer;
        match crate::util::pem::private_key(pem.expose()) {
            Ok(Some(PrivateKeyDer::Pkcs8(k))) => {
                Self::from_pkcs8(SecretBytes::new(k.secret_pkcs8_der().to_vec()))
            }
            Ok(_) => Err(JwtKeyError(
                "expected one PKCS#8 `PRIVATE KEY` PEM block".into(),
            )),
            Err(e) => Err(JwtKeyError(e.to_string())),
        }
    }

    /// The PKCS#8 PEM encoding, in zeroizing memory.
    pub fn to_pem(&self) -> SecretBytes {
        let pem = crate::util::pem::encode_secret("PRIVATE KEY", self.pkcs8.expose());
        SecretBytes::new(pem.as_bytes().to_vec())
    }

    /// The key type.
    pub fn key_type(&self) -> JwtKeyType {
        match self.signer {
            Signer::Ecdsa(_) => JwtKeyType::Es256,
            Signer::Rsa(_) => JwtKeyType::Rs256,
        }
    }

    /// The `kid`: base64url (no padding) of the SHA-256 of the DER SPKI.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The public half as the bundle publishes it.
    pub fn public(&self, expires_at: Option<SystemTime>) -> JwtPublicKey {
        JwtPublicKey {
            key_id: self.kid.clone(),
            spki_der: self.spki_der.clone(),
            expires_at,
        }
    }

    /// The JWS signature of `input`.
    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, CaError> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Ecdsa(k) => k
                .sign(&rng, input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| CaError::Signing("ES256 signing failed".into())),
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .map_err(|_| CaError::Signing("RS256 signing failed".into()))?;
                Ok(sig)
            }
        }
    }
}

/// `kid` of a DER SPKI: base64url (no padding) of its SHA-256.
pub fn key_id(spki_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, spki_der))
}

/// Wraps a PKCS#1 `RSAPublicKey` in a SubjectPublicKeyInfo.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = RSA_ALGORITHM.to_vec();
    super::keys::der(0x03, &bits, &mut body);
    let mut out = Vec::new();
    super::keys::der(0x30, &body, &mut out);
    out
}

/// The key that signs, and until when it may.
#[derive(Debug)]
pub struct ActiveJwtKey {
    /// The key.
    pub key: JwtKey,
    /// The root it belongs to (fingerprint).
    pub root: String,
    /// The published expiry (the root's notAfter): no token outlives it.
    pub not_after: SystemTime,
}

/// The JWT-SVID settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// Type of new signing keys (`jwt_svid_key_type`).
    pub key_type: JwtKeyType,
    /// Lifetimes (`jwt_svid_default_ttl`, `jwt_svid_max_ttl`).
    pub policy: JwtPolicy,
}

impl Settings {
    /// Lifetimes of at least a second, the default within the maximum.
    pub fn validate(&self) -> Result<(), crate::util::settings::InvalidSetting> {
        use crate::util::settings::InvalidSetting;
        let p = self.policy;
        if p.max_ttl < Duration::from_secs(1) {
            return Err(InvalidSetting::new(
                "jwt_svid_max_ttl",
                "must be at least 1s",
            ));
        }
        if p.default_ttl < Duration::from_secs(1) || p.default_ttl > p.max_ttl {
            return Err(InvalidSetting::new(
                "jwt_svid_default_ttl",
                "must be at least 1s and at most jwt_svid_max_ttl",
            ));
        }
        Ok(())
    }
}

/// Lifetimes of minted JWT-SVIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtPolicy {
    /// When the request names none.
    pub default_ttl: Duration,
    /// Longest; longer requests are clamped.
    pub max_ttl: Duration,
}

impl Default for JwtPolicy {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3600),
        }
    }
}

/// A minted JWT-SVID. `Debug` never shows the token.
#[derive(Clone)]
pub struct MintedJwt {
    /// The compact JWS.
    pub token: String,
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `iat`.
    pub issued_at: SystemTime,
    /// `exp`.
    pub expires_at: SystemTime,
    /// The `kid` that signed it.
    pub key_id: String,
    /// The root whose key signed it.
    pub root_fingerprint: String,
    /// True if the requested TTL was reduced to the maximum.
    pub ttl_clamped: bool,
}

impl fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedJwt")
            .field("spiffe_id", &self.spiffe_id)
            .field("audiences", &self.audiences)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    kid: &'a str,
    typ: &'a str,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    iat: u64,
}

/// Checks the requested audiences: at least one, each non-empty, bounded,
/// printable.
pub fn check_audiences(audiences: &[String]) -> Result<(), CaError> {
    if audiences.is_empty() {
        return Err(CaError::BadAudience(
            "at least one audience is required (the `aud` claim names who the token is for)".into(),
        ));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(CaError::BadAudience(format!(
            "{} audiences requested; at most {MAX_AUDIENCES} are allowed",
            audiences.len()
        )));
    }
    for a in audiences {
        if a.is_empty() {
            return Err(CaError::BadAudience("an audience is empty".into()));
        }
        if a.len() > MAX_AUDIENCE_BYTES {
            return Err(CaError::BadAudience(format!(
                "an audience is {} bytes; at most {MAX_AUDIENCE_BYTES} are allowed",
                a.len()
            )));
        }
        if a.chars().any(char::is_control) {
            return Err(CaError::BadAudience(
                "an audience contains a control character".into(),
            ));
        }
    }
    Ok(())
}

impl Authority {
    /// Uses `key` to sign JWT-SVIDs from now on (None: no key, minting fails).
    pub(crate) fn set_jwt_key(&self, key: Option<ActiveJwtKey>) {
        self.jwt.store(key.map(Arc::new));
    }

    /// The key that signs JWT-SVIDs now.
    pub fn jwt_key(&self) -> Option<Arc<ActiveJwtKey>> {
        self.jwt.load_full()
    }

    /// The JWT-SVID lifetimes.
    pub fn jwt_policy(&self) -> JwtPolicy {
        self.jwt_policy
    }

    /// Sets the JWT-SVID lifetimes (before the authority is shared).
    pub fn with_jwt_policy(mut self, policy: JwtPolicy) -> Self {
        self.jwt_policy = policy;
        self
    }

    /// Mints a JWT-SVID for `workload`'s SPIFFE ID with `audiences`.
    pub fn mint_jwt(
        &self,
        workload: &Workload,
        audiences: &[String],
        requested_ttl: Option<Duration>,
    ) -> Result<MintedJwt, CaError> {
        check_audiences(audiences)?;
        let p = self.jwt_policy;
        let (ttl, ttl_clamped) = match requested_ttl {
            None => (p.default_ttl.min(p.max_ttl), false),
            Some(d) if d.is_zero() => (p.default_ttl.min(p.max_ttl), false),
            Some(d) if d < Duration::from_secs(1) => {
                return Err(CaError::InvalidTtl(
                    "a JWT-SVID lives at least one second".into(),
                ))
            }
            Some(d) if d > p.max_ttl => (p.max_ttl, true),
            Some(d) => (d, false),
        };
        let active = self.jwt_key().ok_or_else(|| {
            CaError::IssuerUnusable(
                "no JWT-SVID signing key is loaded (see the server log for why)".into(),
            )
        })?;
        let now = self.clock.now();
        if now >= active.not_after {
            return Err(CaError::IssuerUnusable(format!(
                "the JWT-SVID signing key {} expired with its root at {}; check `meshca rotation status`",
                active.key.key_id(),
                crate::util::clock::rfc3339(active.not_after)
            )));
        }
        let spiffe_id = workload.spiffe_id(&self.policy.mesh);
        let iat = crate::util::clock::unix_secs(now);
        let exp = crate::util::clock::unix_secs(now + ttl)
            .min(crate::util::clock::unix_secs(active.not_after));
        let header = Header {
            alg: active.key.key_type().alg(),
            kid: active.key.key_id(),
            typ: "JWT",
        };
        let claims = Claims {
            sub: spiffe_id.as_str(),
            aud: audiences,
            exp,
            iat,
        };
        let json_err = |e: serde_json::Error| CaError::Signing(e.to_string());
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).map_err(json_err)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).map_err(json_err)?)
        );
        let sig = active.key.sign(token.as_bytes())?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(MintedJwt {
            token,
            spiffe_id,
            audiences: audiences.to_vec(),
            issued_at: SystemTime::UNIX_EPOCH + Duration::from_secs(iat),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(exp),
            key_id: active.key.key_id().to_string(),
            root_fingerprint: active.root.clone(),
            ttl_clamped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::{DataDir, InitOptions};
    use crate::ca::Policy;
    use crate::identity::Mesh;
    use crate::util::clock::{Clock, ManualClock};
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;
    use x509_parser::x509::SubjectPublicKeyInfo;

    fn authority(clock: Arc<ManualClock>) -> (Authority, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        d.init(&InitOptions::default(), clock.now()).unwrap();
        let loaded = d.load().unwrap();
        let policy = Policy {
            mesh: Mesh {
                trust_domain: "example.org".parse().unwrap(),
                control_plane_ns: "meshca".parse().unwrap(),
            },
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86400),
            min_ttl: Duration::from_secs(300),
        };
        let ca = Authority::new(policy, clock, loaded.issuer, loaded.roots);
        (ca, dir)
    }

    fn install(ca: &Authority, kind: JwtKeyType, not_after: SystemTime) -> JwtPublicKey {
        let key = JwtKey::generate(kind).unwrap();
        let public = key.public(Some(not_after));
        ca.set_jwt_key(Some(ActiveJwtKey {
            key,
            root: "ab".repeat(32),
            not_after,
        }));
        public
    }

    /// A verifier we did not write (jsonwebtoken), fed only the published
    /// SPKI turned into JWK components, as a bundle consumer would.
    fn decoding_key(spki: &[u8]) -> DecodingKey {
        let (_, info) = SubjectPublicKeyInfo::from_der(spki).unwrap();
        match info.parsed().unwrap() {
            PublicKey::EC(point) => {
                let p = point.data();
                assert_eq!(p.len(), 65, "uncompressed P-256 point");
                DecodingKey::from_ec_components(
                    &URL_SAFE_NO_PAD.encode(&p[1..33]),
                    &URL_SAFE_NO_PAD.encode(&p[33..]),
                )
                .unwrap()
            }
            // JWK integers have no sign byte (RFC 7518 §6.3.1).
            PublicKey::RSA(rsa) => DecodingKey::from_rsa_components(
                &URL_SAFE_NO_PAD.encode(strip(rsa.modulus)),
                &URL_SAFE_NO_PAD.encode(strip(rsa.exponent)),
            )
            .unwrap(),
            other => panic!("unexpected key {other:?}"),
        }
    }

    fn strip(b: &[u8]) -> &[u8] {
        let zeros = b.iter().take_while(|x| **x == 0).count();
        &b[zeros..]
    }

    #[derive(serde::Deserialize, Debug)]
    struct Got {
        sub: String,
        aud: Vec<String>,
        exp: u64,
        iat: u64,
    }

    fn mint_and_verify(kind: JwtKeyType, alg: Algorithm) {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock.clone());
        let public = install(&ca, kind, clock.now() + Duration::from_secs(86400));
        let w = Workload::new("shop", "web").unwrap();
        let aud = vec!["billing".to_string(), "spiffe://example.org/x".to_string()];
        let m = ca.mint_jwt(&w, &aud, None).unwrap();
        let header = jsonwebtoken::decode_header(&m.token).unwrap();
        assert_eq!(header.alg, alg);
        assert_eq!(header.kid.as_deref(), Some(public.key_id.as_str()));
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let mut v = Validation::new(alg);
        v.set_audience(&["billing"]);
        let got = jsonwebtoken::decode::<Got>(&m.token, &decoding_key(&public.spki_der), &v)
            .unwrap()
            .claims;
        assert_eq!(got.sub, "spiffe://example.org/ns/shop/sa/web");
        assert_eq!(got.aud, aud);
        assert_eq!(got.exp - got.iat, 300, "default TTL is 5 minutes");
        assert_eq!(got.iat, crate::util::clock::unix_secs(clock.now()));
        // Another key of the same type does not verify it.
        let other = JwtKey::generate(kind).unwrap();
        assert!(
            jsonwebtoken::decode::<Got>(&m.token, &decoding_key(other.spki_der()), &v).is_err()
        );
    }

    #[test]
    fn es256_tokens_verify_with_the_published_key_only() {
        mint_and_verify(JwtKeyType::Es256, Algorithm::ES256);
    }

    #[test]
    fn rs256_tokens_verify_with_the_published_key_only() {
        mint_and_verify(JwtKeyType::Rs256, Algorithm::RS256);
    }

    #[test]
    fn the_kid_is_the_public_key_hash_and_survives_a_round_trip() {
        for kind in [JwtKeyType::Es256, JwtKeyType::Rs256] {
            let k = JwtKey::generate(kind).unwrap();
            let again = JwtKey::from_pem(&k.to_pem()).unwrap();
            assert_eq!(again.key_id(), k.key_id());
            assert_eq!(again.key_type(), kind);
            assert_eq!(k.key_id(), key_id(k.spki_der()));
            assert_eq!(k.key_id().len(), 43, "base64url of 32 bytes");
            // The SPKI parses as what it claims to be.
            let (rest, _) = SubjectPublicKeyInfo::from_der(k.spki_der()).unwrap();
            assert!(rest.is_empty());
            // Debug never shows key material.
            let pem = k.to_pem();
            let body = std::str::from_utf8(pem.expose())
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
                .to_string();
            assert!(!format!("{k:?}").contains(&body[..20]));
        }
    }

    #[test]
    fn audiences_are_required_and_bounded() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock.clone());
        install(
            &ca,
            JwtKeyType::Es256,
            clock.now() + Duration::from_secs(86400),
        );
        let w = Workload::new("shop", "web").unwrap();
        let bad: [Vec<String>; 5] = [
            vec![],
            vec![String::new()],
            vec!["a".repeat(MAX_AUDIENCE_BYTES + 1)],
            (0..=MAX_AUDIENCES).map(|i| format!("a{i}")).collect(),
            vec!["x\ny".into()],
        ];
        for aud in bad {
            let e = ca.mint_jwt(&w, &aud, None).unwrap_err();
            assert!(matches!(e, CaError::BadAudience(_)), "{aud:?}: {e}");
        }
        let at_limit: Vec<String> = (0..MAX_AUDIENCES).map(|i| format!("a{i}")).collect();
        ca.mint_jwt(&w, &at_limit, None).unwrap();
        ca.mint_jwt(&w, &["a".repeat(MAX_AUDIENCE_BYTES)], None)
            .unwrap();
    }

    #[test]
    fn lifetimes_are_clamped_to_the_maximum_and_the_key() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock.clone());
        let ca = ca.with_jwt_policy(JwtPolicy {
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(600),
        });
        let key_end = clock.now() + Duration::from_secs(7200);
        install(&ca, JwtKeyType::Es256, key_end);
        let w = Workload::new("shop", "web").unwrap();
        let aud = ["a".to_string()];
        let life = |m: &MintedJwt| m.expires_at.duration_since(m.issued_at).unwrap();
        let m = ca.mint_jwt(&w, &aud, None).unwrap();
        assert_eq!((life(&m), m.ttl_clamped), (Duration::from_secs(60), false));
        let m = ca
            .mint_jwt(&w, &aud, Some(Duration::from_secs(120)))
            .unwrap();
        assert_eq!((life(&m), m.ttl_clamped), (Duration::from_secs(120), false));
        let m = ca
            .mint_jwt(&w, &aud, Some(Duration::from_secs(86400)))
            .unwrap();
        assert_eq!((life(&m), m.ttl_clamped), (Duration::from_secs(600), true));
        let e = ca.mint_jwt(&w, &aud, Some(Duration::from_millis(500)));
        assert!(matches!(e, Err(CaError::InvalidTtl(_))));
        // Near the key's end, tokens end with it; past it, none is minted.
        clock.advance(Duration::from_secs(7200 - 100));
        let m = ca.mint_jwt(&w, &aud, None).unwrap();
        assert_eq!(life(&m), Duration::from_secs(60));
        clock.advance(Duration::from_secs(70));
        let m = ca.mint_jwt(&w, &aud, None).unwrap();
        assert_eq!(
            crate::util::clock::unix_secs(m.expires_at),
            crate::util::clock::unix_secs(key_end)
        );
        clock.advance(Duration::from_secs(30));
        let e = ca.mint_jwt(&w, &aud, None).unwrap_err();
        assert!(matches!(e, CaError::IssuerUnusable(_)), "{e}");
    }

    #[test]
    fn without_a_key_minting_fails_closed_and_tokens_never_show_in_debug() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock.clone());
        let w = Workload::new("shop", "web").unwrap();
        let e = ca.mint_jwt(&w, &["a".into()], None).unwrap_err();
        assert!(matches!(e, CaError::IssuerUnusable(_)), "{e}");
        install(
            &ca,
            JwtKeyType::Es256,
            clock.now() + Duration::from_secs(86400),
        );
        let m = ca.mint_jwt(&w, &["a".into()], None).unwrap();
        let sig = m.token.rsplit('.').next().unwrap();
        assert!(!format!("{m:?}").contains(sig));
    }
}
