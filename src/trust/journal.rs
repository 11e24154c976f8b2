//! The persisted rotation state.
//!
//! Owns: `rotation.json` in the data directory, written whole with
//! temp-file + fsync + rename (via `secret::write_public`), so after a crash
//! the file holds either the state before a transition or the state after
//! it — never a mix. Each write carries the state's `seq`; a write whose seq
//! is not exactly one more than the stored one is refused, so a step is never
//! applied twice. Must not: decide transitions.

use std::path::{Path, PathBuf};

use super::rotation::RotationState;

/// The journal file name.
pub(crate) const FILE: &str = "rotation.json";

/// Why the journal could not be read or written.
///
/// `OutOfOrder` is the one a caller acts on differently: another writer
/// (a replica, an offline command) committed first, so reload and retry;
/// the others are a damaged or unwritable data directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// `rotation.json`.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file holds something that is not a rotation state.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// `rotation.json`.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// `create` found a journal already there.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// `commit` found no journal to follow.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// The transition does not follow the stored step.
    #[error("rotation journal is at step {stored} but this transition follows step {follows}; reload and retry")]
    OutOfOrder {
        /// The stored step.
        stored: u64,
        /// The step the transition was computed from.
        follows: u64,
    },
}

/// The journal of one data directory.
#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal in `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(FILE),
        }
    }

    /// Loads the state, or None if no rotation state was ever written.
    pub fn load(&self) -> Result<Option<RotationState>, JournalError> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| JournalError::Corrupt {
                    path: self.path.clone(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Writes the first state.
    pub fn create(&self, state: &RotationState) -> Result<(), JournalError> {
        if self.path.exists() {
            return Err(JournalError::Exists(self.path.clone()));
        }
        self.write(state)
    }

    /// Replaces the stored state with one adopted from the shared state of
    /// a replicated CA (which orders steps itself, by resourceVersion).
    pub(crate) fn adopt(&self, state: &RotationState) -> Result<(), JournalError> {
        self.write(state)
    }

    /// Persists `next`, which must directly follow what is stored.
    pub fn commit(&self, next: &RotationState) -> Result<(), JournalError> {
        let stored = self
            .load()?
            .ok_or_else(|| JournalError::Missing(self.path.clone()))?;
        if *next == stored {
            return Ok(()); // replay of a step already stored
        }
        if next.seq != stored.seq + 1 {
            return Err(JournalError::OutOfOrder {
                stored: stored.seq,
                follows: next.seq.saturating_sub(1),
            });
        }
        self.write(next)
    }

    fn write(&self, state: &RotationState) -> Result<(), JournalError> {
        // A RotationState always serializes (plain fields, string keys).
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| JournalError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crate::util::secret::write_public(&self.path, &bytes).map_err(|source| JournalError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::rotation::{Command, Observations};
    use std::time::{Duration, SystemTime};

    #[test]
    fn commits_in_order_and_never_twice() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        assert_eq!(j.load().unwrap(), None);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let s0 = RotationState::new("aaaa".into(), now + Duration::from_secs(1 << 25), now);
        j.create(&s0).unwrap();
        assert!(
            matches!(j.create(&s0), Err(JournalError::Exists(_))),
            "never overwritten by create"
        );
        let obs = Observations::no_clients(now, Duration::ZERO, Duration::ZERO);
        let (s1, _) = s0
            .apply(
                &Command::Prepare {
                    id: "bbbb".into(),
                    not_after: now + Duration::from_secs(1 << 26),
                },
                &obs,
            )
            .unwrap();
        j.commit(&s1).unwrap();
        assert_eq!(j.load().unwrap(), Some(s1.clone()));
        // Replaying the same step after a restart is a no-op, not a second step.
        j.commit(&s1).unwrap();
        // A transition computed from a stale state is refused.
        let (stale, _) = s0
            .apply(&Command::Taint { id: "aaaa".into() }, &obs)
            .unwrap();
        // Typed: the caller can tell "someone else committed, reload and
        // retry" from a damaged or unwritable journal.
        let e = j.commit(&stale).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::OutOfOrder {
                    stored: 1,
                    follows: 0
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("reload"), "{e}");
        let (s2, _) = s1.apply(&Command::Activate { force: true }, &obs).unwrap();
        j.commit(&s2).unwrap();
        assert_eq!(j.load().unwrap().unwrap().active().unwrap().id, "bbbb");
        // A temp file left by a crash mid-write does not disturb the journal.
        std::fs::write(dir.path().join(".rotation.json.tmp-1-2"), b"{garbage").unwrap();
        assert_eq!(j.load().unwrap(), Some(s2));
        // A damaged journal is Corrupt, not "absent" and not an I/O error.
        std::fs::write(dir.path().join(FILE), b"{garbage").unwrap();
        assert!(matches!(j.load(), Err(JournalError::Corrupt { .. })));
        let gone = Journal::new(&dir.path().join("missing"));
        assert!(matches!(gone.commit(&s1), Err(JournalError::Missing(_))));
    }
}
