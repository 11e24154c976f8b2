//! Handling of secret bytes and of files that must never be half-written.
//!
//! Owns: the zeroizing wrapper for private-key material, and atomic file
//! writes (temp file + fsync + rename + directory fsync) with explicit modes.
//! Must not: parse keys or decide what is secret; callers choose
//! [`write_private`] or [`write_public`].

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

/// Secret bytes (a private key in PKCS#8 DER or PEM): zeroized on drop,
/// printed as `"..."` by `Debug`.
#[derive(Clone)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Takes ownership of the bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Borrows the secret.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(...)")
    }
}

/// Writes `bytes` to `path` with mode 0600, atomically.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// Writes `bytes` to `path` with mode 0644, atomically.
pub(crate) fn write_public(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic(path, bytes, 0o644)
}

/// Reads a private file, keeping its content in zeroizing memory.
pub(crate) fn read_private(path: &Path) -> io::Result<SecretBytes> {
    Ok(SecretBytes::new(fs::read(path)?))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // A unique temp name in the same directory, so rename is atomic and two
    // writers never share a temp file.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_files_are_0600_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn debug_hides_secret() {
        let s = SecretBytes::new(b"very secret".to_vec());
        assert!(!format!("{s:?}").contains("secret\""));
        assert!(!format!("{s:?}").contains("very"));
    }
}
