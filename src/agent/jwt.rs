//! JWT-SVIDs on the SPIFFE Workload API (the JWT-SVID profile).
//!
//! Owns: `FetchJWTSVID` (a token from the CA's `MintJWTSVID` for this
//! workload's own identity, cached per identity and audience set until about
//! half its lifetime), `FetchJWTBundles` (this trust domain's and every
//! federated trust domain's JWT-SVID keys as RFC 7517 JWK Sets) and
//! `ValidateJWTSVID` (the JWT-SVID specification's checks, against those same
//! keys). Tokens live only in memory, zeroized when dropped; they are never
//! logged (a cache entry is referred to by a hash of its key). Must not:
//! talk to the CA itself (the agent's [`Minter`] does, over mTLS with the
//! held X.509-SVID), serve the socket, or touch the X.509 methods.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tonic::Status;
use x509_parser::prelude::FromDer as _;
use zeroize::Zeroizing;

use super::{AgentError, Bundle, JwtKey, State};
use crate::identity::SpiffeId;
use crate::proto::spiffe as pb;
use crate::util::clock::{Clock, SystemClock};

/// The most audiences one request may name (the CA's limit: asking for
/// more could only be refused by it).
pub const MAX_AUDIENCES: usize = crate::ca::jwt::MAX_AUDIENCES;
/// The largest token `ValidateJWTSVID` looks at.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;
/// How many tokens the cache holds at most (one per identity × audience set).
pub const CACHE_CAPACITY: usize = 512;
/// Clock skew tolerated on `exp` and `nbf` when validating.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// A token the CA minted.
pub struct Minted {
    /// The token's `sub`.
    pub spiffe_id: String,
    /// The compact JWS (zeroized on drop).
    pub token: Zeroizing<String>,
    /// Its `iat`.
    pub issued_at: SystemTime,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// A boxed future (the trait below must stay object safe).
pub type MintFuture<'a> = Pin<Box<dyn Future<Output = Result<Minted, AgentError>> + Send + 'a>>;

/// Gets a JWT-SVID for the agent's own identity from the CA.
pub trait Minter: Send + Sync + 'static {
    /// Mints a token with these audiences (already checked and de-duplicated).
    fn mint<'a>(&'a self, audience: &'a [String]) -> MintFuture<'a>;
}

/// Why a JWT-SVID request was refused; mapped to a gRPC status once, in
/// `From<JwtError> for Status`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// `FetchJWTSVID` without an audience.
    #[error("audience is required: name at least one audience the token is meant for")]
    NoAudience,
    /// Too many audiences.
    #[error("{0} audiences requested: at most {MAX_AUDIENCES} are allowed (one is recommended)")]
    TooManyAudiences(usize),
    /// An empty or over-long audience.
    #[error("audience {0}")]
    BadAudience(String),
    /// The requested `spiffe_id` does not parse.
    #[error("spiffe_id {0:?} is not a valid SPIFFE ID: {1}")]
    BadSpiffeId(String, String),
    /// The requested `spiffe_id` is not this workload's.
    #[error("this workload is {ours}, not {requested}: it may only fetch JWT-SVIDs for its own identity")]
    NotEntitled {
        /// What was asked for.
        requested: String,
        /// The identity this agent holds.
        ours: String,
    },
    /// No X.509-SVID yet (nothing to authenticate to the CA with).
    #[error("the agent has no identity yet (no certificate from the CA); retry shortly")]
    NoIdentityYet,
    /// The Workload API was started without a link to the CA.
    #[error(
        "this Workload API server cannot mint JWT-SVIDs (it was started without a CA connection)"
    )]
    NoCa,
    /// The CA refused the request as invalid.
    #[error("the CA refused the request: {0}")]
    CaInvalid(String),
    /// The CA refused this identity.
    #[error("the CA refused a JWT-SVID for this workload: {0}")]
    CaDenied(String),
    /// The CA could not be used.
    #[error("the CA is unavailable for JWT-SVIDs ({0}); retry later")]
    CaUnavailable(String),
    /// `ValidateJWTSVID` input or the token failed a check.
    #[error("JWT-SVID refused: {0}")]
    Refused(#[from] Refusal),
}

impl From<JwtError> for Status {
    fn from(e: JwtError) -> Status {
        let msg = e.to_string();
        match e {
            JwtError::NotEntitled { .. } | JwtError::CaDenied(_) => Status::permission_denied(msg),
            JwtError::NoIdentityYet | JwtError::NoCa | JwtError::CaUnavailable(_) => {
                Status::unavailable(msg)
            }
            _ => Status::invalid_argument(msg),
        }
    }
}

/// One reason a token does not validate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Empty `audience` in the request.
    #[error("audience is required: say which audience you validate for")]
    NoAudience,
    /// Empty `svid` in the request.
    #[error("svid is required: pass the token to validate")]
    NoToken,
    /// Larger than [`MAX_TOKEN_LEN`].
    #[error("the token is {0} bytes; at most {MAX_TOKEN_LEN} are accepted")]
    TooLarge(usize),
    /// Not a JWS compact serialization.
    #[error("not a JWS in compact serialization: {0}")]
    Malformed(&'static str),
    /// The `alg` header is not one a JWT-SVID may use.
    #[error("algorithm {0:?} is refused: {1}")]
    Algorithm(String, &'static str),
    /// A header the JWT-SVID specification forbids.
    #[error("header {0:?} is not allowed in a JWT-SVID (only alg, kid and typ are)")]
    Header(String),
    /// `typ` is neither `JWT` nor `JOSE`.
    #[error("typ {0} is refused: a JWT-SVID's typ is JWT or JOSE")]
    Typ(String),
    /// No `kid` header.
    #[error("the token has no kid header: the signing key cannot be chosen")]
    NoKid,
    /// No usable `sub`.
    #[error("sub is not a SPIFFE ID: {0}")]
    Subject(String),
    /// No JWT bundle for the subject's trust domain.
    #[error("no JWT bundle for trust domain {0:?}: tokens from it are not trusted here")]
    NoBundle(String),
    /// The `kid` is not in the trust domain's bundle.
    #[error("kid {kid:?} is not a key of trust domain {td:?}")]
    UnknownKid {
        /// The header's kid.
        kid: String,
        /// The subject's trust domain.
        td: String,
    },
    /// The bundle's key has passed its stated expiry.
    #[error("key {0:?} has expired")]
    KeyExpired(String),
    /// The key cannot be used with the token's `alg`.
    #[error("key {kid:?} ({key}) cannot verify {alg}")]
    KeyMismatch {
        /// The key.
        kid: String,
        /// Its type.
        key: String,
        /// The token's algorithm.
        alg: String,
    },
    /// The signature does not verify.
    #[error("the signature does not verify with key {0:?}")]
    Signature(String),
    /// A required claim is missing or of the wrong type.
    #[error("claim {0:?} is missing or not of the type RFC 7519 gives it")]
    Claim(&'static str),
    /// `exp` has passed.
    #[error("the token expired at {0} (Unix seconds)")]
    Expired(i64),
    /// `nbf` is in the future.
    #[error("the token is not valid before {0} (Unix seconds)")]
    NotYetValid(i64),
    /// The requested audience is not in `aud`.
    #[error("audience {0:?} is not in the token's aud claim")]
    Audience(String),
}

/// The JWT-SVID side of one Workload API server: the CA link (if any), the
/// token cache and the clock.
pub struct JwtSvids {
    minter: Option<Arc<dyn Minter>>,
    clock: Arc<dyn Clock>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    /// One lock per cache key being minted: concurrent misses for the same
    /// audience set wait for one CA call instead of each making their own.
    minting: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for JwtSvids {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.cache.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("JwtSvids")
            .field("can_mint", &self.minter.is_some())
            .field("cached", &cached)
            .finish_non_exhaustive()
    }
}

struct Cached {
    spiffe_id: String,
    token: Zeroizing<String>,
    /// The `kid` that signed it: served only while the bundle publishes it.
    kid: String,
    /// Served until then (about half the lifetime); a new one is minted after.
    refresh_at: SystemTime,
}

impl JwtSvids {
    /// JWT-SVIDs minted by `minter` (None: bundles and validation only).
    pub fn new(minter: Option<Arc<dyn Minter>>, clock: Arc<dyn Clock>) -> Self {
        JwtSvids {
            minter,
            clock,
            cache: Mutex::new(HashMap::new()),
            minting: Mutex::new(HashMap::new()),
        }
    }

    /// Bundles and validation only, on the system clock.
    pub fn without_ca() -> Self {
        Self::new(None, Arc::new(SystemClock))
    }

    /// `FetchJWTSVID`: a token for this workload's identity (`ours`, the held
    /// X.509-SVID's SPIFFE ID), from the cache or freshly minted.
    ///
    /// `published` is this trust domain's JWT keys in the bundle held now: a
    /// cached token signed by a key no longer among them (withdrawn after a
    /// taint, or removed) would be refused by every verifier, so it is not
    /// served and a new one is minted.
    pub async fn fetch(
        &self,
        ours: Option<&str>,
        published: &[JwtKey],
        req: pb::JwtsvidRequest,
    ) -> Result<pb::JwtsvidResponse, JwtError> {
        let audience = check_audiences(req.audience)?;
        if !req.spiffe_id.is_empty() {
            if let Err(e) = req.spiffe_id.parse::<SpiffeId>() {
                return Err(JwtError::BadSpiffeId(req.spiffe_id, e.to_string()));
            }
        }
        let ours = ours.ok_or(JwtError::NoIdentityYet)?;
        if !req.spiffe_id.is_empty() && req.spiffe_id != ours {
            return Err(JwtError::NotEntitled {
                requested: req.spiffe_id,
                ours: ours.to_string(),
            });
        }
        let key = cache_key(ours, &audience);
        if let Some(svid) = self.cached(&key, published) {
            return Ok(pb::JwtsvidResponse { svids: vec![svid] });
        }
        let gate = {
            let Ok(mut m) = self.minting.lock() else {
                return Err(JwtError::CaUnavailable("internal lock poisoned".into()));
            };
            m.entry(key).or_default().clone()
        };
        let _turn = gate.lock().await;
        // Whoever held the turn before us may have cached a token meanwhile.
        let r = match self.cached(&key, published) {
            Some(svid) => Ok(svid),
            None => self.mint(ours, &audience, key).await,
        };
        if let Ok(mut m) = self.minting.lock() {
            // Waiters already holding this gate still take their turns (and
            // find the cached token); later requests hit the cache or, after
            // a failure, start a new gate.
            if m.get(&key).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                m.remove(&key);
            }
        }
        Ok(pb::JwtsvidResponse { svids: vec![r?] })
    }

    fn cached(&self, key: &[u8; 32], published: &[JwtKey]) -> Option<pb::Jwtsvid> {
        let now = self.clock.now();
        let cache = self.cache.lock().ok()?;
        let hit = cache
            .get(key)
            .filter(|c| now < c.refresh_at)
            .filter(|c| published.iter().any(|k| k.key_id == c.kid))?;
        tracing::debug!(audience_set = %short_hash(key), "JWT-SVID served from the cache");
        Some(pb::Jwtsvid {
            spiffe_id: hit.spiffe_id.clone(),
            svid: hit.token.to_string(),
            hint: String::new(),
        })
    }

    async fn mint(
        &self,
        ours: &str,
        audience: &[String],
        key: [u8; 32],
    ) -> Result<pb::Jwtsvid, JwtError> {
        let minter = self.minter.as_ref().ok_or(JwtError::NoCa)?;
        let m = minter.mint(audience).await.map_err(from_agent_error)?;
        // The CA mints for whoever authenticated; if that is not the identity
        // this workload is served, something is badly wrong: hand out nothing.
        if m.spiffe_id != ours {
            return Err(JwtError::CaUnavailable(format!(
                "the CA answered with a token for {}, not for this workload ({ours})",
                m.spiffe_id
            )));
        }
        let life = m.expires_at.duration_since(m.issued_at).unwrap_or_default();
        let refresh_at = m.issued_at + life / 2;
        let kid = token_kid(&m.token).unwrap_or_default();
        tracing::debug!(audience_set = %short_hash(&key), expires_at = %crate::util::clock::rfc3339(m.expires_at), "JWT-SVID minted");
        let svid = pb::Jwtsvid {
            spiffe_id: m.spiffe_id.clone(),
            svid: m.token.to_string(),
            hint: String::new(),
        };
        self.remember(
            key,
            Cached {
                spiffe_id: m.spiffe_id,
                token: m.token,
                kid,
                refresh_at,
            },
        );
        Ok(svid)
    }

    /// Caches a token, dropping stale entries and, when still full, the one
    /// due for refresh soonest.
    fn remember(&self, key: [u8; 32], entry: Cached) {
        let now = self.clock.now();
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        cache.retain(|_, c| c.refresh_at > now);
        while cache.len() >= CACHE_CAPACITY {
            let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, c)| c.refresh_at)
                .map(|(k, _)| *k)
            else {
                break;
            };
            cache.remove(&oldest);
        }
        cache.insert(key, entry);
    }

    /// How many tokens are cached now.
    pub fn cached_len(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// `ValidateJWTSVID` against the bundles held now.
    pub fn validate(
        &self,
        own_td: &str,
        bundle: &Bundle,
        req: pb::ValidateJwtsvidRequest,
    ) -> Result<pb::ValidateJwtsvidResponse, JwtError> {
        let (spiffe_id, claims) =
            validate(own_td, bundle, &req.audience, &req.svid, self.clock.now())?;
        Ok(pb::ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(to_struct(claims)),
        })
    }
}

/// Checks the requested audiences and drops repeats (keeping the order).
fn check_audiences(audience: Vec<String>) -> Result<Vec<String>, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::NoAudience);
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(JwtError::TooManyAudiences(audience.len()));
    }
    // The CA's own rule (lengths, printable), so the agent never sends a
    // request that can only be refused, and the limits are stated once.
    if let Err(e) = crate::ca::jwt::check_audiences(&audience) {
        return Err(JwtError::BadAudience(e.to_string()));
    }
    let mut out: Vec<String> = Vec::with_capacity(audience.len());
    for a in audience {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// The cache key: identity and the audience SET (order does not matter).
fn cache_key(spiffe_id: &str, audience: &[String]) -> [u8; 32] {
    let mut sorted: Vec<&str> = audience.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(spiffe_id.as_bytes());
    for a in sorted {
        // Lengths first, so ["ab"] and ["a", "b"] cannot collide.
        ctx.update(&(a.len() as u64).to_be_bytes());
        ctx.update(a.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn short_hash(key: &[u8; 32]) -> String {
    hex::encode(&key[..8])
}

/// Maps a failed CA call to what the workload is told.
fn from_agent_error(e: AgentError) -> JwtError {
    fn refusal(e: &AgentError) -> Option<(tonic::Code, String)> {
        match e {
            AgentError::Ca { code, message }
                if matches!(
                    code,
                    tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
                ) =>
            {
                Some((*code, message.clone()))
            }
            AgentError::AllFailed(v) => v.iter().find_map(|(_, e)| refusal(e)),
            _ => None,
        }
    }
    fn unimplemented(e: &AgentError) -> bool {
        match e {
            AgentError::Ca { code, .. } => *code == tonic::Code::Unimplemented,
            AgentError::AllFailed(v) => v.iter().all(|(_, e)| unimplemented(e)),
            _ => false,
        }
    }
    match refusal(&e) {
        Some((tonic::Code::PermissionDenied, m)) => JwtError::CaDenied(m),
        Some((_, m)) => JwtError::CaInvalid(m),
        None if unimplemented(&e) => JwtError::CaUnavailable(
            "the CA does not mint JWT-SVIDs: it answers UNIMPLEMENTED; upgrade it".into(),
        ),
        None if matches!(e, AgentError::NoCertificate) => JwtError::NoIdentityYet,
        None => JwtError::CaUnavailable(e.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Keys: SPKI DER → what ring verifies with, and → RFC 7517 JWK.

/// The key types a JWT-SVID authority may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    P256,
    P384,
    P521,
    Rsa,
}

impl KeyType {
    fn name(self) -> &'static str {
        match self {
            KeyType::P256 => "EC P-256",
            KeyType::P384 => "EC P-384",
            KeyType::P521 => "EC P-521",
            KeyType::Rsa => "RSA",
        }
    }
}

/// The key's type and its `subjectPublicKey` bits (the uncompressed EC point,
/// or the PKCS#1 RSAPublicKey DER: what ring's verifiers take).
fn key_type(spki: &[u8]) -> Result<(KeyType, x509_parser::x509::SubjectPublicKeyInfo<'_>), String> {
    use x509_parser::oid_registry as oid;
    let (rest, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| format!("not a DER SubjectPublicKeyInfo: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the SubjectPublicKeyInfo".into());
    }
    let alg = &info.algorithm.algorithm;
    let kt = if *alg == oid::OID_PKCS1_RSAENCRYPTION {
        KeyType::Rsa
    } else if *alg == oid::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = info
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or("EC key without a named curve")?;
        if curve == oid::OID_EC_P256 {
            KeyType::P256
        } else if curve == oid::OID_NIST_EC_P384 {
            KeyType::P384
        } else if curve == oid::OID_NIST_EC_P521 {
            KeyType::P521
        } else {
            return Err(format!("unsupported EC curve {curve}"));
        }
    } else {
        return Err(format!("unsupported key algorithm {alg}"));
    };
    Ok((kt, info))
}

/// One bundle key as a JWK with `use: jwt-svid` (RFC 7517/7518; the SPIFFE
/// bundle's member names).
fn jwk(key: &JwtKey) -> Result<Value, String> {
    use x509_parser::public_key::PublicKey;
    let (kt, info) = key_type(&key.public_key)?;
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    match info.parsed().map_err(|e| e.to_string())? {
        PublicKey::EC(point) => {
            let (crv, len) = match kt {
                KeyType::P256 => ("P-256", 32),
                KeyType::P384 => ("P-384", 48),
                _ => ("P-521", 66),
            };
            let p = point.data();
            if p.len() != 1 + 2 * len || p[0] != 4 {
                return Err("EC point is not uncompressed".into());
            }
            Ok(
                json!({"kty": "EC", "kid": key.key_id, "use": "jwt-svid", "crv": crv,
                      "x": b64(&p[1..1 + len]), "y": b64(&p[1 + len..])}),
            )
        }
        PublicKey::RSA(rsa) => {
            // RFC 7518 §6.3.1: minimal octets, no leading zero.
            let trim = |b: &[u8]| {
                let i = b.iter().position(|&x| x != 0).unwrap_or(b.len());
                b64(&b[i..])
            };
            Ok(json!({"kty": "RSA", "kid": key.key_id, "use": "jwt-svid",
                      "n": trim(rsa.modulus), "e": trim(rsa.exponent)}))
        }
        _ => Err("unsupported key".into()),
    }
}

/// A JWK Set of `keys` (a key that cannot be expressed is left out, logged).
pub fn jwks(td: &str, keys: &[JwtKey]) -> Vec<u8> {
    let keys: Vec<Value> = keys
        .iter()
        .filter_map(|k| match jwk(k) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(trust_domain = td, kid = %k.key_id, error = %e, "JWT-SVID key left out of the JWKS");
                None
            }
        })
        .collect();
    serde_json::to_vec(&json!({ "keys": keys })).expect("a JSON value serializes")
}

/// `FetchJWTBundles`' message: a JWKS per trust domain, keyed by the trust
/// domain's SPIFFE ID (`spiffe://td`): this one (always, even with no keys)
/// and every federated one.
pub fn bundles(own_td: &str, bundle: &Bundle) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    out.insert(
        format!("spiffe://{own_td}"),
        jwks(own_td, &bundle.jwt_authorities),
    );
    for (td, fb) in &bundle.federated {
        // A federated bundle never speaks for our own trust domain.
        if td != own_td {
            out.insert(format!("spiffe://{td}"), jwks(td, &fb.jwt_authorities));
        }
    }
    out
}

/// The `FetchJWTBundles` stream: the bundles at once, then whenever they
/// change (renewals alone send nothing).
pub fn bundle_stream(
    state: watch::Receiver<State>,
    own_td: String,
) -> impl futures_util::Stream<Item = Result<pb::JwtBundlesResponse, Status>> + Send + 'static {
    use tokio_stream::StreamExt as _;
    let mut last: Option<BTreeMap<String, Vec<u8>>> = None;
    tokio_stream::wrappers::WatchStream::new(state).filter_map(move |st| {
        let now = bundles(&own_td, &st.bundle);
        if last.as_ref() == Some(&now) {
            return None;
        }
        last = Some(now.clone());
        Some(Ok(pb::JwtBundlesResponse {
            bundles: now.into_iter().collect(),
        }))
    })
}

// ---------------------------------------------------------------------------
// Validation (JWT-SVID §2-4, RFC 7515/7519).

/// The signature algorithms a JWT-SVID may use that this agent verifies.
fn algorithm(
    alg: &str,
) -> Result<
    (
        &'static dyn ring::signature::VerificationAlgorithm,
        &'static [KeyType],
    ),
    Refusal,
> {
    use ring::signature as s;
    const EC256: &[KeyType] = &[KeyType::P256];
    const EC384: &[KeyType] = &[KeyType::P384];
    const RSA: &[KeyType] = &[KeyType::Rsa];
    let refuse = |why| Err(Refusal::Algorithm(alg.to_string(), why));
    Ok(match alg {
        "ES256" => (&s::ECDSA_P256_SHA256_FIXED, EC256),
        "ES384" => (&s::ECDSA_P384_SHA384_FIXED, EC384),
        "RS256" => (&s::RSA_PKCS1_2048_8192_SHA256, RSA),
        "RS384" => (&s::RSA_PKCS1_2048_8192_SHA384, RSA),
        "RS512" => (&s::RSA_PKCS1_2048_8192_SHA512, RSA),
        "PS256" => (&s::RSA_PSS_2048_8192_SHA256, RSA),
        "PS384" => (&s::RSA_PSS_2048_8192_SHA384, RSA),
        "PS512" => (&s::RSA_PSS_2048_8192_SHA512, RSA),
        "none" => return refuse("unsigned tokens are never accepted"),
        a if a.starts_with("HS") => {
            return refuse("HMAC is not a JWT-SVID algorithm (keys are public)")
        }
        "ES512" => return refuse("ES512 (P-521) is not supported by this agent"),
        _ => return refuse("not one of RFC 7518 §3.3-3.5's algorithms"),
    })
}

fn decode_json(part: &str, what: &'static str) -> Result<Map<String, Value>, Refusal> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| Refusal::Malformed(what))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(Refusal::Malformed(what)),
    }
}

/// The `kid` in a compact JWS's header (None when it has none or is not one).
fn token_kid(token: &str) -> Option<String> {
    let header = decode_json(token.split('.').next()?, "header").ok()?;
    match header.get("kid") {
        Some(Value::String(k)) => Some(k.clone()),
        _ => None,
    }
}

/// The JOSE header's `alg` and `kid`, after the JWT-SVID §2 checks.
fn check_header(h: &Map<String, Value>) -> Result<(String, String), Refusal> {
    for name in h.keys() {
        if !matches!(name.as_str(), "alg" | "kid" | "typ") {
            return Err(Refusal::Header(name.clone()));
        }
    }
    let alg = match h.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(Refusal::Malformed("the header has no alg")),
    };
    match h.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(t) => return Err(Refusal::Typ(t.to_string())),
    }
    let kid = match h.get("kid") {
        Some(Value::String(k)) if !k.is_empty() => k.clone(),
        _ => return Err(Refusal::NoKid),
    };
    Ok((alg, kid))
}

/// The key `kid` of the subject's trust domain, usable at `now`.
fn find_key<'b>(
    own_td: &str,
    bundle: &'b Bundle,
    td: &str,
    kid: &str,
    now: SystemTime,
) -> Result<&'b JwtKey, Refusal> {
    let keys = if td == own_td {
        &bundle.jwt_authorities
    } else {
        &bundle
            .federated
            .get(td)
            .ok_or_else(|| Refusal::NoBundle(td.to_string()))?
            .jwt_authorities
    };
    let key = keys
        .iter()
        .find(|k| k.key_id == kid)
        .ok_or_else(|| Refusal::UnknownKid {
            kid: kid.to_string(),
            td: td.to_string(),
        })?;
    if key.expires_at.is_some_and(|t| t <= now) {
        return Err(Refusal::KeyExpired(kid.to_string()));
    }
    Ok(key)
}

fn verify_signature(key: &JwtKey, alg: &str, signed: &str, sig_b64: &str) -> Result<(), Refusal> {
    let (verifier, types) = algorithm(alg)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| Refusal::Malformed("the signature is not base64url"))?;
    let unusable = |key_desc: String| Refusal::KeyMismatch {
        kid: key.key_id.clone(),
        key: key_desc,
        alg: alg.to_string(),
    };
    let (kt, info) = key_type(&key.public_key).map_err(unusable)?;
    if !types.contains(&kt) {
        return Err(unusable(kt.name().to_string()));
    }
    ring::signature::UnparsedPublicKey::new(verifier, &info.subject_public_key.data)
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| Refusal::Signature(key.key_id.clone()))
}

fn unix(now: SystemTime) -> f64 {
    now.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `exp` (required), `nbf` (if present) and `aud` (required; must contain
/// `audience`), per RFC 7519 §4.1.3-4.1.5 and JWT-SVID §3.
fn check_claims(c: &Map<String, Value>, audience: &str, now: SystemTime) -> Result<(), Refusal> {
    let now = unix(now);
    let leeway = LEEWAY.as_secs_f64();
    let exp = c
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(Refusal::Claim("exp"))?;
    if now > exp + leeway {
        return Err(Refusal::Expired(exp as i64));
    }
    if let Some(nbf) = c.get("nbf") {
        let nbf = nbf.as_f64().ok_or(Refusal::Claim("nbf"))?;
        if now + leeway < nbf {
            return Err(Refusal::NotYetValid(nbf as i64));
        }
    }
    let aud: Vec<&str> = match c.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(v)) if !v.is_empty() => v
            .iter()
            .map(Value::as_str)
            .collect::<Option<_>>()
            .ok_or(Refusal::Claim("aud"))?,
        _ => return Err(Refusal::Claim("aud")),
    };
    if !aud.contains(&audience) {
        return Err(Refusal::Audience(audience.to_string()));
    }
    Ok(())
}

/// Validates `token` for `audience` against the JWT keys of the subject's
/// trust domain; returns the SPIFFE ID and every claim.
pub fn validate(
    own_td: &str,
    bundle: &Bundle,
    audience: &str,
    token: &str,
    now: SystemTime,
) -> Result<(String, Map<String, Value>), Refusal> {
    if audience.is_empty() {
        return Err(Refusal::NoAudience);
    }
    if token.is_empty() {
        return Err(Refusal::NoToken);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Refusal::TooLarge(token.len()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [h64, p64, s64] = parts[..] else {
        return Err(Refusal::Malformed("expected three dot-separated parts"));
    };
    let header = decode_json(h64, "the header is not base64url JSON")?;
    let (alg, kid) = check_header(&header)?;
    algorithm(&alg)?;
    let claims = decode_json(p64, "the payload is not base64url JSON")?;
    let sub = match claims.get("sub") {
        Some(Value::String(s)) => s
            .parse::<SpiffeId>()
            .map_err(|e| Refusal::Subject(e.to_string()))?,
        _ => return Err(Refusal::Subject("the sub claim is missing".into())),
    };
    // The key comes from the bundle of the subject's own trust domain (Workload
    // API §6.3): a key of another domain can never vouch for this subject.
    let key = find_key(own_td, bundle, sub.trust_domain(), &kid, now)?;
    verify_signature(key, &alg, &token[..h64.len() + 1 + p64.len()], s64)?;
    check_claims(&claims, audience, now)?;
    Ok((sub.to_string(), claims))
}

/// A JSON object as a protobuf `Struct` (numbers become doubles).
fn to_struct(m: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::FederatedBundle;
    use crate::util::clock::ManualClock;
    use rcgen::PublicKeyData as _;
    use ring::signature::{self as sig, KeyPair as _};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TD: &str = "cluster.local";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// A signing key made in the test, with its bundle entry.
    enum Priv {
        Ec(sig::EcdsaKeyPair),
        Rsa(sig::RsaKeyPair),
    }
    struct Signer {
        key: Priv,
        kid: String,
        spki: Vec<u8>,
    }

    fn rng() -> ring::rand::SystemRandom {
        ring::rand::SystemRandom::new()
    }

    impl Signer {
        fn ec(kid: &str, p384: bool) -> Signer {
            let (alg, ralg): (_, &'static rcgen::SignatureAlgorithm) = if p384 {
                (
                    &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
                    &rcgen::PKCS_ECDSA_P384_SHA384,
                )
            } else {
                (
                    &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &rcgen::PKCS_ECDSA_P256_SHA256,
                )
            };
            let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng()).unwrap();
            let kp = sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng()).unwrap();
            let spki =
                rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8.as_ref().to_vec().into(), ralg)
                    .unwrap()
                    .subject_public_key_info();
            assert!(spki.ends_with(kp.public_key().as_ref()));
            Signer {
                key: Priv::Ec(kp),
                kid: kid.into(),
                spki,
            }
        }

        fn rsa(kid: &str) -> Signer {
            let pem = include_str!("../ca/testdata/rsa2048-pkcs8.pem");
            let der = crate::util::pem::private_key(pem.as_bytes())
                .unwrap()
                .unwrap();
            let kp = sig::RsaKeyPair::from_pkcs8(der.secret_der()).unwrap();
            let spki = rcgen::KeyPair::from_pem(pem)
                .unwrap()
                .subject_public_key_info();
            Signer {
                key: Priv::Rsa(kp),
                kid: kid.into(),
                spki,
            }
        }

        fn authority(&self) -> JwtKey {
            JwtKey {
                key_id: self.kid.clone(),
                public_key: self.spki.clone(),
                expires_at: None,
            }
        }

        /// Signs `claims` under `header` (alg chosen by the key unless given).
        fn sign_with(&self, header: Value, claims: Value) -> String {
            let b = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
            let input = format!("{}.{}", b(&header), b(&claims));
            let s = match &self.key {
                Priv::Ec(k) => k.sign(&rng(), input.as_bytes()).unwrap().as_ref().to_vec(),
                Priv::Rsa(k) => {
                    let pad: &dyn sig::RsaEncoding = match header["alg"].as_str() {
                        Some("PS256") => &sig::RSA_PSS_SHA256,
                        _ => &sig::RSA_PKCS1_SHA256,
                    };
                    let mut out = vec![0; k.public().modulus_len()];
                    k.sign(pad, &rng(), input.as_bytes(), &mut out).unwrap();
                    out
                }
            };
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(s))
        }

        fn sign(&self, claims: Value) -> String {
            let alg = match (&self.key, self.spki.len()) {
                (Priv::Rsa(_), _) => "RS256",
                (Priv::Ec(_), n) if n > 100 => "ES384",
                _ => "ES256",
            };
            self.sign_with(json!({"alg": alg, "kid": self.kid, "typ": "JWT"}), claims)
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn claims(sub: &str, aud: Value, exp_in: i64) -> Value {
        let t = 1_800_000_000i64;
        json!({"sub": sub, "aud": aud, "exp": t + exp_in, "iat": t - 10})
    }

    fn bundle(own: &[&Signer], fed: &[(&str, &[&Signer])]) -> Bundle {
        Bundle {
            version: 1,
            trust_domain: TD.into(),
            jwt_authorities: own.iter().map(|s| s.authority()).collect(),
            federated: fed
                .iter()
                .map(|(td, keys)| {
                    (
                        td.to_string(),
                        FederatedBundle {
                            jwt_authorities: keys.iter().map(|s| s.authority()).collect(),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn check(b: &Bundle, aud: &str, token: &str) -> Result<String, Refusal> {
        validate(TD, b, aud, token, now()).map(|(id, _)| id)
    }

    #[test]
    fn a_good_token_validates_and_its_claims_come_back() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let t = k.sign(claims(WEB, json!(["api", "db"]), 300));
        let (id, c) = validate(TD, &b, "db", &t, now()).unwrap();
        assert_eq!(id, WEB);
        assert_eq!(c["aud"], json!(["api", "db"]));
        assert_eq!(c["exp"], json!(1_800_000_300i64));
        // A single-string aud (RFC 7519 §4.1.3) too.
        let t = k.sign(claims(WEB, json!("api"), 300));
        assert_eq!(check(&b, "api", &t).unwrap(), WEB);
    }

    #[test]
    fn rsa_pss_and_p384_keys_verify() {
        let r = Signer::rsa("r1");
        let e = Signer::ec("e384", true);
        let b = bundle(&[&r, &e], &[]);
        let c = claims(WEB, json!("api"), 300);
        assert_eq!(check(&b, "api", &r.sign(c.clone())).unwrap(), WEB);
        let ps = r.sign_with(json!({"alg": "PS256", "kid": "r1"}), c.clone());
        assert_eq!(check(&b, "api", &ps).unwrap(), WEB);
        assert_eq!(check(&b, "api", &e.sign(c)).unwrap(), WEB);
    }

    #[test]
    fn a_token_for_another_audience_is_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let t = k.sign(claims(WEB, json!(["api"]), 300));
        assert_eq!(check(&b, "db", &t), Err(Refusal::Audience("db".into())));
        // aud is required, and must hold only strings.
        let mut c = claims(WEB, json!("api"), 300);
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(check(&b, "api", &k.sign(c)), Err(Refusal::Claim("aud")));
        let t = k.sign(claims(WEB, json!([]), 300));
        assert_eq!(check(&b, "api", &t), Err(Refusal::Claim("aud")));
        let t = k.sign(claims(WEB, json!(["api", 7]), 300));
        assert_eq!(check(&b, "api", &t), Err(Refusal::Claim("aud")));
    }

    #[test]
    fn an_expired_token_is_refused_beyond_the_leeway() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let t = k.sign(claims(WEB, json!("api"), -31));
        assert_eq!(
            check(&b, "api", &t),
            Err(Refusal::Expired(1_800_000_000 - 31))
        );
        let t = k.sign(claims(WEB, json!("api"), -20));
        assert_eq!(check(&b, "api", &t).unwrap(), WEB, "within the leeway");
        let mut c = claims(WEB, json!("api"), 0);
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(check(&b, "api", &k.sign(c)), Err(Refusal::Claim("exp")));
        let mut c = claims(WEB, json!("api"), 300);
        c["nbf"] = json!(1_800_000_100i64);
        assert_eq!(
            check(&b, "api", &k.sign(c)),
            Err(Refusal::NotYetValid(1_800_000_100))
        );
    }

    #[test]
    fn an_unknown_kid_or_an_expired_key_is_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let other = Signer::ec("k2", false);
        let t = other.sign(claims(WEB, json!("api"), 300));
        assert_eq!(
            check(&b, "api", &t),
            Err(Refusal::UnknownKid {
                kid: "k2".into(),
                td: TD.into()
            })
        );
        let mut b = bundle(&[&k], &[]);
        b.jwt_authorities[0].expires_at = Some(now() - Duration::from_secs(1));
        let t = k.sign(claims(WEB, json!("api"), 300));
        assert_eq!(check(&b, "api", &t), Err(Refusal::KeyExpired("k1".into())));
    }

    #[test]
    fn a_signature_by_another_key_under_a_known_kid_is_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let forger = Signer::ec("k1", false);
        let t = forger.sign(claims(WEB, json!("api"), 300));
        assert_eq!(check(&b, "api", &t), Err(Refusal::Signature("k1".into())));
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let t = k.sign(claims(WEB, json!("api"), 300));
        let parts: Vec<&str> = t.split('.').collect();
        let evil = claims(
            "spiffe://cluster.local/ns/kube-system/sa/admin",
            json!("api"),
            300,
        );
        let evil = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&evil).unwrap());
        let forged = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_eq!(
            check(&b, "api", &forged),
            Err(Refusal::Signature("k1".into()))
        );
    }

    #[test]
    fn alg_none_and_hmac_with_the_public_key_as_secret_are_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let b64 = |v: Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap());
        let body = b64(claims(WEB, json!("api"), 300));
        let none = format!("{}.{body}.", b64(json!({"alg": "none", "kid": "k1"})));
        assert_eq!(
            check(&b, "api", &none),
            Err(Refusal::Algorithm(
                "none".into(),
                "unsigned tokens are never accepted"
            ))
        );
        // The classic confusion attack: HMAC keyed with the published key.
        let input = format!("{}.{body}", b64(json!({"alg": "HS256", "kid": "k1"})));
        let mac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k.spki),
            input.as_bytes(),
        );
        let hs = format!("{input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        assert_eq!(
            check(&b, "api", &hs),
            Err(Refusal::Algorithm(
                "HS256".into(),
                "HMAC is not a JWT-SVID algorithm (keys are public)"
            ))
        );
    }

    #[test]
    fn an_algorithm_that_does_not_fit_the_key_is_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let c = claims(WEB, json!("api"), 300);
        let t = k.sign_with(json!({"alg": "ES384", "kid": "k1"}), c.clone());
        assert!(matches!(
            check(&b, "api", &t),
            Err(Refusal::KeyMismatch { .. })
        ));
        let t = k.sign_with(json!({"alg": "RS256", "kid": "k1"}), c);
        assert!(matches!(
            check(&b, "api", &t),
            Err(Refusal::KeyMismatch { .. })
        ));
    }

    #[test]
    fn headers_beyond_alg_kid_typ_and_a_foreign_typ_are_refused() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        let c = claims(WEB, json!("api"), 300);
        let jku = json!({"alg": "ES256", "kid": "k1", "jku": "https://evil.example/jwks"});
        let t = k.sign_with(jku, c.clone());
        assert_eq!(check(&b, "api", &t), Err(Refusal::Header("jku".into())));
        let t = k.sign_with(
            json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}),
            c.clone(),
        );
        assert_eq!(check(&b, "api", &t), Err(Refusal::Typ("\"at+jwt\"".into())));
        let t = k.sign_with(json!({"alg": "ES256"}), c.clone());
        assert_eq!(check(&b, "api", &t), Err(Refusal::NoKid));
        let t = k.sign_with(json!({"alg": "ES256", "kid": "k1", "typ": "JOSE"}), c);
        assert_eq!(check(&b, "api", &t).unwrap(), WEB);
    }

    #[test]
    fn the_subject_picks_the_trust_domain_and_only_its_keys_count() {
        let own = Signer::ec("own", false);
        let fed = Signer::ec("fed", false);
        let b = bundle(&[&own], &[("partner.example", &[&fed])]);
        let foreign = "spiffe://partner.example/billing";
        let t = fed.sign(claims(foreign, json!("api"), 300));
        assert_eq!(check(&b, "api", &t).unwrap(), foreign);
        // The partner's key cannot vouch for a subject of our trust domain...
        let t = fed.sign(claims(WEB, json!("api"), 300));
        assert_eq!(
            check(&b, "api", &t),
            Err(Refusal::UnknownKid {
                kid: "fed".into(),
                td: TD.into()
            })
        );
        // ...and ours cannot vouch for theirs.
        let t = own.sign(claims(foreign, json!("api"), 300));
        assert!(matches!(
            check(&b, "api", &t),
            Err(Refusal::UnknownKid { .. })
        ));
        // A trust domain we hold no bundle for is untrusted.
        let t = own.sign(claims("spiffe://stranger.example/x", json!("api"), 300));
        assert_eq!(
            check(&b, "api", &t),
            Err(Refusal::NoBundle("stranger.example".into()))
        );
        let t = own.sign(claims("https://cluster.local/x", json!("api"), 300));
        assert!(matches!(check(&b, "api", &t), Err(Refusal::Subject(_))));
    }

    #[test]
    fn malformed_input_gets_a_specific_refusal_not_a_panic() {
        let k = Signer::ec("k1", false);
        let b = bundle(&[&k], &[]);
        assert_eq!(check(&b, "", "x"), Err(Refusal::NoAudience));
        assert_eq!(check(&b, "api", ""), Err(Refusal::NoToken));
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(check(&b, "api", &huge), Err(Refusal::TooLarge(huge.len())));
        for bad in [
            "a.b",
            "a.b.c.d.e",
            "!!.e30.",
            "e30.!!.",
            "W10.e30.",
            "..",
            "é.é.é",
        ] {
            assert!(
                matches!(check(&b, "api", bad), Err(Refusal::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn jwks_keys_carry_the_spiffe_member_names_and_verify_tokens_independently() {
        let e = Signer::ec("e1", false);
        let r = Signer::rsa("r1");
        let doc: Value =
            serde_json::from_slice(&jwks(TD, &[e.authority(), r.authority()])).unwrap();
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0]["use"], "jwt-svid");
        assert_eq!(keys[0]["kid"], "e1");
        assert_eq!(keys[0]["crv"], "P-256");
        assert_eq!(keys[1]["kty"], "RSA");
        assert_eq!(keys[1]["e"], "AQAB");
        // n has no leading zero octet (RFC 7518 §6.3.1.1).
        let n = URL_SAFE_NO_PAD
            .decode(keys[1]["n"].as_str().unwrap())
            .unwrap();
        assert_eq!((n.len(), n[0] != 0), (256, true));
        // jsonwebtoken (not our code) verifies tokens with these JWKs.
        for (key, s, alg) in [
            (&keys[0], &e, jsonwebtoken::Algorithm::ES256),
            (&keys[1], &r, jsonwebtoken::Algorithm::RS256),
        ] {
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.clone()).unwrap();
            let dk = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["api"]);
            v.validate_exp = false;
            let t = s.sign(claims(WEB, json!("api"), 300));
            jsonwebtoken::decode::<Value>(&t, &dk, &v).unwrap();
        }
        // A key that is not a public key is left out, not a failure.
        let bad = JwtKey {
            key_id: "bad".into(),
            public_key: vec![1, 2, 3],
            expires_at: None,
        };
        assert_eq!(jwks(TD, &[bad]), br#"{"keys":[]}"#);
    }

    #[test]
    fn bundles_are_keyed_by_trust_domain_id_and_a_federated_one_never_replaces_ours() {
        let own = Signer::ec("own", false);
        let fed = Signer::ec("fed", false);
        let evil = Signer::ec("evil", false);
        let b = bundle(&[&own], &[("partner.example", &[&fed]), (TD, &[&evil])]);
        let m = bundles(TD, &b);
        let keys: Vec<&String> = m.keys().collect();
        assert_eq!(keys, ["spiffe://cluster.local", "spiffe://partner.example"]);
        let ours: Value = serde_json::from_slice(&m["spiffe://cluster.local"]).unwrap();
        assert_eq!(ours["keys"].as_array().unwrap().len(), 1);
        assert_eq!(ours["keys"][0]["kid"], "own");
        // Validation follows the same rule.
        let t = evil.sign(claims(WEB, json!("api"), 300));
        assert!(matches!(
            check(&b, "api", &t),
            Err(Refusal::UnknownKid { .. })
        ));
        // Our own bundle is always there, even without keys.
        let empty = bundles(TD, &Bundle::default());
        assert_eq!(empty["spiffe://cluster.local"], br#"{"keys":[]}"#);
    }

    // --- FetchJWTSVID: the cache and the CA link --------------------------

    /// A CA stand-in: signs with a test key and counts calls.
    struct FakeCa {
        key: Signer,
        clock: Arc<ManualClock>,
        ttl: u64,
        calls: AtomicUsize,
        fail: Mutex<Option<AgentError>>,
        sub: String,
        slow: bool,
    }

    impl Minter for FakeCa {
        fn mint<'a>(&'a self, audience: &'a [String]) -> MintFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.slow {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Some(e) = self.fail.lock().unwrap().take() {
                    return Err(e);
                }
                let now = self.clock.now();
                let iat = crate::util::clock::unix_secs(now) as i64;
                let token = self.key.sign(json!({"sub": self.sub, "aud": audience,
                    "iat": iat, "exp": iat + self.ttl as i64}));
                Ok(Minted {
                    spiffe_id: self.sub.clone(),
                    token: Zeroizing::new(token),
                    issued_at: now,
                    expires_at: now + Duration::from_secs(self.ttl),
                })
            })
        }
    }

    fn fake(ttl: u64) -> (Arc<FakeCa>, Arc<ManualClock>, JwtSvids) {
        fake_with(ttl, false)
    }

    fn fake_with(ttl: u64, slow: bool) -> (Arc<FakeCa>, Arc<ManualClock>, JwtSvids) {
        let clock = Arc::new(ManualClock::new(now()));
        let ca = Arc::new(FakeCa {
            key: Signer::ec("k1", false),
            clock: clock.clone(),
            ttl,
            calls: AtomicUsize::new(0),
            fail: Mutex::new(None),
            sub: WEB.into(),
            slow,
        });
        let j = JwtSvids::new(Some(ca.clone() as Arc<dyn Minter>), clock.clone());
        (ca, clock, j)
    }

    /// The bundle's JWT keys: the fake CA's key `k1`.
    fn published() -> Vec<JwtKey> {
        vec![JwtKey {
            key_id: "k1".into(),
            public_key: Vec::new(),
            expires_at: None,
        }]
    }

    fn req(aud: &[&str], id: &str) -> pb::JwtsvidRequest {
        pb::JwtsvidRequest {
            audience: aud.iter().map(|a| a.to_string()).collect(),
            spiffe_id: id.into(),
        }
    }

    async fn token(j: &JwtSvids, aud: &[&str]) -> String {
        let r = j
            .fetch(Some(WEB), &published(), req(aud, ""))
            .await
            .unwrap();
        assert_eq!(r.svids.len(), 1);
        assert_eq!(r.svids[0].spiffe_id, WEB);
        r.svids[0].svid.clone()
    }

    #[tokio::test]
    async fn tokens_are_cached_per_audience_set_until_half_their_lifetime() {
        let (ca, clock, j) = fake(300);
        let t1 = token(&j, &["api", "db"]).await;
        // The same set in another order, with a repeat: the cached token.
        assert_eq!(token(&j, &["db", "api", "db"]).await, t1);
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        let b = bundle(&[&ca.key], &[]);
        assert_eq!(validate(TD, &b, "db", &t1, clock.now()).unwrap().0, WEB);
        // Another set: another token.
        let t2 = token(&j, &["api"]).await;
        assert_ne!(t2, t1);
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        clock.advance(Duration::from_secs(149));
        assert_eq!(token(&j, &["api", "db"]).await, t1, "before half-life");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        clock.advance(Duration::from_secs(1));
        assert_ne!(token(&j, &["api", "db"]).await, t1, "at half-life: fresh");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 3);
    }

    /// A taint withdraws the key from the bundle at once: every verifier
    /// then refuses tokens it signed, so the cache must not hand them out.
    #[tokio::test]
    async fn a_cached_token_whose_key_left_the_bundle_is_not_served() {
        let (ca, _clock, j) = fake(300);
        let t1 = token(&j, &["api"]).await;
        let withdrawn: Vec<JwtKey> = Vec::new();
        let r = j
            .fetch(Some(WEB), &withdrawn, req(&["api"], ""))
            .await
            .unwrap();
        assert_ne!(r.svids[0].svid, t1, "the withdrawn key's token was served");
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_for_one_audience_set_make_one_ca_call() {
        let (ca, _clock, j) = fake_with(300, true);
        let j = Arc::new(j);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let j = j.clone();
                tokio::spawn(async move { token(&j, &["api"]).await })
            })
            .collect();
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(t.await.unwrap());
        }
        assert!(tokens.iter().all(|t| *t == tokens[0]));
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        assert!(j.minting.lock().unwrap().is_empty(), "no gate left behind");
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let (ca, _clock, j) = fake(300);
        for i in 0..CACHE_CAPACITY + 20 {
            token(&j, &[&format!("aud-{i}")]).await;
        }
        assert_eq!(j.cached_len(), CACHE_CAPACITY);
        assert_eq!(ca.calls.load(Ordering::SeqCst), CACHE_CAPACITY + 20);
    }

    #[tokio::test]
    async fn requests_are_checked_before_the_ca_is_asked() {
        let (ca, _clock, j) = fake(300);
        let code = |r: Result<pb::JwtsvidResponse, JwtError>| Status::from(r.unwrap_err()).code();
        assert_eq!(
            code(j.fetch(Some(WEB), &published(), req(&[], "")).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(j.fetch(Some(WEB), &published(), req(&[""], "")).await),
            tonic::Code::InvalidArgument
        );
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            code(j.fetch(Some(WEB), &published(), req(&many, "")).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(
                j.fetch(Some(WEB), &published(), req(&["api"], "not-an-id"))
                    .await
            ),
            tonic::Code::InvalidArgument
        );
        // Another workload's identity: the spec's PermissionDenied.
        let other = "spiffe://cluster.local/ns/shop/sa/admin";
        let e = j
            .fetch(Some(WEB), &published(), req(&["api"], other))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(other), "{e}");
        assert_eq!(Status::from(e).code(), tonic::Code::PermissionDenied);
        // No certificate yet: nothing to authenticate with.
        assert_eq!(
            code(j.fetch(None, &published(), req(&["api"], "")).await),
            tonic::Code::Unavailable
        );
        assert_eq!(ca.calls.load(Ordering::SeqCst), 0);
        // Naming our own identity is fine.
        j.fetch(Some(WEB), &published(), req(&["api"], WEB))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ca_failures_map_to_what_the_workload_can_act_on() {
        let (ca, _clock, j) = fake(300);
        let a: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases = [
            (AgentError::Timeout(5), tonic::Code::Unavailable),
            (
                AgentError::AllFailed(vec![(a, AgentError::Timeout(5))]),
                tonic::Code::Unavailable,
            ),
            (
                AgentError::Ca {
                    code: tonic::Code::Unimplemented,
                    message: "no".into(),
                },
                tonic::Code::Unavailable,
            ),
            (
                AgentError::AllFailed(vec![
                    (a, AgentError::Timeout(5)),
                    (
                        a,
                        AgentError::Ca {
                            code: tonic::Code::InvalidArgument,
                            message: "audience too long".into(),
                        },
                    ),
                ]),
                tonic::Code::InvalidArgument,
            ),
            (
                AgentError::Ca {
                    code: tonic::Code::PermissionDenied,
                    message: "denied".into(),
                },
                tonic::Code::PermissionDenied,
            ),
        ];
        for (e, want) in cases {
            *ca.fail.lock().unwrap() = Some(e);
            let s = Status::from(
                j.fetch(Some(WEB), &published(), req(&["api"], ""))
                    .await
                    .unwrap_err(),
            );
            assert_eq!(s.code(), want, "{}", s.message());
        }
        assert_eq!(j.cached_len(), 0, "nothing cached from a failure");
        // A CA without a link at all.
        let s = Status::from(
            JwtSvids::without_ca()
                .fetch(Some(WEB), &published(), req(&["api"], ""))
                .await
                .unwrap_err(),
        );
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn a_token_for_another_identity_from_the_ca_is_not_handed_out() {
        let (_ca, _clock, j) = fake(300);
        let other = "spiffe://cluster.local/ns/shop/sa/db";
        let e = j
            .fetch(Some(other), &published(), req(&["api"], ""))
            .await
            .unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::Unavailable);
        assert_eq!(j.cached_len(), 0);
    }

    #[tokio::test]
    async fn no_token_in_debug_output() {
        let (_ca, _clock, j) = fake(300);
        let t = token(&j, &["api"]).await;
        let sig = t.rsplit('.').next().unwrap();
        assert!(!format!("{j:?}").contains(sig));
        let m = Minted {
            spiffe_id: WEB.into(),
            token: Zeroizing::new(t.clone()),
            issued_at: now(),
            expires_at: now(),
        };
        assert!(!format!("{m:?}").contains(sig));
    }

    #[tokio::test]
    async fn the_bundle_stream_sends_at_once_and_on_key_changes_only() {
        use tokio_stream::StreamExt as _;
        let k1 = Signer::ec("k1", false);
        let (tx, rx) = watch::channel(State {
            svid: None,
            bundle: Arc::new(bundle(&[&k1], &[])),
        });
        let mut s = Box::pin(bundle_stream(rx, TD.into()));
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.bundles.len(), 1);
        // A state change that leaves the keys alone sends nothing.
        tx.send_modify(|st| st.bundle = Arc::new(bundle(&[&k1], &[])));
        let quiet = tokio::time::timeout(Duration::from_millis(200), s.next()).await;
        assert!(quiet.is_err(), "no message without a key change");
        let k2 = Signer::ec("k2", false);
        tx.send_modify(|st| st.bundle = Arc::new(bundle(&[&k1, &k2], &[("p.example", &[])])));
        let next = s.next().await.unwrap().unwrap();
        assert_eq!(next.bundles.len(), 2);
        let ours: Value = serde_json::from_slice(&next.bundles["spiffe://cluster.local"]).unwrap();
        assert_eq!(ours["keys"].as_array().unwrap().len(), 2);
    }
}
