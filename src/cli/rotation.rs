//! `meshca rotation …`: the operator's rotation commands.
//!
//! Owns: the flags, talking to a running server's admin endpoint
//! (`--server`), or running the same step offline on a data directory no
//! server holds (its lock is taken), and printing the result (table or
//! `--output json`). Offline steps go through the same
//! [`RotationService`] as the server's, so they are gated, logged and
//! audited the same way. Must not: decide or persist anything itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cli::Output;
use crate::trust::manager::{RootSource, TrustManager};
use crate::trust::service::{RotationService, Settings, Step};
use crate::util::duration::HumanDuration;

/// Where a rotation command acts.
#[derive(Debug, Clone, Args)]
pub struct Target {
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
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    /// Offline: the longest leaf lifetime the server grants (its max_ttl).
    #[arg(long, default_value = "24h")]
    pub max_ttl: HumanDuration,
    /// Offline: least time a prepared root must be in the bundle before activation.
    #[arg(long, default_value = "24h")]
    pub propagation_wait: HumanDuration,
    /// Offline: lifetime of the issuer made under a newly active root.
    #[arg(long, default_value = "30d")]
    pub issuer_lifetime: HumanDuration,
    /// Offline: trust domain (names the audit log).
    #[arg(long, env = "MESHCA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
}

/// `meshca rotation …`.
#[derive(Debug, Subcommand)]
pub enum RotationCommand {
    /// Each root and the issuer: fingerprint, validity, state, live leaves,
    /// propagation, and the next step with when it becomes safe.
    Status {
        /// Where.
        #[command(flatten)]
        target: Target,
        /// Warn about anything expiring within this.
        #[arg(long, default_value = "7d")]
        warn_within: HumanDuration,
    },
    /// Add a new root to the trust bundle (generated, or imported with
    /// --root-cert/--root-key); it does not sign until `activate`.
    Prepare {
        /// Where.
        #[command(flatten)]
        target: Target,
        /// Import this root certificate (PEM) instead of generating one.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The imported root's private key (PEM).
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        /// Lifetime of a generated root.
        #[arg(long, default_value = "365d")]
        root_lifetime: HumanDuration,
    },
    /// Make the prepared root sign (a new issuer under it); the old root
    /// retires. Refused until the new bundle has propagated.
    Activate {
        /// Where.
        #[command(flatten)]
        target: Target,
        /// Activate even though some clients may not trust the new root yet:
        /// they fail mTLS with peers holding new certificates until they
        /// fetch the bundle. For emergencies (a tainted or expired root).
        #[arg(long)]
        force: bool,
    },
    /// Remove retired roots from the bundle once every leaf they signed has expired.
    Retire {
        /// Where.
        #[command(flatten)]
        target: Target,
    },
    /// Mark a root compromised: clients are told to re-certify, and it
    /// leaves the bundle as soon as no live leaf depends on it.
    Taint {
        /// Where.
        #[command(flatten)]
        target: Target,
        /// The root's fingerprint (or a unique prefix of it).
        root: String,
    },
}

/// Runs a rotation command.
pub(crate) async fn run(cmd: RotationCommand) -> Result<(), crate::cli::Error> {
    let (target, req): (Target, Request) = match cmd {
        RotationCommand::Status {
            target,
            warn_within,
        } => (target, Request::Status(warn_within.0)),
        RotationCommand::Prepare {
            target,
            root_cert,
            root_key,
            root_lifetime,
        } => (
            target,
            Request::Step(Step::Prepare(match (root_cert, root_key) {
                (Some(c), Some(k)) => RootSource::Import(absolute(c)?, absolute(k)?),
                _ => RootSource::Generate(root_lifetime.0),
            })),
        ),
        RotationCommand::Activate { target, force } => {
            (target, Request::Step(Step::Activate { force }))
        }
        RotationCommand::Retire { target } => (target, Request::Step(Step::Retire)),
        RotationCommand::Taint { target, root } => (target, Request::Step(Step::Taint(root))),
    };
    let output = target.output;
    let reply = match &target.server {
        Some(url) => remote(&target, url, req).await?,
        None => offline(&target, req).await?,
    };
    Ok(print_reply(&reply, output)?)
}

#[derive(Debug)]
enum Request {
    Status(Duration),
    Step(Step),
}

fn absolute(p: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display()))
}

async fn remote(
    target: &Target,
    url: &str,
    req: Request,
) -> Result<serde_json::Value, crate::cli::Error> {
    let base = url.trim_end_matches('/');
    let (path, body) = match &req {
        Request::Status(w) => {
            // Reading the status needs the admin token too (it names roots,
            // issuers and clients).
            let token = admin_token(&target.data_dir, target.admin_token_file.as_deref())?;
            let url = format!("{base}/rotation/status?warn_within={}", HumanDuration(*w));
            let (code, text) =
                crate::client::admin::request("GET", &url, Some(&token), None).await?;
            return reply_json(code, &text);
        }
        Request::Step(Step::Prepare(RootSource::Generate(l))) => (
            "prepare",
            serde_json::json!({ "root_lifetime": HumanDuration(*l).to_string() }),
        ),
        Request::Step(Step::Prepare(RootSource::Import(c, k))) => (
            "prepare",
            serde_json::json!({ "root_cert": c, "root_key": k }),
        ),
        Request::Step(Step::Activate { force }) => {
            ("activate", serde_json::json!({ "force": force }))
        }
        Request::Step(Step::Retire) => ("retire", serde_json::json!({})),
        Request::Step(Step::Taint(r)) => ("taint", serde_json::json!({ "root": r })),
    };
    let token = admin_token(&target.data_dir, target.admin_token_file.as_deref())?;
    let (code, text) = crate::client::admin::request(
        "POST",
        &format!("{base}/rotation/{path}"),
        Some(&token),
        Some(body.to_string()),
    )
    .await?;
    reply_json(code, &text)
}

/// The admin token: --admin-token-file, else DATA_DIR/admin.token. Shared by
/// every operator command that talks to `--server` (rotation, revoke).
pub(crate) fn admin_token(
    data_dir: &std::path::Path,
    admin_token_file: Option<&std::path::Path>,
) -> Result<String, String> {
    let token_file = admin_token_file
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| data_dir.join(crate::admin::rotation::TOKEN_FILE));
    let token = crate::util::secret::read_private(&token_file).map_err(|e| {
        format!(
            "cannot read the admin token {}: {e}; give the server's token file with --admin-token-file (it is admin.token in the server's data directory)",
            token_file.display()
        )
    })?;
    Ok(String::from_utf8_lossy(token.expose()).trim().to_string())
}

/// An admin reply as JSON, or the server's error as a sentence with a hint
/// (401 and 421 say what to change).
pub(crate) fn reply_json(code: u16, text: &str) -> Result<serde_json::Value, crate::cli::Error> {
    let said = || {
        serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string())
    };
    match code {
        401 => return Err(crate::cli::Error::Remote { status: code, message: format!(
            "the admin endpoint refused the admin token ({}); hint: pass the server's own token with --admin-token-file (admin.token in its data directory) or run this where --data-dir is the server's",
            said()
        ) }),
        421 => return Err(crate::cli::Error::Remote { status: code, message: format!(
            "the admin endpoint does not answer to this address ({}); hint: use the address it listens on, or add this name to the server's admin_allowed_hosts",
            said()
        ) }),
        _ => {}
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!("the server answered HTTP {code} with something that is not JSON ({e}): {text}")
    })?;
    if code == 200 {
        Ok(v)
    } else {
        Err(crate::cli::Error::Remote {
            status: code,
            message: v["error"]
                .as_str()
                .map_or_else(|| text.to_string(), str::to_string),
        })
    }
}

/// The data directory of an offline command, under its lock (held while
/// the returned file lives), or why it cannot be used.
pub(crate) fn lock_offline(
    dir: &std::path::Path,
) -> Result<(crate::ca::store::DataDir, std::fs::File), crate::cli::Error> {
    let data = crate::ca::store::DataDir::new(dir);
    if !data.is_initialized() {
        return Err(format!(
            "{} holds no CA; run `meshca init --data-dir {0}` first, or give --server",
            dir.display()
        )
        .into());
    }
    let lock = crate::ca::store::lock_data_dir(&data)?;
    Ok((data, lock))
}

async fn offline(target: &Target, req: Request) -> Result<serde_json::Value, crate::cli::Error> {
    let (data, lock) = lock_offline(&target.data_dir)?;
    let clock: Arc<dyn crate::util::clock::Clock> = Arc::new(crate::util::clock::SystemClock);
    let now = clock.now();
    let mgr = Arc::new(TrustManager::open(data.clone(), now)?);
    let settings = Settings {
        issuer_lifetime: target.issuer_lifetime.0,
        root_lifetime: Duration::from_secs(365 * 86400),
        propagation_wait: target.propagation_wait.0,
        max_leaf_ttl: target.max_ttl.0,
        expiry_warning: Duration::from_secs(7 * 86400),
        auto_rotate_every: None,
        check_interval: Duration::from_secs(30),
    };
    if let Request::Status(w) = req {
        let obs = crate::trust::rotation::Observations::no_clients(
            now,
            settings.propagation_wait,
            settings.max_leaf_ttl,
        );
        let s = crate::trust::status::status(&data, &mgr.state(), &obs, None, w)?;
        drop(lock);
        return Ok(serde_json::to_value(s).map_err(|e| e.to_string())?);
    }
    let Request::Step(step) = req else {
        unreachable!("status returned above")
    };
    let rec = mgr.reconcile(settings.issuer_lifetime, now)?;
    let loaded = data.load()?;
    let policy = crate::ca::Policy {
        mesh: crate::identity::Mesh {
            trust_domain: target
                .trust_domain
                .parse()
                .map_err(|e| crate::cli::Error::Usage(format!("--trust-domain: {e}")))?,
            control_plane_ns: "meshca".parse().map_err(|e| format!("{e}"))?,
        },
        default_ttl: target.max_ttl.0,
        max_ttl: target.max_ttl.0,
        min_ttl: Duration::ZERO,
    };
    let ca = Arc::new(crate::ca::Authority::new(
        policy,
        clock.clone(),
        loaded.issuer,
        loaded.roots,
    ));
    // Offline: no /metrics serves this registry; the components need one.
    let metrics: Arc<crate::metrics::Metrics> = Arc::default();
    let (audit, guard) = if data.file(crate::audit::DB_FILE).exists() {
        let (l, g) = crate::audit::AuditLog::open(
            &target.data_dir,
            &target.trust_domain,
            clock,
            metrics.clone(),
        )?;
        (Some(l), Some(g))
    } else {
        (None, None)
    };
    let svc = RotationService::new(mgr, ca, Arc::default(), audit, settings, metrics);
    svc.publish(&rec).await?;
    let r = svc.step(step, "operator (offline)").await;
    if let Some(g) = guard {
        let _ = tokio::task::spawn_blocking(move || g.stop()).await;
    }
    let events = r?;
    let obs = svc.observations(svc.clock().now());
    let s = crate::trust::status::status(
        &data,
        &svc.manager().state(),
        &obs,
        None,
        Duration::from_secs(7 * 86400),
    )?;
    drop(lock);
    Ok(serde_json::json!({
        "events": events.iter().map(crate::admin::rotation::event_text).collect::<Vec<_>>(),
        "status": s,
    }))
}

fn print_reply(v: &serde_json::Value, output: Output) -> Result<(), String> {
    if output == Output::Json {
        return crate::cli::output::print_json(v);
    }
    let status = if v.get("status").is_some() {
        for e in v["events"].as_array().into_iter().flatten() {
            println!("done: {}", e.as_str().unwrap_or_default());
        }
        &v["status"]
    } else {
        v
    };
    let s: crate::trust::status::Status = serde_json::from_value(status.clone())
        .map_err(|e| format!("unexpected status from the server: {e}"))?;
    print_status_table(&s);
    Ok(())
}

/// Prints a rotation status as the operator's table.
fn print_status_table(s: &crate::trust::status::Status) {
    println!("trust bundle version {}", s.bundle_version);
    println!(
        "{:<7}  {:<16}  {:<18}  {:<20}  {:<20}  {:>11}  {:>11}  SUBJECT",
        "KIND", "FINGERPRINT", "STATE", "NOT BEFORE", "NOT AFTER", "LIVE LEAVES", "PROPAGATION"
    );
    for c in &s.certificates {
        println!(
            "{:<7}  {:<16}  {:<18}  {:<20}  {:<20}  {:>11}  {:>11}  {}",
            c.kind,
            // From the server's JSON: never panic on a short value.
            c.fingerprint.get(..16).unwrap_or(&c.fingerprint),
            c.state,
            c.not_before.get(..19).unwrap_or(&c.not_before),
            c.not_after.get(..19).unwrap_or(&c.not_after),
            c.live_leaves.map_or("-".to_string(), |n| n.to_string()),
            c.propagation.as_deref().unwrap_or("-"),
            c.subject
        );
    }
    for c in s.certificates.iter().filter(|c| c.jwt_key.is_some()) {
        println!(
            "JWT-SVID key of root {}: {}",
            c.fingerprint.get(..16).unwrap_or(&c.fingerprint),
            c.jwt_key.as_deref().unwrap_or("-")
        );
    }
    if let Some(p) = &s.propagation {
        println!(
            "clients: {} live, {} watching; {} have seen bundle version {}",
            p.clients, p.watchers, p.acked, p.version
        );
        if p.anonymous_watchers > 0 {
            println!(
                "anonymous watchers (not counted by the activation gate): {}",
                p.anonymous_watchers
            );
        }
        if !p.other_replicas.is_empty() {
            println!(
                "counted with the reports of replicas: {}",
                p.other_replicas.join(", ")
            );
        }
    }
    for w in &s.warnings {
        println!("WARNING: {w}");
    }
    match &s.next_step_at {
        Some(at) => println!("next: {} (safe from {at})", s.next_step),
        None => println!("next: {}", s.next_step),
    }
}
