//! The one place where errors become gRPC status codes.
//!
//! malformed input → INVALID_ARGUMENT, bad or missing credential (and a
//! client certificate that may not renew) → UNAUTHENTICATED, wrong or
//! operator-denied identity → PERMISSION_DENIED, rate limit →
//! RESOURCE_EXHAUSTED, backend down → UNAVAILABLE. Messages say what to fix
//! and never contain a token.

use tonic::{Code, Status};

use crate::authn::AuthnError;
use crate::ca::CaError;

/// Every way a request can fail at the API layer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Authentication failed.
    #[error(transparent)]
    Authn(AuthnError),
    /// The CA refused or failed.
    #[error(transparent)]
    Ca(CaError),
    /// The caller claimed another identity than its credential proves.
    #[error("the request claims identity {claimed:?} but the token authenticates {actual:?}")]
    IdentityMismatch {
        /// What the request claimed.
        claimed: String,
        /// What the credential proves.
        actual: String,
    },
    /// Too many requests from one pod, or for one service account.
    #[error("rate limit exceeded for {0}; retry later")]
    RateLimited(String),
    /// An anonymous bundle watcher over a cap.
    #[error(transparent)]
    TooManyWatchers(super::watchers::Refused),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The decision could not be recorded in the audit log, so the
    /// certificate is withheld.
    #[error("the audit log cannot record this issuance ({0}); the certificate was withheld, retry later")]
    AuditUnavailable(String),
    /// A client certificate may not renew (a token always may).
    #[error(transparent)]
    Renewal(crate::authn::renewal::RenewalError),
    /// The operator denied this identity (`meshca revoke --identity`).
    // The operator's reason stays in the revocation's audit entry: the
    // refused workload may be the compromised one.
    #[error("identity {identity} is denied by the mesh operator; every certificate and bundle request is refused until the operator lifts the denial")]
    Denied {
        /// `namespace/service-account`.
        identity: String,
    },
    /// A bug or an internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Authn(AuthnError::TooLarge(_)) => Code::InvalidArgument,
            ApiError::Authn(AuthnError::Unavailable(_)) => Code::Unavailable,
            ApiError::Authn(AuthnError::Missing | AuthnError::Invalid(_)) => Code::Unauthenticated,
            ApiError::Ca(e) => match e {
                CaError::NameNotAllowed(_) => Code::PermissionDenied,
                CaError::IssuerUnusable(_) => Code::Unavailable,
                CaError::Signing(_) => Code::Internal,
                CaError::MalformedCsr(_)
                | CaError::CsrTooLarge(_)
                | CaError::BadCsrSignature(_)
                | CaError::UnsupportedKey(_)
                | CaError::CaRequested(_)
                | CaError::InvalidTtl(_)
                | CaError::BadAudience(_) => Code::InvalidArgument,
            },
            ApiError::IdentityMismatch { .. } => Code::PermissionDenied,
            ApiError::RateLimited(_) | ApiError::TooManyWatchers(_) => Code::ResourceExhausted,
            ApiError::AuditUnavailable(_) => Code::Unavailable,
            ApiError::BadRequest(_) => Code::InvalidArgument,
            ApiError::Renewal(_) => Code::Unauthenticated,
            ApiError::Denied { .. } => Code::PermissionDenied,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// A short machine label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Authn(AuthnError::Missing) => "missing_credential",
            ApiError::Authn(AuthnError::TooLarge(_)) => "token_too_large",
            ApiError::Authn(AuthnError::Invalid(_)) => "bad_token",
            ApiError::Authn(AuthnError::Unavailable(_)) => "authn_unavailable",
            ApiError::Ca(e) => match e {
                CaError::MalformedCsr(_) => "malformed_csr",
                CaError::CsrTooLarge(_) => "csr_too_large",
                CaError::BadCsrSignature(_) => "bad_csr_signature",
                CaError::UnsupportedKey(_) => "unsupported_key",
                CaError::NameNotAllowed(_) => "name_not_allowed",
                CaError::CaRequested(_) => "ca_requested",
                CaError::InvalidTtl(_) => "invalid_ttl",
                CaError::IssuerUnusable(_) => "issuer_unusable",
                CaError::Signing(_) => "signing_failed",
                CaError::BadAudience(_) => "bad_audience",
            },
            ApiError::IdentityMismatch { .. } => "identity_mismatch",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::TooManyWatchers(r) => r.reason(),
            ApiError::AuditUnavailable(_) => "audit_unavailable",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Renewal(_) => "renewal_refused",
            ApiError::Denied { .. } => "identity_denied",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
