//! `meshca revoke …`: the operator's kill switch.
//!
//! Owns: the flags, talking to a running server's admin endpoint
//! (`--server`, admin token required), or making the same change offline on
//! a data directory no server holds (its lock is taken), and printing the
//! list (table or `--output json`). Must not: decide or persist anything
//! itself (see `revocation`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::cli::Output;
use crate::revocation::{
    list_json, parse_identity, parse_serial, Change, RevocationError, RevocationService,
    Revocations,
};

/// `meshca revoke`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").args(["serial", "identity", "list"]).required(true)))]
pub struct RevokeArgs {
    /// Revoke (or with --lift, un-revoke) this certificate serial (hex, as
    /// `meshca inspect` and `meshca audit list` show it): it and every
    /// certificate renewed from it can no longer renew by certificate.
    #[arg(long)]
    pub serial: Option<String>,
    /// Deny (or with --lift, re-admit) NAMESPACE/SERVICE-ACCOUNT: refused
    /// with PERMISSION_DENIED on every API.
    #[arg(long)]
    pub identity: Option<String>,
    /// Why (kept in the list and the audit log).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Lift the revocation of --serial or the denial of --identity.
    #[arg(long, conflicts_with = "list")]
    pub lift: bool,
    /// List what is revoked and denied.
    #[arg(long)]
    pub list: bool,
    /// A running server's admin endpoint (e.g. http://127.0.0.1:9990). Without
    /// it the command works offline on --data-dir (refused while a server holds it).
    #[arg(long, env = "MESHCA_ADMIN_SERVER")]
    pub server: Option<String>,
    /// Data directory (offline mode; also where the admin token is read from).
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    pub data_dir: PathBuf,
    /// Admin token file [default: DATA_DIR/admin.token].
    #[arg(long, env = "MESHCA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Offline: trust domain (names the audit log).
    #[arg(long, env = "MESHCA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// What the command asks for (None: the list).
fn change(a: &RevokeArgs) -> Result<Option<Change>, RevocationError> {
    if a.list {
        return Ok(None);
    }
    Ok(Some(match (&a.serial, &a.identity, a.lift) {
        (Some(s), None, false) => Change::RevokeSerial {
            serial: parse_serial(s)?,
            reason: a.reason.clone(),
        },
        (Some(s), None, true) => Change::LiftSerial(parse_serial(s)?),
        (None, Some(i), false) => Change::Deny {
            identity: parse_identity(i)?,
            reason: a.reason.clone(),
        },
        (None, Some(i), true) => Change::LiftIdentity(parse_identity(i)?),
        _ => {
            return Err(RevocationError::BadInput(
                "give exactly one of --serial, --identity or --list".into(),
            ))
        }
    }))
}

/// Runs `meshca revoke`.
pub async fn run(a: RevokeArgs) -> Result<(), crate::cli::Error> {
    let change = change(&a)?;
    let reply = match &a.server {
        Some(url) => remote(&a, url, change.as_ref()).await?,
        None => offline(&a, change).await?,
    };
    Ok(print(&reply, a.output)?)
}

async fn remote(
    a: &RevokeArgs,
    url: &str,
    change: Option<&Change>,
) -> Result<serde_json::Value, crate::cli::Error> {
    let base = url.trim_end_matches('/');
    let token = crate::cli::rotation::admin_token(&a.data_dir, a.admin_token_file.as_deref())?;
    let (method, path, body) = match change {
        None => ("GET", "revocations", None),
        Some(c) => {
            let (path, body) = match c {
                Change::RevokeSerial { serial, reason } => (
                    "revoke",
                    serde_json::json!({ "serial": serial, "reason": reason }),
                ),
                Change::Deny { identity, reason } => (
                    "revoke",
                    serde_json::json!({ "identity": identity.to_string(), "reason": reason }),
                ),
                Change::LiftSerial(s) => ("lift", serde_json::json!({ "serial": s })),
                Change::LiftIdentity(w) => {
                    ("lift", serde_json::json!({ "identity": w.to_string() }))
                }
            };
            ("POST", path, Some(body.to_string()))
        }
    };
    let url = match path {
        "revocations" => format!("{base}/revocations"),
        p => format!("{base}/revocations/{p}"),
    };
    let (code, text) = crate::client::admin::request(method, &url, Some(&token), body).await?;
    crate::cli::rotation::reply_json(code, &text)
}

async fn offline(
    a: &RevokeArgs,
    change: Option<Change>,
) -> Result<serde_json::Value, crate::cli::Error> {
    let (data, lock) = crate::cli::rotation::lock_offline(&a.data_dir)?;
    // Offline: no /metrics serves this registry; the components need one.
    let metrics: Arc<crate::metrics::Metrics> = Arc::default();
    let revs = Arc::new(Revocations::open(&a.data_dir, metrics.clone())?);
    let Some(change) = change else {
        drop(lock);
        return Ok(list_json(&revs.list()));
    };
    let clock: Arc<dyn crate::util::clock::Clock> = Arc::new(crate::util::clock::SystemClock);
    let (audit, guard) = if data.file(crate::audit::DB_FILE).exists() {
        let (l, g) =
            crate::audit::AuditLog::open(&a.data_dir, &a.trust_domain, clock.clone(), metrics)?;
        (Some(l), Some(g))
    } else {
        (None, None)
    };
    let svc = RevocationService::new(revs.clone(), audit, None, clock);
    let r = svc.change(change.clone(), "operator (offline)").await;
    if let Some(g) = guard {
        let _ = tokio::task::spawn_blocking(move || g.stop()).await;
    }
    drop(lock);
    r?;
    Ok(serde_json::json!({ "done": change.describe(), "list": list_json(&revs.list()) }))
}

fn print(v: &serde_json::Value, output: Output) -> Result<(), String> {
    if output == Output::Json {
        return crate::cli::output::print_json(v);
    }
    let list = match v.get("done") {
        Some(d) => {
            println!("done: {}", d.as_str().unwrap_or_default());
            &v["list"]
        }
        None => v,
    };
    print_table(list);
    Ok(())
}

/// The list as a table.
pub(crate) fn print_table(list: &serde_json::Value) {
    let rows: Vec<[String; 5]> = ["serials", "identities"]
        .iter()
        .flat_map(|k| {
            list[*k]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |e| {
                    let (kind, what) = if *k == "serials" {
                        (
                            "serial",
                            e["serial"].as_str().unwrap_or_default().to_string(),
                        )
                    } else {
                        (
                            "identity",
                            e["identity"].as_str().unwrap_or_default().to_string(),
                        )
                    };
                    [
                        kind.to_string(),
                        what,
                        e["time"].as_str().unwrap_or_default().to_string(),
                        e["by"].as_str().unwrap_or_default().to_string(),
                        e["reason"].as_str().unwrap_or_default().to_string(),
                    ]
                })
        })
        .collect();
    if rows.is_empty() {
        println!("nothing is revoked or denied");
        return;
    }
    let head = ["KIND", "SERIAL / IDENTITY", "SINCE", "BY", "REASON"];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |c: [&str; 5]| {
        let mut s = String::new();
        for (i, cell) in c.iter().enumerate() {
            if i < 4 {
                s.push_str(&format!("{cell:<width$}  ", width = w[i]));
            } else {
                s.push_str(cell);
            }
        }
        println!("{}", s.trim_end());
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
}
