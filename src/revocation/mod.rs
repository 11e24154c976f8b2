//! The operator's kill switch: revoked serials and denied identities.
//!
//! Owns: the revocation list (`revocations.json` in the data directory,
//! written whole with temp-file + fsync + rename, shared with the other
//! replicas inside the CA state Secret), the lock-free lookups the request
//! path makes ([`Revocations::denied`], [`Revocations::is_revoked`]), and
//! applying an operator's change: the file, the shared state, one log line,
//! one audit entry (kind `revocation`) and the metrics. Must not: decide
//! what a refusal looks like on the wire (`api::status`), or renew anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::identity::Workload;
use crate::metrics::Metrics;

/// The file in the data directory.
pub(crate) const FILE: &str = "revocations.json";

/// Longest reason kept (longer ones are cut).
const MAX_REASON: usize = 256;

/// Why, when and by whom an entry was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The operator's reason.
    #[serde(default)]
    pub reason: String,
    /// RFC 3339 time it was made.
    pub time: String,
    /// Who asked (`operator (admin endpoint)`, `operator (offline)`).
    #[serde(default)]
    pub by: String,
}

/// The persisted list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RevocationList {
    /// Revoked leaf serials (lowercase hex): they, and every certificate
    /// renewed from them, can no longer renew.
    #[serde(default)]
    pub serials: BTreeMap<String, Record>,
    /// Denied identities (`namespace/service-account`): refused on every API.
    #[serde(default)]
    pub identities: BTreeMap<String, Record>,
}

/// An operator's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Revoke a serial.
    RevokeSerial {
        /// Normalized serial.
        serial: String,
        /// Why.
        reason: String,
    },
    /// Deny an identity.
    Deny {
        /// Who.
        identity: Workload,
        /// Why.
        reason: String,
    },
    /// Lift a serial's revocation.
    LiftSerial(String),
    /// Lift an identity's denial.
    LiftIdentity(Workload),
}

impl Change {
    /// The audit `result` and metric label.
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Change::RevokeSerial { .. } => "serial_revoked",
            Change::Deny { .. } => "identity_denied",
            Change::LiftSerial(_) => "serial_lifted",
            Change::LiftIdentity(_) => "identity_lifted",
        }
    }

    /// One line for replies and logs.
    pub(crate) fn describe(&self) -> String {
        match self {
            Change::RevokeSerial { serial, .. } => format!("revoked serial {serial}"),
            Change::Deny { identity, .. } => format!("denied identity {identity}"),
            Change::LiftSerial(s) => format!("lifted the revocation of serial {s}"),
            Change::LiftIdentity(w) => format!("lifted the denial of identity {w}"),
        }
    }
}

/// Why a change was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// Unusable operator input.
    #[error("{0}")]
    BadInput(String),
    /// Already in that state.
    #[error("{0}")]
    Conflict(String),
    /// Nothing to lift.
    #[error("{0}")]
    NotFound(String),
    /// The file or the shared state could not be written.
    #[error("{0}")]
    Storage(String),
}

impl From<String> for RevocationError {
    fn from(e: String) -> Self {
        RevocationError::Storage(e)
    }
}

/// Sharing a change failed (the shared state, the data directory).
impl From<crate::trust::manager::TrustError> for RevocationError {
    fn from(e: crate::trust::manager::TrustError) -> Self {
        RevocationError::Storage(e.to_string())
    }
}

/// Normalizes an operator-given serial (`0A:1b…`, `0x0a1b…`) to the
/// lowercase hex meshca records.
pub(crate) fn parse_serial(s: &str) -> Result<String, RevocationError> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RevocationError::BadInput(format!(
            "{:?} is not a certificate serial: give the hex serial as `meshca inspect` or `meshca audit list` shows it",
            s.chars().take(80).collect::<String>()
        )));
    }
    // A serial is an integer: `00` + serial is the same certificate, and a
    // revocation spelled with extra leading zeros must not silently miss it.
    // meshca records serials as whole octets with no leading zero octet.
    let digits = hex.trim_start_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    Ok(if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits.to_string()
    })
}

/// Parses `namespace/service-account`.
pub(crate) fn parse_identity(s: &str) -> Result<Workload, RevocationError> {
    let (ns, sa) = s.split_once('/').ok_or_else(|| {
        RevocationError::BadInput(format!(
            "{:?} is not an identity: write it as NAMESPACE/SERVICE-ACCOUNT, e.g. shop/web",
            s.chars().take(80).collect::<String>()
        ))
    })?;
    Workload::new(ns, sa).map_err(|e| RevocationError::BadInput(format!("identity {s:?}: {e}")))
}

/// The list in force, and where it is kept.
#[derive(Debug)]
pub(crate) struct Revocations {
    path: Option<PathBuf>,
    list: ArcSwap<RevocationList>,
    metrics: Arc<Metrics>,
}

impl crate::trust::service::StateObserver for Revocations {
    fn reload(&self) -> Result<(), String> {
        Revocations::reload(self)
    }
}

impl Revocations {
    /// An empty list kept nowhere (tests, and cores built without a data directory).
    pub(crate) fn in_memory(metrics: Arc<Metrics>) -> Self {
        Self {
            path: None,
            list: ArcSwap::from_pointee(RevocationList::default()),
            metrics,
        }
    }

    /// Loads the list of `data_dir` (empty if it has none). A file that does
    /// not parse is an error: starting without the operator's denials would
    /// silently re-admit what they shut out.
    pub(crate) fn open(data_dir: &Path, metrics: Arc<Metrics>) -> Result<Self, String> {
        let r = Self {
            path: Some(data_dir.join(FILE)),
            list: ArcSwap::from_pointee(RevocationList::default()),
            metrics,
        };
        r.reload()?;
        Ok(r)
    }

    /// Re-reads the file (after the shared state replaced it). Blocking I/O.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let Some(p) = &self.path else { return Ok(()) };
        let list = read_list(p)?;
        self.list.store(Arc::new(list));
        self.publish_metrics();
        Ok(())
    }

    /// The list in force.
    pub(crate) fn list(&self) -> Arc<RevocationList> {
        self.list.load_full()
    }

    /// The denial of `w`, if any.
    pub(crate) fn denied(&self, w: &Workload) -> Option<Record> {
        let l = self.list.load();
        if l.identities.is_empty() {
            return None;
        }
        l.identities.get(&w.to_string()).cloned()
    }

    /// True when `serial` is revoked.
    pub(crate) fn is_revoked(&self, serial: &str) -> bool {
        let l = self.list.load();
        !l.serials.is_empty() && l.serials.contains_key(serial)
    }

    /// True when nothing is revoked or denied (the request path skips work).
    pub(crate) fn is_empty(&self) -> bool {
        let l = self.list.load();
        l.serials.is_empty() && l.identities.is_empty()
    }

    /// Applies a change to the file and the list in force. Blocking I/O.
    pub(crate) fn apply(
        &self,
        change: &Change,
        by: &str,
        now: std::time::SystemTime,
    ) -> Result<(), RevocationError> {
        // Re-read first: the file is the truth (another replica's state may
        // have been pulled into it).
        let mut list = match &self.path {
            Some(p) => read_list(p).map_err(RevocationError::Storage)?,
            None => (*self.list()).clone(),
        };
        let record = |reason: &str| Record {
            reason: reason.chars().take(MAX_REASON).collect(),
            time: crate::util::clock::rfc3339(now),
            by: by.into(),
        };
        match change {
            Change::RevokeSerial { serial, reason } => {
                if list.serials.contains_key(serial) {
                    return Err(RevocationError::Conflict(format!(
                        "serial {serial} is already revoked"
                    )));
                }
                list.serials.insert(serial.clone(), record(reason));
            }
            Change::Deny { identity, reason } => {
                let k = identity.to_string();
                if list.identities.contains_key(&k) {
                    return Err(RevocationError::Conflict(format!(
                        "identity {k} is already denied"
                    )));
                }
                list.identities.insert(k, record(reason));
            }
            Change::LiftSerial(s) => {
                if list.serials.remove(s).is_none() {
                    return Err(RevocationError::NotFound(format!(
                        "serial {s} is not revoked (see `meshca revoke --list`)"
                    )));
                }
            }
            Change::LiftIdentity(w) => {
                if list.identities.remove(&w.to_string()).is_none() {
                    return Err(RevocationError::NotFound(format!(
                        "identity {w} is not denied (see `meshca revoke --list`)"
                    )));
                }
            }
        }
        if let Some(p) = &self.path {
            let bytes = serde_json::to_vec_pretty(&list)
                .map_err(|e| RevocationError::Storage(e.to_string()))?;
            crate::util::secret::write_public(p, &bytes)
                .map_err(|e| RevocationError::Storage(format!("{}: {e}", p.display())))?;
        }
        self.list.store(Arc::new(list));
        self.publish_metrics();
        Ok(())
    }

    fn publish_metrics(&self) {
        let l = self.list.load();
        self.metrics
            .set_revocations(l.serials.len(), l.identities.len());
    }
}

fn read_list(p: &Path) -> Result<RevocationList, String> {
    match std::fs::read(p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevocationList::default()),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// Checks the bytes of a `revocations.json` (from the shared state Secret)
/// before they are written into the data directory.
pub(crate) fn validate(bytes: &[u8]) -> Result<(), String> {
    let l: RevocationList = serde_json::from_slice(bytes).map_err(|e| format!("{FILE}: {e}"))?;
    for s in l.serials.keys() {
        if parse_serial(s).as_deref() != Ok(s.as_str()) {
            return Err(format!("{FILE}: {s:?} is not a normalized serial"));
        }
    }
    for i in l.identities.keys() {
        parse_identity(i).map_err(|e| format!("{FILE}: {e}"))?;
    }
    Ok(())
}

/// Applies operator changes to a running (or offline) CA: the list, the
/// shared state, the log line, the audit entry, the metrics.
#[derive(Clone)]
pub(crate) struct RevocationService {
    revs: Arc<Revocations>,
    audit: Option<crate::audit::AuditLog>,
    rotation: Option<Arc<crate::trust::service::RotationService>>,
    clock: Arc<dyn crate::util::clock::Clock>,
}

impl std::fmt::Debug for RevocationService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationService")
            .field("revocations", &self.revs)
            .finish_non_exhaustive()
    }
}

impl RevocationService {
    /// `rotation` (when given) shares the change with the other replicas.
    pub(crate) fn new(
        revs: Arc<Revocations>,
        audit: Option<crate::audit::AuditLog>,
        rotation: Option<Arc<crate::trust::service::RotationService>>,
        clock: Arc<dyn crate::util::clock::Clock>,
    ) -> Self {
        Self {
            revs,
            audit,
            rotation,
            clock,
        }
    }

    /// The list.
    pub(crate) fn revocations(&self) -> &Arc<Revocations> {
        &self.revs
    }

    /// Makes one change, shares it, logs and audits it.
    pub(crate) async fn change(&self, change: Change, actor: &str) -> Result<(), RevocationError> {
        let now = self.clock.now();
        let revs = self.revs.clone();
        let (c, by) = (change.clone(), actor.to_string());
        let apply = move || revs.apply(&c, &by, now);
        match &self.rotation {
            Some(rot) => rot.shared_change(apply).await?,
            None => tokio::task::spawn_blocking(apply)
                .await
                .map_err(|e| RevocationError::Storage(e.to_string()))??,
        }
        self.revs.metrics.revocation_change(change.action());
        tracing::warn!(action = change.action(), actor, "{}", change.describe());
        self.audit(&change, actor, now).await;
        Ok(())
    }

    async fn audit(&self, change: &Change, actor: &str, now: std::time::SystemTime) {
        let Some(log) = &self.audit else { return };
        let mut e = crate::audit::Entry {
            time: crate::util::clock::rfc3339(now),
            time_unix_ms: crate::util::clock::unix_millis(now),
            kind: "revocation".into(),
            result: change.action().into(),
            reason: actor.chars().take(64).collect(),
            detail: Some(change.describe()),
            ..Default::default()
        };
        match change {
            Change::RevokeSerial { serial, reason } => {
                e.serial = Some(serial.clone());
                e.detail = Some(format!(
                    "{}: {}",
                    change.describe(),
                    reason.chars().take(MAX_REASON).collect::<String>()
                ));
            }
            Change::LiftSerial(s) => e.serial = Some(s.clone()),
            Change::Deny { identity, reason } => {
                e.namespace = Some(identity.namespace.to_string());
                e.service_account = Some(identity.service_account.to_string());
                e.detail = Some(format!(
                    "{}: {}",
                    change.describe(),
                    reason.chars().take(MAX_REASON).collect::<String>()
                ));
            }
            Change::LiftIdentity(w) => {
                e.namespace = Some(w.namespace.to_string());
                e.service_account = Some(w.service_account.to_string());
            }
        }
        if let Err(err) = log.append(e).await {
            tracing::error!(error = %err, "could not record a revocation change in the audit log");
        }
    }
}

/// The list as the admin endpoint and `meshca revoke --list --output json` show it.
pub(crate) fn list_json(l: &RevocationList) -> serde_json::Value {
    serde_json::json!({
        "serials": l.serials.iter().map(|(s, r)| serde_json::json!({
            "serial": s, "reason": r.reason, "time": r.time, "by": r.by,
        })).collect::<Vec<_>>(),
        "identities": l.identities.iter().map(|(i, r)| serde_json::json!({
            "identity": i, "reason": r.reason, "time": r.time, "by": r.by,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_persist_and_reload_and_inputs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let r = Revocations::open(dir.path(), Arc::default()).unwrap();
        assert!(r.is_empty());
        let web = parse_identity("shop/web").unwrap();
        r.apply(
            &Change::Deny {
                identity: web.clone(),
                reason: "compromised".into(),
            },
            "test",
            now,
        )
        .unwrap();
        let serial = parse_serial("0x0A:1B").unwrap();
        assert_eq!(serial, "0a1b");
        r.apply(
            &Change::RevokeSerial {
                serial: serial.clone(),
                reason: String::new(),
            },
            "test",
            now,
        )
        .unwrap();
        assert!(matches!(
            r.apply(&Change::LiftSerial("ffff".into()), "t", now),
            Err(RevocationError::NotFound(_))
        ));
        // A restart sees the same list.
        let again = Revocations::open(dir.path(), Arc::default()).unwrap();
        assert_eq!(again.denied(&web).unwrap().reason, "compromised");
        assert!(again.is_revoked("0a1b"));
        assert!(again.denied(&parse_identity("shop/db").unwrap()).is_none());
        validate(&std::fs::read(dir.path().join(FILE)).unwrap()).unwrap();
        again
            .apply(&Change::LiftIdentity(web.clone()), "t", now)
            .unwrap();
        assert!(Revocations::open(dir.path(), Arc::default())
            .unwrap()
            .denied(&web)
            .is_none());
        assert!(parse_serial("xyz").is_err());
        // Leading zero octets or digits name the same serial (review finding:
        // `--serial 00<serial>` was stored as given and never matched).
        let serial = "4a1b2c3d4e5f60718293a4b5c6d7e8f9";
        assert_eq!(parse_serial(&format!("00{serial}")).unwrap(), serial);
        assert_eq!(parse_serial(&format!("0x000{serial}")).unwrap(), serial);
        assert_eq!(parse_serial("000a1b").unwrap(), "0a1b");
        assert!(parse_identity("shop").is_err());
        assert!(validate(br#"{"serials":{"XYZ":{"time":"t"}}}"#).is_err());
        // A file that does not parse stops the start instead of re-admitting.
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert!(Revocations::open(dir.path(), Arc::default()).is_err());
    }
}
