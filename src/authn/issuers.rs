//! The token issuers a source accepts: the configured ones (`jwt_issuers`)
//! plus, when the API server is asked, the issuer it announces at
//! `/.well-known/openid-configuration` (on EKS, GKE and AKS that is not the
//! in-cluster default).
//!
//! Owns: the shared issuer set the JWKS verifier and TokenReview read on
//! every request (lock-free), and the discovery loop that asks the API
//! server until it answers, with exponential backoff, so a failed first
//! discovery heals without a restart. Must not: decide on tokens, or read
//! an issuer from anything but the API server's discovery document.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::util::backoff::Backoff;

/// The first pause between two failed discoveries; it doubles up to
/// [`DISCOVERY_BACKOFF_MAX`], each wait drawn from `[d/2, d)`
/// (`util::backoff`).
pub(crate) const DISCOVERY_BACKOFF_START: Duration = Duration::from_secs(1);
/// The longest pause between two discovery attempts.
pub(crate) const DISCOVERY_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long one discovery attempt may take.
pub(crate) const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The accepted issuers of one token source.
#[derive(Debug)]
pub struct Issuers {
    configured: Vec<String>,
    discovered: ArcSwapOption<String>,
    /// While discovery has not succeeded: why its last attempt failed.
    pending: ArcSwapOption<String>,
}

impl Issuers {
    /// A fixed set: nothing is discovered.
    pub fn fixed(configured: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            configured,
            discovered: ArcSwapOption::empty(),
            pending: ArcSwapOption::empty(),
        })
    }

    /// The configured set, to which the API server's issuer is added once
    /// discovered. Until then [`Issuers::pending`] says why it is not known.
    pub fn discovering(configured: Vec<String>) -> Arc<Self> {
        let s = Self::fixed(configured);
        s.pending
            .store(Some(Arc::new("issuer discovery has not run yet".into())));
        s
    }

    /// Whether `iss` is accepted.
    pub fn accepts(&self, iss: &str) -> bool {
        self.configured.iter().any(|i| i == iss)
            || self.discovered.load().as_deref().is_some_and(|d| d == iss)
    }

    /// Every accepted issuer.
    pub fn all(&self) -> Vec<String> {
        let mut v = self.configured.clone();
        if let Some(d) = self.discovered.load_full() {
            if !v.contains(&d) {
                v.push((*d).clone());
            }
        }
        v
    }

    /// While the API server's issuer is still unknown (discovery is being
    /// retried): why the last attempt failed. A token from an issuer not
    /// accepted *yet* must then get UNAVAILABLE (retry), not a rejection.
    pub fn pending(&self) -> Option<String> {
        self.pending.load_full().map(|p| (*p).clone())
    }

    fn found(&self, iss: String) {
        self.discovered.store(Some(Arc::new(iss)));
        self.pending.store(None);
    }

    fn failed(&self, why: String) {
        self.pending.store(Some(Arc::new(why)));
    }

    /// One discovery attempt, bounded by [`DISCOVERY_TIMEOUT`]; Ok once the
    /// issuer is known.
    pub(crate) async fn discover_once<F, Fut>(&self, fetch: &F) -> Result<String, String>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<String, String>>,
    {
        let r = match tokio::time::timeout(DISCOVERY_TIMEOUT, fetch()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {}s", DISCOVERY_TIMEOUT.as_secs())),
        };
        match &r {
            Ok(iss) => self.found(iss.clone()),
            Err(e) => self.failed(e.clone()),
        }
        r
    }
}

/// Retries discovery in the background until it succeeds (after a first
/// attempt has failed). Stops early when every user of `issuers` is gone.
pub(crate) fn retry_in_background<F, Fut>(issuers: &Arc<Issuers>, fetch: F)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send,
{
    let backoff = Backoff::new(DISCOVERY_BACKOFF_START, DISCOVERY_BACKOFF_MAX).with_jitter();
    retry_with(issuers, fetch, backoff);
}

/// [`retry_in_background`] paced by `backoff`.
fn retry_with<F, Fut>(issuers: &Arc<Issuers>, fetch: F, mut backoff: Backoff)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send,
{
    let weak: Weak<Issuers> = Arc::downgrade(issuers);
    tokio::spawn(async move {
        let mut attempts = 1u32;
        loop {
            tokio::time::sleep(backoff.next_wait()).await;
            let Some(issuers) = weak.upgrade() else {
                return;
            };
            attempts = attempts.saturating_add(1);
            match issuers.discover_once(&fetch).await {
                Ok(iss) => {
                    tracing::info!(issuer = %iss, attempts, "Kubernetes service-account issuer discovered after retrying");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempts, "Kubernetes service-account issuer discovery failed again; retrying with backoff");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_discovered_issuer_is_accepted_and_ends_pending() {
        let i = Issuers::discovering(vec!["https://configured".into()]);
        assert!(i.pending().is_some());
        assert!(!i.accepts("https://oidc.eks.example/id/1"));
        let fail = || async { Err::<String, _>("HTTP 503".to_string()) };
        assert!(i.discover_once(&fail).await.is_err());
        assert_eq!(i.pending().as_deref(), Some("HTTP 503"));
        let ok = || async { Ok::<_, String>("https://oidc.eks.example/id/1".to_string()) };
        i.discover_once(&ok).await.unwrap();
        assert!(i.accepts("https://oidc.eks.example/id/1"));
        assert!(i.accepts("https://configured"));
        assert!(!i.accepts("https://other"));
        assert_eq!(i.pending(), None);
        assert_eq!(i.all().len(), 2);
        let fixed = Issuers::fixed(vec!["a".into()]);
        assert_eq!(fixed.pending(), None);
    }

    fn quick() -> Backoff {
        Backoff::new(Duration::from_millis(5), Duration::from_millis(20))
    }

    #[tokio::test]
    async fn the_background_retry_keeps_asking_until_it_succeeds() {
        let i = Issuers::discovering(vec![]);
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        let fetch = move || {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 4 {
                    Err(format!("attempt {n} failed"))
                } else {
                    Ok("https://found".to_string())
                }
            }
        };
        retry_with(&i, fetch, quick());
        for _ in 0..200 {
            if i.pending().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(i.accepts("https://found"));
        assert_eq!(i.pending(), None);
        // Five attempts; none after the success.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn the_retry_stops_when_its_users_are_gone() {
        let i = Issuers::discovering(vec![]);
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        let fetch = move || {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err::<String, _>("down".to_string()) }
        };
        retry_with(&i, fetch, quick());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        drop(i);
        tokio::time::sleep(Duration::from_millis(40)).await;
        let n = calls.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), n);
    }
}
