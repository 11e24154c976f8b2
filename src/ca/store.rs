//! The data directory: where the CA's certificates and keys live on disk.
//!
//! Owns: the file layout, `init` (create or import a root, create an issuer),
//! and loading it back. Private keys are written 0600 through
//! `secret::write_private`. Must not: issue leaves or decide policy.
//!
//! Layout:
//! - `roots/<sha256>.crt`, `roots/<sha256>.key` — every root (self-signed or
//!   imported), named by fingerprint; `rotation.json` (owned by
//!   `trust::journal`) says which one is active
//! - `roots/<sha256>.jwt.key` — that root's JWT-SVID signing key (PKCS#8,
//!   0600), made with the root and rotated with it (see `ca::jwt`)
//! - `root.crt`, `root.key` — the layout before rotation existed: one root;
//!   `trust::manager` moves it into `roots/` on first start
//! - `issuer.crt`, `issuer.key` — the issuing intermediate (under the active root)
//! - `bundle.pem` — the trust bundle (every root in it), rewritten on each change
//! - `token-signer.key` — ES256 key for `meshca token` (development tokens)

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use super::jwt::JwtKey;
use super::{der_to_pem, fingerprint, pem_to_certs, profile, to_system_time, ActiveIssuer, CaKey};
use crate::util::secret::{self, SecretBytes};

/// Errors reading or writing the data directory.
///
/// The variants are what a caller decides on: `NotInitialized` (run
/// `init`), `AlreadyInitialized` (refuse to overwrite), `Locked` (a running
/// server owns the directory: talk to it instead), `Io` (the file system),
/// `Invalid` (a file holds something unusable).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The directory already holds a CA.
    #[error("{0} already holds a CA ({1} exists); refusing to overwrite it")]
    AlreadyInitialized(PathBuf, PathBuf),
    /// The directory holds no CA.
    #[error("{0} holds no CA; run `meshca init --data-dir {0}` first")]
    NotInitialized(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds something unusable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Key generation or signing failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// Another meshca process holds the directory's lock.
    #[error("{} is in use by another meshca process (a running server holds {}); talk to it with --server http://ADMIN_ADDRESS", dir.display(), lock.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
}

impl From<rcgen::Error> for StoreError {
    fn from(e: rcgen::Error) -> Self {
        StoreError::Crypto(e.to_string())
    }
}

/// How to create a CA.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Lifetime of a generated root.
    pub root_lifetime: Duration,
    /// Lifetime of the issuer (clamped to the root's expiry).
    pub issuer_lifetime: Duration,
    /// Import this root (certificate PEM, key PEM) instead of generating one.
    pub import_root: Option<(PathBuf, PathBuf)>,
    /// Type of the root's JWT-SVID signing key.
    pub jwt_key_type: super::jwt::JwtKeyType,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            root_lifetime: Duration::from_secs(365 * 24 * 3600),
            issuer_lifetime: Duration::from_secs(30 * 24 * 3600),
            import_root: None,
            jwt_key_type: Default::default(),
        }
    }
}

/// What `init` created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// SHA-256 of the root certificate.
    pub root_fingerprint: String,
    /// SHA-256 of the issuer certificate.
    pub issuer_fingerprint: String,
    /// The issuer's expiry.
    pub issuer_not_after: SystemTime,
    /// True when the issuer lifetime was cut to the root's expiry.
    pub issuer_clamped: bool,
    /// True when the root was imported.
    pub imported: bool,
}

/// What `renew_issuer` created.
#[derive(Debug, Clone)]
pub struct RenewReport {
    /// SHA-256 of the new issuer certificate.
    pub fingerprint: String,
    /// Its expiry.
    pub not_after: SystemTime,
    /// True when its lifetime was cut to the root's expiry.
    pub clamped_to_root: bool,
}

/// What `load` returns.
#[derive(Debug)]
pub struct LoadedCa {
    /// The issuer, ready to sign.
    pub issuer: ActiveIssuer,
    /// The trust anchors.
    pub roots: Vec<CertificateDer<'static>>,
}

/// A data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    dir: PathBuf,
}

impl DataDir {
    /// Wraps a path (not created until `init`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True when a CA has been created here.
    pub(crate) fn is_initialized(&self) -> bool {
        self.file("issuer.crt").exists()
    }

    /// Creates a root (or imports one) and an issuer under it.
    pub fn init(&self, opts: &InitOptions, now: SystemTime) -> Result<InitReport, StoreError> {
        for f in [
            "root.crt",
            "root.key",
            "roots",
            "rotation.json",
            "issuer.crt",
            "issuer.key",
            "bundle.pem",
        ] {
            let p = self.file(f);
            if p.exists() {
                return Err(StoreError::AlreadyInitialized(self.dir.clone(), p));
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        set_dir_private(&self.dir)?;

        let (root_der, root_key, imported) = match &opts.import_root {
            Some((cert, key)) => {
                let (der, key) = import_root(cert, key, now)?;
                (der, key, true)
            }
            None => {
                let (der, key) = new_root(now, opts.root_lifetime)?;
                (der, key, false)
            }
        };
        let (_, root) = X509Certificate::from_der(&root_der).map_err(|e| StoreError::Invalid {
            path: self.file("root.crt"),
            reason: e.to_string(),
        })?;
        let root_not_after = to_system_time(root.validity().not_after);

        let issuer_key = CaKey::generate_p256()?;
        let wanted = crate::util::clock::add_clamped(now, opts.issuer_lifetime);
        let issuer_clamped = wanted > root_not_after;
        let issuer_not_after = wanted.min(root_not_after);
        let params = profile::issuer(
            &format!("meshca issuer {}", &crate::util::clock::rfc3339(now)[..10]),
            now - super::BACKDATE,
            issuer_not_after,
        );
        let root_issuer = rcgen::Issuer::from_ca_cert_der(&root_der, &root_key)?;
        let issuer_cert = params.signed_by(&issuer_key, &root_issuer)?;

        // Keys first, certificates after: a crash in between leaves a
        // directory that `is_initialized` still reports as empty.
        let jwt =
            JwtKey::generate(opts.jwt_key_type).map_err(|e| StoreError::Crypto(e.to_string()))?;
        self.write_jwt_key(&fingerprint(&root_der), &jwt)?;
        self.write_root(&root_der, &root_key)?;
        self.write_key("issuer.key", &issuer_key.to_pem())?;
        if !self.file("token-signer.key").exists() {
            self.write_key("token-signer.key", &CaKey::generate_p256()?.to_pem())?;
        }
        self.write_pub("bundle.pem", der_to_pem(&root_der).as_bytes())?;
        self.write_pub("issuer.crt", der_to_pem(issuer_cert.der()).as_bytes())?;

        Ok(InitReport {
            root_fingerprint: fingerprint(&root_der),
            issuer_fingerprint: fingerprint(issuer_cert.der()),
            issuer_not_after,
            issuer_clamped,
            imported,
        })
    }

    /// Creates a new issuer under the root `root_id` (a fingerprint in
    /// `roots/`) and makes it the current one. Crash-safe: the pair is
    /// written as `issuer.pending.key` + `issuer.pending.crt`, then renamed
    /// into place key first; [`DataDir::load`] rolls a half-finished switch
    /// forward.
    pub fn renew_issuer(
        &self,
        root_id: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<RenewReport, StoreError> {
        self.finish_pending_issuer()?;
        let (root_der, root_key) = self.read_root(root_id)?;
        let (_, root) = X509Certificate::from_der(&root_der).map_err(|e| StoreError::Invalid {
            path: self.root_paths(root_id).0,
            reason: e.to_string(),
        })?;
        let root_not_after = to_system_time(root.validity().not_after);
        if root_not_after <= now {
            return Err(StoreError::Invalid {
                path: self.root_paths(root_id).0,
                reason: format!(
                    "the root expired at {}; a new issuer cannot be made under it: run `meshca rotation prepare` then `meshca rotation activate --force`",
                    crate::util::clock::rfc3339(root_not_after)
                ),
            });
        }
        let wanted = crate::util::clock::add_clamped(now, lifetime);
        let clamped = wanted > root_not_after;
        let not_after = wanted.min(root_not_after);
        let key = CaKey::generate_p256()?;
        let params = profile::issuer(
            &format!("meshca issuer {}", &crate::util::clock::rfc3339(now)[..10]),
            now - super::BACKDATE,
            not_after,
        );
        let root_issuer = rcgen::Issuer::from_ca_cert_der(&root_der, &root_key)?;
        let cert = params.signed_by(&key, &root_issuer)?;
        self.write_key("issuer.pending.key", &key.to_pem())?;
        self.write_pub("issuer.pending.crt", der_to_pem(cert.der()).as_bytes())?;
        self.finish_pending_issuer()?;
        Ok(RenewReport {
            fingerprint: fingerprint(cert.der()),
            not_after,
            clamped_to_root: clamped,
        })
    }

    /// Installs an issuer made elsewhere (shared state from another
    /// replica), with the same crash-safe pending-then-rename switch.
    pub(crate) fn install_issuer(
        &self,
        cert_pem: &[u8],
        key_pem: &SecretBytes,
    ) -> Result<(), StoreError> {
        self.finish_pending_issuer()?;
        self.write_key("issuer.pending.key", key_pem)?;
        self.write_pub("issuer.pending.crt", cert_pem)?;
        self.finish_pending_issuer()
    }

    /// Completes (or discards) an issuer switch a crash interrupted.
    fn finish_pending_issuer(&self) -> Result<(), StoreError> {
        let (pk, pc) = (
            self.file("issuer.pending.key"),
            self.file("issuer.pending.crt"),
        );
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        if pc.exists() {
            // Both halves were written: roll forward, key first.
            if pk.exists() {
                std::fs::rename(&pk, self.file("issuer.key")).map_err(io(&pk))?;
            }
            std::fs::rename(&pc, self.file("issuer.crt")).map_err(io(&pc))?;
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
        } else if pk.exists() {
            // The certificate was never written: the renewal did not happen.
            std::fs::remove_file(&pk).map_err(io(&pk))?;
        }
        Ok(())
    }

    /// Loads the issuer and the trust bundle.
    pub fn load(&self) -> Result<LoadedCa, StoreError> {
        if !self.is_initialized() {
            return Err(StoreError::NotInitialized(self.dir.clone()));
        }
        self.finish_pending_issuer()?;
        let roots = self.read_certs("bundle.pem")?;
        let chain = self.read_certs("issuer.crt")?;
        let key_path = self.file("issuer.key");
        let key =
            CaKey::from_pem(&self.read_key("issuer.key")?).map_err(|e| StoreError::Invalid {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
        let issuer = ActiveIssuer::new(chain, key).map_err(|e| StoreError::Invalid {
            path: key_path,
            reason: e.to_string(),
        })?;
        Ok(LoadedCa { issuer, roots })
    }

    /// `roots/<id>.crt` and `roots/<id>.key`.
    pub(crate) fn root_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        let d = self.file("roots");
        (d.join(format!("{id}.crt")), d.join(format!("{id}.key")))
    }

    /// Stores a root under its fingerprint (key first) and returns the fingerprint.
    pub(crate) fn write_root(
        &self,
        der: &CertificateDer<'static>,
        key: &CaKey,
    ) -> Result<String, StoreError> {
        self.roots_dir()?;
        let id = fingerprint(der);
        let (crt, k) = self.root_paths(&id);
        secret::write_private(&k, key.to_pem().expose())
            .map_err(|source| StoreError::Io { path: k, source })?;
        secret::write_public(&crt, der_to_pem(der).as_bytes())
            .map_err(|source| StoreError::Io { path: crt, source })?;
        Ok(id)
    }

    /// `roots/<id>.jwt.key`: the JWT-SVID signing key of root `id`.
    pub(crate) fn jwt_key_path(&self, id: &str) -> PathBuf {
        self.file("roots").join(format!("{id}.jwt.key"))
    }

    /// True when root `id` has a JWT-SVID signing key.
    pub(crate) fn has_jwt_key(&self, id: &str) -> bool {
        self.jwt_key_path(id).exists()
    }

    /// `roots/`, created private (0700) if missing.
    fn roots_dir(&self) -> Result<PathBuf, StoreError> {
        let dir = self.file("roots");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        set_dir_private(&dir)?;
        Ok(dir)
    }

    /// Stores root `id`'s JWT-SVID signing key (0600, atomic).
    pub(crate) fn write_jwt_key(&self, id: &str, key: &JwtKey) -> Result<(), StoreError> {
        self.roots_dir()?;
        let path = self.jwt_key_path(id);
        secret::write_private(&path, key.to_pem().expose())
            .map_err(|source| StoreError::Io { path, source })
    }

    /// Root `id`'s JWT-SVID signing key.
    pub(crate) fn read_jwt_key(&self, id: &str) -> Result<JwtKey, StoreError> {
        let path = self.jwt_key_path(id);
        let pem = secret::read_private(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        JwtKey::from_pem(&pem).map_err(|e| StoreError::Invalid {
            path,
            reason: e.to_string(),
        })
    }

    /// Deletes root `id`'s JWT-SVID signing key, if any (the root left the
    /// bundle: its key never signs or verifies again).
    pub(crate) fn remove_jwt_key(&self, id: &str) -> Result<bool, StoreError> {
        let path = self.jwt_key_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// The certificate of a stored root.
    pub fn read_root_cert(&self, id: &str) -> Result<CertificateDer<'static>, StoreError> {
        let path = self.root_paths(id).0;
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let der = pem_to_certs(&bytes)
            .map_err(|reason| StoreError::Invalid {
                path: path.clone(),
                reason,
            })?
            .swap_remove(0);
        if fingerprint(&der) != id {
            return Err(StoreError::Invalid {
                path,
                reason: format!("holds a certificate whose fingerprint is not {id}"),
            });
        }
        Ok(der)
    }

    /// A stored root's certificate and key.
    pub fn read_root(&self, id: &str) -> Result<(CertificateDer<'static>, CaKey), StoreError> {
        let der = self.read_root_cert(id)?;
        let key_path = self.root_paths(id).1;
        let key =
            CaKey::from_pem(
                &secret::read_private(&key_path).map_err(|source| StoreError::Io {
                    path: key_path.clone(),
                    source,
                })?,
            )
            .map_err(|e| StoreError::Invalid {
                path: key_path,
                reason: e.to_string(),
            })?;
        Ok((der, key))
    }

    /// Replaces `bundle.pem` (atomically).
    pub(crate) fn write_bundle(&self, roots: &[CertificateDer<'static>]) -> Result<(), StoreError> {
        let pem: String = roots.iter().map(|r| der_to_pem(r)).collect();
        self.write_pub("bundle.pem", pem.as_bytes())
    }

    /// The current issuer certificate chain (issuer first).
    pub fn issuer_chain(&self) -> Result<Vec<CertificateDer<'static>>, StoreError> {
        self.finish_pending_issuer()?;
        self.read_certs("issuer.crt")
    }

    /// Reads a PEM certificate file of the directory.
    pub(crate) fn read_cert_file(
        &self,
        name: &str,
    ) -> Result<Vec<CertificateDer<'static>>, StoreError> {
        self.read_certs(name)
    }

    /// Reads the PEM trust bundle.
    pub fn bundle_pem(&self) -> Result<String, StoreError> {
        let p = self.file("bundle.pem");
        std::fs::read_to_string(&p).map_err(|source| StoreError::Io { path: p, source })
    }

    /// Reads a private key file into zeroizing memory.
    pub fn read_key(&self, name: &str) -> Result<SecretBytes, StoreError> {
        let path = self.file(name);
        secret::read_private(&path).map_err(|source| StoreError::Io { path, source })
    }

    fn read_certs(&self, name: &str) -> Result<Vec<CertificateDer<'static>>, StoreError> {
        let path = self.file(name);
        let bytes = std::fs::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        pem_to_certs(&bytes).map_err(|reason| StoreError::Invalid { path, reason })
    }

    fn write_key(&self, name: &str, pem: &SecretBytes) -> Result<(), StoreError> {
        let path = self.file(name);
        secret::write_private(&path, pem.expose()).map_err(|source| StoreError::Io { path, source })
    }

    fn write_pub(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.file(name);
        secret::write_public(&path, bytes).map_err(|source| StoreError::Io { path, source })
    }
}

fn set_dir_private(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        StoreError::Io {
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// Generates a P-256 root valid from `now` for `lifetime`. Its common name
/// carries the creation time so that two roots in one bundle are told apart
/// at a glance (and by name-matching path builders).
pub fn new_root(
    now: SystemTime,
    lifetime: Duration,
) -> Result<(CertificateDer<'static>, CaKey), StoreError> {
    let key = CaKey::generate_p256()?;
    let params = profile::root(
        &format!("meshca root CA {}", crate::util::clock::rfc3339(now)),
        now,
        lifetime,
    );
    let cert = params.self_signed(&key)?;
    Ok((cert.der().clone(), key))
}

/// Loads an operator-supplied root and checks it can act as one.
pub fn import_root(
    cert_path: &Path,
    key_path: &Path,
    now: SystemTime,
) -> Result<(CertificateDer<'static>, CaKey), StoreError> {
    let invalid = |path: &Path, reason: String| StoreError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(cert_path).map_err(|source| StoreError::Io {
        path: cert_path.to_path_buf(),
        source,
    })?;
    let der = pem_to_certs(&bytes)
        .map_err(|r| invalid(cert_path, r))?
        .swap_remove(0);
    let key_pem = secret::read_private(key_path).map_err(|source| StoreError::Io {
        path: key_path.to_path_buf(),
        source,
    })?;
    let key = CaKey::from_pem(&key_pem).map_err(|e| invalid(key_path, e.to_string()))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| invalid(cert_path, e.to_string()))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(invalid(
                cert_path,
                "not a CA certificate (basicConstraints CA:true is missing)".into(),
            ))
        }
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(invalid(
                cert_path,
                "keyUsage lacks keyCertSign, so it cannot sign an issuer".into(),
            ));
        }
    }
    if cert.public_key().raw != key.spki_der().as_slice() {
        return Err(invalid(
            key_path,
            "this private key does not belong to the root certificate".into(),
        ));
    }
    if to_system_time(cert.validity().not_after) <= now {
        return Err(invalid(
            cert_path,
            "the root certificate has expired".into(),
        ));
    }
    Ok((der, key))
}

/// Takes the data directory's lock (`.lock`), held for the server's life.
///
/// `Locked` when another process holds it (a running server: the caller
/// should talk to it instead); `Io` when the lock file cannot be opened.
pub(crate) fn lock_data_dir(data: &DataDir) -> Result<std::fs::File, StoreError> {
    let p = data.file(".lock");
    let io = |source| StoreError::Io {
        path: p.clone(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            dir: data.path().to_path_buf(),
            lock: p,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn a_locked_data_dir_is_told_apart_from_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("ca"));
        // Missing: nothing to lock and nothing to load.
        let e = lock_data_dir(&d).unwrap_err();
        assert!(
            matches!(&e, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{e:?}"
        );
        assert!(matches!(
            d.load().unwrap_err(),
            StoreError::NotInitialized(_)
        ));
        // Present and held by someone else (a second open file description
        // conflicts like a second process would).
        d.init(&InitOptions::default(), now()).unwrap();
        let held = lock_data_dir(&d).unwrap();
        let e = lock_data_dir(&d).unwrap_err();
        assert!(
            matches!(&e, StoreError::Locked { dir, .. } if dir == d.path()),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("in use by another meshca process"),
            "{e}"
        );
        drop(held);
        lock_data_dir(&d).unwrap();
    }

    #[test]
    fn init_refuses_to_overwrite_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path().join("ca"));
        let r = d.init(&InitOptions::default(), now()).unwrap();
        assert!(!r.imported && !r.issuer_clamped);
        let e = d.init(&InitOptions::default(), now()).unwrap_err();
        assert!(matches!(e, StoreError::AlreadyInitialized(..)), "{e}");
        let loaded = d.load().unwrap();
        assert_eq!(loaded.roots.len(), 1);
        assert_eq!(loaded.issuer.fingerprint, r.issuer_fingerprint);
        use std::os::unix::fs::PermissionsExt;
        let root_key = d.root_paths(&r.root_fingerprint).1;
        let jwt_key = d.jwt_key_path(&r.root_fingerprint);
        for k in [
            root_key,
            jwt_key,
            d.file("issuer.key"),
            d.file("token-signer.key"),
        ] {
            let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", k.display());
        }
    }

    #[test]
    fn issuer_is_clamped_to_a_short_lived_root() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let opts = InitOptions {
            root_lifetime: Duration::from_secs(3600),
            ..Default::default()
        };
        let r = d.init(&opts, now()).unwrap();
        assert!(r.issuer_clamped);
        assert!(r.issuer_not_after <= now() + Duration::from_secs(3600));
    }

    #[test]
    fn issuer_renewal_is_crash_safe() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let t0 = now();
        let root_id = d
            .init(&InitOptions::default(), t0)
            .unwrap()
            .root_fingerprint;
        let old = d.load().unwrap().issuer.fingerprint.clone();
        let r = d
            .renew_issuer(
                &root_id,
                Duration::from_secs(30 * 86400),
                t0 + Duration::from_secs(86400),
            )
            .unwrap();
        assert_ne!(r.fingerprint, old);
        assert!(!r.clamped_to_root);
        assert_eq!(d.load().unwrap().issuer.fingerprint, r.fingerprint);
        let root = d.read_root_cert(&root_id).unwrap();
        let issuer = d.read_certs("issuer.crt").unwrap().swap_remove(0);
        let (_, x) = X509Certificate::from_der(&issuer).unwrap();
        let (_, rx) = X509Certificate::from_der(&root).unwrap();
        x.verify_signature(Some(rx.public_key()))
            .expect("signed by the root");

        // Crash after the pending key, before the pending certificate: discarded.
        let current = d.load().unwrap().issuer.fingerprint.clone();
        std::fs::write(d.file("issuer.pending.key"), b"half").unwrap();
        assert_eq!(d.load().unwrap().issuer.fingerprint, current);
        assert!(!d.file("issuer.pending.key").exists());

        // Crash between the two renames: rolled forward on load.
        let r2 = d
            .renew_issuer(
                &root_id,
                Duration::from_secs(86400),
                t0 + Duration::from_secs(2 * 86400),
            )
            .unwrap();
        let new_crt = std::fs::read(d.file("issuer.crt")).unwrap();
        std::fs::write(d.file("issuer.pending.crt"), &new_crt).unwrap();
        std::fs::write(d.file("issuer.crt"), der_to_pem(&issuer)).unwrap(); // the old one back
        let loaded = d
            .load()
            .expect("key and certificate match after roll-forward");
        assert_eq!(loaded.issuer.fingerprint, r2.fingerprint);

        // A renewal under a root that expires sooner is clamped to it.
        let r3 = d
            .renew_issuer(
                &root_id,
                Duration::from_secs(400 * 86400),
                t0 + Duration::from_secs(3 * 86400),
            )
            .unwrap();
        assert!(r3.clamped_to_root);
    }

    #[test]
    fn import_checks_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        // A proper CA root and its key.
        let key = CaKey::generate_p256().unwrap();
        let root = profile::root("ext root", now(), Duration::from_secs(86400))
            .self_signed(&key)
            .unwrap();
        std::fs::write(p.join("root.pem"), root.pem()).unwrap();
        std::fs::write(p.join("root.key"), key.to_pem().expose()).unwrap();
        // Another key.
        let other = CaKey::generate_p256().unwrap();
        std::fs::write(p.join("other.key"), other.to_pem().expose()).unwrap();
        // A non-CA certificate.
        let leaf_key = CaKey::generate_p256().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["x.example".to_string()])
            .unwrap()
            .self_signed(&leaf_key)
            .unwrap();
        std::fs::write(p.join("leaf.pem"), leaf.pem()).unwrap();
        std::fs::write(p.join("leaf.key"), leaf_key.to_pem().expose()).unwrap();

        let try_import = |cert: &str, key: &str, sub: &str| {
            let opts = InitOptions {
                import_root: Some((p.join(cert), p.join(key))),
                ..Default::default()
            };
            DataDir::new(p.join(sub)).init(&opts, now())
        };
        let e = try_import("root.pem", "other.key", "a").unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let e = try_import("leaf.pem", "leaf.key", "b").unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
        let r = try_import("root.pem", "root.key", "c").unwrap();
        assert!(r.imported);
        assert_eq!(r.root_fingerprint, fingerprint(root.der()));
        DataDir::new(p.join("c")).load().unwrap();
    }
}
