//! The probes: `/live` (the process answers) and `/ready` (this replica
//! can issue). Readiness is a pure function of what was observed, so each
//! reason to take a replica out of its Service is tested without a server.
//!
//! Must not: observe anything itself (the router gathers the inputs).

use std::time::SystemTime;

use axum::http::StatusCode;

/// What `/ready` decides on, gathered at request time.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Why the audit log cannot write (None: it can, or it is off).
    pub audit_problem: Option<String>,
    /// The CA's clock.
    pub now: SystemTime,
    /// The active issuer's fingerprint (hex).
    pub issuer_fingerprint: String,
    /// When the active issuer expires.
    pub issuer_not_after: SystemTime,
    /// Whether some token source can decide now, and if not, why.
    pub authn: Result<(), String>,
}

/// Whether this replica is ready, and the probe's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Certificates can be issued.
    Ready,
    /// Not: the sentence says why and what to do.
    NotReady(String),
}

impl Readiness {
    /// The HTTP answer: 200 `ready`, or 503 with the reason.
    pub fn response(&self) -> (StatusCode, String) {
        match self {
            Readiness::Ready => (StatusCode::OK, "ready\n".to_string()),
            Readiness::NotReady(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        }
    }
}

/// The `/ready` decision, most fundamental reason first.
pub fn readiness(o: &Observed) -> Readiness {
    // Without a writable audit log every certificate is withheld: take
    // this replica out of rotation, say why.
    if let Some(p) = &o.audit_problem {
        return Readiness::NotReady(format!("not ready: the audit log cannot write ({p}); certificates are refused with UNAVAILABLE until it can: free space on the data volume (docs/audit.md, \"Sizing\")"));
    }
    if o.issuer_not_after <= o.now {
        let short = o
            .issuer_fingerprint
            .get(..16)
            .unwrap_or(&o.issuer_fingerprint);
        return Readiness::NotReady(format!(
            "not ready: issuer {short} expired at {}; see `meshca rotation status`",
            crate::util::clock::rfc3339(o.issuer_not_after)
        ));
    }
    // Keys are loaded; can a token be checked?
    match &o.authn {
        Ok(()) => Readiness::Ready,
        Err(e) => Readiness::NotReady(format!("not ready: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn healthy() -> Observed {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Observed {
            audit_problem: None,
            now,
            issuer_fingerprint: "0123456789abcdef0123456789abcdef".into(),
            issuer_not_after: now + Duration::from_secs(3600),
            authn: Ok(()),
        }
    }

    #[test]
    fn a_healthy_replica_is_ready() {
        let r = readiness(&healthy());
        assert_eq!(r, Readiness::Ready);
        assert_eq!(r.response(), (StatusCode::OK, "ready\n".to_string()));
    }

    #[test]
    fn an_audit_log_that_cannot_write_takes_the_replica_out_first() {
        let mut o = healthy();
        o.audit_problem = Some("disk full".into());
        // Even with an expired issuer and no token source, the audit log is
        // the reason given: it is what the operator must fix first.
        o.issuer_not_after = o.now;
        o.authn = Err("token validation unavailable: x".into());
        let (code, body) = readiness(&o).response();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.starts_with("not ready: the audit log cannot write (disk full); "),
            "{body}"
        );
        assert!(body.ends_with("\"Sizing\")\n"), "{body}");
    }

    #[test]
    fn an_expired_issuer_is_not_ready_and_names_it() {
        let mut o = healthy();
        // Expiry is inclusive: at not_after the issuer no longer signs.
        o.issuer_not_after = o.now;
        o.authn = Err("token validation unavailable: x".into());
        let (code, body) = readiness(&o).response();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            format!(
                "not ready: issuer 0123456789abcdef expired at {}; see `meshca rotation status`\n",
                crate::util::clock::rfc3339(o.now)
            )
        );
    }

    #[test]
    fn no_usable_token_source_is_not_ready_with_the_reason() {
        let mut o = healthy();
        o.authn = Err("token validation unavailable: jwks has no keys loaded".into());
        assert_eq!(
            readiness(&o),
            Readiness::NotReady(
                "not ready: token validation unavailable: jwks has no keys loaded".into()
            )
        );
    }
}
