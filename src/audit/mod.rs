//! The tamper-evident issuance log.
//!
//! Owns: appending every decision durably before the caller gets its answer,
//! batching concurrent appends into one commit (group commit) on a dedicated
//! writer thread, keeping the Merkle frontier, and signing checkpoints.
//! Never stores a token, key or secret (see [`entry::Entry`]). Must not:
//! decide policy; it records what `api` decided.

pub(crate) mod entry;
pub mod intake;
pub mod merkle;
pub mod note;
pub mod query;
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
use merkle::{leaf_hash, Frontier};
use note::{Checkpoint, NoteSigner};
use store::{AuditStore, Indexed, SqliteStore, StoredCheckpoint};

/// File names in the data directory.
pub const DB_FILE: &str = "audit.db";
/// The log's Ed25519 signing key (PKCS#8, 0600).
pub const KEY_FILE: &str = "audit-signer.key";
/// The verifier key auditors use (public).
pub const PUB_FILE: &str = "audit-signer.pub";
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
pub struct Health {
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
    pub fn problem(&self) -> Option<String> {
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
    Append(Box<Entry>, oneshot::Sender<Result<u64, String>>),
    Checkpoint(Option<oneshot::Sender<Result<u64, String>>>),
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
pub type SharedTiles = std::sync::Arc<std::sync::RwLock<tiles::Tiles>>;

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
pub fn load_or_create_key(data_dir: &Path, origin: &str) -> Result<NoteSigner, String> {
    let path = data_dir.join(KEY_FILE);
    let pkcs8 = if path.exists() {
        crate::util::secret::read_private(&path).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        let k = NoteSigner::generate_pkcs8()?;
        crate::util::secret::write_private(&path, k.expose())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        k
    };
    let signer = NoteSigner::from_pkcs8(origin, &pkcs8)?;
    let pub_path = data_dir.join(PUB_FILE);
    let vkey = format!("{}\n", signer.verifier_key());
    if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(vkey.as_str()) {
        crate::util::secret::write_public(&pub_path, vkey.as_bytes())
            .map_err(|e| format!("{}: {e}", pub_path.display()))?;
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
    ) -> Result<(AuditLog, WriterGuard), String> {
        Self::open_limited(data_dir, trust_domain, clock, metrics, None)
    }

    /// [`AuditLog::open`], refusing to grow the log's files past `max_bytes`
    /// (setting `audit_max_bytes`): appends then fail as on a full disk, so a
    /// size-limited volume makes meshca fail closed before the kubelet
    /// evicts the pod (and its log) for exceeding the limit.
    pub fn open_limited(
        data_dir: &Path,
        trust_domain: &str,
        clock: std::sync::Arc<dyn Clock>,
        metrics: std::sync::Arc<Metrics>,
        max_bytes: Option<u64>,
    ) -> Result<(AuditLog, WriterGuard), String> {
        let origin = origin(trust_domain);
        let signer = load_or_create_key(data_dir, &origin)?;
        let verifier_key = signer.verifier_key();
        let db_path = data_dir.join(DB_FILE);
        let store = SqliteStore::open(&db_path)?;
        let leaves = store.leaf_hashes()?;
        // Entries past the last index would mean a gap: refuse to append onto a damaged log.
        if store.count()? != leaves.len() as u64 {
            return Err("audit log is inconsistent (entry count differs from leaves); run `meshca audit verify`".into());
        }
        let frontier = Frontier::from_leaves(&leaves);
        let tiles: SharedTiles =
            std::sync::Arc::new(std::sync::RwLock::new(tiles::Tiles::from_leaves(&leaves)));
        drop(leaves);
        tracing::info!(entries = frontier.size(), db = %db_path.display(), "audit log opened");
        let (tx, rx) = mpsc::channel();
        let health = std::sync::Arc::new(Health::new(metrics));
        let (h, t, db) = (health.clone(), tiles.clone(), db_path.clone());
        let thread = std::thread::Builder::new()
            .name("meshca-audit".into())
            .spawn(move || {
                let limit = Limit::new(&db, max_bytes);
                writer(store, frontier, signer, origin, clock, rx, &h, &t, &limit)
            })
            .map_err(|e| format!("cannot start the audit writer: {e}"))?;
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
    pub async fn append(&self, entry: Entry) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Append(Box::new(entry), tx))
            .map_err(|_| "the audit writer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the audit writer has stopped".to_string())?
    }

    /// Signs a checkpoint now (if the tree grew); resolves with the tree size.
    pub async fn checkpoint(&self) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint(Some(tx)))
            .map_err(|_| "the audit writer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the audit writer has stopped".to_string())?
    }

    /// Asks for a checkpoint without waiting.
    pub fn request_checkpoint(&self) {
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
    pub fn storage_problem(&self) -> Option<String> {
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
    fn check_or_shrink(&self, more: u64, store: &mut SqliteStore) -> Result<(), String> {
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
    fn check(&self, more: u64) -> Result<(), String> {
        let Some(max) = self.max else { return Ok(()) };
        let used: u64 = self
            .files
            .iter()
            .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
            .sum();
        if used + 2 * more > max {
            // The DB-or-disk wording is SQLite's own for a full disk.
            return Err(format!(
                "the audit log reached its size limit (audit_max_bytes = {max} bytes, {used} used): database or disk is full"
            ));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn writer(
    mut store: SqliteStore,
    mut frontier: Frontier,
    signer: NoteSigner,
    origin: String,
    clock: std::sync::Arc<dyn Clock>,
    rx: mpsc::Receiver<Msg>,
    health: &Health,
    tiles: &SharedTiles,
    limit: &Limit,
) {
    // Leaves committed but not yet in `tiles` (a proof held the lock): the
    // writer never waits for a reader, except on the checkpoint tick.
    let mut untiled: Vec<merkle::Hash> = Vec::new();
    let mut add_tiles = |leaves: &mut dyn Iterator<Item = merkle::Hash>, wait: bool| {
        untiled.extend(leaves);
        let guard = if wait {
            Some(tiles.write().unwrap_or_else(|p| p.into_inner()))
        } else {
            tiles.try_write().ok()
        };
        if let Some(mut t) = guard {
            for l in untiled.drain(..) {
                t.push(l);
            }
        }
    };
    let mut last_checkpoint = store
        .checkpoints()
        .ok()
        .and_then(|c| c.last().map(|c| c.size))
        .unwrap_or(0);
    let mut sign = |store: &mut SqliteStore, frontier: &Frontier| -> Result<u64, String> {
        if frontier.size() == last_checkpoint {
            return Ok(last_checkpoint);
        }
        let cp = Checkpoint {
            origin: origin.clone(),
            size: frontier.size(),
            root: frontier.root(),
        };
        let note = signer.sign(&cp);
        store.add_checkpoint(&StoredCheckpoint {
            size: cp.size,
            root: cp.root,
            note,
            time_unix_ms: unix_millis(clock.now()),
        })?;
        last_checkpoint = cp.size;
        Ok(cp.size)
    };
    let (mut batches, mut appended, mut commit_time) = (0u64, 0u64, std::time::Duration::ZERO);
    let mut last_batch = 0usize;
    let (mut commits_since_fold, mut entries_since_fold) = (0u64, 0u64);
    let mut failing = false;
    loop {
        let first = if failing {
            match rx.recv_timeout(PROBE_EVERY) {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if limit.check_or_shrink(0, &mut store).is_ok() && store.probe().is_ok() {
                        failing = false;
                        health.set(None);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        let mut msgs = vec![first];
        if last_batch > 1 {
            std::thread::sleep(LINGER);
        }
        while msgs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        let mut appends = Vec::new();
        let mut rows = Vec::new();
        let mut checkpoints = Vec::new();
        let mut shutdown = false;
        for m in msgs {
            match m {
                Msg::Append(entry, reply) => {
                    let body = entry.canonical();
                    let leaf = leaf_hash(&body);
                    rows.push((
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
                    appends.push(reply);
                }
                Msg::Checkpoint(reply) => checkpoints.push(reply),
                Msg::Shutdown => shutdown = true,
            }
        }
        last_batch = rows.len();
        if !rows.is_empty() {
            let first_index = frontier.size();
            // One transaction, one fsync, for the whole batch.
            let t = std::time::Instant::now();
            let bytes: u64 = rows.iter().map(|(b, _, _)| b.len() as u64).sum();
            let r = limit
                .check_or_shrink(bytes, &mut store)
                .and_then(|()| store.append(first_index, &rows));
            commit_time += t.elapsed();
            batches += 1;
            appended += rows.len() as u64;
            match r {
                Ok(()) => {
                    if failing {
                        failing = false;
                        health.set(None);
                    }
                    commits_since_fold += 1;
                    entries_since_fold += rows.len() as u64;
                    add_tiles(&mut rows.iter().map(|(_, leaf, _)| *leaf), false);
                    for (i, ((_, leaf, _), reply)) in rows.iter().zip(appends).enumerate() {
                        frontier.push(*leaf);
                        let _ = reply.send(Ok(first_index + i as u64));
                    }
                }
                Err(e) => {
                    // The transaction rolled back: nothing of this batch is
                    // in the tree, and no caller was told it is.
                    tracing::error!(error = %e, entries = rows.len(), "audit append failed");
                    health.metrics.audit_write(false);
                    if !failing {
                        failing = true;
                        health.set(Some(e.clone()));
                    }
                    for reply in appends {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        if !checkpoints.is_empty() {
            add_tiles(&mut std::iter::empty(), true);
        }
        if !checkpoints.is_empty()
            || commits_since_fold >= FOLD_COMMITS
            || entries_since_fold >= FOLD_ENTRIES
        {
            (commits_since_fold, entries_since_fold) = (0, 0);
            // The periodic checkpoint tick is also when the WAL is folded in.
            if let Err(e) = store.fold_wal() {
                tracing::warn!(error = %e, "folding the audit WAL failed");
            }
        }
        for reply in checkpoints {
            let r = sign(&mut store, &frontier);
            if let Err(e) = &r {
                tracing::error!(error = %e, "audit checkpoint failed");
            }
            if let Some(reply) = reply {
                let _ = reply.send(r);
            }
        }
        if shutdown {
            tracing::info!(
                batches,
                entries = appended,
                mean_batch = appended as f64 / batches.max(1) as f64,
                mean_commit_ms = commit_time.as_secs_f64() * 1000.0 / batches.max(1) as f64,
                "audit writer stopping"
            );
            if let Err(e) = sign(&mut store, &frontier) {
                tracing::error!(error = %e, "final audit checkpoint failed");
            }
            return;
        }
    }
}

/// Reads a PKCS#8 key file into zeroizing memory (exposed for tests).
pub fn read_key(data_dir: &Path) -> Result<SecretBytes, String> {
    let p = data_dir.join(KEY_FILE);
    crate::util::secret::read_private(&p).map_err(|e| format!("{}: {e}", p.display()))
}
