//! `meshca rotation status` from the data directory (read-only): each root
//! and the issuer, with fingerprint, validity, state and the number of live
//! leaves it signed (counted from the audit log), plus expiry warnings.
//!
//! Must not: change anything.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use x509_parser::prelude::*;

use crate::audit::store::{Filter, SqliteStore};
use crate::ca::store::DataDir;
use crate::ca::{fingerprint, pem_to_certs, to_system_time};
use crate::clock::rfc3339;

/// One certificate row.
#[derive(Debug, Clone, Serialize)]
pub struct CertRow {
    /// `root` or `issuer`.
    pub kind: &'static str,
    /// SHA-256 fingerprint (hex).
    pub fingerprint: String,
    /// Subject.
    pub subject: String,
    /// Validity start (RFC 3339).
    pub not_before: String,
    /// Validity end (RFC 3339).
    pub not_after: String,
    /// `active`, `in bundle`, `expired`, or (journal) the rotation phase.
    pub state: String,
    /// Leaves signed under it that have not expired (None without an audit log).
    pub live_leaves: Option<u64>,
    /// Seconds until expiry (negative once expired).
    pub expires_in_s: i64,
}

/// The status report.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Roots, then the issuer.
    pub certificates: Vec<CertRow>,
    /// Warnings (expiry thresholds).
    pub warnings: Vec<String>,
    /// What to do next, and when.
    pub next_step: String,
}

fn parse(der: &[u8]) -> Result<(String, SystemTime, SystemTime, Vec<u8>), String> {
    let (_, x) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    Ok((
        x.subject().to_string(),
        to_system_time(x.validity().not_before),
        to_system_time(x.validity().not_after),
        x.issuer().as_raw().to_vec(),
    ))
}

/// Builds the status of `data` at `now`. Warns for anything expiring within `warn_within`.
pub fn status(data: &DataDir, now: SystemTime, warn_within: Duration) -> Result<Status, String> {
    let read = |name: &str| -> Result<Vec<Vec<u8>>, String> {
        let p = data.file(name);
        let b = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(pem_to_certs(&b)?.into_iter().map(|c| c.to_vec()).collect())
    };
    let roots = read("bundle.pem")?;
    let issuer = read("issuer.crt")?.swap_remove(0);
    let (i_subject, i_nb, i_na, i_issuer_name) = parse(&issuer)?;
    let issuer_fp = fingerprint(&issuer);

    // Live leaves per issuer, from the audit log's granted entries.
    let live: Option<std::collections::HashMap<String, u64>> = {
        let db = data.file(crate::audit::DB_FILE);
        if db.exists() {
            let store = SqliteStore::open_read_only(&db)?;
            let rows = crate::audit::query::list(
                &store,
                &Filter {
                    result: Some("granted".into()),
                    ..Default::default()
                },
            )?;
            let mut m = std::collections::HashMap::new();
            for r in rows {
                let alive = r
                    .entry
                    .not_after
                    .as_deref()
                    .and_then(|t| {
                        ::time::OffsetDateTime::parse(
                            t,
                            &::time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .is_some_and(|t| SystemTime::from(t) > now);
                if let (true, Some(f)) = (alive, r.entry.issuer_fingerprint) {
                    *m.entry(f).or_insert(0) += 1;
                }
            }
            Some(m)
        } else {
            None
        }
    };
    let issuer_live = live
        .as_ref()
        .map(|m| m.get(&issuer_fp).copied().unwrap_or(0));

    let secs = |t: SystemTime| -> i64 {
        match t.duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    };
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    for r in &roots {
        let (subject, nb, na, _) = parse(r)?;
        let (_, x) = X509Certificate::from_der(r).map_err(|e| e.to_string())?;
        let signs_issuer = x.subject().as_raw() == i_issuer_name.as_slice();
        let state = if na <= now {
            "expired"
        } else if signs_issuer {
            "active"
        } else {
            "in bundle"
        };
        rows.push(CertRow {
            kind: "root",
            fingerprint: fingerprint(r),
            subject,
            not_before: rfc3339(nb),
            not_after: rfc3339(na),
            state: state.into(),
            live_leaves: if signs_issuer {
                issuer_live
            } else {
                live.as_ref().map(|_| 0)
            },
            expires_in_s: secs(na),
        });
    }
    rows.push(CertRow {
        kind: "issuer",
        fingerprint: issuer_fp,
        subject: i_subject,
        not_before: rfc3339(i_nb),
        not_after: rfc3339(i_na),
        state: if i_na <= now {
            "expired".into()
        } else {
            "active".into()
        },
        live_leaves: issuer_live,
        expires_in_s: secs(i_na),
    });
    for r in &rows {
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
    let next_step = if i_na <= now {
        "the issuer has expired: issuance is refused until it is replaced".to_string()
    } else {
        format!(
            "no rotation in progress; the issuer should be renewed by {} (2/3 of its lifetime)",
            rfc3339(i_nb + (i_na.duration_since(i_nb).unwrap_or_default() * 2) / 3)
        )
    };
    Ok(Status {
        certificates: rows,
        warnings,
        next_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::InitOptions;

    #[test]
    fn status_of_a_fresh_ca_and_expiry_warnings() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let now = SystemTime::now();
        d.init(&InitOptions::default(), now).unwrap();
        let s = status(&d, now, Duration::from_secs(7 * 86400)).unwrap();
        assert_eq!(s.certificates.len(), 2);
        assert_eq!(s.certificates[0].kind, "root");
        assert_eq!(s.certificates[0].state, "active");
        assert_eq!(s.certificates[1].kind, "issuer");
        assert_eq!(s.certificates[1].live_leaves, None, "no audit log yet");
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        // 25 days later the 30-day issuer is within the 7-day warning window.
        let later = now + Duration::from_secs(25 * 86400);
        let s = status(&d, later, Duration::from_secs(7 * 86400)).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].starts_with("issuer"));
        // 31 days later it has expired.
        let s = status(&d, now + Duration::from_secs(31 * 86400), Duration::ZERO).unwrap();
        assert_eq!(s.certificates[1].state, "expired");
        assert!(s.warnings[0].contains("EXPIRED"));
        assert!(s.next_step.contains("expired"));
    }
}
