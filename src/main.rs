//! The `meshca` binary: parses the command line and dispatches.
#![forbid(unsafe_code)]
// The binary reports a failed command on stderr, before logging exists for
// most commands; printing is otherwise denied (Cargo.toml [lints]).
#![allow(clippy::print_stderr)]

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
        // The code is chosen in one place, `cli::Error::exit_code` (the table
        // is in docs/configuration.md, "Exit codes"). `exit`, not a returned
        // ExitCode: a failed command must not wait for blocking tasks still
        // running on the runtime.
        std::process::exit(i32::from(e.exit_code()));
    }
}
