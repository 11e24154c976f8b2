//! `meshca federation status`: the trust domains a running server follows,
//! read from its admin endpoint (`GET /federation`), as a table or
//! `--output json`.
//!
//! Must not: decide anything (the server's followers own the state).

use clap::{Args, Subcommand};

use crate::cli::Output;
use crate::federation::DomainStatus;

/// `meshca federation …`.
#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Each followed trust domain: endpoint, profile, the bundle held
    /// (sequence, keys), last success, last failure and why, next refresh.
    Status(StatusArgs),
}

/// Where to ask.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The server's admin endpoint.
    #[arg(
        long,
        env = "MESHCA_ADMIN_SERVER",
        default_value = "http://127.0.0.1:9990"
    )]
    pub server: String,
    /// Data directory (where the admin token is read from).
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    pub data_dir: std::path::PathBuf,
    /// Admin token file [default: DATA_DIR/admin.token].
    #[arg(long, env = "MESHCA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// Runs a federation command.
pub(crate) async fn run(cmd: FederationCommand) -> Result<(), crate::cli::Error> {
    let FederationCommand::Status(a) = cmd;
    let token = crate::cli::rotation::admin_token(&a.data_dir, a.admin_token_file.as_deref())?;
    let url = format!("{}/federation", a.server.trim_end_matches('/'));
    let (code, text) = crate::client::admin::request("GET", &url, Some(&token), None).await?;
    let v = crate::cli::rotation::reply_json(code, &text)?;
    if a.output == Output::Json {
        return Ok(crate::cli::output::print_json(&v)?);
    }
    let domains: Vec<DomainStatus> = serde_json::from_value(v["trust_domains"].clone())
        .map_err(|e| format!("unexpected answer from {url}: {e}"))?;
    if domains.is_empty() {
        println!("no trust domains followed (set federate_with; see docs/federation.md)");
        return Ok(());
    }
    print_table(&domains);
    Ok(())
}

fn when(t: Option<u64>) -> String {
    t.map_or("-".into(), |s| {
        crate::util::clock::rfc3339(crate::util::clock::from_unix_secs(s))
    })
}

fn print_table(domains: &[DomainStatus]) {
    println!(
        "{:<24} {:<13} {:>8} {:>5} {:>4} {:<20} {:<20} {:>5}  URL / LAST ERROR",
        "TRUST DOMAIN",
        "PROFILE",
        "SEQUENCE",
        "X509",
        "JWT",
        "LAST SUCCESS",
        "NEXT REFRESH",
        "FAILS"
    );
    for d in domains {
        let seq = d.sequence.map_or("-".into(), |s| s.to_string());
        println!(
            "{:<24} {:<13} {:>8} {:>5} {:>4} {:<20} {:<20} {:>5}  {}",
            d.trust_domain,
            d.profile,
            if d.has_bundle { seq } else { "none".into() },
            d.x509_authorities,
            d.jwt_keys,
            when(d.last_success_unix),
            when(d.next_refresh_unix),
            d.consecutive_failures,
            d.url
        );
        if let Some(e) = d.last_error.as_ref().filter(|_| d.consecutive_failures > 0) {
            println!("{:<24} last error: {e}", "");
        }
    }
}
