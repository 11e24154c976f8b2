//! Who may use the admin endpoint.
//!
//! Owns: the split between the open routes that probes and Prometheus need
//! (`/metrics`, `/live`, `/ready`) and the operator/auditor routes
//! (`/rotation/*`, `/audit/*`, revocation), which need the bearer admin token
//! for every method, GET included; and the `Host` check that defeats DNS
//! rebinding (a web page on an attacker's name that resolves to the admin
//! address must not be able to talk to it). Must not: know what the routes
//! do, or keep the token itself (only its SHA-256).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::AdminError;

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The credentials of `Bearer <token>`; the scheme is case-insensitive
/// (RFC 7235 §2.1), so `bearer` and `BEARER` work too.
fn bearer(v: &str) -> Option<&str> {
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(rest)
}

/// The digest of the admin token, checked on every protected request.
#[derive(Clone)]
pub(crate) struct TokenCheck {
    sha256: [u8; 32],
}

impl std::fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCheck(..)")
    }
}

impl TokenCheck {
    /// Keeps only the digest of `token`.
    pub(crate) fn new(token: &str) -> Self {
        Self {
            sha256: sha256(token.trim().as_bytes()),
        }
    }

    /// A check against a digest kept elsewhere (the rotation and
    /// revocation routes keep only the digest).
    pub(crate) fn from_digest(sha256: [u8; 32]) -> Self {
        Self { sha256 }
    }

    /// Why `headers` do not carry the admin token (None: they do).
    pub(crate) fn refuse(&self, headers: &HeaderMap) -> Option<&'static str> {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
        else {
            return Some("missing `Authorization: Bearer <admin token>`: the token is in admin.token in the server's data directory (the CLI reads it there, or from --admin-token-file)");
        };
        // Digests have a fixed length, and the comparison visits every byte
        // whatever differs, so timing says nothing about the token.
        let got = sha256(given.trim().as_bytes());
        let diff = got
            .iter()
            .zip(self.sha256.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        (diff != 0).then_some(
            "wrong admin token: use the content of admin.token in the server's data directory",
        )
    }
}

async fn require_token(State(check): State<Arc<TokenCheck>>, req: Request, next: Next) -> Response {
    match check.refuse(req.headers()) {
        None => next.run(req).await,
        Some(why) => AdminError::Unauthorized(why).into_response(),
    }
}

/// Puts every route of `router` behind the admin token (all methods).
pub(crate) fn protect(router: Router, token: &str) -> Router {
    router.layer(middleware::from_fn_with_state(
        Arc::new(TokenCheck::new(token)),
        require_token,
    ))
}

/// Which `Host` headers the admin endpoint answers.
///
/// DNS rebinding always presents the attacker's *name* in `Host` (the
/// browser thinks it talks to the attacker's site), so: IP literals are
/// accepted when they are the listen address (any address when bound to all
/// interfaces: kubelet probes and Prometheus use the pod IP), `localhost`
/// when the listener is on loopback or all interfaces, and names only when
/// configured (`admin_allowed_hosts`).
#[derive(Debug, Clone)]
pub(crate) struct HostRule {
    listen: SocketAddr,
    names: Vec<String>,
}

/// Splits `host[:port]` (or `[v6][:port]`) into the host part; `None` when
/// malformed (`[::1]evil.example`, a non-numeric port after a bracket).
fn host_part(h: &str) -> Option<&str> {
    if let Some(rest) = h.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port_ok = after.is_empty()
            || after
                .strip_prefix(':')
                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
        return port_ok.then_some(host);
    }
    Some(match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    })
}

impl HostRule {
    /// The rule for a listener bound to `listen`, plus extra `names`.
    pub(crate) fn new(listen: SocketAddr, names: &[String]) -> Self {
        Self {
            listen,
            names: names
                .iter()
                .filter_map(|n| host_part(n.trim()))
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a request with this `Host` header value is for us.
    pub(crate) fn allows(&self, host: &str) -> bool {
        let Some(h) = host_part(host.trim()) else {
            return false;
        };
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        let bound = self.listen.ip();
        if let Ok(ip) = h.parse::<IpAddr>() {
            return bound.is_unspecified()
                || ip == bound
                || (bound.is_loopback() && ip.is_loopback());
        }
        if h == "localhost" && (bound.is_loopback() || bound.is_unspecified()) {
            return true;
        }
        !h.is_empty() && self.names.contains(&h)
    }
}

/// The routes probes and Prometheus use; an HTTP/1.0 request without `Host`
/// (which that version allows) may reach these and nothing else.
const OPEN_PATHS: &[&str] = &["/live", "/ready", "/metrics"];

/// Whether a request is for us; the refusal otherwise. In absolute form
/// (`GET http://name/path`) the URI's authority is the target and `Host` is
/// ignored (RFC 9112 §3.2.2), so that is what is checked; HTTP/2 carries it
/// there too.
fn host_verdict(rule: &HostRule, req: &Request) -> Result<(), AdminError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(AdminError::BadRequest(
            "the request has more than one Host header (RFC 9112 §3.2: answer 400)".into(),
        ));
    }
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str().to_string()),
        None => match first.map(|v| v.to_str()) {
            Some(Ok(h)) => Some(h.to_string()),
            Some(Err(_)) => {
                return Err(AdminError::BadRequest(
                    "the Host header is not visible ASCII".into(),
                ))
            }
            None => None,
        },
    };
    match host {
        Some(h) if rule.allows(&h) => Ok(()),
        Some(h) => {
            let shown: String = h.chars().take(64).collect();
            Err(AdminError::MisdirectedHost(format!("Host {shown:?} is not an address or name this admin endpoint serves (a guard against DNS rebinding); if it is yours, add it to admin_allowed_hosts (--admin-allowed-hosts)")))
        }
        None if req.version() == axum::http::Version::HTTP_10
            && OPEN_PATHS.contains(&req.uri().path()) =>
        {
            Ok(())
        }
        None => Err(AdminError::BadRequest(
            "the request has no Host header; send the address you connect to".into(),
        )),
    }
}

async fn check_host(State(rule): State<Arc<HostRule>>, req: Request, next: Next) -> Response {
    match host_verdict(&rule, &req) {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Answers only requests whose `Host` the rule allows (421 otherwise).
pub(crate) fn check_hosts(router: Router, rule: HostRule) -> Router {
    router.layer(middleware::from_fn_with_state(Arc::new(rule), check_host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rule_accepts_our_addresses_and_refuses_rebound_names() {
        let lo = HostRule::new("127.0.0.1:9990".parse().unwrap(), &[]);
        assert!(lo.allows("127.0.0.1:9990"));
        assert!(lo.allows("localhost:9990"));
        assert!(lo.allows("LOCALHOST."));
        assert!(lo.allows("[::1]:9990"));
        assert!(!lo.allows("attacker.example:9990"));
        assert!(!lo.allows("10.0.0.5:9990"));
        assert!(!lo.allows(""));
        assert!(!lo.allows("127.0.0.1.attacker.example"));

        let any = HostRule::new(
            "0.0.0.0:9990".parse().unwrap(),
            &["meshca-admin.meshca.svc".into()],
        );
        assert!(any.allows("10.1.2.3:9990"), "probes use the pod IP");
        assert!(any.allows("meshca-admin.meshca.svc:9990"));
        assert!(!any.allows("meshca-admin.meshca.svc.attacker.example"));
        assert!(!any.allows("rebind.attacker.example"));

        let pod = HostRule::new("10.1.2.3:9990".parse().unwrap(), &[]);
        assert!(pod.allows("10.1.2.3"));
        assert!(!pod.allows("localhost"), "not bound to loopback");
        assert!(!pod.allows("10.1.2.4"));
    }

    fn verdict(rule: &HostRule, raw: &[(&str, &str)], uri: &str, v10: bool) -> u16 {
        let mut b = Request::builder().uri(uri);
        if v10 {
            b = b.version(axum::http::Version::HTTP_10);
        }
        for (k, v) in raw {
            b = b.header(*k, *v);
        }
        let req = b.body(axum::body::Body::empty()).unwrap();
        match host_verdict(rule, &req) {
            Ok(()) => 200,
            Err(r) => r.into_response().status().as_u16(),
        }
    }

    #[test]
    fn host_guard_refuses_smuggled_duplicate_and_absolute_form_hosts() {
        let lo = HostRule::new("127.0.0.1:9990".parse().unwrap(), &[]);
        assert!(!lo.allows("[::1]evil.example"), "junk after the bracket");
        assert!(!lo.allows("[::1]:evil"));
        assert!(lo.allows("[::1]"));
        let h = |v| ("host", v);
        assert_eq!(
            verdict(&lo, &[h("127.0.0.1")], "/rotation/status", false),
            200
        );
        assert_eq!(
            verdict(
                &lo,
                &[h("127.0.0.1"), h("evil.example")],
                "/rotation/status",
                false
            ),
            400,
            "duplicate Host"
        );
        assert_eq!(
            verdict(
                &lo,
                &[h("127.0.0.1")],
                "http://evil.example/rotation/status",
                false
            ),
            421,
            "absolute form: the URI authority is the target"
        );
        assert_eq!(
            verdict(
                &lo,
                &[h("evil.example")],
                "http://127.0.0.1:9990/live",
                false
            ),
            200
        );
        assert_eq!(verdict(&lo, &[], "/live", true), 200, "HTTP/1.0 probe");
        assert_eq!(verdict(&lo, &[], "/metrics", true), 200);
        assert_eq!(verdict(&lo, &[], "/rotation/status", true), 400);
        assert_eq!(verdict(&lo, &[], "/audit/entries", true), 400);
        assert_eq!(
            verdict(&lo, &[], "/live", false),
            400,
            "HTTP/1.1 needs Host"
        );
    }

    #[test]
    fn token_check_needs_the_exact_token() {
        let c = TokenCheck::new("s3cret\n");
        let mut h = HeaderMap::new();
        assert!(c.refuse(&h).unwrap().contains("missing"));
        h.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(c.refuse(&h).unwrap().contains("wrong"));
        h.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(c.refuse(&h).unwrap().contains("missing"));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(c.refuse(&h), None);
        // RFC 7235: the scheme is case-insensitive.
        h.insert(header::AUTHORIZATION, "bearer s3cret".parse().unwrap());
        assert_eq!(c.refuse(&h), None);
        h.insert(header::AUTHORIZATION, "BEARER s3cret".parse().unwrap());
        assert_eq!(c.refuse(&h), None);
        h.insert(header::AUTHORIZATION, "bearers3cret".parse().unwrap());
        assert!(c.refuse(&h).is_some());
    }
}
