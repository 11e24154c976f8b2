//! The `meshca` binary: parses the command line and dispatches.
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = meshca::cli::Cli::parse();
    let log = match cli.command {
        // `serve` sets up logging itself, in the configured format.
        meshca::cli::Command::Serve(_) => None,
        _ => meshca::cli::init_logging(meshca::config::LogFormat::Text),
    };
    let result = meshca::cli::run(cli).await;
    drop(log);
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
