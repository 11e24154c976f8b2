//! Finding the CA among its replicas.
//!
//! Owns: turning the configured address list (`host:port[,host:port…]`)
//! into socket addresses — re-resolved on every use, since a headless
//! Service's records change as replicas come and go — in a random order
//! that spreads load, and trying them in turn until one answers (failover).
//! Must not: know what is asked of the CA.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rand::seq::SliceRandom;

use super::AgentError;

/// How long one endpoint may take before the next is tried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The configured CA addresses.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    targets: Vec<String>,
}

impl Endpoints {
    /// Parses `host:port[,host:port…]`.
    pub(crate) fn parse(spec: &str) -> Result<Self, AgentError> {
        let targets: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        if targets.is_empty() {
            return Err(AgentError::BadAddress(
                "the CA address is empty: give host:port".into(),
            ));
        }
        for t in &targets {
            if t.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(AgentError::BadAddress(format!(
                    "CA address {t:?} is not host:port"
                )));
            }
        }
        Ok(Self { targets })
    }

    /// Resolves every target now, in a random order without duplicates.
    pub(crate) async fn resolve(&self) -> Result<Vec<SocketAddr>, AgentError> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for t in &self.targets {
            match tokio::net::lookup_host(t).await {
                Ok(addrs) => {
                    for a in addrs {
                        if !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(e) => errors.push(format!("{t}: {e}")),
            }
        }
        if out.is_empty() {
            return Err(AgentError::Unresolved(errors.join("; ")));
        }
        out.shuffle(&mut rand::rng());
        Ok(out)
    }

    /// Runs `attempt` against each resolved address in turn; the first
    /// success wins. Fails with every address's error.
    pub(crate) async fn first_answer<T, F, Fut>(&self, attempt: F) -> Result<T, AgentError>
    where
        F: Fn(SocketAddr) -> Fut,
        Fut: Future<Output = Result<T, AgentError>>,
    {
        let addrs = self.resolve().await?;
        let mut errors = Vec::new();
        for a in addrs {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(a)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => errors.push((a, e)),
                Err(_) => errors.push((a, AgentError::Timeout(ATTEMPT_TIMEOUT.as_secs()))),
            }
        }
        Err(AgentError::AllFailed(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_name_a_port() {
        for bad in ["", "meshca.svc", "meshca.svc:80,10.0.0.1:x"] {
            assert!(
                matches!(Endpoints::parse(bad), Err(AgentError::BadAddress(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            Endpoints::parse(" a:1 , b:2 ").unwrap().targets,
            ["a:1", "b:2"]
        );
    }

    #[tokio::test]
    async fn fails_over_to_the_replica_that_answers_and_spreads_load() {
        let e = Endpoints::parse("127.0.0.1:1001,127.0.0.1:1002,127.0.0.1:1003").unwrap();
        let mut first_tried = std::collections::HashSet::new();
        for _ in 0..40 {
            let tried = std::sync::Mutex::new(Vec::new());
            let r = e
                .first_answer(|a| {
                    tried.lock().unwrap().push(a.port());
                    async move {
                        if a.port() == 1002 {
                            Ok(a.port())
                        } else {
                            Err(AgentError::StreamClosed)
                        }
                    }
                })
                .await;
            assert_eq!(r.unwrap(), 1002, "the live replica answers");
            first_tried.insert(tried.lock().unwrap()[0]);
        }
        assert_eq!(
            first_tried.len(),
            3,
            "every replica is tried first sometimes"
        );
        let e = Endpoints::parse("127.0.0.1:1001").unwrap();
        let err = e
            .first_answer(|_| async {
                Err::<(), _>(AgentError::Ca {
                    code: tonic::Code::Unavailable,
                    message: "refused".into(),
                })
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("127.0.0.1:1001: Unavailable: refused"),
            "{err}"
        );
        assert!(matches!(err, AgentError::AllFailed(v) if v.len() == 1));
    }
}
