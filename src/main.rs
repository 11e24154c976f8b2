//! The `meshca` binary: parses the command line and dispatches.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = meshca::cli::Cli::parse();
    if !matches!(cli.command, meshca::cli::Command::Serve(_)) {
        meshca::cli::init_logging(meshca::config::LogFormat::Text);
    }
    if let Err(e) = meshca::cli::run(cli).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
