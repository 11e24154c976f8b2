//! `meshca serve`: resolve the configuration, start the server, and drain
//! it on SIGINT/SIGTERM.
//!
//! Owns: the process's signal handling and the logging guard's lifetime.
//! Must not: build any part of the server itself (that is `server::start`).

use crate::cli::output::init_logging;
use crate::config::ServeArgs;

/// Runs the CA until SIGINT or SIGTERM, then drains in-flight requests.
pub(crate) async fn run(args: ServeArgs) -> Result<(), crate::cli::Error> {
    let cfg = args
        .with_file()
        .and_then(|a| a.resolve())
        .map_err(|e| crate::cli::Error::Failed(e.to_string()))?;
    let _log = init_logging(cfg.log_format);
    let mut running = crate::server::start(cfg).await.map_err(exit_reason)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| crate::cli::Error::Failed(e.to_string()))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining in-flight requests"),
        _ = term.recv() => tracing::info!("SIGTERM: draining in-flight requests"),
    }
    running.trigger_shutdown();
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// A data directory held by another process exits like every other
/// command that finds it locked (docs/configuration.md, "Exit codes");
/// any other start-up failure is the generic one.
fn exit_reason(e: crate::server::ServeError) -> crate::cli::Error {
    match e.source.downcast::<crate::ca::store::StoreError>() {
        Ok(store) => crate::cli::Error::Store(*store),
        Err(other) => crate::cli::Error::Failed(other.to_string()),
    }
}
