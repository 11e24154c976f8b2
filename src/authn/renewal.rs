//! Renewal by certificate: when a meshca leaf may stand in for a token.
//!
//! Owns: the index of leaves this replica granted (serial → who, the exact
//! leaf bytes' hash, the root its issuer chains to, the time of the token
//! authentication at the root of its renewal chain, the serial it was
//! renewed from), the set of roots a renewing leaf may chain to (active or
//! retired, never tainted, prepared-only or removed, as published from the
//! rotation journal), and the decision [`Renewal::check`]. Must not: parse
//! tokens, read files on the request path, or decide revocations (the
//! caller passes the revoked set in).
//!
//! Why an in-memory index and not a SQLite lookup per renewal: the check
//! runs on the async request path, where blocking I/O is not allowed; the
//! index holds only unexpired leaves (pruned as they expire), is rebuilt at
//! start from the audit log's granted entries (one query), and is fed on
//! each grant once its audit entry is durable. Lookups are sharded hash-map
//! reads, so concurrent renewals rarely share a lock. Without the audit log
//! the index lives only in memory: after a restart every leaf is unknown and
//! its holder must present a token (fail closed). With several replicas each
//! keeps its own index, so a leaf from another replica is refused the same
//! way; `meshca agent` always certifies with its token and is unaffected.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use crate::identity::Workload;

const SHARDS: usize = 16;

/// The hint every refusal carries: a token always works.
pub(crate) const HINT: &str = "present a service-account token";

/// One link of a renewal chain (shared by the grants renewed from it, so a
/// revoked ancestor is found even after its own entry was pruned).
#[derive(Debug)]
pub struct Link {
    /// The serial of this grant.
    pub serial: String,
    /// The grant it was renewed from.
    pub parent: Option<Arc<Link>>,
}

/// What the index keeps of one granted leaf.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Who it was issued to.
    pub workload: Workload,
    /// SHA-256 of the exact leaf DER meshca signed.
    pub leaf_sha256: [u8; 32],
    /// Fingerprint of the issuer that signed it.
    pub issuer: String,
    /// Fingerprint of the root that issuer chains to.
    pub root: Option<String>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// When the token authentication at the root of its renewal chain happened.
    pub auth_time: SystemTime,
    /// Its place in the renewal chain.
    pub link: Arc<Link>,
}

/// Why a certificate cannot renew. Every variant is UNAUTHENTICATED at the
/// edge, with [`HINT`] in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewalError {
    /// `renewal_max_age` is 0.
    #[error("renewal by certificate is disabled on this CA (renewal_max_age = 0); {HINT}")]
    Disabled,
    /// The serial is not one this replica granted (or it has expired).
    #[error(
        "certificate serial {0} was not issued by this CA replica (or its record expired); {HINT}"
    )]
    UnknownSerial(String),
    /// The serial is known but the bytes are not what meshca signed.
    #[error("certificate serial {0} does not match the certificate meshca issued with that serial; {HINT}")]
    NotIssuedHere(String),
    /// The leaf names another identity than the one it was issued to.
    #[error("certificate serial {serial} was issued to {issued}, not {presented}; {HINT}")]
    IdentityMismatch {
        /// The serial.
        serial: String,
        /// Who it was issued to.
        issued: String,
        /// Who the presented leaf claims.
        presented: String,
    },
    /// Its root is tainted, prepared-only or removed.
    #[error("certificate serial {serial} chains to root {root}, which is {state}; {HINT}")]
    RootNotTrusted {
        /// The serial.
        serial: String,
        /// Root fingerprint prefix.
        root: String,
        /// Why it does not count.
        state: String,
    },
    /// The serial or one it was renewed from is revoked.
    #[error("certificate serial {serial} is revoked (revoked serial {revoked} in its renewal chain); {HINT}")]
    Revoked {
        /// The presented serial.
        serial: String,
        /// The revoked one.
        revoked: String,
    },
    /// The token authentication it descends from is older than `renewal_max_age`.
    #[error("the token authentication behind certificate serial {serial} is {age_s}s old, more than renewal_max_age ({max_s}s); {HINT}")]
    TooOld {
        /// The serial.
        serial: String,
        /// Seconds since the token authentication.
        age_s: u64,
        /// The limit.
        max_s: u64,
    },
}

impl RenewalError {
    /// A short machine label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RenewalError::Disabled => "disabled",
            RenewalError::UnknownSerial(_) => "unknown_serial",
            RenewalError::NotIssuedHere(_) => "not_issued_here",
            RenewalError::IdentityMismatch { .. } => "identity_mismatch",
            RenewalError::RootNotTrusted { .. } => "root_not_trusted",
            RenewalError::Revoked { .. } => "revoked",
            RenewalError::TooOld { .. } => "too_old",
        }
    }
}

/// The state of each root, as far as renewal is concerned.
#[derive(Debug, Clone, Default)]
pub struct RootStates {
    /// Roots a renewing leaf may chain to (active or retired, not tainted).
    pub renewable: HashSet<String>,
    /// Every other known root and why it does not count.
    pub refused: HashMap<String, &'static str>,
}

impl RootStates {
    /// Derives the states from the rotation journal.
    pub fn from_rotation(s: &crate::trust::rotation::RotationState) -> Self {
        use crate::trust::rotation::Phase;
        let mut out = Self::default();
        for r in &s.roots {
            let why = match (r.phase, r.tainted) {
                (_, true) => Some("tainted"),
                (Phase::Prepared, false) => Some("prepared but not yet active"),
                (Phase::Removed, false) => Some("removed from the trust bundle"),
                (Phase::Active | Phase::Retired, false) => None,
            };
            match why {
                None => {
                    out.renewable.insert(r.id.clone());
                }
                Some(w) => {
                    out.refused.insert(r.id.clone(), w);
                }
            }
        }
        out
    }
}

/// The renewal index and policy of one replica.
pub struct Renewal {
    max_age: Duration,
    shards: Vec<Mutex<HashMap<String, Grant>>>,
    /// Grants held (kept beside the shards so recording one never locks them all).
    count: AtomicUsize,
    roots: ArcSwap<RootStates>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewal")
            .field("max_age", &self.max_age)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl crate::trust::service::StateObserver for Renewal {
    fn roots_changed(&self, state: &crate::trust::rotation::RotationState) {
        self.set_roots(RootStates::from_rotation(state));
    }
}

impl Renewal {
    /// An empty index; renewal is refused for `max_age` after the token
    /// authentication a chain descends from (0: renewal by certificate off).
    /// No root is renewable until [`Renewal::set_roots`] is called.
    pub fn new(max_age: Duration, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            max_age,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            count: AtomicUsize::new(0),
            roots: ArcSwap::from_pointee(RootStates::default()),
            metrics,
        }
    }

    /// The configured bound.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Publishes the root states (after every rotation step and at start).
    pub fn set_roots(&self, roots: RootStates) {
        self.roots.store(Arc::new(roots));
    }

    fn shard(&self, serial: &str) -> &Mutex<HashMap<String, Grant>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serial.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The grant of `serial`, if this replica made it and it has not been pruned.
    pub fn get(&self, serial: &str) -> Option<Grant> {
        self.shard(serial)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(serial)
            .cloned()
    }

    /// Records a grant. `parent` is the serial it was renewed from, if any.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        serial: &str,
        workload: Workload,
        leaf_der: &[u8],
        issuer: String,
        root: Option<String>,
        not_after: SystemTime,
        auth_time: SystemTime,
        parent: Option<&str>,
    ) {
        let parent_link = parent.and_then(|p| self.get(p)).map(|g| g.link);
        let grant = Grant {
            workload,
            leaf_sha256: sha256(leaf_der),
            issuer,
            root,
            not_after,
            auth_time,
            link: Arc::new(Link {
                serial: serial.to_string(),
                parent: parent_link,
            }),
        };
        self.insert(serial, grant);
    }

    fn insert(&self, serial: &str, grant: Grant) {
        let new = self
            .shard(serial)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(serial.to_string(), grant)
            .is_none();
        if new {
            let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.set_renewal_index(n);
        }
    }

    /// Drops every grant whose leaf has expired (it can no longer be
    /// presented). Returns how many were dropped.
    pub fn prune(&self, now: SystemTime) -> usize {
        let mut n = 0;
        for s in &self.shards {
            let mut m = s.lock().unwrap_or_else(|e| e.into_inner());
            let before = m.len();
            m.retain(|_, g| g.not_after > now);
            let dropped = before - m.len();
            self.count.fetch_sub(dropped, Ordering::Relaxed);
            n += dropped;
        }
        self.metrics.set_renewal_index(self.len());
        n
    }

    /// Number of grants held.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// True when no grant is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides whether the presented leaf (DER, already chain-verified by
    /// TLS, naming `workload`, serial `serial`) may renew. Returns the time
    /// of the token authentication it descends from, which the new grant
    /// inherits. `revoked` says whether a serial is revoked.
    pub fn check(
        &self,
        leaf_der: &[u8],
        serial: &str,
        workload: &Workload,
        now: SystemTime,
        revoked: impl Fn(&str) -> bool,
    ) -> Result<SystemTime, RenewalError> {
        if self.max_age.is_zero() {
            return Err(RenewalError::Disabled);
        }
        let grant = self
            .get(serial)
            .ok_or_else(|| RenewalError::UnknownSerial(short(serial)))?;
        // The exact bytes meshca signed: a leaf forged under a stolen root
        // or a foreign CA, even one reusing a genuine serial, differs.
        if grant.leaf_sha256 != sha256(leaf_der) {
            return Err(RenewalError::NotIssuedHere(short(serial)));
        }
        if grant.workload != *workload {
            return Err(RenewalError::IdentityMismatch {
                serial: short(serial),
                issued: grant.workload.to_string(),
                presented: workload.to_string(),
            });
        }
        let roots = self.roots.load();
        let root = grant.root.as_deref().unwrap_or("");
        if !roots.renewable.contains(root) {
            let state = roots
                .refused
                .get(root)
                .copied()
                .unwrap_or("unknown to the rotation journal");
            return Err(RenewalError::RootNotTrusted {
                serial: short(serial),
                root: root.chars().take(16).collect(),
                state: state.into(),
            });
        }
        let mut link = Some(&grant.link);
        while let Some(l) = link {
            if revoked(&l.serial) {
                return Err(RenewalError::Revoked {
                    serial: short(serial),
                    revoked: short(&l.serial),
                });
            }
            link = l.parent.as_ref();
        }
        let age = now.duration_since(grant.auth_time).unwrap_or_default();
        if age > self.max_age {
            return Err(RenewalError::TooOld {
                serial: short(serial),
                age_s: age.as_secs(),
                max_s: self.max_age.as_secs(),
            });
        }
        Ok(grant.auth_time)
    }

    /// Rebuilds the index from the audit log's granted issuance entries
    /// whose leaves are still valid at `now` (one query over the entries of
    /// the last `horizon`, i.e. the longest leaf lifetime). Entries are
    /// applied in log order, so a renewal finds its parent.
    pub fn load_from_audit(
        &self,
        store: &dyn crate::audit::store::AuditStore,
        now: SystemTime,
        horizon: Duration,
    ) -> Result<usize, crate::audit::AuditError> {
        let since = now.checked_sub(horizon).unwrap_or(SystemTime::UNIX_EPOCH);
        let rows = store.query(&crate::audit::store::Filter {
            result: Some("granted".into()),
            since_ms: Some(crate::util::clock::unix_millis(since)),
            ..Default::default()
        })?;
        let mut n = 0;
        for row in rows {
            let Ok(e) = serde_json::from_slice::<crate::audit::Entry>(&row.body) else {
                continue;
            };
            if let Some((serial, grant)) = self.grant_from_entry(&e, now) {
                self.insert(&serial, grant);
                n += 1;
            }
        }
        Ok(n)
    }

    fn grant_from_entry(
        &self,
        e: &crate::audit::Entry,
        now: SystemTime,
    ) -> Option<(String, Grant)> {
        if e.kind != "issuance" || e.result != "granted" {
            return None;
        }
        let serial = e.serial.clone()?;
        let workload =
            Workload::new(e.namespace.as_deref()?, e.service_account.as_deref()?).ok()?;
        let leaf: [u8; 32] = hex::decode(e.leaf_sha256.as_deref()?)
            .ok()?
            .try_into()
            .ok()?;
        let not_after = parse_rfc3339(e.not_after.as_deref()?)?;
        if not_after <= now {
            return None;
        }
        // Entries written before auth_time existed: a token grant was its own
        // authentication; a certificate grant's origin is unknown, so it
        // cannot renew (its holder presents a token).
        let auth_time = match (&e.auth_time, e.auth_method.as_deref()) {
            (Some(t), _) => parse_rfc3339(t)?,
            (None, Some("certificate")) | (None, None) => return None,
            (None, Some(_)) => SystemTime::UNIX_EPOCH + Duration::from_millis(e.time_unix_ms),
        };
        let parent = e
            .renewed_from
            .as_deref()
            .and_then(|p| self.get(p))
            .map(|g| g.link);
        Some((
            serial.clone(),
            Grant {
                workload,
                leaf_sha256: leaf,
                issuer: e.issuer_fingerprint.clone().unwrap_or_default(),
                root: e.root_fingerprint.clone(),
                not_after,
                auth_time,
                link: Arc::new(Link { serial, parent }),
            },
        ))
    }
}

fn short(serial: &str) -> String {
    serial.chars().take(64).collect()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parses an RFC 3339 time as the audit log writes it.
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let ns = t.unix_timestamp_nanos();
    (ns >= 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(sa: &str) -> Workload {
        Workload::new("shop", sa).unwrap()
    }

    fn index(max_age: Duration) -> Renewal {
        let r = Renewal::new(max_age, Arc::default());
        let mut roots = RootStates::default();
        roots.renewable.insert("root-a".into());
        roots.refused.insert("root-t".into(), "tainted");
        r.set_roots(roots);
        r
    }

    #[test]
    fn only_the_exact_leaf_of_a_known_serial_under_a_renewable_root_renews() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let r = index(Duration::from_secs(3600));
        let na = t0 + Duration::from_secs(600);
        r.record(
            "aa",
            w("web"),
            b"leaf-a",
            "iss".into(),
            Some("root-a".into()),
            na,
            t0,
            None,
        );
        r.record(
            "tt",
            w("web"),
            b"leaf-t",
            "iss".into(),
            Some("root-t".into()),
            na,
            t0,
            None,
        );
        let none = |_: &str| false;
        assert_eq!(r.check(b"leaf-a", "aa", &w("web"), t0, none), Ok(t0));
        assert_eq!(
            r.check(b"forged", "aa", &w("web"), t0, none),
            Err(RenewalError::NotIssuedHere("aa".into()))
        );
        assert!(matches!(
            r.check(b"leaf-a", "aa", &w("db"), t0, none),
            Err(RenewalError::IdentityMismatch { .. })
        ));
        assert_eq!(
            r.check(b"leaf-a", "bb", &w("web"), t0, none),
            Err(RenewalError::UnknownSerial("bb".into()))
        );
        let e = r.check(b"leaf-t", "tt", &w("web"), t0, none).unwrap_err();
        assert!(
            e.to_string().contains("tainted") && e.to_string().contains(HINT),
            "{e}"
        );
        // Past renewal_max_age since the token authentication: refused.
        let late = t0 + Duration::from_secs(3601);
        assert!(matches!(
            r.check(b"leaf-a", "aa", &w("web"), late, none),
            Err(RenewalError::TooOld {
                age_s: 3601,
                max_s: 3600,
                ..
            })
        ));
        // 0 disables renewal by certificate.
        let off = index(Duration::ZERO);
        off.record(
            "aa",
            w("web"),
            b"leaf-a",
            "iss".into(),
            Some("root-a".into()),
            na,
            t0,
            None,
        );
        assert_eq!(
            off.check(b"leaf-a", "aa", &w("web"), t0, none),
            Err(RenewalError::Disabled)
        );
    }

    #[test]
    fn a_revoked_ancestor_stops_its_whole_renewal_chain_even_once_pruned() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let r = index(Duration::from_secs(86400));
        let root = Some("root-a".to_string());
        r.record(
            "p",
            w("web"),
            b"p",
            "i".into(),
            root.clone(),
            t0 + Duration::from_secs(10),
            t0,
            None,
        );
        let na = t0 + Duration::from_secs(1000);
        r.record(
            "c",
            w("web"),
            b"c",
            "i".into(),
            root.clone(),
            na,
            t0,
            Some("p"),
        );
        r.record("g", w("web"), b"g", "i".into(), root, na, t0, Some("c"));
        assert_eq!(
            r.prune(t0 + Duration::from_secs(20)),
            1,
            "the parent expired"
        );
        assert!(r.get("p").is_none());
        assert_eq!(r.len(), 2);
        let now = t0 + Duration::from_secs(30);
        assert_eq!(r.check(b"g", "g", &w("web"), now, |_| false), Ok(t0));
        let e = r
            .check(b"g", "g", &w("web"), now, |s| s == "p")
            .unwrap_err();
        assert_eq!(
            e,
            RenewalError::Revoked {
                serial: "g".into(),
                revoked: "p".into()
            }
        );
    }
}
