//! What can go wrong between meshca and the Kubernetes API server, typed so
//! a caller can tell a lost race (409: re-read and retry) from a missing
//! permission (403: an operator must act) from an outage (retry later) from
//! an object whose content meshca refuses.
//!
//! Owns: [`Error`] and the classification of `kube::Error`. Every variant
//! names what meshca was doing (`what`), so the message stands alone in a
//! log line. Must not: decide retries (callers do, by variant).

use std::path::PathBuf;

/// A failed call to the API server, or an object meshca cannot use.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// 409: the object changed since it was read, or already exists.
    #[error("{what}: conflict (409): {message}")]
    Conflict {
        /// What meshca was doing, e.g. `updating Secret meshca/meshca-ca`.
        what: String,
        /// The API server's message.
        message: String,
    },
    /// 404.
    #[error("{what}: not found (404): {message}")]
    NotFound {
        /// What meshca was doing.
        what: String,
        /// The API server's message.
        message: String,
    },
    /// 401/403: meshca's service account lacks a permission.
    #[error("{what}: forbidden ({code}): {message}; check the RBAC rules of meshca's service account (docs/kubernetes.md)")]
    Forbidden {
        /// What meshca was doing.
        what: String,
        /// 401 or 403.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// Any other status the API server answered.
    #[error("{what}: the API server answered {code}: {message}")]
    Api {
        /// What meshca was doing.
        what: String,
        /// The HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// No answer: connection, TLS, timeout, or a response that did not decode.
    #[error("{what}: {source}")]
    Transport {
        /// What meshca was doing.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// No answer within the call's deadline (a dead connection, a stalled
    /// or overloaded API server): the call was abandoned.
    #[error("{what}: no answer from the API server within {after:?}; it is slow or unreachable (check its health and the network path from this pod)")]
    Timeout {
        /// What meshca was doing.
        what: String,
        /// The deadline that passed.
        after: std::time::Duration,
    },
    /// An object whose content meshca refuses (a bad key, a foreign
    /// certificate…), or local data that cannot be sent.
    #[error("{what}: {reason}")]
    Invalid {
        /// Which object or file.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A local file beside the API state (the data directory).
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Classifies a client error by the API server's status.
    pub(crate) fn from_kube(what: impl Into<String>, e: kube::Error) -> Self {
        let what = what.into();
        match e {
            kube::Error::Api(st) => {
                let message = st.message.clone();
                match st.code {
                    409 => Self::Conflict { what, message },
                    404 => Self::NotFound { what, message },
                    401 | 403 => Self::Forbidden {
                        what,
                        code: st.code,
                        message,
                    },
                    code => Self::Api {
                        what,
                        code,
                        message,
                    },
                }
            }
            source => Self::Transport { what, source },
        }
    }

    /// An object or file meshca refuses.
    pub fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// True for a 409: another writer got there first; re-read and retry.
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// `map_err(kube_err("reading Secret ns/name"))`.
pub(crate) fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |e| Error::from_kube(what, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: format!("status {code}"),
            ..Default::default()
        }))
    }

    #[test]
    fn a_conflict_is_told_from_an_outage_and_a_permission() {
        let e = Error::from_kube("updating Secret m/s", api(409));
        assert!(e.is_conflict());
        assert_eq!(
            e.to_string(),
            "updating Secret m/s: conflict (409): status 409"
        );
        assert!(matches!(
            Error::from_kube("x", api(404)),
            Error::NotFound { .. }
        ));
        for code in [401, 403] {
            let e = Error::from_kube("watching pods", api(code));
            assert!(matches!(e, Error::Forbidden { code: c, .. } if c == code));
            assert!(e.to_string().contains("RBAC"), "{e}");
            assert!(!e.is_conflict());
        }
        let e = Error::from_kube("x", api(500));
        assert!(matches!(e, Error::Api { code: 500, .. }));
        assert!(!e.is_conflict());
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let e = Error::from_kube("reading Secret m/s", kube::Error::ReadEvents(reset));
        assert!(matches!(e, Error::Transport { .. }));
        assert!(e.to_string().starts_with("reading Secret m/s: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
