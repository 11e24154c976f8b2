//! What every command shares for talking to the operator: the `--output`
//! choice, JSON printing, and logging set-up for the process.
//!
//! Owns: the output format switch and the logging subscriber. Must not:
//! know any command's data (each command formats its own table).

use clap::ValueEnum;

use crate::config::LogFormat;

/// Output format for commands that print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// A readable table.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// Prints `v` as pretty JSON on stdout (the `--output json` form).
pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Sets up logging to stderr through a background writer thread, so a slow
/// log consumer never blocks a request. Keep the guard alive: dropping it
/// flushes what is buffered.
pub fn init_logging(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHCA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Never drop a decision log line: back-pressure instead when the
        // buffer of 128k lines is full.
        .lossy(false)
        .buffered_lines_limit(128 * 1024)
        .finish(std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let ok = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
    ok.ok().map(|_| guard)
}
