//! Step "drain": graceful shutdown. On the signal every task stops
//! accepting, in-flight gRPC requests finish (clients get GOAWAY) within
//! [`DRAIN_TIMEOUT`], the audit log records folded refusals and signs its
//! final checkpoint, and only then is the data-directory lock released.
//!
//! Must not: stop anything before in-flight requests had their chance.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::audit::FinalAudit;

/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the admin endpoint gets to finish its requests.
const ADMIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The stop signal every task watches (flips to true once).
pub(super) struct Stop {
    tx: watch::Sender<bool>,
    rx: watch::Receiver<bool>,
}

impl Stop {
    /// A signal not yet given.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self { tx, rx }
    }

    /// A receiver for one more task.
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }
}

/// The serving tasks drain waits for.
pub(super) struct Tasks {
    /// tonic, ending once its connections have drained.
    pub grpc: JoinHandle<()>,
    /// The admin endpoint.
    pub admin: JoinHandle<()>,
}

/// Starts the task that waits for the shutdown request and drains; returns
/// the trigger and the task, which ends when everything has stopped.
pub(super) fn spawn(
    stop: Stop,
    tasks: Tasks,
    audit: FinalAudit,
    lock: std::fs::File,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = shutdown_rx.await;
        let _ = stop.tx.send(true);
        // Graceful: in-flight requests finish and clients get GOAWAY. A
        // client that keeps its connection open past the grace period is cut.
        if !finish(tasks.grpc, DRAIN_TIMEOUT).await {
            tracing::warn!(
                "connections still open {}s after shutdown began; closing them",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        finish(tasks.admin, ADMIN_DRAIN_TIMEOUT).await;
        audit.close().await;
        drop(lock);
    });
    (shutdown_tx, task)
}

/// Waits up to `limit` for `task`, then aborts it; false when it had to.
async fn finish(mut task: JoinHandle<()>, limit: Duration) -> bool {
    if tokio::time::timeout(limit, &mut task).await.is_ok() {
        return true;
    }
    task.abort();
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_will_not_end_is_aborted_after_the_limit() {
        // Real time (tokio's test-util is not enabled): a short limit.
        let stuck = tokio::spawn(std::future::pending::<()>());
        let probe = stuck.abort_handle();
        assert!(!finish(stuck, Duration::from_millis(20)).await);
        tokio::task::yield_now().await;
        assert!(probe.is_finished(), "the stuck task was aborted");
        let quick = tokio::spawn(async {});
        assert!(finish(quick, Duration::from_secs(10)).await);
    }
}
