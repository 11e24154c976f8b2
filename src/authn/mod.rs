//! Authentication: turns a bearer token into a verified workload identity.
//!
//! Owns: the ordered chain of token sources (local JWKS verification first,
//! TokenReview for what JWKS cannot decide) and the fail-closed rule: a token
//! passes only when a source positively authenticates it; when no source can
//! decide because a backend is down, the answer is [`AuthnError::Unavailable`]
//! (clients retry), never a pass and never a false "bad token". Must not:
//! build gRPC statuses (see `api::status`) or store tokens (only hashes).

pub(crate) mod binding;
pub mod devtoken;
pub mod fetch;
pub mod issuers;
pub mod jwt;
pub(crate) mod renewal;
pub mod settings;
pub mod tokenreview;

use std::time::SystemTime;

use crate::identity::Workload;

/// The issuer of legacy secret-based service-account tokens.
pub(crate) const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// Why a legacy secret-based token is refused, wherever it is seen: the
/// API server authenticates those tokens only for its own audiences, so
/// TokenReview can never confirm one for `audience` (the reason the former
/// `allow_legacy_tokens` setting could not work).
pub(crate) fn legacy_refusal(audience: &str) -> String {
    format!(
        "legacy secret-based service-account tokens (iss {LEGACY_ISSUER:?}) are refused: the API server grants them only its own audiences, never {audience:?}; mount a projected service-account token with audience {audience:?}"
    )
}

/// The largest token accepted, in bytes.
pub(crate) const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How a caller was authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// JWT verified locally against a JWKS.
    Jwks,
    /// JWT verified with the development signer of `meshca token`.
    DevKey,
    /// Kubernetes TokenReview.
    TokenReview,
    /// A still-valid meshca client certificate (mTLS renewal).
    Certificate,
}

impl Method {
    /// Label used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Jwks => "jwks",
            Method::DevKey => "dev_key",
            Method::TokenReview => "token_review",
            Method::Certificate => "certificate",
        }
    }
}

/// A positively authenticated caller.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The service account.
    pub workload: Workload,
    /// The pod the token is bound to, when known.
    pub pod_name: Option<String>,
    /// The pod UID, when known.
    pub pod_uid: Option<String>,
    /// How it was authenticated.
    pub method: Method,
    /// When the credential stops being valid, when known.
    pub expires: Option<SystemTime>,
}

/// One source's answer.
#[derive(Debug)]
pub enum Verdict {
    /// The token is good.
    Authenticated(Authenticated),
    /// The token is definitely bad.
    Rejected(String),
    /// This source cannot tell (not its issuer, unknown key…); ask the next.
    Undecided(String),
    /// This source's backend is unreachable.
    Unavailable(String),
}

/// Why authentication failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthnError {
    /// No token was presented.
    #[error("no credential: send a Kubernetes service-account token (or, on meshca.v1.Identity Certify and MintJWTSVID only, present a still-valid meshca client certificate over mTLS and no token)")]
    Missing,
    /// The token is larger than [`MAX_TOKEN_BYTES`].
    #[error("token is {0} bytes, more than the 16384-byte limit")]
    TooLarge(usize),
    /// The token is bad.
    #[error("token rejected: {0}")]
    Invalid(String),
    /// No source could decide because a backend is down.
    #[error("cannot validate the token right now: {0}")]
    Unavailable(String),
}

/// A token source in the chain.
pub enum Source {
    /// Local verification.
    Jwks(std::sync::Arc<jwt::JwksVerifier>),
    /// Kubernetes TokenReview (boxed: it carries its caches and limiters).
    TokenReview(Box<tokenreview::TokenReviewer>),
}

impl Source {
    /// Name for logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Source::Jwks(j) => format!("JWKS (issuers {:?})", j.issuers()),
            Source::TokenReview(_) => "TokenReview".into(),
        }
    }
}

/// The ordered chain of token sources.
pub struct Authenticator {
    sources: Vec<Source>,
    bindings: Option<std::sync::Arc<dyn binding::BindingCheck>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.sources.iter().map(Source::describe).collect();
        f.debug_struct("Authenticator")
            .field("sources", &names)
            .finish()
    }
}

impl Authenticator {
    /// A chain tried in the given order.
    pub fn new(sources: Vec<Source>) -> Self {
        Self {
            sources,
            bindings: None,
        }
    }

    /// Makes every Kubernetes token source refuse tokens whose pod or
    /// service account no longer exists, as `bindings` (an in-memory cache)
    /// says. The development signer is left alone: its tokens name no
    /// real objects.
    pub(crate) fn with_bindings(
        mut self,
        bindings: std::sync::Arc<dyn binding::BindingCheck>,
    ) -> Self {
        for s in &mut self.sources {
            match s {
                Source::Jwks(j) if j.method() == Method::Jwks => j.set_bindings(bindings.clone()),
                Source::Jwks(_) => {}
                Source::TokenReview(t) => t.set_bindings(bindings.clone()),
            }
        }
        self.bindings = Some(bindings);
        self
    }

    /// The JWKS verifiers whose keys come from a URL (for periodic refresh).
    pub(crate) fn remote_jwks(&self) -> Vec<std::sync::Arc<jwt::JwksVerifier>> {
        self.sources
            .iter()
            .filter_map(|s| match s {
                Source::Jwks(j) if j.is_remote() => Some(j.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether some source can decide on a token now: a JWKS with keys
    /// loaded, or TokenReview (asked per request; an API-server outage shows
    /// as UNAVAILABLE answers and in the metrics, not here, so that an outage
    /// does not take every replica out of its Service at once). The error
    /// says what is missing.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        let mut why = Vec::new();
        let has_review = self
            .sources
            .iter()
            .any(|s| matches!(s, Source::TokenReview(_)));
        if let Some(b) = &self.bindings {
            // Without TokenReview to fall back on, a token cannot pass until
            // the pod/service-account watch has synced.
            if !has_review && !b.is_synced() {
                return Err("token validation unavailable: the pod and service-account watch (watch_token_bindings) has not synced with the Kubernetes API server".into());
            }
        }
        for s in &self.sources {
            match s {
                Source::TokenReview(_) => return Ok(()),
                Source::Jwks(j) if j.key_count() > 0 => return Ok(()),
                Source::Jwks(_) => why.push(format!(
                    "{} has no keys loaded (fetch failing?)",
                    s.describe()
                )),
            }
        }
        Err(format!("token validation unavailable: {}", why.join("; ")))
    }

    /// Names of the sources, in order.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.sources.iter().map(Source::describe).collect()
    }

    /// Authenticates `token` for `audience` (caller unknown: it shares one
    /// TokenReview budget with every other unknown caller).
    pub async fn authenticate(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<Authenticated, AuthnError> {
        self.authenticate_from(token, audience, None).await
    }

    /// Authenticates `token` for `audience` for the caller at `peer` (whose
    /// fair share of the TokenReview budget it uses).
    pub(crate) async fn authenticate_from(
        &self,
        token: &str,
        audience: &str,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Authenticated, AuthnError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthnError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthnError::TooLarge(token.len()));
        }
        let mut undecided = Vec::new();
        let mut unavailable = Vec::new();
        for source in &self.sources {
            let verdict = match source {
                Source::Jwks(j) => j.verify(token, audience).await,
                Source::TokenReview(t) => t.review(token, audience, peer).await,
            };
            match verdict {
                Verdict::Authenticated(a) => return Ok(a),
                Verdict::Rejected(why) => return Err(AuthnError::Invalid(why)),
                Verdict::Undecided(why) => undecided.push(why),
                Verdict::Unavailable(why) => unavailable.push(why),
            }
        }
        if !unavailable.is_empty() {
            return Err(AuthnError::Unavailable(unavailable.join("; ")));
        }
        if undecided.is_empty() {
            undecided.push("no token source is configured".into());
        }
        Err(AuthnError::Invalid(undecided.join("; ")))
    }
}

/// The JWT payload, decoded but NOT verified. Only for routing or bounding
/// decisions that cannot widen access (which verifier to ask, how long to
/// cache, which identity to claim before the CA checks it).
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// At most 128 bytes of an untrusted string (cut at a character boundary),
/// marked when cut, for error messages that echo it.
pub(crate) fn clip(s: &str) -> String {
    if s.len() <= 128 {
        return s.to_string();
    }
    let mut end = 128;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(truncated)", &s[..end])
}

/// SHA-256 of a token, hex: the only form in which a token is ever kept.
pub(crate) fn token_hash(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_untrusted_strings_at_128_bytes_on_a_char_boundary() {
        assert_eq!(clip("https://issuer"), "https://issuer");
        let long = "é".repeat(200); // 2 bytes each
        let c = clip(&long);
        assert!(c.ends_with("…(truncated)"), "{c}");
        assert_eq!(c.trim_end_matches("…(truncated)").len(), 128);
        let odd = format!("a{}", "é".repeat(100));
        assert_eq!(clip(&odd).trim_end_matches("…(truncated)").len(), 127);
    }
}
