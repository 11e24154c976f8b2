//! Why an audit-log operation failed, in the terms a caller decides on.
//!
//! Owns: [`AuditError`]. The admin endpoint maps it to HTTP status
//! (`admin::error`), the CLI to an exit code (`cli::Error`), issuance to
//! UNAVAILABLE (`api::status`). Must not: decide those codes itself.

use std::path::PathBuf;
use std::sync::Arc;

/// Why an audit-log operation failed.
///
/// `Clone`: one failed group commit answers every caller in the batch.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// No entry records this serial (the caller asked for something absent).
    #[error("no entry for serial {serial}")]
    NotFound {
        /// The serial as looked up (normalized lowercase hex).
        serial: String,
    },
    /// There is no audit log in this data directory.
    #[error("no audit log at {}", path.display())]
    NoLog {
        /// Where it was expected.
        path: PathBuf,
    },
    /// The query is malformed: a time bound, a proof range, a limit.
    #[error("{0}")]
    BadRequest(String),
    /// The log contradicts itself (a failed verification, an index that
    /// leads to the wrong entry, a stored entry that does not parse): not
    /// the caller's fault and not fixed by retrying; run `meshca audit verify`.
    #[error("{0}")]
    Integrity(String),
    /// The database could not be read or written (SQLite, a full disk, the
    /// `audit_max_bytes` limit): retrying later may work.
    #[error("{0}")]
    Storage(String),
    /// The writer thread has stopped (the server is shutting down).
    #[error("the audit writer has stopped")]
    Stopped,
    /// A key file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error (shared: the enum is `Clone`).
        source: Arc<std::io::Error>,
    },
    /// Writing an export failed.
    #[error("export: {0}")]
    Export(Arc<std::io::Error>),
    /// The signing or verifier key is unusable.
    #[error("{0}")]
    Key(String),
}

impl AuditError {
    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AuditError::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}
