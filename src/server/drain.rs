//! Step "drain": graceful shutdown. On the signal every task stops
//! accepting, in-flight gRPC requests finish (clients get GOAWAY) within
//! [`DRAIN_TIMEOUT`] while the Kubernetes controllers finish their own
//! shutdown (the Lease handed back, this replica's report deleted) within
//! [`CONTROLLERS_TIMEOUT`], the audit log records folded refusals and signs
//! its final checkpoint, and only then is the data-directory lock released
//! (and the process may exit).
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

/// How long the Kubernetes controllers get to finish (each of their API
/// calls on the way out is bounded well below this).
const CONTROLLERS_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The Kubernetes controllers that end on the stop signal.
    pub controllers: Vec<JoinHandle<()>>,
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
        let (drained, controllers) = tokio::join!(
            finish(tasks.grpc, DRAIN_TIMEOUT),
            finish_all(tasks.controllers, CONTROLLERS_TIMEOUT),
        );
        if !drained {
            tracing::warn!(
                "connections still open {}s after shutdown began; closing them",
                DRAIN_TIMEOUT.as_secs()
            );
        }
        if controllers > 0 {
            tracing::warn!(
                unfinished = controllers,
                "Kubernetes controllers still busy {}s after shutdown began; stopped them",
                CONTROLLERS_TIMEOUT.as_secs()
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

/// Waits up to `limit` (in all) for every task, then aborts the rest;
/// returns how many had to be aborted.
async fn finish_all(tasks: Vec<JoinHandle<()>>, limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    let mut aborted = 0;
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            aborted += 1;
        }
    }
    aborted
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

    /// Shutdown waits for controllers that are finishing (a Lease hand-back
    /// in flight), and the limit bounds all of them together.
    #[tokio::test]
    async fn controllers_are_awaited_and_the_limit_bounds_them_all() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let finishing = tokio::spawn(async move {
            let _ = rx.await;
            d.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = tx.send(());
        });
        let started = tokio::time::Instant::now();
        let stuck = || tokio::spawn(std::future::pending::<()>());
        let aborted = finish_all(
            vec![finishing, stuck(), stuck()],
            Duration::from_millis(200),
        )
        .await;
        assert!(done.load(std::sync::atomic::Ordering::SeqCst), "awaited");
        assert_eq!(aborted, 2);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(400),
            "one limit for all: {took:?}"
        );
        release.await.unwrap();
    }
}
