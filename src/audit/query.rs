//! Auditor queries shared by the CLI and the admin endpoint: list, show with
//! an inclusion proof, consistency proofs, export, and verification of a live
//! store or of an export.
//!
//! Must not: write to the store.

use std::io::{BufRead, Write};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Serialize;
use serde_json::json;

use super::entry::Entry;
use super::merkle::{self, Hash};
use super::note::NoteVerifier;
use super::store::{AuditStore, Filter, StoredCheckpoint, StoredEntry};
use super::tiles::Tiles;
use super::verify::{self, CheckpointInput, Problem, Report};
use super::AuditError;

/// An entry with its index.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// Leaf index.
    pub index: u64,
    /// The record.
    #[serde(flatten)]
    pub entry: Entry,
}

/// Lists entries matching `f`.
pub fn list(store: &dyn AuditStore, f: &Filter) -> Result<Vec<Listed>, AuditError> {
    store
        .query(f)?
        .into_iter()
        .map(|s| {
            serde_json::from_slice(&s.body)
                .map(|entry| Listed {
                    index: s.index,
                    entry,
                })
                .map_err(|e| {
                    AuditError::Integrity(format!("entry {} does not parse: {e}", s.index))
                })
        })
        .collect()
}

/// An entry with the proof that it is in the log.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    /// Leaf index.
    pub index: u64,
    /// The record.
    pub entry: Entry,
    /// Leaf hash (base64).
    pub leaf_hash: String,
    /// The checkpoint the proof is against (signed note), if one covers the entry.
    pub checkpoint: Option<String>,
    /// Tree size of that checkpoint.
    pub tree_size: Option<u64>,
    /// The inclusion proof (base64 hashes), leaf to root.
    pub inclusion_proof: Vec<String>,
    /// True when the proof was checked against the checkpoint's root here.
    pub proof_verified: bool,
}

fn b64s(hs: &[Hash]) -> Vec<String> {
    hs.iter().map(|h| B64.encode(h)).collect()
}

/// The entry for a serial, refusing one whose signed content names another
/// serial (whatever store answered, a lookup must never show the wrong
/// certificate).
fn find(store: &dyn AuditStore, serial: &str) -> Result<(StoredEntry, Entry), AuditError> {
    let serial = serial.replace(':', "").to_lowercase();
    let s = store
        .by_serial(&serial)?
        .ok_or_else(|| AuditError::NotFound {
            serial: serial.clone(),
        })?;
    let entry: Entry = serde_json::from_slice(&s.body)
        .map_err(|e| AuditError::Integrity(format!("entry {}: {e}", s.index)))?;
    if entry.serial.as_deref() != Some(serial.as_str()) {
        return Err(AuditError::Integrity(format!(
            "audit log integrity failure: the lookup for serial {serial} led to entry {}, which is for another certificate (run `meshca audit verify`)",
            s.index
        )));
    }
    Ok((s, entry))
}

/// Finds the entry for a serial (hex, any case, colons allowed) and proves it.
pub fn show(store: &dyn AuditStore, serial: &str) -> Result<Shown, AuditError> {
    let (s, entry) = find(store, serial)?;
    let leaves = store.leaf_hashes()?;
    let cp = store
        .checkpoints()?
        .into_iter()
        .find(|c| c.size > s.index && c.size as usize <= leaves.len());
    let proven = cp.map(|cp| {
        let proof = merkle::inclusion_proof(s.index as usize, &leaves[..cp.size as usize]);
        (cp, proof)
    });
    Ok(shown(s.index, &s.body, entry, proven))
}

/// The answer of [`show`] and [`show_tiled`]: the entry, and its proof
/// against `proven`'s checkpoint, checked here.
fn shown(
    index: u64,
    body: &[u8],
    entry: Entry,
    proven: Option<(StoredCheckpoint, Vec<Hash>)>,
) -> Shown {
    let leaf = merkle::leaf_hash(body);
    let (checkpoint, tree_size, proof, verified) = match proven {
        Some((cp, proof)) => {
            let ok = merkle::verify_inclusion(index, cp.size, &leaf, &proof, &cp.root).is_ok();
            (Some(cp.note), Some(cp.size), proof, ok)
        }
        None => (None, None, Vec::new(), false),
    };
    Shown {
        index,
        entry,
        leaf_hash: B64.encode(leaf),
        checkpoint,
        tree_size,
        inclusion_proof: b64s(&proof),
        proof_verified: verified,
    }
}

/// [`show`] for a running server: the proof comes from the writer's
/// in-memory subtree hashes and at most a tile of leaves read from `store`,
/// not from every leaf (`audit/tiles.rs`).
pub fn show_tiled(
    store: &dyn AuditStore,
    tiles: &Tiles,
    serial: &str,
) -> Result<Shown, AuditError> {
    let (s, entry) = find(store, serial)?;
    let mut read = |a, b| store.leaf_range(a, b);
    let proven = match store.checkpoint_between(s.index, tiles.size())? {
        Some(cp) => {
            let proof = tiles.inclusion_proof(s.index, cp.size, &mut read)?;
            Some((cp, proof))
        }
        None => None,
    };
    Ok(shown(s.index, &s.body, entry, proven))
}

/// [`prove`] for a running server, from the in-memory subtree hashes.
pub fn prove_tiled(
    store: &dyn AuditStore,
    tiles: &Tiles,
    from: u64,
    to: u64,
) -> Result<Proved, AuditError> {
    if from == 0 || from > to || to > tiles.size() {
        return Err(AuditError::BadRequest(format!(
            "need 0 < from <= to <= {} (the log's size)",
            tiles.size()
        )));
    }
    let mut read = |a, b| store.leaf_range(a, b);
    let a = tiles.root(from, &mut read)?;
    let b = tiles.root(to, &mut read)?;
    let proof = tiles.consistency_proof(from, to, &mut read)?;
    let ok = merkle::verify_consistency(from, to, &a, &b, &proof).is_ok();
    Ok(Proved {
        from,
        to,
        from_root: B64.encode(a),
        to_root: B64.encode(b),
        from_checkpoint: store.checkpoint_of_size(from)?.map(|c| c.note),
        to_checkpoint: store.checkpoint_of_size(to)?.map(|c| c.note),
        proof: b64s(&proof),
        proof_verified: ok,
    })
}

/// A consistency proof between two tree sizes.
#[derive(Debug, Clone, Serialize)]
pub struct Proved {
    /// Smaller size.
    pub from: u64,
    /// Larger size.
    pub to: u64,
    /// Root at `from` (base64).
    pub from_root: String,
    /// Root at `to` (base64).
    pub to_root: String,
    /// Signed checkpoint at `from`, if there is one.
    pub from_checkpoint: Option<String>,
    /// Signed checkpoint at `to`, if there is one.
    pub to_checkpoint: Option<String>,
    /// The proof (base64 hashes).
    pub proof: Vec<String>,
    /// True when the proof verified here.
    pub proof_verified: bool,
}

/// Proves that the tree at `to` extends the tree at `from`.
pub fn prove(store: &dyn AuditStore, from: u64, to: u64) -> Result<Proved, AuditError> {
    let leaves = store.leaf_hashes()?;
    if from == 0 || from > to || to as usize > leaves.len() {
        return Err(AuditError::BadRequest(format!(
            "need 0 < from <= to <= {} (the log's size)",
            leaves.len()
        )));
    }
    let a = merkle::root(&leaves[..from as usize]);
    let b = merkle::root(&leaves[..to as usize]);
    let proof = merkle::consistency_proof(from as usize, &leaves[..to as usize]);
    let ok = merkle::verify_consistency(from, to, &a, &b, &proof).is_ok();
    let cps = store.checkpoints()?;
    let note = |n: u64| cps.iter().find(|c| c.size == n).map(|c| c.note.clone());
    Ok(Proved {
        from,
        to,
        from_root: B64.encode(a),
        to_root: B64.encode(b),
        from_checkpoint: note(from),
        to_checkpoint: note(to),
        proof: b64s(&proof),
        proof_verified: ok,
    })
}

/// Verifies the whole live log.
pub fn verify_store(
    store: &dyn AuditStore,
    verifier: &NoteVerifier,
    progress: impl FnMut(u64),
) -> Result<Report, AuditError> {
    let cps = store
        .checkpoints()?
        .into_iter()
        .map(|c| CheckpointInput {
            note: c.note,
            stored_size: Some(c.size),
            stored_root: Some(c.root),
        })
        .collect();
    // Stream entries in pages so memory stays flat on long logs.
    let mut err = None;
    let mut from = 0u64;
    let mut page: std::vec::IntoIter<_> = Vec::new().into_iter();
    let iter = std::iter::from_fn(|| loop {
        if let Some(e) = page.next() {
            return Some(e);
        }
        if err.is_some() {
            return None;
        }
        match store.entries(from, 10_000) {
            Ok(v) if v.is_empty() => return None,
            Ok(v) => {
                from = v.last().map_or(from, |e| e.index + 1);
                page = v
                    .into_iter()
                    .map(|e| (e.index, e.body, Some(e.leaf_hash), e.columns))
                    .collect::<Vec<_>>()
                    .into_iter();
            }
            Err(e) => {
                err = Some(e);
                return None;
            }
        }
    });
    let r = verify::verify(iter, cps, verifier, progress)
        .map_err(|p: Problem| AuditError::Integrity(p.to_string()));
    // A read error ends the stream early: never report that as a pass.
    if let Some(e) = err {
        return Err(e);
    }
    let report = r?;
    // The columns now match the signed entries, so the serial index can be
    // checked against them (a wrong index makes lookups lie).
    match store.serial_index_fault()? {
        Some(fault) => Err(AuditError::Integrity(fault)),
        None => Ok(report),
    }
}

/// Writes the export: a header line, one line per entry (with its exact
/// bytes), one line per checkpoint.
pub fn export(
    store: &dyn AuditStore,
    verifier_key: &str,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    let io = |e: std::io::Error| AuditError::Export(std::sync::Arc::new(e));
    writeln!(
        out,
        "{}",
        json!({"meshca_audit_export": 1, "verifier_key": verifier_key})
    )
    .map_err(io)?;
    let mut from = 0;
    let mut n = 0;
    loop {
        let page = store.entries(from, 10_000)?;
        if page.is_empty() {
            break;
        }
        for e in &page {
            let entry: serde_json::Value = serde_json::from_slice(&e.body).unwrap_or(json!(null));
            writeln!(
                out,
                "{}",
                json!({"index": e.index, "body": B64.encode(&e.body), "entry": entry})
            )
            .map_err(io)?;
            n += 1;
        }
        from = page.last().map_or(from, |e| e.index + 1);
    }
    for c in store.checkpoints()? {
        writeln!(out, "{}", json!({"checkpoint": c.note})).map_err(io)?;
    }
    Ok(n)
}

/// Verifies an export with only the log's verifier key.
pub fn verify_export(
    input: &mut dyn BufRead,
    verifier: &NoteVerifier,
    progress: impl FnMut(u64),
) -> Result<Report, AuditError> {
    let bad = |n: usize, e: &dyn std::fmt::Display| {
        AuditError::Integrity(format!("export line {}: {e}", n + 1))
    };
    let mut entries = Vec::new();
    let mut cps = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| bad(n, &e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(n, &e))?;
        if let Some(note) = v["checkpoint"].as_str() {
            cps.push(CheckpointInput {
                note: note.to_string(),
                stored_size: None,
                stored_root: None,
            });
        } else if let (Some(i), Some(b)) = (v["index"].as_u64(), v["body"].as_str()) {
            let body = B64.decode(b).map_err(|_| bad(n, &"bad base64 body"))?;
            entries.push((i, body, None, None));
        }
    }
    verify::verify(entries, cps, verifier, progress)
        .map_err(|p| AuditError::Integrity(p.to_string()))
}

/// Parses a time bound: RFC 3339, Unix milliseconds, or a duration ago (`1h`).
pub fn parse_time(s: &str, now: std::time::SystemTime) -> Result<u64, AuditError> {
    if let Ok(d) = s.parse::<crate::util::duration::HumanDuration>() {
        if s.chars().any(|c| c.is_ascii_alphabetic()) {
            // Saturate: `as u64` would wrap a huge duration into a recent time.
            let ago = u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX);
            return Ok(crate::util::clock::unix_millis(now).saturating_sub(ago));
        }
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            AuditError::BadRequest(format!(
                "{s:?} is not a time (use RFC 3339, Unix ms, or a duration ago like 1h)"
            ))
        })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
}
