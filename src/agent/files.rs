//! The agent's file output.
//!
//! Owns: the layout of `--out-dir` and every write into it, then running the
//! operator's command (through `sh -c`, with `MESHCA_OUT_DIR` set) so a
//! server can reload. Must not: hold keys longer than one write, or touch
//! anything in the directory that is not its own (names below).
//!
//! Layout (the kubelet's AtomicWriter design):
//!
//! ```text
//! out-dir/
//!   ..2026_11_28_16_05_00.123456789/   one generation: chain.pem key.pem bundle.pem
//!   ..data -> ..2026_11_28_16_05_00.123456789
//!   chain.pem -> ..data/chain.pem      stable names, created once
//!   key.pem -> ..data/key.pem
//!   bundle.pem -> ..data/bundle.pem
//! ```
//!
//! Each update is written whole into a new generation directory and fsynced,
//! then `..data` is switched to it with one `rename(2)` of a fresh symlink.
//! Before, `key.pem` and `chain.pem` were each renamed atomically but not
//! together, so a reader loading the pair across a renewal could get a key
//! that does not match the chain. Now every generation is a matching set,
//! and the set a reader sees changes at one instant.
//!
//! What that guarantees: a reader that resolves `..data` once (`readlink`,
//! or opening `..data` as a directory and the files relative to it) always
//! gets a matching pair. A reader that opens `chain.pem` and then `key.pem`
//! by their stable names resolves `..data` twice: it gets a matching pair
//! unless the switch falls between its two opens (no writer can prevent
//! that for two separate opens), a window of the reader's own making that
//! used to be widened by the writer's whole fsync-and-rename sequence.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::State;

/// The symlink naming the current generation (the kubelet's name).
pub const DATA_LINK: &str = "..data";
/// Where the next `..data` symlink is made before it is renamed into place.
const DATA_TMP: &str = "..data_tmp";
/// The stable names readers open, in the order they are (re)linked: key
/// before chain, as the old writer renamed them, so that during an upgrade
/// from the old layout a reader that sees the new chain finds its key.
const NAMES: [&str; 3] = ["key.pem", "chain.pem", "bundle.pem"];

/// A write that failed, naming the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct FilesError {
    /// The file or directory the operation was on.
    pub path: PathBuf,
    /// What the operating system said.
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the current state as a new generation and makes it current.
///
/// Without an SVID only `bundle.pem` is written (the agent's follower never
/// writes before it has one).
pub fn write(dir: &Path, state: &State) -> Result<(), FilesError> {
    fs::create_dir_all(dir).map_err(at(dir))?;
    let chain = state.svid.as_ref().map(|s| s.chain_pem());
    let bundle = state.bundle.to_pem();
    let mut files: Vec<(&str, &[u8], u32)> = Vec::with_capacity(3);
    if let (Some(svid), Some(chain)) = (&state.svid, &chain) {
        files.push(("key.pem", svid.key_pem.expose(), 0o600));
        files.push(("chain.pem", chain.as_bytes(), 0o644));
    }
    files.push(("bundle.pem", bundle.as_bytes(), 0o644));

    let generation = new_generation(dir)?;
    let gen_path = dir.join(&generation);
    if let Err(e) = fill(&gen_path, &files) {
        // Never current, so nobody can be reading it.
        let _ = fs::remove_dir_all(&gen_path);
        return Err(e);
    }
    let previous = current_generation(dir);
    switch(dir, &generation)?;
    for name in NAMES {
        if files.iter().any(|(n, _, _)| *n == name) {
            ensure_link(dir, name)?;
        }
    }
    sync_dir(dir)?;
    remove_old(dir, &generation, previous.as_deref());
    Ok(())
}

/// `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN` (UTC) for `t`: sortable by eye, and
/// the same form as the kubelet's, so operators recognise it.
fn generation_name(t: SystemTime) -> String {
    let nanos = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(d) => format!(
            "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second(),
            d.nanosecond()
        ),
        Err(_) => format!("..{nanos}"),
    }
}

/// Whether `name` is one of our generation directories: `..` and a digit.
/// (`..data`, `..data_tmp` and anything an operator put there are not.)
fn is_generation(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    b.len() > 2 && b.starts_with(b"..") && b[2].is_ascii_digit()
}

/// Creates an empty generation directory (0755: the chain and bundle in it
/// are public, as they were before; the key is protected by its own 0600)
/// and returns its name. The name is only a label: which generation is
/// current is what `..data` says, so a clock step cannot confuse anything.
fn new_generation(dir: &Path) -> Result<String, FilesError> {
    let base = generation_name(SystemTime::now());
    for n in 0..100u32 {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}_{n}")
        };
        let path = dir.join(&name);
        match DirBuilder::new().mode(0o755).create(&path) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(at(&path)(e)),
        }
    }
    Err(at(&dir.join(&base))(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "100 generation directories with this timestamp already exist",
    )))
}

/// Writes each file into the (not yet visible) generation directory and
/// makes the contents and the directory durable before it becomes current.
fn fill(gen_path: &Path, files: &[(&str, &[u8], u32)]) -> Result<(), FilesError> {
    for (name, bytes, mode) in files {
        let p = gen_path.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(*mode)
            .open(&p)
            .map_err(at(&p))?;
        f.write_all(bytes).map_err(at(&p))?;
        f.sync_all().map_err(at(&p))?;
    }
    sync_dir(gen_path)
}

/// The generation `..data` names now, if any.
fn current_generation(dir: &Path) -> Option<OsString> {
    fs::read_link(dir.join(DATA_LINK))
        .ok()
        .and_then(|t| t.file_name().map(OsStr::to_os_string))
}

/// Points `..data` at `generation` in one step: a new symlink renamed over
/// the old one, so a reader resolves either the old or the new target,
/// never nothing.
fn switch(dir: &Path, generation: &str) -> Result<(), FilesError> {
    let tmp = dir.join(DATA_TMP);
    remove_if_present(&tmp)?;
    std::os::unix::fs::symlink(generation, &tmp).map_err(at(&tmp))?;
    let data = dir.join(DATA_LINK);
    fs::rename(&tmp, &data).map_err(at(&data))
}

/// Makes `dir/name` the symlink `..data/name`, replacing in one rename
/// whatever is there (a regular file from the old layout, or a wrong link).
fn ensure_link(dir: &Path, name: &str) -> Result<(), FilesError> {
    let link = dir.join(name);
    let target = Path::new(DATA_LINK).join(name);
    if fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = dir.join(format!("{DATA_TMP}.{name}"));
    remove_if_present(&tmp)?;
    std::os::unix::fs::symlink(&target, &tmp).map_err(at(&tmp))?;
    fs::rename(&tmp, &link).map_err(at(&link))
}

fn remove_if_present(p: &Path) -> Result<(), FilesError> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(p)(e)),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), FilesError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(at(dir))
}

/// Removes every generation but the current and the one it replaced.
///
/// Why keep the previous one: a reader that resolved `..data` just before
/// the switch (the consistent way to read the pair) still has to open its
/// files; removing that generation at once, as the kubelet does, would make
/// those opens fail. It goes at the next update, normally a renewal minutes
/// later, by which time such a reader has long finished. Older ones go now:
/// one spare copy of three small files, however long the agent runs.
fn remove_old(dir: &Path, current: &str, previous: Option<&OsStr>) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot list old certificate generations");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let keep = name == current || Some(name.as_os_str()) == previous;
        // file_type() does not follow symlinks: only real directories go.
        if keep || !is_generation(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Err(e) = fs::remove_dir_all(entry.path()) {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove an old certificate generation");
        }
    }
}

/// Keeps `dir` in line with the agent until the agent stops.
pub async fn follow(dir: PathBuf, on_update: Option<String>, mut rx: watch::Receiver<State>) {
    let mut written: Option<(usize, u64)> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        // Identify what was written by the SVID's address and bundle version.
        let id = (
            state
                .svid
                .as_ref()
                .map_or(0, |s| std::sync::Arc::as_ptr(s) as usize),
            state.bundle.version,
        );
        if state.svid.is_some() && written != Some(id) {
            let d = dir.clone();
            let s = state.clone();
            match tokio::task::spawn_blocking(move || write(&d, &s)).await {
                Ok(Ok(())) => {
                    written = Some(id);
                    tracing::info!(dir = %dir.display(), "certificate files written");
                    if let Some(cmd) = &on_update {
                        run_hook(cmd, &dir).await;
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "cannot write certificate files"),
                Err(e) => tracing::error!(error = %e, "file writer panicked"),
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn run_hook(cmd: &str, dir: &Path) {
    let r = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("MESHCA_OUT_DIR", dir)
        .status()
        .await;
    match r {
        Ok(s) if s.success() => tracing::info!(command = cmd, "update command ran"),
        Ok(s) => tracing::warn!(command = cmd, status = %s, "update command failed"),
        Err(e) => tracing::warn!(command = cmd, error = %e, "update command could not start"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use crate::agent::{Bundle, Svid};
    use crate::util::secret::SecretBytes;

    /// A state with a fresh key and a self-signed leaf for it.
    fn state(version: u64) -> State {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["w.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let svid = Svid {
            spiffe_id: "spiffe://td/w".into(),
            chain: vec![cert.der().clone()],
            key_pkcs8: SecretBytes::new(key.serialize_der()),
            key_pem: SecretBytes::new(key.serialize_pem().into_bytes()),
            not_after: SystemTime::now(),
            renew_at: SystemTime::now(),
        };
        State {
            svid: Some(Arc::new(svid)),
            bundle: Arc::new(Bundle {
                version,
                roots: vec![cert.der().clone()],
                ..Bundle::default()
            }),
        }
    }

    fn generations(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| is_generation(OsStr::new(n)))
            .collect();
        v.sort();
        v
    }

    fn data_target(dir: &Path) -> String {
        fs::read_link(dir.join(DATA_LINK))
            .unwrap()
            .into_os_string()
            .into_string()
            .unwrap()
    }

    #[test]
    fn each_write_is_a_new_generation_behind_stable_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let mut previous = None;
        for v in 1..=5 {
            let s = state(v);
            write(&dir, &s).unwrap();
            let current = data_target(&dir);
            assert!(is_generation(OsStr::new(&current)), "{current}");
            assert_ne!(
                Some(&current),
                previous.as_ref(),
                "a new generation each time"
            );
            // Current and the one it replaced; nothing older.
            let mut want: Vec<String> = previous.iter().cloned().collect();
            want.push(current.clone());
            want.sort();
            assert_eq!(generations(&dir), want);
            for name in NAMES {
                assert_eq!(
                    fs::read_link(dir.join(name)).unwrap(),
                    Path::new(DATA_LINK).join(name),
                    "{name} is the stable link"
                );
            }
            let svid = s.svid.as_ref().unwrap();
            assert_eq!(
                fs::read(dir.join("key.pem")).unwrap(),
                svid.key_pem.expose()
            );
            assert_eq!(
                fs::read_to_string(dir.join("chain.pem")).unwrap(),
                svid.chain_pem()
            );
            assert_eq!(
                fs::read_to_string(dir.join("bundle.pem")).unwrap(),
                s.bundle.to_pem()
            );
            let mode = |n: &str| fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode("key.pem"), 0o600);
            assert_eq!(mode("chain.pem"), 0o644);
            assert_eq!(mode(&current), 0o755);
            previous = Some(current);
        }
        assert!(!dir.join(DATA_TMP).exists());
    }

    #[test]
    fn upgrade_from_the_old_layout_replaces_files_with_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for name in NAMES {
            fs::write(dir.join(name), b"old").unwrap();
        }
        // Debris of an interrupted switch, and files that are not ours.
        std::os::unix::fs::symlink("nowhere", dir.join(DATA_TMP)).unwrap();
        fs::write(dir.join("updates.log"), b"x").unwrap();
        fs::create_dir(dir.join("..mine")).unwrap();
        let s = state(1);
        write(dir, &s).unwrap();
        for name in NAMES {
            assert!(fs::symlink_metadata(dir.join(name))
                .unwrap()
                .file_type()
                .is_symlink());
        }
        assert_eq!(
            fs::read(dir.join("key.pem")).unwrap(),
            s.svid.as_ref().unwrap().key_pem.expose()
        );
        assert_eq!(fs::read(dir.join("updates.log")).unwrap(), b"x");
        assert!(dir.join("..mine").is_dir());
        assert_eq!(generations(dir).len(), 1);
    }

    #[test]
    fn generation_names_look_like_the_kubelets() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_795_881_900, 123_456_789);
        assert_eq!(generation_name(t), "..2026_11_28_16_05_00.123456789");
        assert!(is_generation(OsStr::new("..2026_11_28_16_05_00.123456789")));
        for not in ["..data", "..data_tmp", "..", "..x1", "key.pem", ".1"] {
            assert!(!is_generation(OsStr::new(not)), "{not}");
        }
    }

    #[test]
    fn a_link_that_cannot_be_made_is_reported_with_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write(dir, &state(1)).unwrap();
        // `chain.pem` cannot become a link while it is a non-empty directory.
        fs::remove_file(dir.join("chain.pem")).unwrap();
        fs::create_dir(dir.join("chain.pem")).unwrap();
        fs::write(dir.join("chain.pem").join("x"), b"x").unwrap();
        let e = write(dir, &state(2)).unwrap_err();
        assert_eq!(e.path, dir.join("chain.pem"), "{e}");
        assert!(e
            .to_string()
            .starts_with(&dir.join("chain.pem").display().to_string()));
    }
}
