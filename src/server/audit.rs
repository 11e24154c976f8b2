//! Step "audit log": the signing key (shared through a Secret between
//! replicas with `audit_key_secret`), the log itself with its checkpoint
//! ticker, and the refusal gate whose folded summaries are appended when
//! their window ends. With `audit_log = false`, nothing (and a warning).
//!
//! Must not: decide what is logged (see `api` and `audit::intake`).

use std::sync::Arc;
use std::time::Duration;

use crate::audit::intake::RefusalGate;
use crate::audit::{AuditLog, WriterGuard};
use crate::config::ServeConfig;
use crate::kubernetes::client::Factory;
use crate::metrics::Metrics;
use crate::util::clock::Clock;

use super::BoxError;

/// The open audit log (all None when it is off).
pub(super) struct Audit {
    /// The log requests append to.
    pub log: Option<AuditLog>,
    /// Folds repeated refusals per peer.
    pub gate: Option<Arc<RefusalGate>>,
    guard: Option<WriterGuard>,
}

/// What the drain step needs to close the log cleanly.
pub(super) struct FinalAudit {
    log: Option<AuditLog>,
    gate: Option<Arc<RefusalGate>>,
    guard: Option<WriterGuard>,
}

impl Audit {
    /// Hands the log to the drain step.
    pub fn into_final(self) -> FinalAudit {
        FinalAudit {
            log: self.log,
            gate: self.gate,
            guard: self.guard,
        }
    }
}

impl FinalAudit {
    /// After in-flight requests are done: records the folded refusals,
    /// then signs the final checkpoint.
    pub async fn close(self) {
        if let (Some(log), Some(gate)) = (&self.log, &self.gate) {
            append_summaries(log, gate, true).await;
        }
        if let Some(g) = self.guard {
            let _ = tokio::task::spawn_blocking(move || g.stop()).await;
        }
    }
}

/// Opens the audit log (when on) and starts its periodic tasks.
pub(super) async fn open(
    cfg: &ServeConfig,
    kube: &Factory,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<Audit, BoxError> {
    if !cfg.audit.audit_log {
        tracing::warn!(
            "the audit log is off (audit_log = false): decisions are not recorded durably"
        );
        return Ok(Audit {
            log: None,
            gate: None,
            guard: None,
        });
    }
    // Replicas sharing one CA each keep their own log (their own tree and
    // checkpoints), named by replica so auditors can tell them apart.
    let log_name = match &cfg.kubernetes.state_secret {
        Some(_) => format!("{}/{}", cfg.issuance.mesh.trust_domain, cfg.replica),
        None => cfg.issuance.mesh.trust_domain.to_string(),
    };
    sync_key(cfg, kube).await?;
    let (log, guard) = AuditLog::open_limited(
        &cfg.data_dir,
        &log_name,
        clock.clone(),
        metrics.clone(),
        cfg.audit.audit_max_bytes,
    )?;
    let every = cfg.audit.audit_checkpoint_interval;
    let ticker = log.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            ticker.request_checkpoint();
        }
    });
    let gate = Arc::new(RefusalGate::new(cfg.audit.audit_refusal, clock));
    // Summaries of folded refusals are appended once their window ends.
    let (drainer, g) = (log.clone(), gate.clone());
    let every = (cfg.audit.audit_refusal.window / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(5));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            append_summaries(&drainer, &g, false).await;
        }
    });
    Ok(Audit {
        log: Some(log),
        gate: Some(gate),
        guard: Some(guard),
    })
}

/// With `audit_key_secret`: adopts (or creates) the signing key every
/// replica shares, before the log loads its key from the data directory.
async fn sync_key(cfg: &ServeConfig, kube: &Factory) -> Result<(), BoxError> {
    let Some(name) = &cfg.kubernetes.audit_key_secret else {
        return Ok(());
    };
    let Some(client) = kube
        .client()
        .await
        .map_err(|e| format!("invalid setting kubeconfig: {e}"))?
    else {
        return Ok(());
    };
    let outcome = crate::kubernetes::audit_key::sync(
        client,
        cfg.issuance.mesh.control_plane_ns.as_str(),
        name,
        &cfg.data_dir,
    )
    .await
    .map_err(|e| format!("the audit signing key (setting audit_key_secret): {e}"))?;
    tracing::info!(secret = %name, ?outcome, "audit signing key shared through a Secret");
    Ok(())
}

/// Appends the summary entries of folded refusals that are due.
async fn append_summaries(log: &AuditLog, gate: &RefusalGate, all: bool) {
    for e in gate.drain(all) {
        if let Err(err) = log.append(e).await {
            tracing::error!(error = %err, "could not record a summary of folded refusals in the audit log");
        }
    }
}
