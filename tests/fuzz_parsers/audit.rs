//! Audit entries read back: signed checkpoint notes (C2SP signed-note /
//! tlog-checkpoint), verifier keys, entry bodies, whole-log verification
//! (`verify::verify`, as `audit verify` runs it on a live store) and
//! exports (`query::verify_export`), and Merkle proofs handed to an auditor.
//! Tampering is reported as a typed `Problem`, never a panic and never a
//! pass; a note that still verifies after a mutation says what was signed.

use std::sync::OnceLock;

use meshca::audit::merkle::{self, Hash};
use meshca::audit::note::{Checkpoint, NoteSigner, NoteVerifier};
use meshca::audit::query::verify_export;
use meshca::audit::store::Indexed;
use meshca::audit::verify::{verify, CheckpointInput, Input};
use meshca::audit::Entry;
use proptest::collection::vec;
use proptest::prelude::*;

use super::harness::{apply, bytes, cases, measure, mutated, mutations, Mutation};

const FIXED: usize = 256 * 1024;
const ORIGIN: &str = "meshca/cluster.local";

/// A small genuine log: entries, their leaf hashes, signed checkpoints.
struct Log {
    bodies: Vec<Vec<u8>>,
    leaves: Vec<Hash>,
    notes: Vec<(Checkpoint, String)>,
    vkey: String,
    verifier: NoteVerifier,
}

fn log() -> &'static Log {
    static L: OnceLock<Log> = OnceLock::new();
    L.get_or_init(|| {
        let signer = NoteSigner::from_pkcs8(ORIGIN, &NoteSigner::generate_pkcs8().expect("key"))
            .expect("signer");
        let bodies: Vec<Vec<u8>> = (0..9u64)
            .map(|i| {
                Entry {
                    time: "2026-01-01T00:00:00Z".into(),
                    time_unix_ms: 1_767_225_600_000 + i,
                    kind: "issuance".into(),
                    api: Some("native".into()),
                    namespace: Some("shop".into()),
                    service_account: Some("web".into()),
                    result: if i % 3 == 0 { "refused" } else { "granted" }.into(),
                    reason: "ok".into(),
                    serial: Some(format!("{i:032x}")),
                    sans: vec!["URI:spiffe://cluster.local/ns/shop/sa/web".into()],
                    ..Default::default()
                }
                .canonical()
            })
            .collect();
        let leaves: Vec<Hash> = bodies.iter().map(|b| merkle::leaf_hash(b)).collect();
        let notes = [2usize, 5, 9]
            .iter()
            .map(|&n| {
                let cp = Checkpoint {
                    origin: ORIGIN.into(),
                    size: n as u64,
                    root: merkle::root(&leaves[..n]),
                };
                let note = signer.sign(&cp);
                (cp, note)
            })
            .collect();
        let vkey = signer.verifier_key();
        Log {
            verifier: NoteVerifier::parse(&vkey).expect("vkey"),
            bodies,
            leaves,
            notes,
            vkey,
        }
    })
}

fn inputs(notes: &[String], stored: bool) -> Vec<CheckpointInput> {
    let l = log();
    notes
        .iter()
        .zip(&l.notes)
        .map(|(n, (cp, _))| CheckpointInput {
            note: n.clone(),
            stored_size: stored.then_some(cp.size),
            stored_root: stored.then_some(cp.root),
        })
        .collect()
}

fn export_text() -> String {
    use base64::Engine;
    let l = log();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out =
        serde_json::json!({"meshca_audit_export": 1, "verifier_key": l.vkey}).to_string() + "\n";
    for (i, b) in l.bodies.iter().enumerate() {
        let entry: serde_json::Value = serde_json::from_slice(b).expect("entry");
        out += &(serde_json::json!({"index": i, "body": b64.encode(b), "entry": entry})
            .to_string()
            + "\n");
    }
    for (_, n) in &l.notes {
        out += &(serde_json::json!({"checkpoint": n}).to_string() + "\n");
    }
    out
}

/// The query columns a live store keeps beside an entry.
fn columns(body: &[u8]) -> Indexed {
    let e: Entry = serde_json::from_slice(body).expect("entry");
    Indexed {
        time_ms: e.time_unix_ms,
        namespace: e.namespace,
        service_account: e.service_account,
        result: e.result,
        serial: e.serial,
    }
}

/// Which entry to tamper with and how.
#[derive(Debug, Clone)]
enum Tamper {
    Column(usize, u8, u64),
    Body(usize, Vec<Mutation>),
    Reindex(usize, u64),
    Drop(usize),
    Swap(usize, usize),
    Note(usize, Vec<Mutation>),
}

fn tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        3 => (0..9usize, mutations()).prop_map(|(i, m)| Tamper::Body(i, m)),
        1 => (0..9usize, any::<u64>()).prop_map(|(i, n)| Tamper::Reindex(i, n)),
        1 => (0..9usize).prop_map(Tamper::Drop),
        1 => (0..9usize, 0..9usize).prop_map(|(a, b)| Tamper::Swap(a, b)),
        2 => (0..3usize, mutations()).prop_map(|(i, m)| Tamper::Note(i, m)),
        2 => (0..9usize, 0..5u8, any::<u64>()).prop_map(|(i, c, v)| Tamper::Column(i, c, v)),
    ]
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn note_mutated_verifies_only_as_signed(seed_and_note in mutated(
        log().notes.iter().map(|(_, n)| n.clone().into_bytes()).collect()
    )) {
        let (i, note) = seed_and_note;
        let text = String::from_utf8_lossy(&note);
        let (r, cost) = measure(|| log().verifier.verify(&text));
        cost.check("NoteVerifier::verify", note.len(), FIXED)?;
        if let Ok(cp) = r {
            prop_assert_eq!(&cp, &log().notes[i].0, "a note verified with other contents");
        }
    }

    #[test]
    fn note_and_body_arbitrary(b in bytes(8192)) {
        let text = String::from_utf8_lossy(&b);
        let (_, cost) = measure(|| {
            let _ = Checkpoint::parse_body(&text);
            let _ = NoteVerifier::parse(&text);
            log().verifier.verify(&text).is_ok()
        });
        cost.check("note parsers", b.len(), FIXED)?;
    }

    #[test]
    fn verifier_key_mutated(seed_and_key in mutated(vec![log().vkey.clone().into_bytes()])) {
        let text = String::from_utf8_lossy(&seed_and_key.1);
        if let Ok(v) = NoteVerifier::parse(&text) {
            // A key string that still parses is the same key.
            prop_assert!(v.verify(&log().notes[2].1).is_ok());
        }
    }

    #[test]
    fn tampered_log_never_verifies(t in tamper(), stored in any::<bool>()) {
        let l = log();
        let mut entries: Vec<Input> = l
            .bodies
            .iter()
            .zip(&l.leaves)
            .enumerate()
            .map(|(i, (b, h))| (i as u64, b.clone(), stored.then_some(*h), stored.then(|| columns(b))))
            .collect();
        let mut notes: Vec<String> = l.notes.iter().map(|(_, n)| n.clone()).collect();
        let changed = match &t {
            // Columns exist only in a live store; an edited one changes
            // what `audit list` finds, so it must be caught.
            Tamper::Column(i, c, v) => match entries[*i].3.as_mut() {
                None => false,
                Some(col) => {
                    let text = format!("x{v}");
                    match c {
                        0 => col.time_ms = col.time_ms.wrapping_add(v | 1),
                        1 => col.namespace = Some(text),
                        2 => col.service_account = Some(text),
                        3 => col.result = text,
                        _ => col.serial = Some(text),
                    }
                    true
                }
            },
            Tamper::Body(i, m) => {
                entries[*i].1 = apply(entries[*i].1.clone(), m);
                entries[*i].1 != l.bodies[*i]
            }
            Tamper::Reindex(i, n) => {
                entries[*i].0 = *n;
                *n != *i as u64
            }
            Tamper::Drop(i) => {
                entries.remove(*i);
                true
            }
            Tamper::Swap(a, b) => {
                entries.swap(*a, *b);
                l.bodies[*a] != l.bodies[*b]
            }
            Tamper::Note(i, m) => {
                notes[*i] = String::from_utf8_lossy(&apply(notes[*i].clone().into_bytes(), m)).into_owned();
                notes[*i] != l.notes[*i].1
            }
        };
        let n = entries.len();
        let (r, cost) = measure(|| verify(entries, inputs(&notes, stored), &l.verifier, |_| {}));
        cost.check("audit verify", n * 512, FIXED)?;
        match r {
            Ok(report) => {
                // Only a harmless note mutation (e.g. a trailing byte after
                // the signature lines that still parses) may pass, and then
                // the report is the genuine one.
                prop_assert!(!changed || matches!(t, Tamper::Note(..)), "tampering passed: {t:?}");
                prop_assert_eq!(report.entries, 9);
                prop_assert_eq!(report.latest_checkpoint_size, 9);
            }
            Err(p) => prop_assert!(changed, "an untouched log failed: {p}"),
        }
    }

    #[test]
    fn export_mutated(m in mutations()) {
        let original = export_text();
        let text = apply(original.clone().into_bytes(), &m);
        let (r, cost) = measure(|| verify_export(&mut &text[..], &log().verifier, |_| {}));
        cost.check("verify_export", text.len(), FIXED)?;
        if let Ok(report) = r {
            // A mutated export that verifies proves a prefix of the genuine
            // log (cutting the tail off is visible only as fewer entries and
            // checkpoints; the auditor compares with the checkpoint it holds).
            use base64::Engine;
            let n = report.entries as usize;
            prop_assert!(n <= 9 && report.latest_checkpoint_size as usize <= n);
            let root = base64::engine::general_purpose::STANDARD.encode(merkle::root(&log().leaves[..n]));
            prop_assert_eq!(report.root, root, "a mutated export proved other contents");
        }
    }

    #[test]
    fn export_arbitrary_lines(lines in vec(prop_oneof![
        ".{0,200}",
        (any::<u64>(), bytes(300)).prop_map(|(i, b)| {
            use base64::Engine;
            serde_json::json!({"index": i, "body": base64::engine::general_purpose::STANDARD.encode(b)}).to_string()
        }),
        ".{0,200}".prop_map(|n| serde_json::json!({"checkpoint": n}).to_string()),
    ], 0..20)) {
        let text = lines.join("\n");
        let (_, cost) = measure(|| verify_export(&mut text.as_bytes(), &log().verifier, |_| {}));
        cost.check("verify_export", text.len(), FIXED)?;
    }

    #[test]
    fn entry_json_mutated(seed_and_body in mutated(log().bodies.clone())) {
        let (r, cost) = measure(|| serde_json::from_slice::<Entry>(&seed_and_body.1));
        cost.check("Entry JSON", seed_and_body.1.len(), FIXED)?;
        if let Ok(e) = r {
            // What parses re-serializes to a canonical form that parses again.
            let again: Entry = serde_json::from_slice(&e.canonical()).expect("canonical parses");
            prop_assert_eq!(again, e);
        }
    }

    #[test]
    fn merkle_proofs_from_an_auditor(
        index in prop_oneof![0..20u64, any::<u64>()],
        size in prop_oneof![0..20u64, any::<u64>()],
        proof in vec(any::<[u8; 32]>(), 0..70),
        leaf in any::<[u8; 32]>(),
        root in any::<[u8; 32]>(),
    ) {
        // Random proofs never verify, whatever the sizes (no panic either).
        prop_assert!(merkle::verify_inclusion(index, size, &leaf, &proof, &root).is_err());
        prop_assert!(merkle::verify_consistency(index, size, &leaf, &root, &proof).is_err() || (index == size && index > 0 && proof.is_empty() && leaf == root));
    }
}

#[test]
fn the_genuine_log_and_export_verify() {
    let l = log();
    let entries: Vec<_> = l
        .bodies
        .iter()
        .zip(&l.leaves)
        .enumerate()
        .map(|(i, (b, h))| (i as u64, b.clone(), Some(*h), Some(columns(b))))
        .collect();
    let notes: Vec<String> = l.notes.iter().map(|(_, n)| n.clone()).collect();
    let r = verify(entries, inputs(&notes, true), &l.verifier, |_| {}).expect("verifies");
    assert_eq!((r.entries, r.checkpoints), (9, 3));
    let r = verify_export(&mut export_text().as_bytes(), &l.verifier, |_| {}).expect("export");
    assert_eq!(r.unsigned_tail, 0);
}

// ---- the live store, read back from a damaged database file ---------------

/// A real audit database (written by `AuditLog`, WAL folded), its
/// verifier, and what `audit verify` reports for it.
struct StoreSeed {
    db: Vec<u8>,
    verifier: NoteVerifier,
    entries: u64,
    root: String,
}

fn store_seed() -> &'static StoreSeed {
    static S: OnceLock<StoreSeed> = OnceLock::new();
    S.get_or_init(|| {
        use meshca::audit::AuditLog;
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, guard) = AuditLog::open(
            dir.path(),
            "cluster.local",
            std::sync::Arc::new(meshca::util::clock::SystemClock),
            Default::default(),
        )
        .expect("open");
        super::harness::block_on(async {
            for b in &log_seed_bodies() {
                let e: Entry = serde_json::from_slice(b).expect("entry");
                log.append(e).await.expect("append");
            }
            log.checkpoint().await.expect("checkpoint");
        });
        let vkey = log.verifier_key().to_string();
        drop(log);
        guard.stop();
        let path = dir.path().join(meshca::audit::DB_FILE);
        meshca::audit::store::SqliteStore::open(&path)
            .and_then(|mut s| s.fold_wal())
            .expect("fold");
        let db = std::fs::read(&path).expect("db");
        let verifier = NoteVerifier::parse(&vkey).expect("vkey");
        let (entries, root) = read_back(&db, &verifier).expect("the genuine store verifies");
        StoreSeed {
            db,
            verifier,
            entries,
            root,
        }
    })
}

fn log_seed_bodies() -> Vec<Vec<u8>> {
    log().bodies.clone()
}

/// What `meshca audit verify`, `audit list` and `audit show` do with a
/// database file: open it read-only and read every row back.
fn read_back(db: &[u8], verifier: &NoteVerifier) -> Result<(u64, String), String> {
    use meshca::audit::query;
    use meshca::audit::store::{Filter, SqliteStore};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("audit.db");
    std::fs::write(&path, db).map_err(|e| e.to_string())?;
    let store = SqliteStore::open_read_only(&path).map_err(|e| e.to_string())?;
    let _ = query::list(&store, &Filter::default());
    let _ = query::show(&store, &format!("{:032x}", 4));
    let r = query::verify_store(&store, verifier, |_| {}).map_err(|e| e.to_string())?;
    Ok((r.entries, r.root))
}

proptest! {
    // Each case writes and opens a database file.
    #![proptest_config(cases(400))]

    #[test]
    fn damaged_store_file_never_verifies_other_contents(m in mutations()) {
        let s = store_seed();
        let db = apply(s.db.clone(), &m);
        let started = std::time::Instant::now();
        let r = read_back(&db, &s.verifier);
        prop_assert!(started.elapsed() < super::harness::IO_TIME_BUDGET);
        if let Ok((entries, root)) = r {
            // Damage SQLite does not notice (free space, an index page)
            // may pass; what verifies is then the genuine log, all of it.
            prop_assert_eq!(entries, s.entries);
            prop_assert_eq!(root, s.root.clone());
        }
    }
}

#[test]
fn the_genuine_store_reads_back() {
    let s = store_seed();
    assert_eq!(s.entries, 9);
}
