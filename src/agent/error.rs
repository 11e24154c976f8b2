//! Why the agent could not start, or one request to the CA failed.
//!
//! Owns: [`AgentError`], and [`AgentError::is_denied`], which decides the
//! retry pace (an operator denial waits at the backoff cap instead of
//! hammering the CA). Must not: retry or log itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::client::ClientError;

/// Why the agent could not start, or one attempt at the CA failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The bootstrap bundle cannot be read or holds no certificate.
    #[error("bootstrap bundle {}: {reason}", path.display())]
    Bootstrap {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The configured CA address is unusable.
    #[error("{0}")]
    BadAddress(String),
    /// No CA address resolved.
    #[error("no CA address resolved: {0}")]
    Unresolved(String),
    /// The token file cannot be read.
    #[error("token file {}: {source}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Connecting, or making the key and CSR.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The CA answered with an error status.
    #[error("{code:?}: {message}")]
    Ca {
        /// The gRPC code.
        code: tonic::Code,
        /// The CA's message.
        message: String,
    },
    /// The CA's answer is unusable.
    #[error("{0}")]
    BadResponse(&'static str),
    /// The CA ended the bundle stream.
    #[error("the CA closed the stream")]
    StreamClosed,
    /// No endpoint answered in time.
    #[error("no answer within {0}s")]
    Timeout(u64),
    /// Every endpoint failed; each one's error, in the order tried.
    #[error("{}", join(.0))]
    AllFailed(Vec<(SocketAddr, AgentError)>),
    /// A stream needs the certificate the agent does not hold yet.
    #[error("no certificate yet")]
    NoCertificate,
    /// The agent was stopped.
    #[error("the agent stopped")]
    Stopped,
    /// No certificate arrived in time.
    #[error("no certificate within {0}s (see the agent's log)")]
    NotReady(u64),
}

fn join(errors: &[(SocketAddr, AgentError)]) -> String {
    errors
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<tonic::Status> for AgentError {
    fn from(s: tonic::Status) -> Self {
        AgentError::Ca {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

impl AgentError {
    /// True when the CA (any replica) refused this workload's identity (an
    /// operator denial): retrying soon will not help.
    pub fn is_denied(&self) -> bool {
        match self {
            AgentError::Ca { code, .. } => *code == tonic::Code::PermissionDenied,
            AgentError::AllFailed(v) => v.iter().any(|(_, e)| e.is_denied()),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denial_is_told_by_its_code_not_by_words_in_a_message() {
        let denied = AgentError::Ca {
            code: tonic::Code::PermissionDenied,
            message: "identity shop/web is denied by the mesh operator".into(),
        };
        // A message can say anything (it comes from the server): matching
        // text would pace an outage like a denial.
        let outage = AgentError::Ca {
            code: tonic::Code::Unavailable,
            message: "upstream said PermissionDenied".into(),
        };
        assert!(denied.is_denied());
        assert!(!outage.is_denied());
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let one_replica_denies =
            AgentError::AllFailed(vec![(a, AgentError::Timeout(5)), (b, denied)]);
        assert!(one_replica_denies.is_denied());
        assert!(!AgentError::AllFailed(vec![(a, outage)]).is_denied());
        assert_eq!(
            one_replica_denies.to_string(),
            "127.0.0.1:1: no answer within 5s; 127.0.0.1:2: PermissionDenied: identity shop/web is denied by the mesh operator"
        );
    }
}
