//! The tamper-evident issuance log.
//!
//! Owns: appending every decision durably before the caller gets its answer,
//! batching concurrent appends into one commit (group commit) on a dedicated
//! writer thread, keeping the Merkle frontier, and signing checkpoints.
//! Never stores a token, key or secret (see [`entry::Entry`]). Must not:
//! decide policy; it records what `api` decided.

pub(crate) mod entry;
mod error;
pub mod intake;
pub mod merkle;
pub mod note;
pub mod query;
pub mod settings;
pub mod store;
pub(crate) mod tiles;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::metrics::Metrics;
use crate::util::clock::{unix_millis, Clock};
use crate::util::secret::SecretBytes;
pub use entry::Entry;
pub use error::AuditError;
use merkle::{leaf_hash, Frontier};
use note::{Checkpoint, NoteSigner};
use store::{AuditStore, Indexed, SqliteStore, StoredCheckpoint};

/// File names in the data directory.
pub const DB_FILE: &str = "audit.db";
/// The log's Ed25519 signing key (PKCS#8, 0600).
pub(crate) const KEY_FILE: &str = "audit-signer.key";
/// The verifier key auditors use (public).
pub(crate) const PUB_FILE: &str = "audit-signer.pub";
/// Largest batch committed at once.
const MAX_BATCH: usize = 4096;
/// Under concurrent load, how long the writer waits for more entries before
/// committing: fewer, larger commits cost less CPU and fewer wake-ups than
/// the latency they add (measured with `meshca bench --audit both`). A lone
/// request (the previous batch held one entry) is committed at once.
const LINGER: std::time::Duration = std::time::Duration::from_micros(500);
/// The WAL is folded into the database after this many commits (or
/// [`FOLD_ENTRIES`] entries) as well as on every checkpoint tick, so it stays
/// a few MiB under any load instead of growing until the next tick.
const FOLD_COMMITS: u64 = 256;
const FOLD_ENTRIES: u64 = 4096;
/// While the store cannot write, how often the writer probes it, so the
/// server becomes ready again by itself when space returns.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Whether the log can write: read by `/ready`, set by the writer thread.
#[derive(Debug)]
pub(crate) struct Health {
    problem: std::sync::RwLock<Option<String>>,
    metrics: std::sync::Arc<Metrics>,
}

impl Health {
    /// Healthy (storage OK), reporting to `metrics`.
    fn new(metrics: std::sync::Arc<Metrics>) -> Self {
        metrics.audit_write(true);
        Self {
            problem: std::sync::RwLock::new(None),
            metrics,
        }
    }

    /// Why the log cannot write (None: it can).
    pub(crate) fn problem(&self) -> Option<String> {
        self.problem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, problem: Option<String>) {
        let mut g = self.problem.write().unwrap_or_else(|p| p.into_inner());
        match (&*g, &problem) {
            (None, Some(e)) => {
                tracing::error!(error = %e, "the audit log cannot write: certificates are refused with UNAVAILABLE until it can (is the data volume full?)")
            }
            (Some(_), None) => tracing::info!("the audit log can write again: issuance resumes"),
            _ => {}
        }
        self.metrics.audit_write(problem.is_none());
        *g = problem;
    }
}

enum Msg {
    Append(Box<Entry>, oneshot::Sender<Result<u64, AuditError>>),
    Checkpoint(Option<oneshot::Sender<Result<u64, AuditError>>>),
    Shutdown,
}

/// Handle to the running log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    db_path: PathBuf,
    verifier_key: String,
    health: std::sync::Arc<Health>,
    tiles: SharedTiles,
}

/// The writer's subtree hashes, read by the proof routes.
pub(crate) type SharedTiles = std::sync::Arc<std::sync::RwLock<tiles::Tiles>>;

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("db", &self.db_path)
            .finish_non_exhaustive()
    }
}

/// The log's origin line for a trust domain.
pub fn origin(trust_domain: &str) -> String {
    format!("meshca/{trust_domain}")
}

/// Loads the signing key from the data directory, creating it on first use.
pub(crate) fn load_or_create_key(data_dir: &Path, origin: &str) -> Result<NoteSigner, AuditError> {
    let path = data_dir.join(KEY_FILE);
    let pkcs8 = if path.exists() {
        crate::util::secret::read_private(&path).map_err(|e| AuditError::io(&path, e))?
    } else {
        let k = NoteSigner::generate_pkcs8().map_err(AuditError::Key)?;
        crate::util::secret::write_private(&path, k.expose())
            .map_err(|e| AuditError::io(&path, e))?;
        k
    };
    let signer = NoteSigner::from_pkcs8(origin, &pkcs8).map_err(AuditError::Key)?;
    let pub_path = data_dir.join(PUB_FILE);
    let vkey = format!("{}\n", signer.verifier_key());
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(vkey.as_str()) {
        crate::util::secret::write_public(&pub_path, vkey.as_bytes())
            .map_err(|e| AuditError::io(&pub_path, e))?;
    }
    Ok(signer)
}

/// The guard that stops the writer thread (signing a final checkpoint).
pub struct WriterGuard {
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for WriterGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterGuard")
    }
}

impl WriterGuard {
    /// Signs a last checkpoint and waits for the writer to finish.
    pub fn stop(mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
    }
}

impl AuditLog {
    /// Opens the log in `data_dir` and starts its writer thread.
    pub fn open(
        data_dir: &Path,
        trust_domain: &str,
        clock: std::sync::Arc<dyn Clock>,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<(AuditLog, WriterGuard), AuditError> {
        Self::open_limited(data_dir, trust_domain, clock, metrics, None)
    }

    /// [`AuditLog::open`], refusing to grow the log's files past `max_bytes`
    /// (setting `audit_max_bytes`): appends then fail as on a full disk, so a
    /// size-limited volume makes meshca fail closed before the kubelet
    /// evicts the pod (and its log) for exceeding the limit.
    pub(crate) fn open_limited(
        data_dir: &Path,
        trust_domain: &str,
        clock: std::sync::Arc<dyn Clock>,
        metrics: std::sync::Arc<Metrics>,
        max_bytes: Option<u64>,
    ) -> Result<(AuditLog, WriterGuard), AuditError> {
        let origin = origin(trust_domain);
        let signer = load_or_create_key(data_dir, &origin)?;
        let verifier_key = signer.verifier_key();
        let db_path = data_dir.join(DB_FILE);
        let store = SqliteStore::open(&db_path)?;
        let leaves = store.leaf_hashes()?;
        // Entries past the last index would mean a gap: refuse to append onto a damaged log.
        if store.count()? != leaves.len() as u64 {
            return Err(AuditError::Integrity("audit log is inconsistent (entry count differs from leaves); run `meshca audit verify`".into()));
        }
        let frontier = Frontier::from_leaves(&leaves);
        let tiles: SharedTiles =
            std::sync::Arc::new(std::sync::RwLock::new(tiles::Tiles::from_leaves(&leaves)));
        drop(leaves);
        tracing::info!(entries = frontier.size(), db = %db_path.display(), "audit log opened");
        let (tx, rx) = mpsc::channel();
        let health = std::sync::Arc::new(Health::new(metrics));
        let last_checkpoint = store
            .checkpoints()
            .ok()
            .and_then(|c| c.last().map(|c| c.size))
            .unwrap_or(0);
        let writer = Writer {
            store,
            frontier,
            signer,
            origin,
            clock,
            health: health.clone(),
            tiles: tiles.clone(),
            limit: Limit::new(&db_path, max_bytes),
            untiled: Vec::new(),
            last_checkpoint,
            last_batch: 0,
            since_fold: (0, 0),
            failing: false,
            stats: WriterStats::default(),
        };
        let thread = std::thread::Builder::new()
            .name("meshca-audit".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| AuditError::Storage(format!("cannot start the audit writer: {e}")))?;
        Ok((
            AuditLog {
                tx: tx.clone(),
                db_path,
                verifier_key,
                health,
                tiles,
            },
            WriterGuard {
                tx,
                thread: Some(thread),
            },
        ))
    }

    /// Appends an entry; resolves once it is durable, with its index.
    pub async fn append(&self, entry: Entry) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Append(Box::new(entry), tx))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Signs a checkpoint now (if the tree grew); resolves with the tree size.
    pub async fn checkpoint(&self) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(Some(tx)))
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }

    /// Asks for a checkpoint without waiting.
    pub(crate) fn request_checkpoint(&self) {
        let _ = self.tx.send(Msg::Checkpoint(None));
    }

    /// The SQLite file (for read-only queries).
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// The subtree hashes proofs are computed from (`tiles`).
    pub fn tiles(&self) -> &SharedTiles {
        &self.tiles
    }

    /// Why the log cannot write right now (None: it can); `/ready` reports it.
    pub(crate) fn storage_problem(&self) -> Option<String> {
        self.health.problem()
    }

    /// The verifier key of the log's signer.
    pub fn verifier_key(&self) -> &str {
        &self.verifier_key
    }
}

/// `audit_max_bytes`: the database and its WAL together.
struct Limit {
    files: [PathBuf; 2],
    max: Option<u64>,
}

impl Limit {
    /// [`Limit::check`]; when over, first folds the WAL into the database
    /// and truncates it (the WAL alone can hold a few MiB), then checks again.
    fn check_or_shrink(&self, more: u64, store: &mut SqliteStore) -> Result<(), AuditError> {
        self.check(more).or_else(|_| {
            let _ = store.truncate_wal();
            self.check(more)
        })
    }

    fn new(db: &Path, max: Option<u64>) -> Self {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        Self {
            files: [db.to_path_buf(), PathBuf::from(wal)],
            max,
        }
    }

    /// Whether `more` bytes of entries may be added (pages and index cost
    /// about twice the body size, hence the margin).
    fn check(&self, more: u64) -> Result<(), AuditError> {
        let Some(max) = self.max else { return Ok(()) };
        let used: u64 = self
            .files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
        if used + 2 * more > max {
            // The DB-or-disk wording is SQLite's own for a full disk.
            return Err(AuditError::Storage(format!(
                "the audit log reached its size limit (audit_max_bytes = {max} bytes, {used} used): database or disk is full"
            )));
        }
        Ok(())
    }
}

/// The writer thread's state: the store, the tree, and the counters that
/// decide when to fold the WAL and what the stop line reports.
struct Writer {
    store: SqliteStore,
    frontier: Frontier,
    signer: NoteSigner,
    origin: String,
    clock: std::sync::Arc<dyn Clock>,
    health: std::sync::Arc<Health>,
    tiles: SharedTiles,
    limit: Limit,
    /// Leaves committed but not yet in `tiles` (a proof held the lock): the
    /// writer never waits for a reader, except on the checkpoint tick.
    untiled: Vec<merkle::Hash>,
    last_checkpoint: u64,
    /// Entries in the previous batch (a lone request is committed at once).
    last_batch: usize,
    /// Commits and entries since the WAL was last folded in.
    since_fold: (u64, u64),
    /// The store cannot write: probe it until it can.
    failing: bool,
    stats: WriterStats,
}

/// What the writer logs when it stops.
#[derive(Default)]
struct WriterStats {
    batches: u64,
    appended: u64,
    commit_time: std::time::Duration,
}

/// One drained batch of messages, sorted by kind.
#[derive(Default)]
struct Batch {
    rows: Vec<(Vec<u8>, merkle::Hash, Indexed)>,
    appends: Vec<oneshot::Sender<Result<u64, AuditError>>>,
    checkpoints: Vec<Option<oneshot::Sender<Result<u64, AuditError>>>>,
    shutdown: bool,
}

impl Batch {
    fn sort(msgs: Vec<Msg>) -> Self {
        let mut b = Batch::default();
        for m in msgs {
            match m {
                Msg::Append(entry, reply) => {
                    let body = entry.canonical();
                    let leaf = leaf_hash(&body);
                    b.rows.push((
                        body,
                        leaf,
                        Indexed {
                            time_ms: entry.time_unix_ms,
                            namespace: entry.namespace.clone(),
                            service_account: entry.service_account.clone(),
                            result: entry.result.clone(),
                            serial: entry.serial.clone(),
                        },
                    ));
                    b.appends.push(reply);
                }
                Msg::Checkpoint(reply) => b.checkpoints.push(reply),
                Msg::Shutdown => b.shutdown = true,
            }
        }
        b
    }
}

impl Writer {
    /// The loop: take a batch, commit it, fold the WAL when due, answer
    /// checkpoint requests; on shutdown sign a last checkpoint. Ends without
    /// one when every sender is gone.
    fn run(mut self, rx: &mpsc::Receiver<Msg>) {
        while let Some(first) = self.next(rx) {
            let batch = Batch::sort(self.gather(first, rx));
            self.last_batch = batch.rows.len();
            if !batch.rows.is_empty() {
                self.commit(&batch.rows, batch.appends);
            }
            let tick = !batch.checkpoints.is_empty();
            if tick {
                self.add_tiles(std::iter::empty(), true);
            }
            self.fold_if_due(tick);
            for reply in batch.checkpoints {
                let r = self.sign();
                if let Err(e) = &r {
                    tracing::error!(error = %e, "audit checkpoint failed");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            if batch.shutdown {
                self.stop();
                return;
            }
        }
    }

    /// The next message; while the store is failing, probes it every
    /// [`PROBE_EVERY`] so the server becomes ready again by itself.
    fn next(&mut self, rx: &mpsc::Receiver<Msg>) -> Option<Msg> {
        if !self.failing {
            return rx.recv().ok();
        }
        loop {
            match rx.recv_timeout(PROBE_EVERY) {
                Ok(m) => return Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.limit.check_or_shrink(0, &mut self.store).is_ok()
                        && self.store.probe().is_ok()
                    {
                        self.failing = false;
                        self.health.set(None);
                        return rx.recv().ok();
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// `first` and whatever else is queued (up to [`MAX_BATCH`]), after
    /// lingering when the previous batch showed concurrent load.
    fn gather(&self, first: Msg, rx: &mpsc::Receiver<Msg>) -> Vec<Msg> {
        let mut msgs = vec![first];
        if self.last_batch > 1 {
            std::thread::sleep(LINGER);
        }
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        msgs
    }

    /// Commits the rows in one transaction (one fsync) and answers each
    /// caller with its index, or every caller with the error.
    fn commit(
        &mut self,
        rows: &[(Vec<u8>, merkle::Hash, Indexed)],
        appends: Vec<oneshot::Sender<Result<u64, AuditError>>>,
    ) {
        let first_index = self.frontier.size();
        let t = std::time::Instant::now();
        let bytes: u64 = rows.iter().map(|(b, _, _)| b.len() as u64).sum();
        let r = self
            .limit
            .check_or_shrink(bytes, &mut self.store)
            .and_then(|()| self.store.append(first_index, rows));
        self.stats.commit_time += t.elapsed();
        self.stats.batches += 1;
        self.stats.appended += rows.len() as u64;
        match r {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    self.health.set(None);
                }
                self.since_fold.0 += 1;
                self.since_fold.1 += rows.len() as u64;
                self.add_tiles(rows.iter().map(|(_, leaf, _)| *leaf), false);
                for (i, ((_, leaf, _), reply)) in rows.iter().zip(appends).enumerate() {
                    self.frontier.push(*leaf);
                    let _ = reply.send(Ok(first_index + i as u64));
                }
            }
            Err(e) => {
                // The transaction rolled back: nothing of this batch is
                // in the tree, and no caller was told it is.
                tracing::error!(error = %e, entries = rows.len(), "audit append failed");
                self.health.metrics.audit_write(false);
                if !self.failing {
                    self.failing = true;
                    self.health.set(Some(e.to_string()));
                }
                for reply in appends {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Adds committed leaves to the subtree hashes; waits for readers only
    /// when `wait` (the checkpoint tick), else keeps them for next time.
    fn add_tiles(&mut self, leaves: impl Iterator<Item = merkle::Hash>, wait: bool) {
        self.untiled.extend(leaves);
        let guard = if wait {
            Some(self.tiles.write().unwrap_or_else(|p| p.into_inner()))
        } else {
            self.tiles.try_write().ok()
        };
        if let Some(mut t) = guard {
            for l in self.untiled.drain(..) {
                t.push(l);
            }
        }
    }

    /// Folds the WAL into the database on the checkpoint tick, or after
    /// [`FOLD_COMMITS`] commits / [`FOLD_ENTRIES`] entries.
    fn fold_if_due(&mut self, tick: bool) {
        let (commits, entries) = self.since_fold;
        if tick || commits >= FOLD_COMMITS || entries >= FOLD_ENTRIES {
            self.since_fold = (0, 0);
            if let Err(e) = self.store.fold_wal() {
                tracing::warn!(error = %e, "folding the audit WAL failed");
            }
        }
    }

    /// Signs a checkpoint of the current tree (if it grew since the last).
    fn sign(&mut self) -> Result<u64, AuditError> {
        if self.frontier.size() == self.last_checkpoint {
            return Ok(self.last_checkpoint);
        }
        let cp = Checkpoint {
            origin: self.origin.clone(),
            size: self.frontier.size(),
            root: self.frontier.root(),
        };
        let note = self.signer.sign(&cp);
        self.store.add_checkpoint(&StoredCheckpoint {
            size: cp.size,
            root: cp.root,
            note,
            time_unix_ms: unix_millis(self.clock.now()),
        })?;
        self.last_checkpoint = cp.size;
        Ok(cp.size)
    }

    /// Logs the batching figures and signs a final checkpoint.
    fn stop(&mut self) {
        let s = &self.stats;
        tracing::info!(
            batches = s.batches,
            entries = s.appended,
            mean_batch = s.appended as f64 / s.batches.max(1) as f64,
            mean_commit_ms = s.commit_time.as_secs_f64() * 1000.0 / s.batches.max(1) as f64,
            "audit writer stopping"
        );
        if let Err(e) = self.sign() {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
    }
}

/// Reads a PKCS#8 key file into zeroizing memory (exposed for tests).
pub fn read_key(data_dir: &Path) -> Result<SecretBytes, AuditError> {
    let p = data_dir.join(KEY_FILE);
    crate::util::secret::read_private(&p).map_err(|e| AuditError::io(&p, e))
}
