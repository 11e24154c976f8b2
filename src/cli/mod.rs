//! The command line: the argument tree and the dispatch to one file per
//! command family.
//!
//! Owns: turning flags into calls on the library and printing results
//! (tables by default, `--output json` where offered). Must not: hold policy.
//!
//! Files: `output` (the `--output` switch, JSON printing, logging set-up),
//! `error` (exit codes), and one per command family: `init` (init, bundle),
//! `serve`, `token`, `certify`, `inspect`, `audit`, `rotation`, `revoke`,
//! `sidecar` (agent, proxy), `bench`.

// The CLI's job is to print to the terminal: stdout for results, stderr for
// progress and warnings. Everywhere else printing is denied (Cargo.toml
// [lints]) so that the server only ever speaks through `tracing`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod audit;
mod bench;
mod certify;
mod error;
mod federation;
mod init;
mod inspect;
mod output;
pub mod revoke;
mod rotation;
mod serve;
mod sidecar;
mod token;

pub use error::{Error, EXIT_FAILURE, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE};
pub use output::{init_logging, Output};

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

/// meshca: a service-mesh certificate authority.
#[derive(Debug, Parser)]
#[command(name = "meshca", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
// Parsed once per process; boxing the large `serve` variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a CA (root + issuer) in a data directory; refuses to overwrite one.
    Init(init::InitArgs),
    /// Run the CA (gRPC over TLS + admin HTTP). Creates a CA on first start.
    Serve(ServeArgs),
    /// Print the trust bundle (PEM roots).
    Bundle(init::BundleArgs),
    /// Print a PEM certificate chain readably.
    Inspect(inspect::InspectArgs),
    /// Mint a development token shaped like a Kubernetes projected service-account token.
    Token(token::TokenArgs),
    /// Reference client: get a certificate from a running CA and write it out.
    Certify(certify::CertifyArgs),
    /// Benchmark issuance against an in-process server.
    Bench(bench::BenchArgs),
    /// Query and verify the tamper-evident issuance log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Trust-anchor and issuer lifecycle.
    #[command(subcommand)]
    Rotation(rotation::RotationCommand),
    /// SPIFFE federation: the trust domains a running server follows.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// The kill switch: revoke a certificate serial (it can no longer renew)
    /// or deny an identity (refused on every API), lift either, or list them.
    Revoke(revoke::RevokeArgs),
    /// Run beside a workload: obtain and renew its certificate, follow the
    /// trust bundle, and serve them as files and/or the SPIFFE Workload API.
    Agent(sidecar::AgentArgs),
    /// A small L4 mTLS sidecar using the workload's identity (inbound with a
    /// SPIFFE ID allow-list, outbound with upstream identity checks).
    Proxy(sidecar::ProxyArgs),
}

/// Runs a command; the error carries its exit code (`Error::exit_code`).
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Init(a) => init::run(a),
        Command::Serve(args) => Ok(serve::run(args).await?),
        Command::Bundle(a) => init::bundle(a),
        Command::Inspect(a) => Ok(inspect::run(a)?),
        Command::Token(a) => Ok(token::run(a)?),
        Command::Certify(a) => certify::run(a).await,
        Command::Bench(args) => Ok(bench::run(args).await?),
        Command::Audit(cmd) => Ok(audit::run(cmd)?),
        Command::Rotation(cmd) => rotation::run(cmd).await,
        Command::Federation(cmd) => federation::run(cmd).await,
        Command::Revoke(args) => revoke::run(args).await,
        Command::Agent(args) => Ok(sidecar::run_agent(args).await?),
        Command::Proxy(args) => Ok(sidecar::run_proxy(args).await?),
    }
}
