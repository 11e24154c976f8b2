//! The agent's `--out-dir` as a reader sees it (issue 14, part 3): a reader
//! hammering `chain.pem` + `key.pem` through many renewals, checking that
//! the key is the leaf's. Each hammer also runs against a writer without the
//! defence (the old two-rename writer, kept here in the test only, or
//! generations updated in place) to show the same reader finds mismatches
//! when there are any. Also: old generations are removed, the key is 0600,
//! and an agent upgraded from the old layout switches to the new one.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::agent::files::{self, DATA_LINK};
use meshca::agent::{Bundle, State, Svid};
use meshca::util::secret::SecretBytes;
use support::*;
use x509_parser::prelude::*;

/// `n` states, each with its own key and a leaf for that key.
fn states(n: usize) -> Vec<State> {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let bundle = Arc::new(Bundle {
        version: 1,
        roots: vec![ca_cert.der().clone()],
        ..Bundle::default()
    });
    (0..n)
        .map(|i| {
            let key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec![format!("w{i}.example")])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            State {
                svid: Some(Arc::new(Svid {
                    spiffe_id: format!("spiffe://td/w{i}"),
                    chain: vec![leaf.der().clone(), ca_cert.der().clone()],
                    key_pkcs8: SecretBytes::new(key.serialize_der()),
                    key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
                    not_after: SystemTime::now(),
                    renew_at: SystemTime::now(),
                })),
                bundle: bundle.clone(),
            }
        })
        .collect()
}

/// Whether `key_pem` is the private key of the first certificate in
/// `chain_pem` (what `SSL_CTX_check_private_key` checks), and the leaf.
fn pair_matches(chain_pem: &[u8], key_pem: &[u8]) -> (bool, Vec<u8>) {
    let chain = meshca::ca::pem_to_certs(chain_pem).unwrap();
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let key = rcgen::KeyPair::from_pem(std::str::from_utf8(key_pem).unwrap()).unwrap();
    let same = leaf.public_key().subject_public_key.data.as_ref() == key.public_key_raw();
    (same, chain[0].to_vec())
}

/// How a reader opens the pair.
#[derive(Clone, Copy)]
enum Reader {
    /// `chain.pem`, then `key.pem`, by their stable names (what
    /// `ssl.SSLContext.load_cert_chain(chain, key)` does).
    StableNames,
    /// `readlink ..data` once, then both files in that generation.
    Pinned,
}

fn read_pair(dir: &Path, how: Reader) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let base: PathBuf = match how {
        Reader::StableNames => dir.to_path_buf(),
        Reader::Pinned => dir.join(fs::read_link(dir.join(DATA_LINK))?),
    };
    let chain = fs::read(base.join("chain.pem"))?;
    let key = fs::read(base.join("key.pem"))?;
    Ok((chain, key))
}

#[derive(Debug, Default)]
struct Seen {
    pairs: u64,
    mismatches: u64,
    /// Opens that failed (a file not there yet, or a generation removed).
    errors: u64,
    leaves: std::collections::HashSet<Vec<u8>>,
}

/// Runs `write` over every state (twice round) while a reader thread reads
/// pairs as fast as it can; returns what the reader saw.
fn hammer(dir: &Path, how: Reader, states: &[State], mut write: impl FnMut(&Path, &State)) -> Seen {
    write(dir, &states[0]);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (dir.to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !stop.load(Ordering::Relaxed) {
                match read_pair(&dir, how) {
                    Ok((chain, key)) => {
                        let (ok, leaf) = pair_matches(&chain, &key);
                        seen.pairs += 1;
                        seen.mismatches += u64::from(!ok);
                        seen.leaves.insert(leaf);
                    }
                    Err(_) => seen.errors += 1,
                }
            }
            seen
        })
    };
    for s in states.iter().chain(states.iter()).skip(1) {
        write(dir, s);
        // Let the reader run between renewals on a busy 2-core machine.
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap()
}

/// The pre-issue-14 writer: key.pem then chain.pem, each written to a temp
/// file, fsynced and renamed — each atomic, the pair not.
fn two_rename_write(dir: &Path, state: &State) {
    let svid = state.svid.as_ref().unwrap();
    atomic_write(&dir.join("key.pem"), svid.key_pem.expose(), 0o600);
    atomic_write(&dir.join("chain.pem"), svid.chain_pem().as_bytes(), 0o644);
}

fn atomic_write(path: &Path, bytes: &[u8], mode: u32) {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    fs::rename(&tmp, path).unwrap();
    fs::File::open(path.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

fn generations(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("..") && n[2..].starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

#[test]
fn a_reader_that_pins_the_generation_never_sees_a_mismatched_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let states = states(40);
    let seen = hammer(tmp.path(), Reader::Pinned, &states, |d, s| {
        files::write(d, s).unwrap()
    });
    eprintln!(
        "generations + pinned reader: {seen:?}",
        seen = (seen.pairs, seen.mismatches, seen.errors, seen.leaves.len())
    );
    assert_eq!(seen.mismatches, 0, "{} mismatched pairs", seen.mismatches);
    assert!(
        seen.pairs >= 200,
        "the reader hammered ({} pairs)",
        seen.pairs
    );
    assert!(
        seen.leaves.len() >= 10,
        "and saw renewals ({} leaves)",
        seen.leaves.len()
    );
    // Old generations are removed: the current one and the one it replaced.
    assert_eq!(
        generations(tmp.path()).len(),
        2,
        "{:?}",
        generations(tmp.path())
    );
    let mode = fs::metadata(tmp.path().join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn the_pinned_reader_finds_mismatches_when_a_generation_is_updated_in_place() {
    // Without a new directory per update the pinned reader is no better off:
    // the same hammer fails, so the test above can fail.
    let tmp = tempfile::tempdir().unwrap();
    let states = states(40);
    let mut first = true;
    let seen = hammer(tmp.path(), Reader::Pinned, &states, |d, s| {
        if first {
            files::write(d, s).unwrap();
            first = false;
        } else {
            two_rename_write(&d.join(fs::read_link(d.join(DATA_LINK)).unwrap()), s);
        }
    });
    eprintln!(
        "in-place + pinned reader: {:?}",
        (seen.pairs, seen.mismatches, seen.errors)
    );
    assert!(seen.mismatches > 0, "{seen:?}");
}

#[test]
fn readers_by_stable_name_see_far_fewer_mismatches_than_with_two_renames() {
    // A reader that opens chain.pem and then key.pem resolves `..data`
    // twice, so a switch between its two opens still splits the pair (no
    // writer can prevent that). What the generations remove is the
    // writer's own window: with two renames a reader that opens both files
    // between them, during the chain's fsync, always gets a split pair.
    let states = states(40);
    let old_dir = tempfile::tempdir().unwrap();
    let old = hammer(
        old_dir.path(),
        Reader::StableNames,
        &states,
        two_rename_write,
    );
    let new_dir = tempfile::tempdir().unwrap();
    let new = hammer(new_dir.path(), Reader::StableNames, &states, |d, s| {
        files::write(d, s).unwrap()
    });
    let rate = |s: &Seen| s.mismatches as f64 / s.pairs.max(1) as f64;
    eprintln!(
        "stable names: two renames {}/{} mismatched ({:.4}), generations {}/{} ({:.4})",
        old.mismatches,
        old.pairs,
        rate(&old),
        new.mismatches,
        new.pairs,
        rate(&new)
    );
    assert!(old.mismatches > 0, "the hammer finds split pairs: {old:?}");
    assert!(new.pairs >= 200 && old.pairs >= 200);
    assert!(
        rate(&new) * 3.0 < rate(&old),
        "generations: {:.4} of pairs split, two renames: {:.4}",
        rate(&new),
        rate(&old)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_upgraded_from_the_old_layout_writes_generations() {
    let ca = Ca::start_with(|c| {
        c.set_max_ttl(Duration::from_secs(3));
        c.issuance.default_ttl = Duration::from_secs(3);
        c.issuance.min_ttl = Duration::from_secs(1);
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("certs");
    fs::create_dir(&out).unwrap();
    // What the previous agent version left: regular files.
    let old = states(1);
    two_rename_write(&out, &old[0]);
    fs::write(out.join("bundle.pem"), old[0].bundle.to_pem()).unwrap();

    let agent = ca.start_agent(tmp.path(), Duration::from_secs(3));
    agent.ready(Duration::from_secs(20)).await.unwrap();
    tokio::spawn(files::follow(
        out.clone(),
        Some("echo x >> \"$MESHCA_OUT_DIR/updates.log\"".into()),
        agent.watch(),
    ));
    let updates = || {
        fs::read_to_string(out.join("updates.log"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_until(
        "three writes (start and two renewals)",
        Duration::from_secs(20),
        || async { updates() >= 3 },
    )
    .await;
    for name in ["chain.pem", "key.pem", "bundle.pem"] {
        let link = fs::read_link(out.join(name)).unwrap();
        assert_eq!(link, Path::new(DATA_LINK).join(name));
    }
    let (chain, key) = read_pair(&out, Reader::Pinned).unwrap();
    let (ok, leaf) = pair_matches(&chain, &key);
    assert!(ok, "the agent's key matches its leaf");
    assert_ne!(leaf, old[0].svid.as_ref().unwrap().chain[0].to_vec());
    assert!(generations(&out).len() <= 2, "{:?}", generations(&out));
    let mode = fs::metadata(out.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let roots = meshca::ca::pem_to_certs(&fs::read(out.join("bundle.pem")).unwrap()).unwrap();
    let chain = meshca::ca::pem_to_certs(&chain).unwrap();
    let der = |v: &[rustls::pki_types::CertificateDer<'static>]| -> Vec<Vec<u8>> {
        v.iter().map(|c| c.to_vec()).collect()
    };
    openssl_verify(tmp.path(), &chain[0], &der(&chain[1..]), &der(&roots));
    agent.stop();
}
