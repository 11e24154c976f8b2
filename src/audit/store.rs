//! Storage of audit entries and checkpoints.
//!
//! Owns: the [`AuditStore`] trait (the seam where a server database can be
//! added for multi-replica deployments) and its embedded SQLite (WAL)
//! implementation. Must not: compute Merkle hashes beyond storing them, or
//! sign anything.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::entry::Entry;
use super::merkle::Hash;
use super::AuditError;

/// A stored entry.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    /// Position in the log (0-based): the Merkle leaf index.
    pub index: u64,
    /// Canonical entry bytes.
    pub body: Vec<u8>,
    /// The leaf hash recorded when the entry was appended.
    pub leaf_hash: Hash,
    /// The query columns stored beside the body (read by [`AuditStore::entries`],
    /// which `verify` uses to check them against the body).
    pub columns: Option<Indexed>,
}

/// A stored checkpoint.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    /// Tree size.
    pub size: u64,
    /// Root hash.
    pub root: Hash,
    /// The signed note.
    pub note: String,
    /// When it was signed (Unix ms).
    pub time_unix_ms: u64,
}

/// Filters for listing entries.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `namespace/service-account` exact match.
    pub identity: Option<String>,
    /// Namespace exact match.
    pub namespace: Option<String>,
    /// `granted` or `refused`.
    pub result: Option<String>,
    /// Only entries at or after this Unix ms.
    pub since_ms: Option<u64>,
    /// Only entries before this Unix ms.
    pub until_ms: Option<u64>,
    /// At most this many (newest last).
    pub limit: Option<u64>,
    /// Only entries with an index below this (the paging cursor).
    pub before_index: Option<u64>,
}

/// Fields indexed for queries, besides the body.
#[derive(Debug, Clone, Default)]
pub struct Indexed {
    /// Unix ms.
    pub time_ms: u64,
    /// Namespace.
    pub namespace: Option<String>,
    /// Service account.
    pub service_account: Option<String>,
    /// Result.
    pub result: String,
    /// Serial.
    pub serial: Option<String>,
}

/// Errors from storage.
pub(crate) type StoreResult<T> = Result<T, AuditError>;

/// Where the audit log lives.
pub trait AuditStore: Send {
    /// Appends entries at `first_index..`, all or none, durably.
    fn append(&mut self, first_index: u64, entries: &[(Vec<u8>, Hash, Indexed)])
        -> StoreResult<()>;
    /// Every leaf hash in index order (to rebuild the tree and make proofs).
    fn leaf_hashes(&self) -> StoreResult<Vec<Hash>>;
    /// Entries in index order starting at `from`, at most `limit`.
    fn entries(&self, from: u64, limit: u64) -> StoreResult<Vec<StoredEntry>>;
    /// Entries matching a filter.
    fn query(&self, f: &Filter) -> StoreResult<Vec<StoredEntry>>;
    /// The entry that granted a serial. An entry whose signed content
    /// carries another serial is an error, never an answer: a tampered
    /// index must not map one certificate to another's entry.
    fn by_serial(&self, serial: &str) -> StoreResult<Option<StoredEntry>>;
    /// The first disagreement between the serial lookup index and the
    /// entries (`verify` calls this once the entries' query columns are
    /// known to match their signed content), or `None`.
    fn serial_index_fault(&self) -> StoreResult<Option<String>>;
    /// Number of entries.
    fn count(&self) -> StoreResult<u64>;
    /// Records a signed checkpoint.
    fn add_checkpoint(&mut self, cp: &StoredCheckpoint) -> StoreResult<()>;
    /// Every checkpoint, by size.
    fn checkpoints(&self) -> StoreResult<Vec<StoredCheckpoint>>;
    /// The leaf hashes of entries `from..to` (a proof reads at most a tile).
    fn leaf_range(&self, from: u64, to: u64) -> StoreResult<Vec<Hash>>;
    /// The smallest checkpoint with `above < size <= at_most`.
    fn checkpoint_between(&self, above: u64, at_most: u64)
        -> StoreResult<Option<StoredCheckpoint>>;
    /// The checkpoint of exactly `size`.
    fn checkpoint_of_size(&self, size: u64) -> StoreResult<Option<StoredCheckpoint>>;
    /// The newest checkpoint.
    fn latest_checkpoint(&self) -> StoreResult<Option<StoredCheckpoint>>;
}

/// SQLite in WAL mode with `synchronous=FULL`: a commit is on disk when it returns.
pub struct SqliteStore {
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    namespace TEXT,
    service_account TEXT,
    result TEXT NOT NULL,
    serial TEXT,
    body BLOB NOT NULL,
    leaf_hash BLOB NOT NULL
);
-- Serial lookups go through this index, filled in bulk off the commit path
-- (`fold_wal`): random serials in a per-insert index would dirty a random
-- page on every append. Entries past `serials_indexed_upto` are scanned.
CREATE TABLE IF NOT EXISTS serials (serial TEXT PRIMARY KEY, idx INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size INTEGER PRIMARY KEY,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    time_ms INTEGER NOT NULL
);
";

fn e(err: rusqlite::Error) -> AuditError {
    AuditError::Storage(format!("audit store: {err}"))
}

fn hash_of(v: Vec<u8>) -> Hash {
    let mut h = [0u8; 32];
    if v.len() == 32 {
        h.copy_from_slice(&v);
    }
    h
}

impl SqliteStore {
    /// Opens (creating if needed) the log for writing.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path).map_err(e)?;
        // WAL + synchronous=FULL: every commit is fsynced before it returns.
        // The WAL is folded into the database off the commit path
        // (`fold_wal`), not by SQLite's automatic checkpoint inside a commit.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=4194304; PRAGMA cache_size=-16384;",
        )
        .map_err(e)?;
        conn.execute_batch(SCHEMA).map_err(e)?;
        set_private(path);
        Ok(Self { conn })
    }

    /// Opens an existing log read-only (auditor commands; works beside a running server).
    pub fn open_read_only(path: &Path) -> StoreResult<Self> {
        if !path.exists() {
            return Err(AuditError::NoLog {
                path: path.to_path_buf(),
            });
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(e)?;
        Ok(Self { conn })
    }

    /// Off the commit path: indexes the serials appended since the last
    /// fold (one transaction), then copies the WAL into the database file (a
    /// SQLite checkpoint, not a log checkpoint) without blocking readers.
    pub fn fold_wal(&mut self) -> StoreResult<()> {
        let tx = self.conn.transaction().map_err(e)?;
        let upto = indexed_upto(&tx)?;
        tx.execute(
            "INSERT OR IGNORE INTO serials (serial, idx) SELECT serial, idx FROM entries WHERE idx >= ?1 AND serial IS NOT NULL",
            [upto as i64],
        )
        .map_err(e)?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (k, v) SELECT 'serials_indexed_upto', COALESCE(MAX(idx) + 1, 0) FROM entries",
            [],
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(e)
    }

    /// Copies the whole WAL into the database and truncates it to nothing
    /// (waits for readers; used only near `audit_max_bytes`).
    pub(crate) fn truncate_wal(&mut self) -> StoreResult<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(e)
    }

    /// A small durable write, to learn whether the store can write again
    /// after a failure (disk full) without waiting for a request.
    pub fn probe(&mut self) -> StoreResult<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES ('write_probe', ?1)",
                [std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64)],
            )
            .map(|_| ())
            .map_err(e)
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEntry> {
        Ok(StoredEntry {
            index: r.get::<_, i64>(0)? as u64,
            body: r.get(1)?,
            leaf_hash: hash_of(r.get(2)?),
            columns: None,
        })
    }

    fn row_with_columns(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEntry> {
        let mut s = Self::row(r)?;
        s.columns = Some(Indexed {
            time_ms: r.get::<_, i64>(3)? as u64,
            namespace: r.get(4)?,
            service_account: r.get(5)?,
            result: r.get(6)?,
            serial: r.get(7)?,
        });
        Ok(s)
    }
}

fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCheckpoint> {
    Ok(StoredCheckpoint {
        size: r.get::<_, i64>(0)? as u64,
        root: hash_of(r.get(1)?),
        note: r.get(2)?,
        time_unix_ms: r.get::<_, i64>(3)? as u64,
    })
}

/// `found` if its signed content carries `serial`; an error otherwise (the
/// lookup index or the serial column was edited outside the log).
fn carrying(serial: &str, found: StoredEntry) -> StoreResult<StoredEntry> {
    let carried = serde_json::from_slice::<Entry>(&found.body)
        .map_err(|err| {
            AuditError::Integrity(format!(
                "audit log entry {} does not parse: {err}",
                found.index
            ))
        })?
        .serial;
    if carried.as_deref() == Some(serial) {
        return Ok(found);
    }
    Err(AuditError::Integrity(format!(
        "audit log integrity failure: the lookup for serial {serial} led to entry {}, which is for {}; the log's index was edited outside meshca (run `meshca audit verify`)",
        found.index,
        carried.map_or_else(|| "no certificate".to_string(), |s| format!("serial {s}"))
    )))
}

fn indexed_upto(conn: &Connection) -> StoreResult<u64> {
    conn.query_row(
        "SELECT v FROM meta WHERE k = 'serials_indexed_upto'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|v| v.unwrap_or(0) as u64)
    .map_err(e)
}

fn set_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

impl AuditStore for SqliteStore {
    fn append(&mut self, first: u64, entries: &[(Vec<u8>, Hash, Indexed)]) -> StoreResult<()> {
        let tx = self.conn.transaction().map_err(e)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO entries (idx, time_ms, namespace, service_account, result, serial, body, leaf_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(e)?;
            for (i, (body, leaf, ix)) in entries.iter().enumerate() {
                st.execute(params![
                    (first + i as u64) as i64,
                    ix.time_ms as i64,
                    ix.namespace,
                    ix.service_account,
                    ix.result,
                    ix.serial,
                    body,
                    &leaf[..],
                ])
                .map_err(e)?;
            }
        }
        tx.commit().map_err(e)
    }

    fn leaf_hashes(&self) -> StoreResult<Vec<Hash>> {
        let mut st = self
            .conn
            .prepare("SELECT leaf_hash FROM entries ORDER BY idx")
            .map_err(e)?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(e)?;
        rows.map(|r| r.map(hash_of).map_err(e)).collect()
    }

    fn entries(&self, from: u64, limit: u64) -> StoreResult<Vec<StoredEntry>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT idx, body, leaf_hash, time_ms, namespace, service_account, result, serial
                 FROM entries WHERE idx >= ?1 ORDER BY idx LIMIT ?2",
            )
            .map_err(e)?;
        let rows = st
            .query_map(params![from as i64, limit as i64], Self::row_with_columns)
            .map_err(e)?;
        rows.map(|r| r.map_err(e)).collect()
    }

    fn query(&self, f: &Filter) -> StoreResult<Vec<StoredEntry>> {
        let mut sql = String::from("SELECT idx, body, leaf_hash FROM entries WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(id) = &f.identity {
            let (ns, sa) = id.split_once('/').unwrap_or((id.as_str(), ""));
            sql.push_str(" AND namespace = ? AND service_account = ?");
            args.push(ns.to_string().into());
            args.push(sa.to_string().into());
        }
        if let Some(ns) = &f.namespace {
            sql.push_str(" AND namespace = ?");
            args.push(ns.clone().into());
        }
        if let Some(r) = &f.result {
            sql.push_str(" AND result = ?");
            args.push(r.clone().into());
        }
        if let Some(t) = f.since_ms {
            sql.push_str(" AND time_ms >= ?");
            args.push((t as i64).into());
        }
        if let Some(t) = f.until_ms {
            sql.push_str(" AND time_ms < ?");
            args.push((t as i64).into());
        }
        if let Some(b) = f.before_index {
            sql.push_str(" AND idx < ?");
            args.push((b.min(i64::MAX as u64) as i64).into());
        }
        sql.push_str(" ORDER BY idx DESC");
        if let Some(l) = f.limit {
            sql.push_str(" LIMIT ?");
            args.push((l as i64).into());
        }
        let mut st = self.conn.prepare(&sql).map_err(e)?;
        let rows = st
            .query_map(rusqlite::params_from_iter(args), Self::row)
            .map_err(e)?;
        let mut out: Vec<StoredEntry> = rows.map(|r| r.map_err(e)).collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    fn by_serial(&self, serial: &str) -> StoreResult<Option<StoredEntry>> {
        let indexed = self
            .conn
            .query_row(
                "SELECT e.idx, e.body, e.leaf_hash FROM serials s JOIN entries e ON e.idx = s.idx WHERE s.serial = ?1",
                [serial],
                Self::row,
            )
            .optional()
            .map_err(e)?;
        if let Some(found) = indexed {
            return carrying(serial, found).map(Some);
        }
        // The tail not yet folded into the index.
        let upto = indexed_upto(&self.conn)?;
        self.conn
            .query_row(
                "SELECT idx, body, leaf_hash FROM entries WHERE idx >= ?1 AND serial = ?2 ORDER BY idx LIMIT 1",
                rusqlite::params![upto as i64, serial],
                Self::row,
            )
            .optional()
            .map_err(e)?
            .map(|found| carrying(serial, found))
            .transpose()
    }

    fn serial_index_fault(&self) -> StoreResult<Option<String>> {
        let upto = indexed_upto(&self.conn)?;
        let count = self.count()?;
        if upto > count {
            return Ok(Some(format!(
                "the serial index claims to cover {upto} entries but the log holds {count}: entries were removed or the index was edited"
            )));
        }
        // Every indexed serial points to an entry below the mark carrying it.
        let bad: Option<(String, i64, Option<String>)> = self
            .conn
            .query_row(
                "SELECT s.serial, s.idx, e.serial FROM serials s LEFT JOIN entries e ON e.idx = s.idx
                 WHERE e.idx IS NULL OR e.serial IS NOT s.serial OR s.idx >= ?1 LIMIT 1",
                [upto as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(e)?;
        if let Some((serial, idx, carried)) = bad {
            let carried = carried.unwrap_or_else(|| "no serial".into());
            return Ok(Some(format!(
                "the serial index maps serial {serial} to entry {idx}, which carries {carried} (or lies past the indexed mark {upto}): the index was edited, so `audit show` and renewal lookups would find the wrong entry"
            )));
        }
        // Every entry with a serial below the mark is indexed, at the
        // first entry carrying that serial.
        let missing: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT e.idx, e.serial FROM entries e WHERE e.idx < ?1 AND e.serial IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM serials s WHERE s.serial = e.serial AND s.idx <= e.idx) LIMIT 1",
                [upto as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(e)?;
        Ok(missing.map(|(idx, serial)| {
            format!(
                "entry {idx} (serial {serial}) is missing from the serial index: the index was edited, so `audit show {serial}` would not find it"
            )
        }))
    }

    fn count(&self) -> StoreResult<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM entries", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(e)
    }

    fn add_checkpoint(&mut self, cp: &StoredCheckpoint) -> StoreResult<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO checkpoints (size, root, note, time_ms) VALUES (?1, ?2, ?3, ?4)",
                params![cp.size as i64, &cp.root[..], cp.note, cp.time_unix_ms as i64],
            )
            .map(|_| ())
            .map_err(e)
    }

    fn checkpoints(&self) -> StoreResult<Vec<StoredCheckpoint>> {
        let mut st = self
            .conn
            .prepare("SELECT size, root, note, time_ms FROM checkpoints ORDER BY size")
            .map_err(e)?;
        let rows = st.query_map([], checkpoint_row).map_err(e)?;
        rows.map(|r| r.map_err(e)).collect()
    }

    fn leaf_range(&self, from: u64, to: u64) -> StoreResult<Vec<Hash>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT leaf_hash FROM entries WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
            )
            .map_err(e)?;
        let rows = st
            .query_map(params![from as i64, to as i64], |r| r.get::<_, Vec<u8>>(0))
            .map_err(e)?;
        rows.map(|r| r.map(hash_of).map_err(e)).collect()
    }

    fn checkpoint_between(
        &self,
        above: u64,
        at_most: u64,
    ) -> StoreResult<Option<StoredCheckpoint>> {
        self.conn
            .query_row(
                "SELECT size, root, note, time_ms FROM checkpoints WHERE size > ?1 AND size <= ?2 ORDER BY size LIMIT 1",
                params![above as i64, at_most.min(i64::MAX as u64) as i64],
                checkpoint_row,
            )
            .optional()
            .map_err(e)
    }

    fn checkpoint_of_size(&self, size: u64) -> StoreResult<Option<StoredCheckpoint>> {
        self.conn
            .query_row(
                "SELECT size, root, note, time_ms FROM checkpoints WHERE size = ?1",
                params![size.min(i64::MAX as u64) as i64],
                checkpoint_row,
            )
            .optional()
            .map_err(e)
    }

    fn latest_checkpoint(&self) -> StoreResult<Option<StoredCheckpoint>> {
        self.conn
            .query_row(
                "SELECT size, root, note, time_ms FROM checkpoints ORDER BY size DESC LIMIT 1",
                [],
                checkpoint_row,
            )
            .optional()
            .map_err(e)
    }
}
