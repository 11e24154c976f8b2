//! `meshca serve`: resolve the configuration, start the server, and drain
//! it on SIGINT/SIGTERM.
//!
//! Owns: the process's signal handling and the logging guard's lifetime.
//! Must not: build any part of the server itself (that is `server::start`).

use crate::cli::output::init_logging;
use crate::config::ServeArgs;

/// Runs the CA until SIGINT or SIGTERM, then drains in-flight requests.
pub(crate) async fn run(args: ServeArgs) -> Result<(), String> {
    let cfg = args
        .with_file()
        .and_then(|a| a.resolve())
        .map_err(|e| e.to_string())?;
    let _log = init_logging(cfg.log_format);
    let mut running = crate::server::start(cfg).await.map_err(|e| e.to_string())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining in-flight requests"),
        _ = term.recv() => tracing::info!("SIGTERM: draining in-flight requests"),
    }
    running.trigger_shutdown();
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}
