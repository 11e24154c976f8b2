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
pub const FILE: &str = "rotation.json";

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
    pub fn load(&self) -> Result<Option<RotationState>, String> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }

    /// Writes the first state.
    pub fn create(&self, state: &RotationState) -> Result<(), String> {
        if self.path.exists() {
            return Err(format!("{} already exists", self.path.display()));
        }
        self.write(state)
    }

    /// Replaces the stored state with one adopted from the shared state of
    /// a replicated CA (which orders steps itself, by resourceVersion).
    pub fn adopt(&self, state: &RotationState) -> Result<(), String> {
        self.write(state)
    }

    /// Persists `next`, which must directly follow what is stored.
    pub fn commit(&self, next: &RotationState) -> Result<(), String> {
        let stored = self
            .load()?
            .ok_or_else(|| format!("{} does not exist", self.path.display()))?;
        if *next == stored {
            return Ok(()); // replay of a step already stored
        }
        if next.seq != stored.seq + 1 {
            return Err(format!(
                "rotation journal is at step {} but this transition follows step {}; reload and retry",
                stored.seq,
                next.seq.saturating_sub(1)
            ));
        }
        self.write(next)
    }

    fn write(&self, state: &RotationState) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
        crate::util::secret::write_public(&self.path, &bytes)
            .map_err(|e| format!("{}: {e}", self.path.display()))
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
        assert!(j.create(&s0).is_err(), "never overwritten by create");
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
        assert!(j.commit(&stale).unwrap_err().contains("reload"));
        let (s2, _) = s1.apply(&Command::Activate { force: true }, &obs).unwrap();
        j.commit(&s2).unwrap();
        assert_eq!(j.load().unwrap().unwrap().active().unwrap().id, "bbbb");
        // A temp file left by a crash mid-write does not disturb the journal.
        std::fs::write(dir.path().join(".rotation.json.tmp-1-2"), b"{garbage").unwrap();
        assert_eq!(j.load().unwrap(), Some(s2));
    }
}
