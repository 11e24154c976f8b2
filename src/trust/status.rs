//! `meshca rotation status`: the report (read-only).
//!
//! Owns: building the status from the rotation state, the certificate
//! files, the propagation tracker (when a server is running) and the audit
//! log (live leaves per root and issuer): each root and the issuer with
//! fingerprint, validity, state, live leaves and propagation, expiry
//! warnings, and the next step with when it becomes safe. Must not: change
//! anything.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use super::propagation::Propagation;
use super::rotation::{Observations, Phase, RotationState};
use super::service::phase_name;
use crate::audit::store::{Filter, SqliteStore};
use crate::ca::store::DataDir;
use crate::ca::{fingerprint, to_system_time};
use crate::util::clock::rfc3339;

/// One certificate row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRow {
    /// `root` or `issuer`.
    pub kind: String,
    /// SHA-256 fingerprint (hex).
    pub fingerprint: String,
    /// Subject.
    pub subject: String,
    /// Validity start (RFC 3339).
    pub not_before: String,
    /// Validity end (RFC 3339).
    pub not_after: String,
    /// Roots: `prepared`, `active`, `retired` (with `, tainted`, or
    /// `, EXPIRED`); the issuer: `active` or `EXPIRED`.
    pub state: String,
    /// Leaves signed under it that have not expired (None without an audit log).
    pub live_leaves: Option<u64>,
    /// For the prepared root: clients that have seen it / live clients
    /// (None when unknown, e.g. offline).
    pub propagation: Option<String>,
    /// Seconds until expiry (negative once expired).
    pub expires_in_s: i64,
    /// Roots: their JWT-SVID key, `ALG kid KID (signing|published|withdrawn)`,
    /// or `none` (a root made by an older meshca).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_key: Option<String>,
}

/// The status report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The trust bundle version.
    pub bundle_version: u64,
    /// Roots (oldest first), then the issuer.
    pub certificates: Vec<CertRow>,
    /// Propagation of the version that matters now (None offline).
    pub propagation: Option<Propagation>,
    /// Warnings (expiry thresholds, unobservable clients).
    pub warnings: Vec<String>,
    /// What to do next.
    pub next_step: String,
    /// When it becomes safe (RFC 3339), if it is gated on time.
    pub next_step_at: Option<String>,
}

fn parse(der: &[u8]) -> Result<(String, SystemTime, SystemTime), String> {
    let (_, x) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok((
        x.subject().to_string(),
        to_system_time(x.validity().not_before),
        to_system_time(x.validity().not_after),
    ))
}

/// Live leaves per root and per issuer, from the audit log's granted entries.
type LiveLeaves = (HashMap<String, u64>, HashMap<String, u64>);

fn live_leaves(
    data: &DataDir,
    now: SystemTime,
    max_ttl: Duration,
) -> Result<Option<LiveLeaves>, String> {
    let db = data.file(crate::audit::DB_FILE);
    if !db.exists() {
        return Ok(None);
    }
    let store = SqliteStore::open_read_only(&db).map_err(|e| e.to_string())?;
    let since = now.checked_sub(max_ttl + Duration::from_secs(3600));
    let rows = crate::audit::query::list(
        &store,
        &Filter {
            result: Some("granted".into()),
            since_ms: since.map(crate::util::clock::unix_millis),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let (mut by_root, mut by_issuer) = (HashMap::new(), HashMap::new());
    for r in rows {
        let alive = r
            .entry
            .not_after
            .as_deref()
            .and_then(|t| {
                ::time::OffsetDateTime::parse(t, &::time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .is_some_and(|t| SystemTime::from(t) > now);
        if !alive {
            continue;
        }
        if let Some(f) = r.entry.root_fingerprint {
            *by_root.entry(f).or_insert(0) += 1;
        }
        if let Some(f) = r.entry.issuer_fingerprint {
            *by_issuer.entry(f).or_insert(0) += 1;
        }
    }
    Ok(Some((by_root, by_issuer)))
}

/// Expiry thresholds, laggards, and replicas whose clients are not counted.
fn warnings(
    rows: &[CertRow],
    propagation: Option<&Propagation>,
    warn_within: Duration,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for r in rows {
        if r.expires_in_s <= 0 {
            warnings.push(format!(
                "{} {} EXPIRED at {}",
                r.kind,
                &r.fingerprint[..16],
                r.not_after
            ));
        } else if r.expires_in_s as u64 <= warn_within.as_secs() {
            warnings.push(format!(
                "{} {} expires in {}h (at {})",
                r.kind,
                &r.fingerprint[..16],
                r.expires_in_s / 3600,
                r.not_after
            ));
        }
    }
    if let Some(p) = propagation {
        for l in &p.lagging {
            warnings.push(format!(
                "client has not seen bundle version {}: {l}",
                p.version
            ));
        }
        for r in &p.replica_problems {
            warnings.push(format!("clients not counted (activation refused): {r}"));
        }
        if let Some(e) = &p.own_report_error {
            warnings.push(format!(
                "this replica's propagation report could not be published (other replicas refuse to activate until it is): {e}"
            ));
        }
    }
    warnings
}

/// How a root's JWT-SVID key stands: its type, `kid` and role.
fn jwt_key_row(data: &DataDir, state: &RotationState, r: &super::rotation::RootRecord) -> String {
    let Ok(k) = data.read_jwt_key(&r.id) else {
        return "none".into();
    };
    let role = if r.phase == Phase::Active {
        "signing"
    } else if state.jwt_published().any(|p| p.id == r.id) {
        "published"
    } else {
        "withdrawn"
    };
    format!("{} kid {} ({role})", k.key_type().alg(), k.key_id())
}

/// Builds the status of `data` at `now`. `propagation` comes from a running
/// server; offline it is None.
pub fn status(
    data: &DataDir,
    state: &RotationState,
    obs: &Observations,
    propagation: Option<Propagation>,
    warn_within: Duration,
) -> Result<Status, String> {
    let now = obs.now;
    let live = live_leaves(data, now, obs.max_leaf_ttl)?;
    let secs = |t: SystemTime| -> i64 {
        match t.duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    };
    let mut rows = Vec::new();
    for r in state.in_bundle() {
        let der = data.read_root_cert(&r.id).map_err(|e| e.to_string())?;
        let (subject, nb, na) = parse(&der)?;
        let mut st = phase_name(r.phase).to_string();
        if r.tainted {
            st.push_str(", tainted");
        }
        if na <= now {
            st.push_str(", EXPIRED");
        }
        let prop = match (&propagation, r.phase) {
            (Some(p), Phase::Prepared) => Some(format!("{}/{}", p.acked, p.clients)),
            _ => None,
        };
        rows.push(CertRow {
            kind: "root".into(),
            fingerprint: r.id.clone(),
            subject,
            not_before: rfc3339(nb),
            not_after: rfc3339(na),
            state: st,
            live_leaves: live
                .as_ref()
                .map(|(by_root, _)| by_root.get(&r.id).copied().unwrap_or(0)),
            propagation: prop,
            expires_in_s: secs(na),
            jwt_key: Some(jwt_key_row(data, state, r)),
        });
    }
    let issuer = data
        .issuer_chain()
        .map_err(|e| e.to_string())?
        .swap_remove(0);
    let (i_subject, i_nb, i_na) = parse(&issuer)?;
    let issuer_fp = fingerprint(&issuer);
    rows.push(CertRow {
        kind: "issuer".into(),
        fingerprint: issuer_fp.clone(),
        subject: i_subject,
        not_before: rfc3339(i_nb),
        not_after: rfc3339(i_na),
        state: if i_na <= now { "EXPIRED" } else { "active" }.into(),
        live_leaves: live
            .as_ref()
            .map(|(_, by_issuer)| by_issuer.get(&issuer_fp).copied().unwrap_or(0)),
        propagation: None,
        expires_in_s: secs(i_na),
        jwt_key: None,
    });

    let warnings = warnings(&rows, propagation.as_ref(), warn_within);

    let active_expired = state.active().is_none_or(|a| a.not_after <= now);
    let (next_step, next_step_at) = if active_expired {
        (
            "the active root has expired: run `meshca rotation prepare`, then `meshca rotation activate --force` (docs/rotation.md, recovery)".to_string(),
            None,
        )
    } else if i_na <= now && state.prepared().is_none() {
        (
            "the issuer has expired: restart `meshca serve` (it makes a new issuer under the active root at start)".to_string(),
            None,
        )
    } else {
        let (step, at) = state.next_step(obs);
        (step, at.map(rfc3339))
    };
    Ok(Status {
        bundle_version: state.bundle_version,
        certificates: rows,
        propagation,
        warnings,
        next_step,
        next_step_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::InitOptions;
    use crate::trust::manager::TrustManager;

    fn obs(now: SystemTime) -> Observations {
        Observations::no_clients(now, Duration::from_secs(86400), Duration::from_secs(86400))
    }

    #[test]
    fn status_of_a_fresh_ca_and_expiry_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let now = SystemTime::now();
        d.init(&InitOptions::default(), now).unwrap();
        let m = TrustManager::open(d.clone(), now).unwrap();
        let week = Duration::from_secs(7 * 86400);
        let s = status(&d, &m.state(), &obs(now), None, week).unwrap();
        assert_eq!(s.certificates.len(), 2);
        assert_eq!(s.certificates[0].kind, "root");
        assert_eq!(s.certificates[0].state, "active");
        assert_eq!(s.certificates[1].kind, "issuer");
        assert_eq!(s.certificates[1].live_leaves, None, "no audit log yet");
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert!(s.next_step.starts_with("prepare"), "{}", s.next_step);
        // 25 days later the 30-day issuer is within the 7-day warning window.
        let later = now + Duration::from_secs(25 * 86400);
        let s = status(&d, &m.state(), &obs(later), None, week).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].starts_with("issuer"));
        // 31 days later it has expired.
        let t = now + Duration::from_secs(31 * 86400);
        let s = status(&d, &m.state(), &obs(t), None, Duration::ZERO).unwrap();
        assert_eq!(s.certificates[1].state, "EXPIRED");
        assert!(s.warnings[0].contains("EXPIRED"));
        assert!(s.next_step.contains("expired"));
    }
}
