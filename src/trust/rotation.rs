//! The trust-anchor rotation state machine.
//!
//! Owns: the lifecycle of each root — prepared (in the bundle, not signing)
//! → active (its issuer signs) → retired (in the bundle until its last leaf
//! expires) → removed, plus the tainted flag — and the safety gates between
//! them. Every transition is a pure function of `(state, command,
//! observations)`: no clock reads, no I/O, so it is tested without sleeps
//! and a restart resumes from the persisted state alone. Must not: generate
//! keys, sign, or write files (see `trust::journal`).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Where a root is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// In the bundle, not signing yet.
    Prepared,
    /// Its issuer signs new leaves. Exactly one root is active.
    Active,
    /// No longer signing; kept in the bundle while leaves it signed live.
    Retired,
    /// Out of the bundle.
    Removed,
}

/// One root's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRecord {
    /// SHA-256 fingerprint of the root certificate (hex).
    pub id: String,
    /// The root's expiry.
    pub not_after: SystemTime,
    /// Phase.
    pub phase: Phase,
    /// Compromised: clients must re-certify now; removed once no live leaf needs it.
    pub tainted: bool,
    /// The bundle version that first contained this root.
    pub added_in_bundle: u64,
    /// When it was prepared.
    pub prepared_at: SystemTime,
    /// When it became active.
    pub activated_at: Option<SystemTime>,
    /// When it was retired.
    pub retired_at: Option<SystemTime>,
    /// The latest notAfter of any leaf signed under it (None: none signed).
    pub last_leaf_not_after: Option<SystemTime>,
}

/// The whole rotation state (what the journal persists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationState {
    /// Increases with every transition (the journal sequence number).
    pub seq: u64,
    /// The trust bundle version; increases whenever the set of roots in it changes.
    pub bundle_version: u64,
    /// Every root ever known, oldest first.
    pub roots: Vec<RootRecord>,
}

/// What the CA has observed, passed into each transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observations {
    /// The current time.
    pub now: SystemTime,
    /// Connected bundle watchers.
    pub watchers: usize,
    /// Watchers that have acknowledged at least `bundle_version`.
    pub watchers_acked: usize,
    /// The bundle version those acknowledgements refer to.
    pub acked_version: u64,
    /// The least time a prepared root must be in the bundle before activation
    /// (default: the maximum leaf TTL, so every renewing client has fetched it).
    pub propagation_wait: Duration,
    /// The longest lifetime a leaf can have: a root that stops signing is
    /// needed in the bundle for at most this long afterwards.
    pub max_leaf_ttl: Duration,
    /// Why some replica's clients could not be counted (one sentence each,
    /// naming the replica): while any, the counts above are incomplete and
    /// activation is refused (fail closed) unless forced.
    pub uncounted: Vec<String>,
}

impl Observations {
    /// Observations with no client tracked (offline commands, tests): only
    /// the time gates apply.
    pub fn no_clients(now: SystemTime, propagation_wait: Duration, max_leaf_ttl: Duration) -> Self {
        Self {
            now,
            watchers: 0,
            watchers_acked: 0,
            acked_version: 0,
            propagation_wait,
            max_leaf_ttl,
            uncounted: Vec::new(),
        }
    }

    /// True when every tracked client has seen bundle `version` (vacuously
    /// true with none).
    pub(crate) fn all_acked(&self, version: u64) -> bool {
        self.watchers == 0
            || (self.acked_version >= version && self.watchers_acked >= self.watchers)
    }
}

/// An operator (or automatic policy) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Add a new root to the bundle, not yet signing.
    Prepare {
        /// Its fingerprint.
        id: String,
        /// Its expiry.
        not_after: SystemTime,
    },
    /// Make the prepared root the signing root; the old active one retires.
    Activate {
        /// Skip the propagation gate (the operator accepts the risk).
        force: bool,
    },
    /// Remove retired roots whose leaves have all expired.
    Retire,
    /// Mark a root compromised.
    Taint {
        /// The root's fingerprint (or a unique prefix).
        id: String,
    },
    /// Automatic housekeeping: remove tainted, non-active roots nothing depends on.
    Tick,
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    /// There is no prepared root to activate.
    #[error("no root is prepared: run `meshca rotation prepare` first")]
    NothingPrepared,
    /// A root is already prepared.
    #[error("root {0} is already prepared: activate it (or taint it) before preparing another")]
    AlreadyPrepared(String),
    /// The prepared root has not reached every client yet.
    #[error("the prepared root has not propagated: {acked}/{total} live clients (bundle watchers and holders of unexpired certificates) have been sent bundle version {version}, and it has been in the bundle {waited}s of the required {wait}s; activating now could break clients that do not trust it yet (see `meshca rotation status` for who lags; use --force to accept that risk)")]
    NotPropagated {
        /// Watchers that acknowledged.
        acked: usize,
        /// All watchers.
        total: usize,
        /// The bundle version that must be acknowledged.
        version: u64,
        /// Seconds the root has been in the bundle.
        waited: u64,
        /// Seconds required.
        wait: u64,
    },
    /// Some replica's clients could not be counted, so the gate cannot
    /// know whether the prepared root has reached every client.
    #[error("the activation gate cannot count every replica's clients ({0}); activating now could break clients that do not trust the new root yet. Wait until the replica writes its report again, delete its report ConfigMap if that replica is gone for good (docs/kubernetes.md, propagation reports), or use --force to accept the risk")]
    Uncounted(String),
    /// A tainted root cannot become active.
    #[error("root {0} is tainted and cannot be activated")]
    TaintedPrepared(String),
    /// Nothing can be removed yet.
    #[error("no retired root can be removed yet: {0}")]
    NothingToRetire(String),
    /// The root is unknown.
    #[error("no root matches {0:?}")]
    UnknownRoot(String),
    /// The prefix matches several roots.
    #[error("{0:?} matches more than one root; give more of the fingerprint")]
    AmbiguousRoot(String),
    /// The root is already out of the bundle.
    #[error("root {0} was already removed")]
    AlreadyRemoved(String),
    /// The root is already tainted.
    #[error("root {0} is already tainted")]
    AlreadyTainted(String),
    /// No root is active (the state is broken).
    #[error("no root is active")]
    NoActiveRoot,
}

/// What a transition did (for logs, metrics and the audit log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A root was prepared.
    Prepared(String),
    /// A root became active (and the previous one retired).
    Activated {
        /// The new active root.
        new: String,
        /// The retired one.
        old: String,
        /// Whether the gate was overridden.
        forced: bool,
    },
    /// A root was removed from the bundle.
    Removed(String),
    /// A root was tainted.
    Tainted(String),
}

impl RotationState {
    /// The initial state: one active root.
    pub fn new(root_id: String, not_after: SystemTime, now: SystemTime) -> Self {
        Self {
            seq: 0,
            bundle_version: 1,
            roots: vec![RootRecord {
                id: root_id,
                not_after,
                phase: Phase::Active,
                tainted: false,
                added_in_bundle: 1,
                prepared_at: now,
                activated_at: Some(now),
                retired_at: None,
                last_leaf_not_after: None,
            }],
        }
    }

    /// The active root.
    pub fn active(&self) -> Option<&RootRecord> {
        self.roots.iter().find(|r| r.phase == Phase::Active)
    }

    /// The prepared root, if any.
    pub fn prepared(&self) -> Option<&RootRecord> {
        self.roots.iter().find(|r| r.phase == Phase::Prepared)
    }

    /// The roots in the bundle (not removed).
    pub fn in_bundle(&self) -> impl Iterator<Item = &RootRecord> {
        self.roots.iter().filter(|r| r.phase != Phase::Removed)
    }

    /// The roots whose JWT-SVID keys are published: every root in the
    /// bundle, except a tainted one that does not sign. A JWT-SVID lives
    /// minutes and is re-minted on demand, so unlike a tainted root (kept
    /// while the leaves it signed live) a tainted key is withdrawn as soon
    /// as another key signs: tokens it signed stop verifying at once.
    pub fn jwt_published(&self) -> impl Iterator<Item = &RootRecord> {
        self.in_bundle()
            .filter(|r| !r.tainted || r.phase == Phase::Active)
    }

    /// The next state after JWT-SVID keys were added to roots already in
    /// the bundle (an upgrade from a version without them): the published
    /// keys changed, so the bundle version moves and every watcher hears.
    pub fn jwt_keys_added(&self) -> RotationState {
        let mut next = self.clone();
        next.seq += 1;
        next.bundle_version += 1;
        next
    }

    fn find(&self, id: &str) -> Result<usize, RotationError> {
        let hits: Vec<usize> = self
            .roots
            .iter()
            .enumerate()
            .filter(|(_, r)| r.id.starts_with(&id.to_lowercase()))
            .map(|(i, _)| i)
            .collect();
        match hits.as_slice() {
            [] => Err(RotationError::UnknownRoot(id.into())),
            [i] => Ok(*i),
            _ => Err(RotationError::AmbiguousRoot(id.into())),
        }
    }

    /// When a retired or tainted root stops mattering to live leaves.
    fn safe_to_remove_at(r: &RootRecord) -> SystemTime {
        r.last_leaf_not_after
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .max(r.retired_at.unwrap_or(SystemTime::UNIX_EPOCH))
    }

    /// Applies a command. On success returns the next state (with `seq`
    /// incremented) and what happened; on refusal the state is unchanged.
    /// Each command is its own function working on a copy of the state, so
    /// a refusal simply drops the copy.
    pub fn apply(
        &self,
        cmd: &Command,
        obs: &Observations,
    ) -> Result<(RotationState, Vec<Event>), RotationError> {
        let mut next = self.clone();
        let events = match cmd {
            Command::Prepare { id, not_after } => next.prepare(id, *not_after, obs.now)?,
            Command::Activate { force } => next.activate(*force, obs)?,
            Command::Retire => next.retire(obs.now)?,
            Command::Taint { id } => next.taint(id)?,
            Command::Tick => next.tick(obs.now),
        };
        if next != *self {
            next.seq = self.seq + 1;
        }
        debug_assert!(
            next.roots
                .iter()
                .filter(|r| r.phase == Phase::Active)
                .count()
                <= 1
        );
        Ok((next, events))
    }

    /// `prepare`: a new root joins the bundle (one prepared root at a time).
    fn prepare(
        &mut self,
        id: &str,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<Vec<Event>, RotationError> {
        if let Some(p) = self.prepared() {
            return Err(RotationError::AlreadyPrepared(p.id.clone()));
        }
        self.bundle_version += 1;
        self.roots.push(RootRecord {
            id: id.to_string(),
            not_after,
            phase: Phase::Prepared,
            tainted: false,
            added_in_bundle: self.bundle_version,
            prepared_at: now,
            activated_at: None,
            retired_at: None,
            last_leaf_not_after: None,
        });
        Ok(vec![Event::Prepared(id.to_string())])
    }

    /// `activate`: the prepared root starts signing, gated on propagation
    /// unless forced; the active root retires.
    fn activate(&mut self, force: bool, obs: &Observations) -> Result<Vec<Event>, RotationError> {
        let now = obs.now;
        let pi = self
            .roots
            .iter()
            .position(|r| r.phase == Phase::Prepared)
            .ok_or(RotationError::NothingPrepared)?;
        let p = &self.roots[pi];
        if p.tainted {
            return Err(RotationError::TaintedPrepared(p.id.clone()));
        }
        if !force && !obs.uncounted.is_empty() {
            return Err(RotationError::Uncounted(obs.uncounted.join("; ")));
        }
        let waited = now.duration_since(p.prepared_at).unwrap_or_default();
        let propagated = obs.all_acked(p.added_in_bundle)
            && waited >= obs.propagation_wait
            && obs.uncounted.is_empty();
        if !force && !propagated {
            return Err(RotationError::NotPropagated {
                acked: if obs.acked_version >= p.added_in_bundle {
                    obs.watchers_acked
                } else {
                    0
                },
                total: obs.watchers,
                version: p.added_in_bundle,
                waited: waited.as_secs(),
                wait: obs.propagation_wait.as_secs(),
            });
        }
        let ai = self
            .roots
            .iter()
            .position(|r| r.phase == Phase::Active)
            .ok_or(RotationError::NoActiveRoot)?;
        let event = Event::Activated {
            new: self.roots[pi].id.clone(),
            old: self.roots[ai].id.clone(),
            forced: force && !propagated,
        };
        let old = &mut self.roots[ai];
        if old.tainted {
            // Its JWT-SVID key stops being published now that another key
            // signs (see `jwt_published`): the bundle changes.
            self.bundle_version += 1;
        }
        old.phase = Phase::Retired;
        old.retired_at = Some(now);
        // Leaves it signed up to now live at most max_leaf_ttl more (and
        // never past the root itself): a bound that needs no per-leaf
        // bookkeeping and survives restarts.
        old.last_leaf_not_after = Some((now + obs.max_leaf_ttl).min(old.not_after));
        let new = &mut self.roots[pi];
        new.phase = Phase::Active;
        new.activated_at = Some(now);
        Ok(vec![event])
    }

    /// `retire`: every retired root whose leaves have all expired leaves
    /// the bundle; refused when none can.
    fn retire(&mut self, now: SystemTime) -> Result<Vec<Event>, RotationError> {
        let mut events = Vec::new();
        let mut waiting = Vec::new();
        for r in self.roots.iter_mut().filter(|r| r.phase == Phase::Retired) {
            let at = Self::safe_to_remove_at(r);
            if now >= at {
                r.phase = Phase::Removed;
                events.push(Event::Removed(r.id.clone()));
            } else {
                waiting.push(format!(
                    "root {} still has live leaves until {}",
                    &r.id[..16.min(r.id.len())],
                    crate::util::clock::rfc3339(at)
                ));
            }
        }
        if events.is_empty() {
            return Err(RotationError::NothingToRetire(if waiting.is_empty() {
                "no root is retired".into()
            } else {
                waiting.join("; ")
            }));
        }
        self.bundle_version += 1;
        Ok(events)
    }

    /// `taint`: mark a root compromised (by fingerprint or unique prefix).
    fn taint(&mut self, id: &str) -> Result<Vec<Event>, RotationError> {
        let i = self.find(id)?;
        let r = &mut self.roots[i];
        if r.phase == Phase::Removed {
            return Err(RotationError::AlreadyRemoved(r.id.clone()));
        }
        if r.tainted {
            return Err(RotationError::AlreadyTainted(r.id.clone()));
        }
        r.tainted = true;
        let event = Event::Tainted(r.id.clone());
        // The bundle message lists tainted roots: clients must see a new
        // version to learn they have to re-certify.
        self.bundle_version += 1;
        Ok(vec![event])
    }

    /// Housekeeping: tainted roots that no longer matter (not active, no
    /// live leaves) leave the bundle. Never refused.
    fn tick(&mut self, now: SystemTime) -> Vec<Event> {
        let mut events = Vec::new();
        for r in self.roots.iter_mut() {
            let idle = matches!(r.phase, Phase::Retired | Phase::Prepared);
            if r.tainted && idle && now >= Self::safe_to_remove_at(r) {
                r.phase = Phase::Removed;
                events.push(Event::Removed(r.id.clone()));
            }
        }
        if !events.is_empty() {
            self.bundle_version += 1;
        }
        events
    }

    /// The next routine step and when it becomes safe (for `rotation status`).
    pub(crate) fn next_step(&self, obs: &Observations) -> (String, Option<SystemTime>) {
        if let Some(p) = self.prepared() {
            let at = p.prepared_at + obs.propagation_wait;
            let acked = obs.all_acked(p.added_in_bundle);
            let refused = if obs.uncounted.is_empty() {
                String::new()
            } else {
                format!(
                    "; REFUSED while some replica's clients cannot be counted: {}",
                    obs.uncounted.join("; ")
                )
            };
            return (
                format!(
                    "activate (clients with the new bundle: {}/{}{refused})",
                    if obs.acked_version >= p.added_in_bundle {
                        obs.watchers_acked
                    } else {
                        0
                    },
                    obs.watchers
                ),
                // Refused: no time makes it safe, only the replicas do.
                obs.uncounted
                    .is_empty()
                    .then_some(if acked { at } else { at.max(obs.now) }),
            );
        }
        if let Some(r) = self
            .roots
            .iter()
            .filter(|r| r.phase == Phase::Retired)
            .min_by_key(|r| Self::safe_to_remove_at(r))
        {
            return ("retire".into(), Some(Self::safe_to_remove_at(r)));
        }
        ("prepare (no rotation in progress)".into(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    fn t(h: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + H * h as u32
    }

    fn obs(now: SystemTime) -> Observations {
        Observations {
            now,
            watchers: 2,
            watchers_acked: 2,
            acked_version: 100,
            propagation_wait: 24 * H,
            max_leaf_ttl: 24 * H,
            uncounted: Vec::new(),
        }
    }

    fn start() -> RotationState {
        RotationState::new("aaaa".into(), t(24 * 365), t(0))
    }

    #[test]
    fn routine_rotation_walks_every_phase() {
        let s = start();
        let (s, ev) = s
            .apply(
                &Command::Prepare {
                    id: "bbbb".into(),
                    not_after: t(24 * 730),
                },
                &obs(t(1)),
            )
            .unwrap();
        assert_eq!(ev, vec![Event::Prepared("bbbb".into())]);
        assert_eq!(s.bundle_version, 2);
        assert_eq!(s.in_bundle().count(), 2);
        // Too early: not in the bundle for the propagation wait yet.
        let e = s
            .apply(&Command::Activate { force: false }, &obs(t(2)))
            .unwrap_err();
        assert!(
            matches!(e, RotationError::NotPropagated { wait: 86400, .. }),
            "{e}"
        );
        let (s, ev) = s
            .apply(&Command::Activate { force: false }, &obs(t(26)))
            .unwrap();
        assert_eq!(
            ev,
            vec![Event::Activated {
                new: "bbbb".into(),
                old: "aaaa".into(),
                forced: false
            }]
        );
        assert_eq!(s.active().unwrap().id, "bbbb");
        assert_eq!(s.roots[0].phase, Phase::Retired);
        // Leaves the old root signed until t(26) live at most 24h more.
        assert_eq!(s.roots[0].last_leaf_not_after, Some(t(50)));
        let e = s.apply(&Command::Retire, &obs(t(49))).unwrap_err();
        assert!(e.to_string().contains("live leaves"), "{e}");
        let (s, ev) = s.apply(&Command::Retire, &obs(t(50))).unwrap();
        assert_eq!(ev, vec![Event::Removed("aaaa".into())]);
        assert_eq!(s.bundle_version, 3);
        assert_eq!(s.in_bundle().count(), 1);
        assert_eq!(s.seq, 3, "one seq per state change");
    }

    /// Every client that is counted has the new bundle, but one replica's
    /// clients could not be counted: refused (fail closed), naming it;
    /// --force overrides and is recorded as forced.
    #[test]
    fn uncounted_replicas_refuse_activation_unless_forced() {
        let prepare = Command::Prepare {
            id: "bbbb".into(),
            not_after: t(24 * 730),
        };
        let (s, _) = start().apply(&prepare, &obs(t(1))).unwrap();
        let mut o = obs(t(26));
        o.uncounted = vec!["replica b: report stale: no change seen for 200s".into()];
        let e = s
            .apply(&Command::Activate { force: false }, &o)
            .unwrap_err();
        assert!(matches!(e, RotationError::Uncounted(_)), "{e}");
        assert!(e.to_string().contains("replica b: report stale"), "{e}");
        let (step, _) = s.next_step(&o);
        assert!(
            step.contains("REFUSED") && step.contains("replica b"),
            "{step}"
        );
        let (_, ev) = s.apply(&Command::Activate { force: true }, &o).unwrap();
        assert!(
            matches!(&ev[0], Event::Activated { forced: true, .. }),
            "{ev:?}"
        );
        // Without the problem the same observations pass, unforced.
        let (_, ev) = s
            .apply(&Command::Activate { force: false }, &obs(t(26)))
            .unwrap();
        assert!(matches!(&ev[0], Event::Activated { forced: false, .. }));
    }

    #[test]
    fn gates_refuse_unsafe_steps_and_force_overrides() {
        let (s, _) = start()
            .apply(
                &Command::Prepare {
                    id: "bbbb".into(),
                    not_after: t(9999),
                },
                &obs(t(0)),
            )
            .unwrap();
        // A watcher that has not acknowledged the new bundle blocks activation.
        let mut o = obs(t(48));
        o.watchers_acked = 1;
        let e = s
            .apply(&Command::Activate { force: false }, &o)
            .unwrap_err();
        assert!(
            matches!(
                e,
                RotationError::NotPropagated {
                    acked: 1,
                    total: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--force"));
        o.acked_version = 1; // acknowledged only the old bundle
        o.watchers_acked = 2;
        assert!(s.apply(&Command::Activate { force: false }, &o).is_err());
        let (s2, ev) = s.apply(&Command::Activate { force: true }, &o).unwrap();
        assert!(matches!(&ev[0], Event::Activated { forced: true, .. }));
        assert_eq!(s2.active().unwrap().id, "bbbb");
    }

    #[test]
    fn illegal_transitions_are_refused_with_clear_errors() {
        let s = start();
        assert_eq!(
            s.apply(&Command::Activate { force: true }, &obs(t(1)))
                .unwrap_err(),
            RotationError::NothingPrepared
        );
        assert!(matches!(
            s.apply(&Command::Retire, &obs(t(1))).unwrap_err(),
            RotationError::NothingToRetire(_)
        ));
        assert_eq!(
            s.apply(&Command::Taint { id: "zz".into() }, &obs(t(1)))
                .unwrap_err(),
            RotationError::UnknownRoot("zz".into())
        );
        let (s, _) = s
            .apply(
                &Command::Prepare {
                    id: "ab01".into(),
                    not_after: t(9999),
                },
                &obs(t(1)),
            )
            .unwrap();
        assert_eq!(
            s.apply(
                &Command::Prepare {
                    id: "cc".into(),
                    not_after: t(9999)
                },
                &obs(t(1))
            )
            .unwrap_err(),
            RotationError::AlreadyPrepared("ab01".into())
        );
        assert!(matches!(
            s.apply(&Command::Taint { id: "a".into() }, &obs(t(1)))
                .unwrap_err(),
            RotationError::AmbiguousRoot(_)
        ));
        let (s, _) = s
            .apply(&Command::Taint { id: "ab".into() }, &obs(t(1)))
            .unwrap();
        assert_eq!(
            s.apply(&Command::Activate { force: true }, &obs(t(99)))
                .unwrap_err(),
            RotationError::TaintedPrepared("ab01".into())
        );
        // Retiring before the old root's last leaf expires is refused.
        let s = start();
        let (s, _) = s
            .apply(
                &Command::Prepare {
                    id: "bbbb".into(),
                    not_after: t(9999),
                },
                &obs(t(0)),
            )
            .unwrap();
        let (s, _) = s
            .apply(&Command::Activate { force: false }, &obs(t(25)))
            .unwrap();
        let e = s.apply(&Command::Retire, &obs(t(48))).unwrap_err();
        assert!(e.to_string().contains("live leaves"), "{e}");
        assert!(s.apply(&Command::Retire, &obs(t(49))).is_ok());
    }

    #[test]
    fn tainted_roots_leave_the_bundle_once_nothing_depends_on_them() {
        let s = start();
        let (s, _) = s
            .apply(
                &Command::Prepare {
                    id: "bbbb".into(),
                    not_after: t(9999),
                },
                &obs(t(1)),
            )
            .unwrap();
        let (s, _) = s
            .apply(&Command::Taint { id: "aaaa".into() }, &obs(t(1)))
            .unwrap();
        assert_eq!(s.bundle_version, 3, "tainting changes the bundle message");
        assert_eq!(
            s.apply(&Command::Taint { id: "aaaa".into() }, &obs(t(1)))
                .unwrap_err(),
            RotationError::AlreadyTainted("aaaa".into())
        );
        // Emergency: activate the new root at once.
        let (s, _) = s
            .apply(&Command::Activate { force: true }, &obs(t(2)))
            .unwrap();
        let (s2, ev) = s.apply(&Command::Tick, &obs(t(5))).unwrap();
        assert!(ev.is_empty(), "leaves under the tainted root still live");
        assert_eq!(s2, s);
        let (s3, ev) = s.apply(&Command::Tick, &obs(t(26))).unwrap();
        assert_eq!(ev, vec![Event::Removed("aaaa".into())]);
        assert_eq!(s3.bundle_version, s.bundle_version + 1);
        assert_eq!(
            s3.apply(&Command::Taint { id: "aaaa".into() }, &obs(t(11)))
                .unwrap_err(),
            RotationError::AlreadyRemoved("aaaa".into())
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let (s, _) = start()
            .apply(
                &Command::Prepare {
                    id: "bbbb".into(),
                    not_after: t(9999),
                },
                &obs(t(1)),
            )
            .unwrap();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<RotationState>(&j).unwrap(), s);
    }
}
