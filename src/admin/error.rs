//! The one place where a failed admin request becomes an HTTP status.
//!
//! 400 the request is malformed · 401 no or wrong admin token · 404 nothing
//! there (an unknown serial, nothing to lift, no checkpoint yet) · 421 a
//! Host this endpoint does not serve · 409 a
//! safety gate or a conflict refused it · 500 the log contradicts itself,
//! files could not be written, or a bug · 503 the audit store, or the
//! Kubernetes API server holding the shared state, cannot be reached right
//! now (retry). The body is always `{"error": "…"}`.
//!
//! Owns: [`AdminError`] and its `IntoResponse`. Must not: decide anything;
//! the domain error says what happened, this says how HTTP spells it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::audit::AuditError;
use crate::revocation::RevocationError;
use crate::trust::journal::JournalError;
use crate::trust::manager::TrustError;

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum AdminError {
    /// The request itself is malformed (a parameter, the body).
    #[error("{0}")]
    BadRequest(String),
    /// The admin token is missing or wrong.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Nothing there.
    #[error("{0}")]
    NotFound(String),
    /// The request names a host this endpoint does not serve (421, a guard
    /// against DNS rebinding).
    #[error("{0}")]
    MisdirectedHost(String),
    /// A rotation step.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A revocation change.
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    /// An audit query.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A bug or an internal failure (a panicked task, a serializer).
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    /// The HTTP status (see the module doc).
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            AdminError::Trust(e) => match e {
                // Another writer committed first: reload and retry.
                TrustError::Refused(_) | TrustError::Journal(JournalError::OutOfOrder { .. }) => {
                    StatusCode::CONFLICT
                }
                TrustError::BadInput(_) => StatusCode::BAD_REQUEST,
                // The API server holding the shared state did not answer in
                // time: nothing was changed, the same request can be retried.
                TrustError::Shared(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AdminError::Revocation(e) => match e {
                RevocationError::BadInput(_) => StatusCode::BAD_REQUEST,
                RevocationError::Conflict(_) => StatusCode::CONFLICT,
                RevocationError::NotFound(_) => StatusCode::NOT_FOUND,
                RevocationError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AdminError::Audit(e) => match e {
                AuditError::BadRequest(_) => StatusCode::BAD_REQUEST,
                AuditError::NotFound { .. } => StatusCode::NOT_FOUND,
                AuditError::Storage(_) | AuditError::NoLog { .. } | AuditError::Stopped => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AdminError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let mut r = error_body(self.status(), &self.to_string());
        if let AdminError::Unauthorized(_) = self {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"meshca-admin\""),
            );
        }
        r
    }
}

/// The `{"error": …}` reply every admin route and the guard send.
pub(crate) fn error_body(code: StatusCode, msg: &str) -> Response {
    (
        code,
        [("content-type", "application/json")],
        format!("{}\n", serde_json::json!({ "error": msg })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::rotation::RotationError;

    #[test]
    fn each_domain_failure_gets_the_status_a_client_can_act_on() {
        let cases: Vec<(AdminError, u16)> = vec![
            (AdminError::BadRequest("limit".into()), 400),
            (AdminError::Unauthorized("no token"), 401),
            (AdminError::MisdirectedHost("evil.example".into()), 421),
            (
                TrustError::Refused(RotationError::NothingPrepared).into(),
                409,
            ),
            (TrustError::BadInput("root".into()).into(), 400),
            (TrustError::Storage("disk".into()).into(), 500),
            (
                TrustError::Journal(JournalError::OutOfOrder {
                    stored: 3,
                    follows: 2,
                })
                .into(),
                409,
            ),
            (
                TrustError::Journal(JournalError::Missing("rotation.json".into())).into(),
                500,
            ),
            (
                TrustError::Shared("reading Secret meshca/meshca-ca: no answer within 10s".into())
                    .into(),
                503,
            ),
            (RevocationError::Conflict("again".into()).into(), 409),
            (RevocationError::NotFound("nothing".into()).into(), 404),
            (RevocationError::BadInput("serial".into()).into(), 400),
            (RevocationError::Storage("disk".into()).into(), 500),
            (
                AuditError::NotFound {
                    serial: "ab".into(),
                }
                .into(),
                404,
            ),
            (AuditError::Integrity("index lies".into()).into(), 500),
            (AuditError::Storage("locked".into()).into(), 503),
            (AuditError::BadRequest("from > to".into()).into(), 400),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let r = e.into_response();
            assert_eq!(r.status().as_u16(), code, "{msg}");
        }
    }
}
