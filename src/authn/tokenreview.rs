//! Token validation through the Kubernetes TokenReview API.
//!
//! Owns: POSTing `authentication.k8s.io/v1` TokenReviews through kube, the
//! checks on the answer (authenticated, audience echoed, a service-account
//! username), a positive-result cache keyed by token hash, and the client-side
//! QPS/burst limit toward the API server, shared fairly between callers. What
//! the API server would refuse anyway, or what meshca must refuse whatever it
//! says, never costs a review: a token that is not a JWT, whose unverified
//! `iss` is not an accepted issuer (UNAVAILABLE instead while the API
//! server's own issuer is still being discovered), or that never expires
//! (a legacy secret-based token: the API server would not confirm it for
//! our audience anyway). Must not: keep tokens (only their SHA-256), or
//! turn an unreachable API server into a rejection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::binding::{Binding, BindingCheck, ObjectRef, Presence};
use super::issuers::Issuers;
use super::{token_hash, Authenticated, Method, Verdict, LEGACY_ISSUER};
use crate::identity::Workload;
use crate::metrics::Metrics;
use crate::util::clock::Clock;
use crate::util::ratelimit::{KeyedLimiter, TokenBucket};

/// How long a positive review is reused at most.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(300);
/// How long one review may take before the API server counts as unavailable.
pub(crate) const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
const SHARDS: usize = 16;
/// One caller (peer IP) may use at most 1/PEER_SHARE of the QPS and burst
/// toward the API server, so a caller sending junk cannot starve the rest.
pub(crate) const PEER_SHARE: u32 = 4;

/// A cached positive review: who, until when, and the service account's UID.
type Entry = (Authenticated, SystemTime, Option<String>);
type Shard = Mutex<HashMap<String, Entry>>;

/// The `kubeconfig` value that means: use the pod's own service account.
pub(crate) const IN_CLUSTER: &str = "in-cluster";

/// Reviews tokens with the API server.
pub struct TokenReviewer {
    client: kube::Client,
    clock: Arc<dyn Clock>,
    cache: Vec<Shard>,
    limiter: TokenBucket,
    peer_limiter: KeyedLimiter<Option<IpAddr>>,
    issuers: Arc<Issuers>,
    bindings: Option<Arc<dyn BindingCheck>>,
    metrics: Arc<Metrics>,
}

impl TokenReviewer {
    /// A reviewer allowing `qps` reviews per second with bursts of `burst`
    /// (each caller at most 1/[`PEER_SHARE`] of both), for tokens issued by
    /// one of `issuers`.
    pub fn new(
        client: kube::Client,
        clock: Arc<dyn Clock>,
        qps: f64,
        burst: u32,
        issuers: Arc<Issuers>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            client,
            limiter: TokenBucket::new(qps, burst, clock.clone()),
            peer_limiter: KeyedLimiter::new(
                qps / f64::from(PEER_SHARE),
                (burst / PEER_SHARE).max(1),
                clock.clone(),
            ),
            clock,
            cache: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            issuers,
            bindings: None,
        }
    }

    /// Re-checks cached answers against the binding cache: a positive
    /// review is not reused once the token's pod or service account is gone.
    pub(crate) fn set_bindings(&mut self, bindings: Arc<dyn BindingCheck>) {
        self.bindings = Some(bindings);
    }

    /// The issuers whose tokens may be reviewed (now).
    pub fn issuers(&self) -> Vec<String> {
        self.issuers.all()
    }

    /// Refuses, without a review, what must not reach the API server (or,
    /// while the API server's issuer is not discovered yet, holds back a
    /// token from an issuer it might turn out to be: UNAVAILABLE).
    /// Reading the payload unverified is safe: this can only refuse.
    fn precheck(&self, token: &str, audience: &str) -> Result<(), Verdict> {
        let refuse = |reason: &'static str, why: String| {
            self.metrics.tokenreview_refused_locally(reason);
            Err(Verdict::Rejected(why))
        };
        let Some(claims) = super::unverified_claims(token) else {
            return refuse(
                "not_jwt",
                "the token is not a JWT; Kubernetes service-account tokens are JWTs".into(),
            );
        };
        let iss = claims["iss"].as_str().unwrap_or_default();
        if iss == LEGACY_ISSUER {
            return refuse("legacy", super::legacy_refusal(audience));
        }
        if !self.issuers.accepts(iss) {
            if let Some(why) = self.issuers.pending() {
                return Err(Verdict::Unavailable(format!(
                    "the token's issuer {:?} is not accepted yet: the API server's service-account issuer is still being discovered ({why}); retry shortly",
                    super::clip(iss)
                )));
            }
            return refuse(
                "issuer",
                format!(
                    "the token's issuer {:?} is not one this CA accepts (setting jwt_issuers, or the API server's own issuer)",
                    super::clip(iss)
                ),
            );
        }
        if claims["exp"].as_u64().is_none() {
            return refuse(
                "legacy",
                "the token never expires (no exp claim); use a projected service-account token"
                    .into(),
            );
        }
        Ok(())
    }

    /// Takes one review from the caller's share, then from the global budget.
    fn take_budget(&self, peer: Option<IpAddr>) -> Result<(), Verdict> {
        if !self.peer_limiter.try_take(&peer) {
            self.metrics.tokenreview_throttled("peer");
            return Err(Verdict::Unavailable(
                "this caller's share of the TokenReview budget is spent; retry shortly".into(),
            ));
        }
        if !self.limiter.try_take() {
            self.metrics.tokenreview_throttled("global");
            return Err(Verdict::Unavailable(
                "the TokenReview rate limit toward the API server is reached; retry shortly".into(),
            ));
        }
        Ok(())
    }

    /// A cached positive answer, unless its pod or service account is gone
    /// (when the binding cache is synced; otherwise the answer stands, as
    /// the API server checked them when it reviewed).
    fn cached_verdict(&self, entry: &Entry) -> Verdict {
        let (a, _, sa_uid) = entry;
        if let Some(b) = &self.bindings {
            let binding = Binding {
                namespace: a.workload.namespace.as_str(),
                service_account: sa_uid.as_deref().map(|uid| ObjectRef {
                    name: a.workload.service_account.as_str(),
                    uid,
                }),
                pod: match (&a.pod_name, &a.pod_uid) {
                    (Some(name), Some(uid)) => Some(ObjectRef { name, uid }),
                    _ => None,
                },
            };
            // Counted by the binding cache (`token_binding_refusals`).
            if let Presence::Gone { why, .. } = b.check(&binding) {
                return Verdict::Rejected(why);
            }
        }
        Verdict::Authenticated(a.clone())
    }

    /// Builds a kube client from a kubeconfig file.
    pub async fn client_from_kubeconfig(path: &std::path::Path) -> Result<kube::Client, String> {
        if path.as_os_str() == IN_CLUSTER {
            // The pod's service account: token, CA and API server address
            // from the standard mounts and environment.
            let cfg = kube::Config::incluster().map_err(|e| {
                format!("in-cluster configuration: {e} (is this running in a pod?)")
            })?;
            return kube::Client::try_from(cfg).map_err(|e| format!("kube client: {e}"));
        }
        let kc = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
        kube::Client::try_from(cfg).map_err(|e| format!("kube client: {e}"))
    }

    fn shard(&self, key: &str) -> &Shard {
        let i = usize::from_str_radix(&key[..2], 16).unwrap_or(0) % SHARDS;
        &self.cache[i]
    }

    /// Reviews `token` for `audience`, on behalf of the caller at `peer`.
    pub async fn review(&self, token: &str, audience: &str, peer: Option<IpAddr>) -> Verdict {
        if let Err(v) = self.precheck(token, audience) {
            return v;
        }
        let now = self.clock.now();
        let key = format!("{}:{}", token_hash(token), audience);
        {
            let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
            match shard.get(&key) {
                Some(e) if e.1 > now => return self.cached_verdict(e),
                Some(_) => {
                    shard.remove(&key);
                }
                None => {}
            }
        }
        if let Err(v) = self.take_budget(peer) {
            return v;
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let started = std::time::Instant::now();
        let res =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review)).await;
        self.metrics.observe_tokenreview(started.elapsed());
        let answer = match res {
            Err(_) => {
                return Verdict::Unavailable(format!(
                    "the Kubernetes API server did not answer the TokenReview within {}s",
                    REVIEW_TIMEOUT.as_secs()
                ))
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 400 || s.code == 422 => {
                return Verdict::Rejected(format!("TokenReview refused the token: {}", s.message))
            }
            Ok(Err(kube::Error::Api(s))) => {
                return Verdict::Unavailable(format!(
                    "TokenReview failed with HTTP {} ({}); check the CA's RBAC and the API server",
                    s.code, s.message
                ))
            }
            Ok(Err(e)) => {
                return Verdict::Unavailable(format!("cannot reach the Kubernetes API server: {e}"))
            }
            Ok(Ok(r)) => r,
        };
        let mut verdict = interpret(&answer, audience);
        let sa_uid = answer
            .status
            .as_ref()
            .and_then(|s| s.user.as_ref())
            .and_then(|u| u.uid.clone());
        if let Verdict::Authenticated(a) = &mut verdict {
            // Never cache past the token's own expiry. Reading `exp` without
            // verification is safe here: it can only shorten the cache life.
            a.expires = unverified_exp(token);
            let until = now + CACHE_TTL;
            let until = a.expires.map_or(until, |e| e.min(until));
            let mut shard = self.shard(&key).lock().unwrap_or_else(|e| e.into_inner());
            if shard.len() > 10_000 {
                shard.retain(|_, (_, u, _)| *u > now);
            }
            shard.insert(key, (a.clone(), until, sa_uid));
        }
        verdict
    }
}

/// The `exp` claim of a JWT, unverified (None for opaque tokens).
fn unverified_exp(token: &str) -> Option<SystemTime> {
    let exp = super::unverified_claims(token)?["exp"].as_u64()?;
    Some(crate::util::clock::from_unix_secs(exp))
}

/// Decides from a TokenReview answer.
fn interpret(review: &TokenReview, audience: &str) -> Verdict {
    let Some(status) = &review.status else {
        return Verdict::Unavailable("TokenReview answer has no status".into());
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into());
        return Verdict::Rejected(format!(
            "the API server did not authenticate the token: {why}"
        ));
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Verdict::Rejected(format!("the token is not valid for audience {audience:?}"));
    }
    let Some(user) = &status.user else {
        return Verdict::Rejected("TokenReview returned no user".into());
    };
    let username = user.username.clone().unwrap_or_default();
    let workload = match Workload::from_username(&username) {
        Ok(w) => w,
        Err(e) => return Verdict::Rejected(format!("not a service-account token: {e}")),
    };
    let extra = |k: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(k))
            .and_then(|v| v.first().cloned())
    };
    Verdict::Authenticated(Authenticated {
        workload,
        pod_name: extra("authentication.kubernetes.io/pod-name"),
        pod_uid: extra("authentication.kubernetes.io/pod-uid"),
        method: Method::TokenReview,
        expires: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn review(authenticated: bool, audiences: &[&str], username: &str) -> TokenReview {
        TokenReview {
            status: Some(TokenReviewStatus {
                authenticated: Some(authenticated),
                audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    extra: Some(
                        [(
                            "authentication.kubernetes.io/pod-name".to_string(),
                            vec!["web-1".to_string()],
                        )]
                        .into(),
                    ),
                    ..Default::default()
                }),
                error: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn answers_are_checked() {
        match interpret(
            &review(true, &["meshca"], "system:serviceaccount:shop:web"),
            "meshca",
        ) {
            Verdict::Authenticated(a) => {
                assert_eq!(a.workload.to_string(), "shop/web");
                assert_eq!(a.pod_name.as_deref(), Some("web-1"));
            }
            other => panic!("{other:?}"),
        }
        for (r, why) in [
            (
                review(false, &["meshca"], "system:serviceaccount:shop:web"),
                "not authenticated",
            ),
            (
                review(true, &["other"], "system:serviceaccount:shop:web"),
                "audience not echoed",
            ),
            (review(true, &["meshca"], "alice"), "not a service account"),
        ] {
            assert!(
                matches!(interpret(&r, "meshca"), Verdict::Rejected(_)),
                "{why}"
            );
        }
        assert!(matches!(
            interpret(&TokenReview::default(), "meshca"),
            Verdict::Unavailable(_)
        ));
    }

    #[test]
    fn cache_life_is_bounded_by_token_expiry() {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let t = format!("{}.{}.sig", b.encode(b"{}"), b.encode(br#"{"exp": 1000}"#));
        assert_eq!(
            unverified_exp(&t),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000))
        );
        assert_eq!(unverified_exp("opaque"), None);
    }

    #[tokio::test]
    async fn in_cluster_is_a_mode_not_a_file_name() {
        // Outside a pod the in-cluster configuration is missing, and the
        // error says which mode was tried (not "file not found").
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return; // really in a pod: nothing to check here
        }
        let Err(e) = TokenReviewer::client_from_kubeconfig(std::path::Path::new(IN_CLUSTER)).await
        else {
            panic!("no in-cluster configuration outside a pod");
        };
        assert!(e.contains("in-cluster configuration"), "{e}");
    }
}

/// Property tests of what meshca reads from a TokenReview answer and from
/// the token itself on this path (issue 11, part 8).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        ProptestConfig::with_cases(cases)
    }

    fn jwt_with_exp(exp: &serde_json::Value) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = serde_json::json!({ "exp": exp });
        format!("e30.{}.sig", b64.encode(claims.to_string()))
    }

    proptest! {
        #![proptest_config(config())]

        /// The unverified `exp` only ever shortens the cache life; whatever
        /// it says (u64::MAX, far past the year 9999) it must not panic.
        #[test]
        fn unverified_exp_is_total(exp in prop_oneof![any::<u64>(), Just(u64::MAX), Just(1u64 << 63)]) {
            let t = jwt_with_exp(&serde_json::json!(exp));
            let got = unverified_exp(&t);
            prop_assert!(got.is_some());
            prop_assert!(got <= Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp.min(253_402_300_799))));
        }

        /// Arbitrary TokenReview answers (as JSON from the API server):
        /// authenticated only when the answer says so, for the audience,
        /// with a service-account user.
        #[test]
        fn tokenreview_answers(
            authenticated in prop::option::of(any::<bool>()),
            audiences in prop::option::of(prop::collection::vec(prop_oneof![Just("meshca".to_string()), ".{0,12}"], 0..3)),
            username in prop_oneof![
                Just("system:serviceaccount:shop:web".to_string()),
                "system:serviceaccount:.{0,20}",
                ".{0,40}",
            ],
            extra in prop::collection::btree_map(".{0,40}", prop::collection::vec(".{0,20}", 0..3), 0..3),
            error in prop::option::of(".{0,40}"),
        ) {
            let answer = serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {},
                "status": {
                    "authenticated": authenticated, "audiences": audiences, "error": error,
                    "user": { "username": username, "extra": extra },
                }
            });
            let review: TokenReview = serde_json::from_value(answer).expect("shape");
            match interpret(&review, "meshca") {
                Verdict::Authenticated(a) => {
                    prop_assert_eq!(authenticated, Some(true));
                    prop_assert!(audiences.unwrap_or_default().iter().any(|a| a == "meshca"));
                    prop_assert_eq!(a.workload.username(), username);
                }
                Verdict::Rejected(why) => prop_assert!(!why.is_empty()),
                other => prop_assert!(false, "{other:?}"),
            }
        }
    }
}
