//! The agent's file output.
//!
//! Owns: writing `chain.pem` (leaf first), `key.pem` (0600) and
//! `bundle.pem` atomically into a directory whenever the certificate or the
//! bundle changes, then running the operator's command (through `sh -c`,
//! with `MESHCA_OUT_DIR` set) so a server can reload. Must not: hold keys
//! longer than one write.

use std::path::{Path, PathBuf};

use tokio::sync::watch;

use super::State;

/// Writes the current state once.
pub fn write(dir: &Path, state: &State) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let w = |name: &str, bytes: &[u8], private: bool| {
        let p = dir.join(name);
        let r = if private {
            crate::util::secret::write_private(&p, bytes)
        } else {
            crate::util::secret::write_public(&p, bytes)
        };
        r.map_err(|e| format!("{}: {e}", p.display()))
    };
    // Key before chain: a reader that sees the new chain finds its key.
    if let Some(svid) = &state.svid {
        w("key.pem", svid.key_pem.expose(), true)?;
        w("chain.pem", svid.chain_pem().as_bytes(), false)?;
    }
    w("bundle.pem", state.bundle.to_pem().as_bytes(), false)
}

/// Keeps `dir` in line with the agent until the agent stops.
pub async fn follow(dir: PathBuf, on_update: Option<String>, mut rx: watch::Receiver<State>) {
    let mut written: Option<(usize, u64)> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        // Identify what was written by the SVID's address and bundle version.
        let id = (
            state
                .svid
                .as_ref()
                .map_or(0, |s| std::sync::Arc::as_ptr(s) as usize),
            state.bundle.version,
        );
        if state.svid.is_some() && written != Some(id) {
            let d = dir.clone();
            let s = state.clone();
            match tokio::task::spawn_blocking(move || write(&d, &s)).await {
                Ok(Ok(())) => {
                    written = Some(id);
                    tracing::info!(dir = %dir.display(), "certificate files written");
                    if let Some(cmd) = &on_update {
                        run_hook(cmd, &dir).await;
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot write certificate files"),
                Err(e) => tracing::error!(error = %e, "file writer panicked"),
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn run_hook(cmd: &str, dir: &Path) {
    let r = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("MESHCA_OUT_DIR", dir)
        .status()
        .await;
    match r {
        Ok(s) if s.success() => tracing::info!(command = cmd, "update command ran"),
        Ok(s) => tracing::warn!(command = cmd, status = %s, "update command failed"),
        Err(e) => tracing::warn!(command = cmd, error = %e, "update command could not start"),
    }
}
