//! Workload names: trust domains, SPIFFE IDs, mesh DNS identities and the
//! Kubernetes names they are built from.
//!
//! Everything here is a pure newtype that validates on construction and prints
//! back exactly what it parsed. This module knows nothing of certificates,
//! tokens or the network.

use std::fmt;
use std::str::FromStr;

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    /// What kind of name was being parsed.
    pub kind: &'static str,
    /// The rejected input (never a secret: these are public names).
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl NameError {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        // Bound what we echo back: the input may be attacker-supplied.
        let value: String = value.chars().take(300).collect();
        Self {
            kind,
            value,
            reason,
        }
    }
}

/// Checks an RFC 1123 label as Kubernetes defines it (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, <= 63).
fn check_dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > 63 {
        return Err("must be at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("may contain only lowercase letters, digits and '-'");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks an RFC 1123 subdomain: dot-separated labels, <= 253 characters.
fn check_dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() > 253 {
        return Err("must be at most 253 characters");
    }
    s.split('.').try_for_each(check_dns1123_label)
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                let check: fn(&str) -> Result<(), &'static str> = $check;
                check(s).map_err(|r| NameError::new($kind, s, r))?;
                Ok(Self(s.to_string()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// A Kubernetes namespace name (an RFC 1123 label).
    Namespace,
    "namespace",
    check_dns1123_label
);

string_newtype!(
    /// A Kubernetes service-account name (an RFC 1123 subdomain).
    ServiceAccount,
    "service account",
    check_dns1123_subdomain
);

string_newtype!(
    /// A SPIFFE trust domain, e.g. `cluster.local`. Lowercase letters, digits,
    /// `.`, `-` and `_` only (SPIFFE-ID §2.1); also a valid DNS suffix here,
    /// since the mesh DNS identity ends with it.
    TrustDomain,
    "trust domain",
    |s| {
        if s.is_empty() {
            return Err("must not be empty");
        }
        if s.len() > 255 {
            return Err("must be at most 255 characters");
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        }) {
            return Err("may contain only lowercase letters, digits, '.', '-' and '_'");
        }
        if s.contains('_') {
            return Err("must be a DNS name (no '_') because DNS identities end with it");
        }
        check_dns1123_subdomain(s)
    }
);

string_newtype!(
    /// A mesh DNS identity such as
    /// `web.shop.serviceaccount.identity.meshca.cluster.local`: a DNS name of
    /// RFC 1123 labels (the form Linkerd proxies expect).
    DnsIdentity,
    "DNS identity",
    check_dns1123_subdomain
);

/// A SPIFFE ID (`spiffe://<trust-domain>/<path>`), validated per the SPIFFE-ID
/// specification: no port, user info, query or fragment; path segments are
/// non-empty, not `.` or `..`, and use only `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: String,
    td_len: usize,
}

impl SpiffeId {
    const SCHEME: &'static str = "spiffe://";

    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust-domain part.
    pub fn trust_domain(&self) -> &str {
        &self.uri[Self::SCHEME.len()..Self::SCHEME.len() + self.td_len]
    }

    /// The path part, starting with `/` (empty for a trust-domain ID).
    pub fn path(&self) -> &str {
        &self.uri[Self::SCHEME.len() + self.td_len..]
    }
}

impl FromStr for SpiffeId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let err = |r| NameError::new("SPIFFE ID", s, r);
        if s.len() > 2048 {
            return Err(err("must be at most 2048 bytes"));
        }
        let rest = s
            .strip_prefix(Self::SCHEME)
            .ok_or_else(|| err("must start with spiffe://"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(err("trust domain must not be empty"));
        }
        if !td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        }) {
            return Err(err(
                "trust domain may contain only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(err("path segments must not be empty"));
                }
                if seg == "." || seg == ".." {
                    return Err(err("path segments must not be '.' or '..'"));
                }
                if !seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
                {
                    return Err(err(
                        "path may contain only letters, digits, '.', '-' and '_'",
                    ));
                }
            }
        }
        Ok(Self {
            uri: s.to_string(),
            td_len: td.len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// The naming context of one mesh: its trust domain and the namespace the CA
/// itself runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The trust domain, e.g. `cluster.local`.
    pub trust_domain: TrustDomain,
    /// The control-plane namespace, e.g. `meshca`.
    pub control_plane_ns: Namespace,
}

/// The service account the CA itself runs as: its serving certificate is
/// issued to this workload in the control-plane namespace.
pub(crate) const CA_SERVICE_ACCOUNT: &str = "meshca";

/// The TLS server name of the CA (what its serving certificate carries and
/// what clients verify): the DNS identity of [`CA_SERVICE_ACCOUNT`] in the
/// control-plane namespace, `meshca.<ns>.serviceaccount.identity.<ns>.<td>`.
///
/// Takes plain strings because clients (`certify`, `agent`) derive it from
/// flags the CA validates, not they.
pub(crate) fn ca_server_name(control_plane_ns: &str, trust_domain: &str) -> String {
    format!(
        "{CA_SERVICE_ACCOUNT}.{control_plane_ns}.serviceaccount.identity.{control_plane_ns}.{trust_domain}"
    )
}

/// An authenticated Kubernetes workload: service account `sa` in namespace `ns`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    /// The namespace.
    pub namespace: Namespace,
    /// The service account.
    pub service_account: ServiceAccount,
}

impl Workload {
    /// Builds a workload from raw strings, validating both.
    pub fn new(namespace: &str, service_account: &str) -> Result<Self, NameError> {
        Ok(Self {
            namespace: namespace.parse()?,
            service_account: service_account.parse()?,
        })
    }

    /// Parses a Kubernetes username `system:serviceaccount:NS:SA`.
    pub(crate) fn from_username(username: &str) -> Result<Self, NameError> {
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| {
                NameError::new(
                    "service-account username",
                    username,
                    "must have the form system:serviceaccount:<namespace>:<name>",
                )
            })?;
        let (ns, sa) = rest.split_once(':').ok_or_else(|| {
            NameError::new(
                "service-account username",
                username,
                "must have the form system:serviceaccount:<namespace>:<name>",
            )
        })?;
        Self::new(ns, sa)
    }

    /// `system:serviceaccount:NS:SA`.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// `spiffe://<td>/ns/<NS>/sa/<SA>`.
    pub fn spiffe_id(&self, mesh: &Mesh) -> SpiffeId {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            mesh.trust_domain, self.namespace, self.service_account
        )
        .parse()
        .expect("components are validated, so the SPIFFE ID is valid")
    }

    /// `<SA>.<NS>.serviceaccount.identity.<control-plane-ns>.<td>`.
    pub fn dns_identity(&self, mesh: &Mesh) -> Result<DnsIdentity, NameError> {
        // Can fail only on length: each component is already a valid label.
        format!(
            "{}.{}.serviceaccount.identity.{}.{}",
            self.service_account, self.namespace, mesh.control_plane_ns, mesh.trust_domain
        )
        .parse()
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh() -> Mesh {
        Mesh {
            trust_domain: "cluster.local".parse().unwrap(),
            control_plane_ns: "meshca".parse().unwrap(),
        }
    }

    #[test]
    fn derives_both_names() {
        let w = Workload::new("shop", "web").unwrap();
        assert_eq!(
            w.spiffe_id(&mesh()).as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            w.dns_identity(&mesh()).unwrap().as_str(),
            "web.shop.serviceaccount.identity.meshca.cluster.local"
        );
        assert_eq!(w.username(), "system:serviceaccount:shop:web");
        // The CA's server name is the DNS identity of its own workload, the
        // name its serving certificate is issued for.
        let m = mesh();
        let ca = Workload::new(m.control_plane_ns.as_str(), CA_SERVICE_ACCOUNT).unwrap();
        assert_eq!(
            ca_server_name(m.control_plane_ns.as_str(), m.trust_domain.as_str()),
            ca.dns_identity(&m).unwrap().as_str()
        );
        assert_eq!(
            ca_server_name("cp", "example.org"),
            "meshca.cp.serviceaccount.identity.cp.example.org"
        );
        assert_eq!(Workload::from_username(&w.username()).unwrap(), w);
    }

    #[test]
    fn round_trips() {
        for s in [
            "spiffe://cluster.local/ns/a/sa/b",
            "spiffe://example.org",
            "spiffe://td/a_b/C.d-e",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        }
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/a/sa/b");
        let d: DnsIdentity = "a.b.serviceaccount.identity.x.y".parse().unwrap();
        assert_eq!(d.to_string().parse::<DnsIdentity>().unwrap(), d);
    }

    #[test]
    fn rejects_bad_names() {
        for s in [
            "http://x/y",
            "spiffe://",
            "spiffe:///path",
            "spiffe://UPPER/x",
            "spiffe://td/a//b",
            "spiffe://td/a/",
            "spiffe://td/./a",
            "spiffe://td/../a",
            "spiffe://td:443/a",
            "spiffe://user@td/a",
            "spiffe://td/a?q=1",
            "spiffe://td/a#f",
        ] {
            assert!(s.parse::<SpiffeId>().is_err(), "{s} should be rejected");
        }
        for s in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(s.parse::<Namespace>().is_err(), "{s:?} namespace");
        }
        for s in ["", "a..b", ".a", "A", "a/b"] {
            assert!(s.parse::<ServiceAccount>().is_err(), "{s:?} sa");
        }
        assert!("a.b".parse::<ServiceAccount>().is_ok());
        for s in ["", "Cluster.local", "a_b.local", "a..b"] {
            assert!(s.parse::<TrustDomain>().is_err(), "{s:?} td");
        }
        assert!(Workload::from_username("system:serviceaccount:ns").is_err());
        assert!(Workload::from_username("alice").is_err());
        let e = Workload::from_username("system:serviceaccount:NS:sa").unwrap_err();
        assert!(e.to_string().contains("namespace"), "{e}");
    }
}
