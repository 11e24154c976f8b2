//! `meshca audit …`: the auditor's commands over the data directory's log
//! (read-only; safe beside a running server) or over an export.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::audit::{self, note::NoteVerifier, query, store::SqliteStore};
use crate::cli::output::{print_json, Output};

/// Auditor commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List decisions, newest last.
    List {
        /// Only this identity (`namespace/service-account`).
        #[arg(long)]
        identity: Option<String>,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only `granted` or `refused`.
        #[arg(long, value_parser = ["granted", "refused"])]
        result: Option<String>,
        /// From this time on (RFC 3339, Unix ms, or a duration ago like 1h).
        #[arg(long)]
        since: Option<String>,
        /// Before this time.
        #[arg(long)]
        until: Option<String>,
        /// At most this many (the newest).
        #[arg(long)]
        limit: Option<u64>,
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Output: a table, or JSON lines.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show the entry for a serial (or a PEM certificate) with its inclusion proof.
    Show {
        /// A serial in hex, or a PEM certificate file.
        what: String,
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Recompute the tree from every entry and check every checkpoint.
    Verify {
        /// Data directory (ignored with --export).
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Verify an export instead (offline; needs --public-key).
        #[arg(long, requires = "public_key")]
        export: Option<PathBuf>,
        /// The log's verifier key (the string, or a file holding it)
        /// [default: <data-dir>/audit-signer.pub].
        #[arg(long)]
        public_key: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Prove that the tree at --to extends the tree at --from.
    Prove {
        /// Smaller tree size.
        #[arg(long)]
        from: u64,
        /// Larger tree size.
        #[arg(long)]
        to: u64,
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Write every entry and checkpoint as JSON lines.
    Export {
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Output file [default: stdout].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the log's verifier key.
    Key {
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
    },
}

fn open(data_dir: &Path) -> Result<SqliteStore, String> {
    SqliteStore::open_read_only(&data_dir.join(audit::DB_FILE)).map_err(|e| {
        if data_dir.join(audit::DB_FILE).exists() {
            e.to_string()
        } else {
            format!("{e}: pass --data-dir with the data directory of the server that wrote it")
        }
    })
}

fn verifier(data_dir: &Path, key: Option<String>) -> Result<NoteVerifier, String> {
    let text = match key {
        Some(k) if Path::new(&k).exists() => {
            std::fs::read_to_string(&k).map_err(|e| format!("{k}: {e}"))?
        }
        Some(k) => k,
        None => {
            let p = data_dir.join(audit::PUB_FILE);
            std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?
        }
    };
    NoteVerifier::parse(&text)
}

/// Runs an audit command.
pub(crate) fn run(cmd: AuditCommand) -> Result<(), crate::cli::Error> {
    match cmd {
        AuditCommand::List {
            identity,
            namespace,
            result,
            since,
            until,
            limit,
            data_dir,
            output,
        } => {
            let now = std::time::SystemTime::now();
            let time =
                |t: Option<String>| t.as_deref().map(|s| query::parse_time(s, now)).transpose();
            let f = audit::store::Filter {
                identity,
                namespace,
                result,
                since_ms: time(since)?,
                until_ms: time(until)?,
                limit,
                before_index: None,
            };
            list(&data_dir, &f, output)
        }
        AuditCommand::Show {
            what,
            data_dir,
            output,
        } => show(&what, &data_dir, output),
        AuditCommand::Verify {
            data_dir,
            export,
            public_key,
            output,
        } => verify(&data_dir, export.as_deref(), public_key, output),
        AuditCommand::Prove {
            from,
            to,
            data_dir,
            output,
        } => prove(&data_dir, from, to, output),
        AuditCommand::Export { data_dir, out } => export(&data_dir, out.as_deref()),
        AuditCommand::Key { data_dir } => {
            let p = data_dir.join(audit::PUB_FILE);
            print!(
                "{}",
                std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?
            );
            Ok(())
        }
    }
}

/// `audit list`: a table, or one JSON object per line.
fn list(
    data_dir: &Path,
    f: &audit::store::Filter,
    output: Output,
) -> Result<(), crate::cli::Error> {
    let rows = query::list(&open(data_dir)?, f)?;
    match output {
        Output::Json => {
            for r in rows {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            }
        }
        Output::Table => {
            println!(
                "{:>7}  {:<24}  {:<7}  {:<24}  {:<8}  {:<20}  SERIAL",
                "INDEX", "TIME", "API", "IDENTITY", "RESULT", "REASON"
            );
            for r in &rows {
                let e = &r.entry;
                println!(
                    "{:>7}  {:<24}  {:<7}  {:<24}  {:<8}  {:<20}  {}",
                    r.index,
                    e.time.get(..24).unwrap_or(&e.time),
                    e.api.as_deref().unwrap_or("-"),
                    e.identity(),
                    e.result,
                    e.reason,
                    e.serial.as_deref().unwrap_or("-")
                );
            }
            println!("{} entries", rows.len());
        }
    }
    Ok(())
}

/// `audit show`: `what` is a serial in hex, or a PEM certificate file.
fn show(what: &str, data_dir: &Path, output: Output) -> Result<(), crate::cli::Error> {
    let serial = if Path::new(what).exists() {
        let pem = std::fs::read(what).map_err(|e| format!("{what}: {e}"))?;
        let der = crate::ca::pem_to_certs(&pem)?.swap_remove(0);
        let (_, x) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
        hex::encode(x.raw_serial())
    } else {
        what.to_string()
    };
    let shown = query::show(&open(data_dir)?, &serial)?;
    if output == Output::Json {
        return Ok(print_json(&shown)?);
    }
    let e = &shown.entry;
    let or_dash = |v: &Option<String>| v.as_deref().unwrap_or("-").to_string();
    println!("entry {}  ({} {})", shown.index, e.result, e.reason);
    println!("  time        {}", e.time);
    println!("  api         {}", or_dash(&e.api));
    println!(
        "  identity    {}  (auth: {})",
        e.identity(),
        or_dash(&e.auth_method)
    );
    println!("  pod         {}", or_dash(&e.pod_name));
    println!("  serial      {}", or_dash(&e.serial));
    for s in &e.sans {
        println!("  san         {s}");
    }
    println!(
        "  validity    {} .. {}",
        or_dash(&e.not_before),
        or_dash(&e.not_after)
    );
    println!("  leaf sha256 {}", or_dash(&e.leaf_sha256));
    println!("  issuer      {}", or_dash(&e.issuer_fingerprint));
    println!("  leaf hash   {}", shown.leaf_hash);
    match shown.tree_size {
        Some(n) => println!(
            "  inclusion   {} hashes, against the checkpoint of size {n}: {}",
            shown.inclusion_proof.len(),
            verdict(shown.proof_verified)
        ),
        None => println!("  inclusion   no checkpoint covers this entry yet"),
    }
    Ok(())
}

fn verdict(verified: bool) -> &'static str {
    if verified {
        "verifies"
    } else {
        "DOES NOT VERIFY"
    }
}

/// `audit verify`: the data directory's log, or an export (offline).
fn verify(
    data_dir: &Path,
    export: Option<&Path>,
    public_key: Option<String>,
    output: Output,
) -> Result<(), crate::cli::Error> {
    let progress = |n: u64| eprint!("\rchecking: {n} entries read");
    let report = match export {
        Some(f) => {
            let v = verifier(data_dir, public_key)?;
            let file = std::fs::File::open(f).map_err(|e| format!("{}: {e}", f.display()))?;
            query::verify_export(&mut std::io::BufReader::new(file), &v, progress)
        }
        None => {
            // The log must exist before its key is read, so a wrong
            // directory says so rather than a raw OS error.
            let store = open(data_dir)?;
            let v = verifier(data_dir, public_key)?;
            query::verify_store(&store, &v, progress)
        }
    };
    // Erase the progress line: the verdict follows on its own.
    eprint!("\r{:60}\r", "");
    let report = report.map_err(|e| format!("VERIFICATION FAILED: {e}"))?;
    if output == Output::Json {
        return Ok(print_json(&report)?);
    }
    println!("audit log OK");
    println!("  entries              {}", report.entries);
    println!(
        "  checkpoints          {} (all signatures verify, each consistent with the next)",
        report.checkpoints
    );
    println!(
        "  latest checkpoint    size {}",
        report.latest_checkpoint_size
    );
    println!("  not yet checkpointed {}", report.unsigned_tail);
    println!("  root                 {}", report.root);
    Ok(())
}

/// `audit prove`: the consistency proof between two tree sizes.
fn prove(data_dir: &Path, from: u64, to: u64, output: Output) -> Result<(), crate::cli::Error> {
    let p = query::prove(&open(data_dir)?, from, to)?;
    if output == Output::Json {
        return Ok(print_json(&p)?);
    }
    let signed = |c: bool| if c { "  (signed checkpoint)" } else { "" };
    println!(
        "consistency {} -> {}: {}",
        p.from,
        p.to,
        verdict(p.proof_verified)
    );
    println!(
        "  root at {:<8} {}{}",
        p.from,
        p.from_root,
        signed(p.from_checkpoint.is_some())
    );
    println!(
        "  root at {:<8} {}{}",
        p.to,
        p.to_root,
        signed(p.to_checkpoint.is_some())
    );
    for h in &p.proof {
        println!("  proof    {h}");
    }
    Ok(())
}

/// `audit export`: every entry and checkpoint as JSON lines, to a file or stdout.
fn export(data_dir: &Path, out: Option<&Path>) -> Result<(), crate::cli::Error> {
    let store = open(data_dir)?;
    let key = std::fs::read_to_string(data_dir.join(audit::PUB_FILE)).map_err(|e| e.to_string())?;
    let n = match out {
        Some(p) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
            );
            query::export(&store, key.trim(), &mut f)?
        }
        None => query::export(&store, key.trim(), &mut std::io::stdout().lock())?,
    };
    eprintln!("exported {n} entries");
    Ok(())
}
