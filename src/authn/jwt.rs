//! Local JWT verification against a JWKS (Kubernetes projected
//! service-account tokens).
//!
//! Owns: the algorithm allow-list (RS256, ES256 only), key lookup by `kid`
//! with rate-limited refresh, and the claim checks (`iss`, `aud`, `exp`,
//! `nbf`, `sub` consistent with the `kubernetes.io` claim). Must not: call
//! the Kubernetes API (that is `tokenreview`) or build gRPC statuses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use super::binding::{Binding, BindingCheck, ObjectRef, Presence};
use super::issuers::Issuers;
use super::{Authenticated, Method, Verdict, LEGACY_ISSUER};
use crate::identity::Workload;
use crate::util::clock::{unix_secs, Clock};

/// Clock-skew tolerance for `exp`, `nbf` and `iat`.
pub(crate) const LEEWAY: Duration = Duration::from_secs(60);
/// The shortest interval between two JWKS refreshes triggered by unknown `kid`s.
pub(crate) const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// The claims of a Kubernetes projected service-account token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct K8sClaims {
    /// Issuer.
    pub iss: String,
    /// `system:serviceaccount:NS:SA`.
    pub sub: String,
    /// Audiences (a string or a list on the wire).
    #[serde(deserialize_with = "one_or_many", default)]
    pub aud: Vec<String>,
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// Issued at (Unix seconds).
    #[serde(default)]
    pub iat: Option<u64>,
    /// Not before (Unix seconds).
    #[serde(default)]
    pub nbf: Option<u64>,
    /// The `kubernetes.io` private claim.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<K8sInfo>,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct K8sInfo {
    /// The service account's namespace.
    pub namespace: String,
    /// The service account.
    pub serviceaccount: NameUid,
    /// The pod the token is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<NameUid>,
}

/// A `{name, uid}` reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NameUid {
    /// Object name.
    pub name: String,
    /// Object UID.
    pub uid: String,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Where the keys come from.
#[derive(Clone)]
pub enum JwksSource {
    /// A JWKS JSON file, re-read on refresh.
    File(PathBuf),
    /// A JWKS document fetched over HTTPS (e.g. the API server's `/openid/v1/jwks`).
    Url {
        /// The JWKS URL.
        url: String,
        /// The HTTPS client.
        fetcher: Box<super::fetch::Fetcher>,
    },
    /// The API server's own JWKS (`/openid/v1/jwks`), fetched through the
    /// Kubernetes client with its credentials (in a pod: its service account).
    Kubernetes(kube::Client),
    /// A fixed set (tests, the development signer).
    Static(String),
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(p) => f.debug_tuple("File").field(p).finish(),
            JwksSource::Url { url, .. } => f
                .debug_struct("Url")
                .field("url", url)
                .finish_non_exhaustive(),
            JwksSource::Kubernetes(_) => f.write_str("Kubernetes(/openid/v1/jwks)"),
            JwksSource::Static(_) => f.write_str("Static"),
        }
    }
}

impl JwksSource {
    fn is_remote(&self) -> bool {
        matches!(self, JwksSource::Url { .. } | JwksSource::Kubernetes(_))
    }
}

struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies JWTs against one JWKS for a set of accepted issuers.
pub struct JwksVerifier {
    issuers: Arc<Issuers>,
    source: JwksSource,
    keys: ArcSwap<HashMap<String, Arc<Key>>>,
    last_refresh: Mutex<Option<SystemTime>>,
    /// Why the last fetch failed, while it is failing.
    fetch_error: Mutex<Option<String>>,
    clock: Arc<dyn Clock>,
    method: Method,
    /// When set, a verified token whose pod or service account is gone is
    /// refused (see `authn::binding`).
    bindings: OnceLock<Arc<dyn BindingCheck>>,
}

impl std::fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("issuers", &self.issuers)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Parses JWKS JSON into usable keys, skipping (not failing on) keys that are
/// not RS256/ES256-capable.
fn parse_jwks(json: &str) -> Result<HashMap<String, Arc<Key>>, String> {
    let set: JwkSet = serde_json::from_str(json).map_err(|e| format!("JWKS is not valid: {e}"))?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec)
                if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let kid = jwk.common.key_id.clone().unwrap_or_else(|| format!("#{i}"));
        keys.insert(kid, Arc::new(Key { alg, key }));
    }
    Ok(keys)
}

impl JwksVerifier {
    /// Loads the keys once. A local source that cannot be read is an error;
    /// a remote one that cannot be fetched yet starts empty (tokens then get
    /// UNAVAILABLE until a fetch succeeds). Accepts tokens from `issuers`.
    pub async fn new(
        source: JwksSource,
        issuers: Vec<String>,
        clock: Arc<dyn Clock>,
        method: Method,
    ) -> Result<Self, String> {
        Self::with_issuers(source, Issuers::fixed(issuers), clock, method).await
    }

    /// [`JwksVerifier::new`] with a shared issuer set (one the API server's
    /// discovered issuer is added to when it is known).
    pub async fn with_issuers(
        source: JwksSource,
        issuers: Arc<Issuers>,
        clock: Arc<dyn Clock>,
        method: Method,
    ) -> Result<Self, String> {
        let (keys, fetch_error) = match read_source(&source).await.and_then(|j| parse_jwks(&j)) {
            Ok(k) if k.is_empty() => return Err("JWKS has no RS256 or ES256 key".into()),
            Ok(k) => (k, None),
            Err(e) if source.is_remote() => {
                tracing::warn!(error = %e, "JWKS fetch failed at start-up; will retry");
                (HashMap::new(), Some(e))
            }
            Err(e) => return Err(e),
        };
        Ok(Self {
            issuers,
            source,
            keys: ArcSwap::from_pointee(keys),
            // The initial load does not count against the refresh rate limit.
            last_refresh: Mutex::new(None),
            fetch_error: Mutex::new(fetch_error),
            clock,
            method,
            bindings: OnceLock::new(),
        })
    }

    /// Refuse verified tokens whose bound pod or service account is gone,
    /// as `bindings` says. Set once, before serving.
    pub(crate) fn set_bindings(&self, bindings: Arc<dyn BindingCheck>) {
        let _ = self.bindings.set(bindings);
    }

    /// What a token it accepts counts as.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The accepted issuers (now: discovery may add one later).
    pub fn issuers(&self) -> Vec<String> {
        self.issuers.all()
    }

    /// How many keys are loaded.
    pub(crate) fn key_count(&self) -> usize {
        self.keys.load().len()
    }

    /// True when the keys come from a URL (and so want periodic refresh).
    pub(crate) fn is_remote(&self) -> bool {
        self.source.is_remote()
    }

    /// Re-reads the key source now, keeping the old keys if that fails.
    pub(crate) async fn refresh_now(&self) {
        match read_source(&self.source).await.and_then(|j| parse_jwks(&j)) {
            Ok(k) if !k.is_empty() => {
                self.keys.store(Arc::new(k));
                *self.fetch_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Ok(_) => {
                tracing::warn!(source = ?self.source, "JWKS refresh found no usable key; keeping the old keys")
            }
            Err(e) => {
                tracing::warn!(source = ?self.source, error = %e, "JWKS refresh failed; keeping the old keys");
                *self.fetch_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    }

    /// Re-reads the key source, at most once per [`MIN_REFRESH_INTERVAL`].
    async fn refresh(&self) {
        let now = self.clock.now();
        {
            let mut last = self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = *last {
                if now.duration_since(t).unwrap_or_default() < MIN_REFRESH_INTERVAL {
                    return;
                }
            }
            *last = Some(now);
        }
        self.refresh_now().await;
    }

    fn find_key(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        let keys = self.keys.load();
        match kid {
            Some(kid) => keys.get(kid).filter(|k| k.alg == alg).cloned(),
            None if keys.len() == 1 => keys.values().next().filter(|k| k.alg == alg).cloned(),
            None => None,
        }
    }

    /// An issuer not accepted: undecided (another source may know it), or
    /// UNAVAILABLE while the API server's own issuer is still being
    /// discovered (it may be this one: retry, never a false rejection).
    fn unknown_issuer(&self, iss: &str) -> Verdict {
        match self.issuers.pending() {
            Some(why) => Verdict::Unavailable(format!(
                "the token's issuer {:?} is not accepted yet: the API server's service-account issuer is still being discovered ({why}); retry shortly",
                super::clip(iss)
            )),
            None => Verdict::Undecided(format!(
                "token issuer {:?} is not one of the JWKS issuers",
                super::clip(iss)
            )),
        }
    }

    /// Verifies `token` for `audience`.
    pub async fn verify(&self, token: &str, audience: &str) -> Verdict {
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            Err(e) => {
                return Verdict::Rejected(format!(
                    "the token is not a well-formed JWT or uses a forbidden algorithm ({e})"
                ))
            }
        };
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Verdict::Rejected(format!(
                "token algorithm {:?} is not allowed (only RS256 and ES256)",
                header.alg
            ));
        }
        // Peek at the unverified issuer only to route the token to the
        // right verifier; nothing is trusted until the signature checks.
        let unverified_iss = peek_issuer(token);
        if unverified_iss.as_deref() == Some(LEGACY_ISSUER) {
            return Verdict::Rejected(super::legacy_refusal(audience));
        }
        let iss = match unverified_iss {
            Some(iss) if self.issuers.accepts(&iss) => iss,
            Some(iss) => return self.unknown_issuer(&iss),
            None => return Verdict::Rejected("the token has no iss claim".into()),
        };
        let kid = header.kid.as_deref();
        let key = match self.find_key(kid, header.alg) {
            Some(k) => k,
            None => {
                self.refresh().await;
                match self.find_key(kid, header.alg) {
                    Some(k) => k,
                    None => {
                        let failing = self
                            .fetch_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone();
                        if let Some(e) = failing {
                            return Verdict::Unavailable(format!(
                                "the JWKS cannot be fetched, so the token's key is unknown: {e}"
                            ));
                        }
                        return Verdict::Undecided(format!(
                            "no {:?} key with kid {:?} in the JWKS",
                            header.alg,
                            kid.unwrap_or("")
                        ));
                    }
                }
            }
        };

        let mut v = Validation::new(key.alg);
        v.algorithms = vec![key.alg];
        v.set_audience(&[audience]);
        v.set_issuer(&[iss.as_str()]);
        // Time claims are checked below against our own clock.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.set_required_spec_claims(&["iss", "aud", "sub"]);
        let claims = match jsonwebtoken::decode::<K8sClaims>(token, &key.key, &v) {
            Ok(d) => d.claims,
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                let why = match e.kind() {
                    K::InvalidSignature => "the token signature does not verify".to_string(),
                    K::InvalidAudience => {
                        format!("the token's audience does not include {audience:?}")
                    }
                    K::InvalidIssuer => "the token issuer is not accepted".to_string(),
                    K::MissingRequiredClaim(c) => format!("the token has no {c} claim"),
                    K::Json(_) => {
                        "the token claims are not those of a Kubernetes service-account token"
                            .to_string()
                    }
                    _ => format!("the token is invalid ({e})"),
                };
                return Verdict::Rejected(why);
            }
        };
        match check_claims(&claims, self.clock.now()) {
            Ok(mut a) => {
                if let Some(v) = self
                    .bindings
                    .get()
                    .and_then(|b| binding_verdict(&**b, &claims))
                {
                    return v;
                }
                a.method = self.method;
                Verdict::Authenticated(a)
            }
            Err(why) => Verdict::Rejected(why),
        }
    }
}

async fn read_source(source: &JwksSource) -> Result<String, String> {
    match source {
        JwksSource::File(p) => tokio::fs::read_to_string(p)
            .await
            .map_err(|e| format!("cannot read JWKS file {}: {e}", p.display())),
        JwksSource::Url { url, fetcher } => fetcher.get(url).await,
        JwksSource::Kubernetes(client) => {
            kube_get(client, super::fetch::API_SERVER_JWKS_PATH).await
        }
        JwksSource::Static(s) => Ok(s.clone()),
    }
}

/// GETs a non-resource path from the API server through `client`
/// (bounded in time and size, see `fetch::api_get`).
pub(crate) async fn kube_get(client: &kube::Client, path: &str) -> Result<String, String> {
    super::fetch::api_get(client, path).await
}

/// The service-account issuer the API server announces
/// (`/.well-known/openid-configuration`), fetched through `client`.
pub(crate) async fn kube_issuer(client: &kube::Client) -> Result<String, String> {
    let doc = kube_get(client, "/.well-known/openid-configuration").await?;
    let v: serde_json::Value =
        serde_json::from_str(&doc).map_err(|e| format!("OIDC discovery document: {e}"))?;
    v["issuer"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "OIDC discovery document has no issuer".into())
}

/// The payload's `iss`, without verifying anything.
fn peek_issuer(token: &str) -> Option<String> {
    super::unverified_claims(token)?["iss"]
        .as_str()
        .map(str::to_string)
}

/// What the binding cache says about a verified token, when it refuses
/// or cannot tell (None: its objects exist).
fn binding_verdict(bindings: &dyn BindingCheck, c: &K8sClaims) -> Option<Verdict> {
    let k8s = c.kubernetes.as_ref()?;
    fn r(n: &NameUid) -> Option<ObjectRef<'_>> {
        (!n.uid.is_empty()).then_some(ObjectRef {
            name: n.name.as_str(),
            uid: n.uid.as_str(),
        })
    }
    let binding = Binding {
        namespace: &k8s.namespace,
        service_account: r(&k8s.serviceaccount),
        pod: k8s.pod.as_ref().and_then(r),
    };
    match bindings.check(&binding) {
        Presence::Present => None,
        // Counted by the binding cache (`token_binding_refusals`).
        Presence::Gone { why, .. } => Some(Verdict::Rejected(why)),
        // Another source (TokenReview, which asks the API server) may
        // still decide; alone, this is UNAVAILABLE, never a pass.
        Presence::Unknown(why) => Some(Verdict::Unavailable(why)),
    }
}

/// Checks time claims and that `sub` matches the `kubernetes.io` claim.
fn check_claims(c: &K8sClaims, now: SystemTime) -> Result<Authenticated, String> {
    let now_s = unix_secs(now);
    let leeway = LEEWAY.as_secs();
    // Saturating: exp, nbf and iat are signed but still untrusted numbers,
    // and u64::MAX must not wrap around into "expired long ago" (or panic).
    if c.exp.saturating_add(leeway) <= now_s {
        return Err(format!(
            "the token expired at {} (now {})",
            crate::util::clock::rfc3339(crate::util::clock::from_unix_secs(c.exp)),
            crate::util::clock::rfc3339(now)
        ));
    }
    if let Some(nbf) = c.nbf {
        if nbf > now_s.saturating_add(leeway) {
            return Err("the token is not valid yet (nbf is in the future)".into());
        }
    }
    if let Some(iat) = c.iat {
        if iat > now_s.saturating_add(leeway) {
            return Err("the token was issued in the future (iat); check clocks".into());
        }
    }
    let workload = Workload::from_username(&c.sub).map_err(|e| format!("token subject: {e}"))?;
    let k8s = c.kubernetes.as_ref().ok_or(
        "the token has no kubernetes.io claim; it is not a projected service-account token",
    )?;
    if k8s.namespace != workload.namespace.as_str()
        || k8s.serviceaccount.name != workload.service_account.as_str()
    {
        return Err("the token's sub does not match its kubernetes.io claim".into());
    }
    Ok(Authenticated {
        workload,
        pod_name: k8s.pod.as_ref().map(|p| p.name.clone()),
        pod_uid: k8s.pod.as_ref().map(|p| p.uid.clone()),
        method: Method::Jwks,
        expires: Some(crate::util::clock::from_unix_secs(c.exp)),
    })
}
