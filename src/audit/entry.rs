//! One audit record: what was decided, for whom, and why.
//!
//! Owns: the record's fields and its canonical byte form (the JSON
//! serialization in field order, which is what the Merkle leaf hashes).
//! Never holds a token, key or other secret: only hashes where a reference
//! is needed.

use serde::{Deserialize, Serialize};

/// An audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339 time of the decision.
    pub time: String,
    /// The same, as Unix milliseconds.
    pub time_unix_ms: u64,
    /// `issuance`, `jwt_svid` or `rotation`.
    pub kind: String,
    /// `native`, `linkerd` or `istio` (issuance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// How the caller was authenticated (`jwks`, `token_review`, `certificate`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<String>,
    /// The authenticated namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The authenticated service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The pod UID, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The caller's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The identity the request claimed (Linkerd's `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_identity: Option<String>,
    /// The requested lifetime in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_ttl_s: Option<u64>,
    /// SHA-256 of the CSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr_sha256: Option<String>,
    /// `granted` or `refused` (issuance), or the transition (rotation).
    pub result: String,
    /// Machine reason (`ok`, `bad_token`, …).
    pub reason: String,
    /// Human detail of a refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Leaf serial (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Leaf SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sans: Vec<String>,
    /// Leaf notBefore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Leaf notAfter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// SHA-256 of the leaf certificate (DER).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaf_sha256: Option<String>,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spki_sha256: Option<String>,
    /// SHA-256 of the issuer certificate that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_fingerprint: Option<String>,
    /// SHA-256 of the root that issuer chains to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_fingerprint: Option<String>,
    /// The trust-bundle version handed out with the certificate (native and
    /// Istio responses carry the bundle; Linkerd's do not). For rotation
    /// entries: the bundle version after the transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_version: Option<u64>,
    /// How many refusals this entry stands for, when more than one: identical
    /// refusals (same peer address, API, reason and detail) within
    /// `audit_refusal_window` after a recorded one, or refusals past the
    /// per-peer intake limit (`reason: refusals_over_audit_limit`). Absent: one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Issuance: when the token authentication at the root of this grant's
    /// renewal chain happened (the grant's own time for a token; inherited
    /// on renewal by certificate). Renewal by certificate is refused once
    /// `renewal_max_age` has passed since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<String>,
    /// Issuance by certificate: the serial of the certificate presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_from: Option<String>,
    /// `jwt_svid`: the token's `sub` (the caller's SPIFFE ID). The token
    /// itself is never recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// `jwt_svid`: the token's `aud` claim.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// `jwt_svid`: the `kid` of the key that signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

impl Entry {
    /// The canonical bytes the Merkle leaf is computed over.
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Entry always serializes")
    }

    /// `namespace/service-account`, or `-`.
    pub fn identity(&self) -> String {
        match (&self.namespace, &self.service_account) {
            (Some(n), Some(s)) => format!("{n}/{s}"),
            _ => "-".into(),
        }
    }
}
