//! The JWT-SVID pipeline: authenticate → deny list → rate limit → mint,
//! then one audit entry (kind `jwt_svid`), one log line and one metric per
//! decision — the same steps, and the same checks, as certificate issuance
//! (`Core::certify`). Must not: sign anything itself (see `ca::jwt`), or
//! record the token anywhere.

use std::net::SocketAddr;
use std::time::Duration;

use super::{ApiError, Core, Credential, Provenance, WireApi};
use crate::authn::Authenticated;
use crate::ca::jwt::MintedJwt;

/// One JWT-SVID request.
#[derive(Debug)]
pub struct MintInput<'a> {
    /// The API it came through.
    pub api: WireApi,
    /// The credential.
    pub credential: Credential<'a>,
    /// The `aud` values asked for.
    pub audiences: &'a [String],
    /// Requested lifetime.
    pub ttl: Option<Duration>,
    /// The caller's address.
    pub peer: Option<SocketAddr>,
}

impl Core {
    /// Mints a JWT-SVID for the authenticated caller's own SPIFFE ID, and
    /// records the decision whatever the outcome. A grant is returned only
    /// once its audit entry is durable.
    pub async fn mint_jwt_svid(&self, input: MintInput<'_>) -> Result<MintedJwt, ApiError> {
        let _guard = self.metrics.in_flight();
        let mut who: Option<Authenticated> = None;
        let mut provenance: Option<Provenance> = None;
        let mut result = self.mint_inner(&input, &mut who, &mut provenance).await;
        let now = self.ca.clock().now();
        self.record_decision(
            |r| audit_entry(&input, who.as_ref(), r, now),
            provenance.as_ref(),
            &mut result,
        )
        .await;
        self.log_mint(&input, who.as_ref(), &result);
        result
    }

    async fn mint_inner(
        &self,
        input: &MintInput<'_>,
        who: &mut Option<Authenticated>,
        provenance: &mut Option<Provenance>,
    ) -> Result<MintedJwt, ApiError> {
        let a = self
            .authenticate(input.api, &input.credential, input.peer, provenance)
            .await?;
        *who = Some(a.clone());
        self.check_denied(&a.workload)?;
        self.rate_limit(&a, input.peer)?;
        // An ES256 signature is tens of µs of CPU and no I/O: inline, like
        // certificate signing.
        Ok(self.ca.mint_jwt(&a.workload, input.audiences, input.ttl)?)
    }

    /// The metric and the one log line of a decision (never the token).
    fn log_mint(
        &self,
        input: &MintInput<'_>,
        who: Option<&Authenticated>,
        result: &Result<MintedJwt, ApiError>,
    ) {
        let identity = who
            .map(|a| a.workload.to_string())
            .unwrap_or_else(|| "-".into());
        let method = who.map(|a| a.method.as_str()).unwrap_or("-");
        let peer = input
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into());
        match result {
            Ok(m) => {
                self.metrics.jwt_svid(input.api.as_str(), true, "ok");
                tracing::info!(
                    target: "meshca::issuance",
                    api = input.api.as_str(),
                    identity = %identity,
                    spiffe_id = %m.spiffe_id,
                    method,
                    peer = %peer,
                    audiences = ?m.audiences,
                    kid = %m.key_id,
                    expires_at = %crate::util::clock::rfc3339(m.expires_at),
                    result = "granted",
                    reason = "ok",
                    "JWT-SVID minted"
                );
            }
            Err(e) => {
                self.metrics.jwt_svid(input.api.as_str(), false, e.reason());
                tracing::info!(
                    target: "meshca::issuance",
                    api = input.api.as_str(),
                    identity = %identity,
                    method,
                    peer = %peer,
                    result = "refused",
                    reason = e.reason(),
                    detail = %crate::audit::intake::bound_detail(&e.to_string()),
                    "JWT-SVID refused"
                );
            }
        }
    }
}

/// The audit record of one JWT-SVID decision: who, for which audiences,
/// signed with which key, until when — never the token.
fn audit_entry(
    input: &MintInput<'_>,
    who: Option<&Authenticated>,
    result: &Result<MintedJwt, ApiError>,
    now: std::time::SystemTime,
) -> crate::audit::Entry {
    use crate::util::clock::rfc3339;
    let mut e = super::decision_entry("jwt_svid", input.api, who, input.peer, input.ttl, now);
    match result {
        Ok(m) => {
            e.result = "granted".into();
            e.reason = "ok".into();
            e.subject = Some(m.spiffe_id.to_string());
            e.audiences = m.audiences.clone();
            e.key_id = Some(m.key_id.clone());
            e.not_before = Some(rfc3339(m.issued_at));
            e.not_after = Some(rfc3339(m.expires_at));
            e.root_fingerprint = Some(m.root_fingerprint.clone());
        }
        Err(err) => super::mark_refused(&mut e, err),
    }
    e
}
