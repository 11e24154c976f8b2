//! Full verification of a log: every entry, every checkpoint.
//!
//! Owns: recomputing the tree from the entries' bytes, checking each
//! checkpoint's signature and that its root is the root of the recomputed
//! tree at its size (which also proves each checkpoint consistent with the
//! next), and naming the first bad entry or checkpoint. Works on a live
//! store or on an export. Must not: modify anything.

use super::entry::Entry;
use super::merkle::{leaf_hash, Frontier, Hash};
use super::note::NoteVerifier;
use super::store::Indexed;

/// One entry to check: its index, exact bytes, the leaf hash recorded when
/// it was appended, and the query columns stored beside it (None in an
/// export, where only the bytes exist).
pub type Input = (u64, Vec<u8>, Option<Hash>, Option<Indexed>);

/// A checkpoint to check: its signed note and the (size, root) stored beside it.
#[derive(Debug, Clone)]
pub struct CheckpointInput {
    /// The signed note.
    pub note: String,
    /// The size stored beside it (None in an export, where only the note exists).
    pub stored_size: Option<u64>,
    /// The root stored beside it.
    pub stored_root: Option<Hash>,
}

/// What a successful verification saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Size of the newest checkpoint.
    pub latest_checkpoint_size: u64,
    /// Entries appended after the newest checkpoint (not yet signed over).
    pub unsigned_tail: u64,
    /// Root of the whole recomputed tree (base64).
    pub root: String,
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// An index is missing (deleted row).
    #[error("entry {0} is missing: the log has a gap (an entry was deleted)")]
    Missing(u64),
    /// An entry appears out of order or twice (inserted row).
    #[error(
        "entry at position {expected} carries index {found}: an entry was inserted or renumbered"
    )]
    Misplaced {
        /// Expected index.
        expected: u64,
        /// Index found.
        found: u64,
    },
    /// An entry's bytes do not match the hash recorded when it was appended.
    #[error("entry {0} was modified: its content no longer matches its recorded leaf hash")]
    Modified(u64),
    /// An entry's bytes are not a valid entry.
    #[error("entry {0} is not a valid entry record: {1}")]
    Unparseable(u64, String),
    /// A checkpoint's signature fails or it is malformed.
    #[error("checkpoint {0}: {1}")]
    BadCheckpoint(String, String),
    /// A checkpoint does not match the recomputed tree.
    #[error("checkpoint at size {size} does not match the entries: the tree they form at that size has a different root, so an entry with index below {size} (and, as checkpoint {prev} still matched, at or above {prev}) was changed, inserted or removed")]
    RootMismatch {
        /// Checkpoint size.
        size: u64,
        /// Size of the previous matching checkpoint.
        prev: u64,
    },
    /// A query column disagrees with the hashed body: the row was edited
    /// outside the log (it would be found, or hidden, by the wrong queries).
    #[error("entry {index}: its {column} column ({stored}) disagrees with its signed content ({signed}): the row was edited, so queries on {column} would find or hide it wrongly")]
    ColumnMismatch {
        /// Entry index.
        index: u64,
        /// The column (`time_ms`, `namespace`, `service_account`, `result`, `serial`).
        column: &'static str,
        /// What the column holds.
        stored: String,
        /// What the hashed entry says.
        signed: String,
    },
    /// A checkpoint covers more entries than exist.
    #[error(
        "checkpoint at size {0} covers more entries than the log holds ({1}): entries were removed"
    )]
    Truncated(u64, u64),
}

/// Verifies entries (in index order, as `(index, body, recorded leaf hash)`)
/// against checkpoints. `progress` is called as entries are checked.
pub fn verify<I>(
    entries: I,
    mut checkpoints: Vec<CheckpointInput>,
    verifier: &NoteVerifier,
    mut progress: impl FnMut(u64),
) -> Result<Report, Problem>
where
    I: IntoIterator<Item = Input>,
{
    // Check every checkpoint's signature first, and order them by size.
    let mut cps = Vec::new();
    for c in checkpoints.drain(..) {
        let first_line = c.note.lines().take(2).collect::<Vec<_>>().join(" ");
        let cp = verifier
            .verify(&c.note)
            .map_err(|e| Problem::BadCheckpoint(first_line.clone(), e))?;
        if c.stored_size.is_some_and(|s| s != cp.size)
            || c.stored_root.is_some_and(|r| r != cp.root)
        {
            return Err(Problem::BadCheckpoint(
                first_line,
                "the stored size/root differ from the signed note".into(),
            ));
        }
        cps.push(cp);
    }
    cps.sort_by_key(|c| c.size);
    let mut next_cp = 0;
    let mut prev_ok = 0;
    let mut frontier = Frontier::default();
    let check_cps = |frontier: &Frontier, prev_ok: &mut u64, next_cp: &mut usize| {
        while *next_cp < cps.len() && cps[*next_cp].size == frontier.size() {
            if cps[*next_cp].root != frontier.root() {
                return Err(Problem::RootMismatch {
                    size: frontier.size(),
                    prev: *prev_ok,
                });
            }
            *prev_ok = frontier.size();
            *next_cp += 1;
        }
        Ok(())
    };
    check_cps(&frontier, &mut prev_ok, &mut next_cp)?;
    // A column edit is reported only once the tree itself checks out: a
    // damaged tree is the graver finding, and names the damage better.
    let mut column_problem = None;
    for (pos, (index, body, recorded, columns)) in entries.into_iter().enumerate() {
        let pos = pos as u64;
        if index > pos {
            return Err(Problem::Missing(pos));
        }
        if index < pos {
            return Err(Problem::Misplaced {
                expected: pos,
                found: index,
            });
        }
        let leaf = leaf_hash(&body);
        if recorded.is_some_and(|r| r != leaf) {
            return Err(Problem::Modified(index));
        }
        let entry = match serde_json::from_slice::<Entry>(&body) {
            Ok(e) => e,
            Err(e) => return Err(Problem::Unparseable(index, e.to_string())),
        };
        if column_problem.is_none() {
            column_problem = columns.and_then(|c| column_mismatch(index, &entry, &c));
        }
        frontier.push(leaf);
        check_cps(&frontier, &mut prev_ok, &mut next_cp)?;
        if (index + 1) % 10_000 == 0 {
            progress(index + 1);
        }
    }
    progress(frontier.size());
    if let Some(cp) = cps.get(next_cp) {
        return Err(Problem::Truncated(cp.size, frontier.size()));
    }
    if let Some(p) = column_problem {
        return Err(p);
    }
    let latest = cps.last().map_or(0, |c| c.size);
    use base64::Engine;
    Ok(Report {
        entries: frontier.size(),
        checkpoints: cps.len() as u64,
        latest_checkpoint_size: latest,
        unsigned_tail: frontier.size() - latest,
        root: base64::engine::general_purpose::STANDARD.encode(frontier.root()),
    })
}

/// The first query column of a row that disagrees with its hashed entry.
fn column_mismatch(index: u64, e: &Entry, c: &Indexed) -> Option<Problem> {
    let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let pairs: [(&'static str, String, String); 5] = [
        ("time_ms", c.time_ms.to_string(), e.time_unix_ms.to_string()),
        ("namespace", show(&c.namespace), show(&e.namespace)),
        (
            "service_account",
            show(&c.service_account),
            show(&e.service_account),
        ),
        ("result", c.result.clone(), e.result.clone()),
        ("serial", show(&c.serial), show(&e.serial)),
    ];
    pairs
        .into_iter()
        .find(|(_, stored, signed)| stored != signed)
        .map(|(column, stored, signed)| Problem::ColumnMismatch {
            index,
            column,
            stored,
            signed,
        })
}
