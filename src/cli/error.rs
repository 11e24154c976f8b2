//! The one place where a failed command becomes a process exit code.
//!
//! Owns: the exit-code table (documented in docs/configuration.md, "Exit
//! codes") and the conversions from each layer's typed error into a command
//! failure. Must not: print, retry or decide anything else; commands build
//! their messages, `main` prints them.
//!
//! 0 success · 1 failure (I/O, unusable files, anything not listed; what
//! scripts have always seen) · 2 usage (a flag or argument value is wrong;
//! clap's own parse errors also exit 2) · 3 refused (a safety gate or a
//! conflict: retrying the same command will not help) · 4 unavailable (the
//! server cannot be reached, or a running server holds the data directory:
//! retry later or give `--server`).

use crate::agent::AgentError;
use crate::audit::AuditError;
use crate::ca::store::StoreError;
use crate::client::ClientError;
use crate::proxy::ProxyError;
use crate::revocation::RevocationError;
use crate::trust::journal::JournalError;
use crate::trust::manager::TrustError;

/// Exit code of a generic failure (I/O, unusable data, anything else).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of a usage error: a flag or argument value is wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a refusal: a safety gate or a conflict.
pub const EXIT_REFUSED: u8 = 3;
/// Exit code when the server or the data directory is unavailable.
pub const EXIT_UNAVAILABLE: u8 = 4;

/// Why a command failed. The message is what the operator reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A flag or argument value is wrong.
    #[error("{0}")]
    Usage(String),
    /// The data directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rotation step.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A revocation change.
    #[error(transparent)]
    Revocation(#[from] RevocationError),
    /// The audit log.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Talking to a server.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent could not start.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The proxy could not start.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A running server answered with an HTTP error.
    #[error("{message}")]
    Remote {
        /// The HTTP status code.
        status: u16,
        /// What the server said (and a hint).
        message: String,
    },
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for Error {
    fn from(e: String) -> Self {
        Error::Failed(e)
    }
}

impl From<&str> for Error {
    fn from(e: &str) -> Self {
        Error::Failed(e.to_string())
    }
}

impl Error {
    /// The process exit code (see the module doc).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => EXIT_USAGE,
            Error::Store(StoreError::Locked { .. }) => EXIT_UNAVAILABLE,
            Error::Store(StoreError::AlreadyInitialized(..)) => EXIT_REFUSED,
            Error::Trust(
                TrustError::Refused(_) | TrustError::Journal(JournalError::OutOfOrder { .. }),
            ) => EXIT_REFUSED,
            Error::Trust(TrustError::BadInput(_)) => EXIT_USAGE,
            Error::Revocation(RevocationError::BadInput(_)) => EXIT_USAGE,
            Error::Revocation(RevocationError::Conflict(_) | RevocationError::NotFound(_)) => {
                EXIT_REFUSED
            }
            Error::Audit(AuditError::BadRequest(_)) => EXIT_USAGE,
            Error::Audit(AuditError::NotFound { .. }) => EXIT_REFUSED,
            Error::Audit(AuditError::Storage(_)) => EXIT_UNAVAILABLE,
            Error::Client(e) if e.is_unreachable() => EXIT_UNAVAILABLE,
            Error::Client(ClientError::BadAddress { .. }) => EXIT_USAGE,
            Error::Agent(AgentError::BadAddress(_)) => EXIT_USAGE,
            Error::Proxy(ProxyError::Config(_)) => EXIT_USAGE,
            Error::Remote { status, .. } => match status {
                400 => EXIT_USAGE,
                404 | 409 => EXIT_REFUSED,
                503 => EXIT_UNAVAILABLE,
                _ => EXIT_FAILURE,
            },
            _ => EXIT_FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn each_kind_of_failure_gets_its_own_exit_code() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let cases: Vec<(Error, u8)> = vec![
            (Error::from("disk full".to_string()), EXIT_FAILURE),
            (Error::Usage("--trust-domain: empty".into()), EXIT_USAGE),
            (
                StoreError::Locked {
                    dir: PathBuf::from("d"),
                    lock: PathBuf::from("d/.lock"),
                }
                .into(),
                EXIT_UNAVAILABLE,
            ),
            (
                StoreError::Io {
                    path: PathBuf::from("d/.lock"),
                    source: io(),
                }
                .into(),
                EXIT_FAILURE,
            ),
            (
                StoreError::AlreadyInitialized("d".into(), "d/root.crt".into()).into(),
                EXIT_REFUSED,
            ),
            (StoreError::NotInitialized("d".into()).into(), EXIT_FAILURE),
            (
                RevocationError::Conflict("already revoked".into()).into(),
                EXIT_REFUSED,
            ),
            (
                RevocationError::BadInput("serial".into()).into(),
                EXIT_USAGE,
            ),
            (
                RevocationError::Storage("write".into()).into(),
                EXIT_FAILURE,
            ),
            (
                TrustError::Refused(crate::trust::rotation::RotationError::NothingPrepared).into(),
                EXIT_REFUSED,
            ),
            (TrustError::BadInput("root".into()).into(), EXIT_USAGE),
            (TrustError::Storage("write".into()).into(), EXIT_FAILURE),
            (
                TrustError::Journal(JournalError::OutOfOrder {
                    stored: 3,
                    follows: 2,
                })
                .into(),
                EXIT_REFUSED,
            ),
            (AuditError::BadRequest("--since".into()).into(), EXIT_USAGE),
            (
                AuditError::NotFound {
                    serial: "ab".into(),
                }
                .into(),
                EXIT_REFUSED,
            ),
            (
                AuditError::Storage("database is locked".into()).into(),
                EXIT_UNAVAILABLE,
            ),
            (
                AuditError::Integrity("root mismatch".into()).into(),
                EXIT_FAILURE,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e:?}");
        }
        let unreachable = Error::from(ClientError::Unreachable("no answer within 60s".into()));
        assert_eq!(unreachable.exit_code(), EXIT_UNAVAILABLE);
        let chain = Error::from(ClientError::Chain("chain does not verify".into()));
        assert_eq!(chain.exit_code(), EXIT_FAILURE);
        let proxy_flags = Error::from(ProxyError::Config("nothing to proxy".into()));
        assert_eq!(proxy_flags.exit_code(), EXIT_USAGE);
        let port_taken = Error::from(ProxyError::Listen {
            addr: "127.0.0.1:1".parse().unwrap(),
            side: "inbound",
            source: std::io::ErrorKind::AddrInUse.into(),
        });
        assert_eq!(port_taken.exit_code(), EXIT_FAILURE);
        let ca_address = Error::from(AgentError::BadAddress("not host:port".into()));
        assert_eq!(ca_address.exit_code(), EXIT_USAGE);
        let remote = |status| Error::Remote {
            status,
            message: "m".into(),
        };
        assert_eq!(remote(409).exit_code(), EXIT_REFUSED);
        assert_eq!(remote(400).exit_code(), EXIT_USAGE);
        assert_eq!(remote(503).exit_code(), EXIT_UNAVAILABLE);
        assert_eq!(remote(401).exit_code(), EXIT_FAILURE);
        assert_eq!(remote(500).exit_code(), EXIT_FAILURE);
    }
}
