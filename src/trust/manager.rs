//! The rotation state on disk, and the files derived from it.
//!
//! Owns: applying a rotation command to the data directory — write any new
//! root (`roots/<sha256>.*`), commit the next state to the journal, then
//! bring the derived files in line with it (`bundle.pem`, and an issuer
//! signed by the active root). The journal commit *is* the step: a crash
//! before it means the step did not happen (an orphan root file in `roots/`
//! is ignored), a crash after it is finished by [`TrustManager::reconcile`]
//! on the next start, which is idempotent. Blocking I/O: async callers use
//! `spawn_blocking`. Must not: decide transitions (see `rotation`), touch the
//! running CA's memory, or log or audit (see `service`).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use super::journal::{Journal, JournalError};
use super::rotation::{Command, Event, Observations, Phase, RotationError, RotationState};
use crate::ca::jwt::{ActiveJwtKey, JwtKey, JwtKeyType};
use crate::ca::store::{DataDir, RenewReport, StoreError};
use crate::ca::{fingerprint, signed_by, to_system_time, JwtPublicKey, TrustBundle};

/// Why a rotation command (or reading the rotation state) did not happen.
///
/// `Refused`: a safety gate said no (retrying later may pass the gate);
/// `BadInput`: the operator's input is unusable; `Journal(OutOfOrder)`:
/// another writer committed first (reload and retry); the rest: the data
/// directory is damaged or unwritable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The state machine refused it (a safety gate or an illegal step).
    #[error("{0}")]
    Refused(#[from] RotationError),
    /// The operator's input is unusable (e.g. an imported root).
    #[error("{0}")]
    BadInput(String),
    /// Files could not be read or written.
    #[error("{0}")]
    Storage(String),
    /// The data directory (a root, the issuer, the bundle).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The rotation journal.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The journal names no active root: it was edited or damaged.
    #[error("the rotation state has no active root")]
    NoActiveRoot,
    /// The state shared with other replicas could not be read or written
    /// (the Kubernetes API): retry.
    #[error("{0}")]
    Shared(String),
}

/// Where a prepared root comes from.
#[derive(Debug, Clone)]
pub enum RootSource {
    /// Generate a P-256 root with this lifetime.
    Generate(Duration),
    /// Import an externally made root (certificate PEM, key PEM).
    Import(PathBuf, PathBuf),
}

/// What [`TrustManager::reconcile`] had to do.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    /// `bundle.pem` was rewritten.
    pub bundle_written: bool,
    /// A new issuer was made under the active root (and why).
    pub issuer_renewed: Option<(RenewReport, &'static str)>,
    /// What could not be repaired (e.g. the active root has expired).
    pub problem: Option<String>,
}

/// The issuer's certificate and key, and the root that signed it.
pub(crate) struct IssuerFiles {
    /// SHA-256 of the issuer certificate.
    pub fingerprint: String,
    /// Its notBefore.
    pub not_before: SystemTime,
    /// The issuer certificate (PEM).
    pub cert_pem: Vec<u8>,
    /// Its private key (PEM).
    pub key_pem: crate::util::secret::SecretBytes,
    /// The active root (PEM).
    pub root_pem: String,
}

impl std::fmt::Debug for IssuerFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerFiles")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The rotation state of one data directory.
#[derive(Debug)]
pub struct TrustManager {
    data: DataDir,
    journal: Journal,
    state: Mutex<RotationState>,
    /// The type of new JWT-SVID keys (None: the active root's key's type,
    /// else ES256).
    jwt_key_type: Option<JwtKeyType>,
}

/// Test hook: `MESHCA_FAILPOINT=before-commit:<step>` or
/// `after-commit:<step>` makes the process SIGKILL itself at that point, so
/// the crash-resume tests kill a real server exactly around the state write.
/// Compiled only with the `failpoints` feature (tests/rotation_crash.rs):
/// a default build neither reads the variable nor contains the hook.
// The process is about to SIGKILL itself, so the line must reach stderr
// synchronously (a tracing writer thread would never flush it).
#[cfg(feature = "failpoints")]
#[allow(clippy::print_stderr)]
fn failpoint(stage: &str, step: &str) {
    let Ok(v) = std::env::var("MESHCA_FAILPOINT") else {
        return;
    };
    if v == format!("{stage}:{step}") {
        eprintln!("MESHCA_FAILPOINT {v}: killing this process");
        let _ = std::process::Command::new("kill")
            .args(["-9", &std::process::id().to_string()])
            .status();
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Without the `failpoints` feature the hook is nothing at all.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
fn failpoint(_stage: &str, _step: &str) {}

fn step_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Prepare { .. } => "prepare",
        Command::Activate { .. } => "activate",
        Command::Retire => "retire",
        Command::Taint { .. } => "taint",
        Command::Tick => "tick",
    }
}

fn not_after(der: &[u8]) -> Result<SystemTime, TrustError> {
    let (_, c) = X509Certificate::from_der(der).map_err(|e| TrustError::Storage(e.to_string()))?;
    Ok(to_system_time(c.validity().not_after))
}

impl TrustManager {
    /// Opens the rotation state of `data`, creating it on first use: the
    /// root that signed the current issuer becomes the active root (a
    /// pre-rotation `root.crt`/`root.key` is moved into `roots/`).
    pub fn open(data: DataDir, now: SystemTime) -> Result<Self, TrustError> {
        let journal = Journal::new(data.path());
        let state = match journal.load()? {
            Some(s) => s,
            None => Self::adopt(&data, &journal, now)?,
        };
        // A crash during adoption may leave the legacy files behind: they
        // are copies of a root now in roots/.
        let legacy = data.file("root.crt");
        if legacy.exists() {
            let der = data.read_cert_file("root.crt")?.swap_remove(0);
            if data.root_paths(&fingerprint(&der)).1.exists() {
                let _ = std::fs::remove_file(data.file("root.key"));
                let _ = std::fs::remove_file(&legacy);
            }
        }
        Ok(Self {
            data,
            journal,
            state: Mutex::new(state),
            jwt_key_type: None,
        })
    }

    /// Makes new JWT-SVID keys of `kind` (the setting `jwt_svid_key_type`).
    pub fn with_jwt_key_type(mut self, kind: JwtKeyType) -> Self {
        self.jwt_key_type = Some(kind);
        self
    }

    /// The type of the next JWT-SVID key: the setting, else the active
    /// root's key's type (so an offline `rotation prepare` keeps it), else ES256.
    fn next_jwt_key_type(&self) -> JwtKeyType {
        if let Some(k) = self.jwt_key_type {
            return k;
        }
        self.state()
            .active()
            .and_then(|a| self.data.read_jwt_key(&a.id).ok())
            .map(|k| k.key_type())
            .unwrap_or_default()
    }

    /// Gives every published root that has none a JWT-SVID signing key (a
    /// data directory made before JWT-SVIDs existed), and moves the bundle
    /// version when it did, since the published keys changed. Run once at
    /// start, before the state is shared: a replica that adopts the shared
    /// state takes the keys in it instead. Returns the roots given a key.
    pub fn ensure_jwt_keys(&self) -> Result<Vec<String>, TrustError> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<String> = guard
            .jwt_published()
            .filter(|r| !self.data.has_jwt_key(&r.id))
            .map(|r| r.id.clone())
            .collect();
        if missing.is_empty() {
            return Ok(missing);
        }
        let kind = self.jwt_key_type.unwrap_or_default();
        for id in &missing {
            let key = JwtKey::generate(kind).map_err(|e| TrustError::Storage(e.to_string()))?;
            self.data.write_jwt_key(id, &key)?;
        }
        let next = guard.jwt_keys_added();
        self.journal.commit(&next)?;
        *guard = next;
        Ok(missing)
    }

    /// The active root's JWT-SVID signing key, ready to sign.
    pub fn active_jwt_key(&self) -> Result<ActiveJwtKey, TrustError> {
        let s = self.state();
        let active = s.active().ok_or(TrustError::NoActiveRoot)?;
        Ok(ActiveJwtKey {
            key: self.data.read_jwt_key(&active.id)?,
            root: active.id.clone(),
            not_after: active.not_after,
        })
    }

    /// The published JWT-SVID keys (see [`RotationState::jwt_published`]);
    /// a root without a key yet (shared by an older replica) publishes none.
    fn jwt_keys(&self, s: &RotationState) -> Result<Vec<JwtPublicKey>, TrustError> {
        let mut out = Vec::new();
        for r in s.jwt_published() {
            if self.data.has_jwt_key(&r.id) {
                out.push(self.data.read_jwt_key(&r.id)?.public(Some(r.not_after)));
            }
        }
        Ok(out)
    }

    fn adopt(
        data: &DataDir,
        journal: &Journal,
        now: SystemTime,
    ) -> Result<RotationState, TrustError> {
        let issuer = data.issuer_chain()?;
        let id = if data.file("root.crt").exists() {
            let der = data.read_cert_file("root.crt")?.swap_remove(0);
            let key = crate::ca::CaKey::from_pem(&data.read_key("root.key")?).map_err(|e| {
                StoreError::Invalid {
                    path: data.file("root.key"),
                    reason: e.to_string(),
                }
            })?;
            data.write_root(&der, &key)?
        } else {
            let dir = data.file("roots");
            let mut found = None;
            let io = |source| StoreError::Io {
                path: dir.clone(),
                source,
            };
            for e in std::fs::read_dir(&dir).map_err(io)? {
                let name = e.map_err(io)?.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".crt")) else {
                    continue;
                };
                let der = data.read_root_cert(id)?;
                if signed_by(&issuer[0], &der) {
                    found = Some(id.to_string());
                }
            }
            found.ok_or_else(|| {
                TrustError::Storage(format!(
                    "{}: no root in roots/ signed issuer.crt, and there is no rotation.json saying which root is active",
                    data.path().display()
                ))
            })?
        };
        let der = data.read_root_cert(&id)?;
        let state = RotationState::new(id, not_after(&der)?, now);
        journal.create(&state)?;
        Ok(state)
    }

    /// Re-reads the journal (after the shared state replaced it).
    pub(crate) fn reload(&self) -> Result<(), TrustError> {
        let s = self.journal.load()?.ok_or_else(|| {
            TrustError::Storage("rotation.json disappeared from the data directory".into())
        })?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        Ok(())
    }

    /// The data directory.
    pub fn data(&self) -> &DataDir {
        &self.data
    }

    /// The current state.
    pub fn state(&self) -> RotationState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The trust bundle the state describes.
    pub fn bundle(&self) -> Result<TrustBundle, TrustError> {
        let s = self.state();
        let mut roots = Vec::new();
        let mut tainted = Vec::new();
        for r in s.in_bundle() {
            let der = self.data.read_root_cert(&r.id)?;
            if r.tainted {
                tainted.push(der.clone());
            }
            roots.push(der);
        }
        Ok(TrustBundle {
            version: s.bundle_version,
            roots,
            tainted,
            jwt_keys: self.jwt_keys(&s)?,
        })
    }

    /// Brings `bundle.pem` and the issuer in line with the state. Safe to
    /// run any number of times; run at start and after every step.
    pub(crate) fn reconcile(
        &self,
        issuer_lifetime: Duration,
        now: SystemTime,
    ) -> Result<Reconciled, TrustError> {
        let mut out = Reconciled::default();
        let bundle = self.bundle()?;
        let current: Vec<CertificateDer<'static>> =
            self.data.read_cert_file("bundle.pem").unwrap_or_default();
        if current != bundle.roots {
            self.data.write_bundle(&bundle.roots)?;
            out.bundle_written = true;
        }
        let state = self.state();
        for r in state.roots.iter().filter(|r| r.phase == Phase::Removed) {
            self.data.remove_jwt_key(&r.id)?;
        }
        let active = state.active().ok_or(TrustError::NoActiveRoot)?;
        let root = self.data.read_root_cert(&active.id)?;
        let issuer = self.data.issuer_chain()?;
        let reason = if !signed_by(&issuer[0], &root) {
            Some("the active root changed")
        } else if not_after(&issuer[0])? <= now {
            Some("the issuer had expired")
        } else {
            None
        };
        if let Some(reason) = reason {
            if active.not_after <= now {
                out.problem = Some(format!(
                    "the active root {} expired at {}, so no issuer can be made under it: run `meshca rotation prepare` and `meshca rotation activate --force` to bring the CA back",
                    &active.id[..16],
                    crate::util::clock::rfc3339(active.not_after)
                ));
            } else {
                let r = self.data.renew_issuer(&active.id, issuer_lifetime, now)?;
                out.issuer_renewed = Some((r, reason));
            }
        }
        Ok(out)
    }

    /// The current issuer as files: for mirroring it into a
    /// `kubernetes.io/tls` Secret.
    pub(crate) fn issuer_files(&self) -> Result<IssuerFiles, TrustError> {
        let state = self.state();
        let active = state.active().ok_or(TrustError::NoActiveRoot)?;
        let cert_pem = std::fs::read(self.data.file("issuer.crt"))
            .map_err(|e| TrustError::Storage(format!("issuer.crt: {e}")))?;
        let der = crate::ca::pem_to_certs(&cert_pem)
            .map_err(TrustError::Storage)?
            .into_iter()
            .next()
            .ok_or_else(|| TrustError::Storage("issuer.crt holds no certificate".into()))?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| TrustError::Storage(e.to_string()))?;
        let root = self.data.read_root_cert(&active.id)?;
        Ok(IssuerFiles {
            fingerprint: fingerprint(&der),
            not_before: to_system_time(cert.validity().not_before),
            cert_pem,
            key_pem: self.data.read_key("issuer.key")?,
            root_pem: crate::ca::der_to_pem(&root),
        })
    }

    /// Checks an issuer made outside meshca (an operator's or cert-manager's
    /// `kubernetes.io/tls` Secret) and makes it the issuer: the first
    /// certificate of `chain_pem` must be a CA certificate allowed to sign
    /// certificates, valid now, matching `key_pem`, and signed by the active
    /// root. Returns the new issuer's fingerprint.
    pub fn install_external_issuer(
        &self,
        chain_pem: &[u8],
        key_pem: &crate::util::secret::SecretBytes,
        now: SystemTime,
    ) -> Result<String, TrustError> {
        self.check_external_issuer(chain_pem, key_pem, now)
            .map_err(TrustError::BadInput)?;
        let der = crate::ca::pem_to_certs(chain_pem)
            .map_err(TrustError::BadInput)?
            .swap_remove(0);
        self.data.install_issuer(
            crate::ca::der_to_pem(&der).as_bytes(),
            &crate::util::secret::SecretBytes::new(key_pem.expose().to_vec()),
        )?;
        Ok(fingerprint(&der))
    }

    /// Why a foreign issuer may not be installed (Ok: it may).
    fn check_external_issuer(
        &self,
        chain_pem: &[u8],
        key_pem: &crate::util::secret::SecretBytes,
        now: SystemTime,
    ) -> Result<(), String> {
        let state = self.state();
        let active = state
            .active()
            .ok_or("the rotation state has no active root")?;
        let der = crate::ca::pem_to_certs(chain_pem)?
            .into_iter()
            .next()
            .ok_or("no certificate in tls.crt")?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("tls.crt: {e}"))?;
        if !cert.is_ca() {
            return Err("tls.crt is not a CA certificate (basicConstraints cA is not set)".into());
        }
        if let Ok(Some(ku)) = cert.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err("tls.crt's key usage does not allow signing certificates".into());
            }
        }
        let nb = to_system_time(cert.validity().not_before);
        let na = to_system_time(cert.validity().not_after);
        if now < nb || now >= na {
            return Err(format!(
                "tls.crt is not valid now (valid {} to {})",
                crate::util::clock::rfc3339(nb),
                crate::util::clock::rfc3339(na)
            ));
        }
        let key = crate::ca::CaKey::from_pem(key_pem).map_err(|e| format!("tls.key: {e}"))?;
        if cert.public_key().raw != key.spki_der().as_slice() {
            return Err("tls.key does not belong to tls.crt".into());
        }
        let root = self
            .data
            .read_root_cert(&active.id)
            .map_err(|e| e.to_string())?;
        if !signed_by(&der, &root) {
            return Err(format!(
                "tls.crt is not signed by the active root {}",
                &active.id[..16]
            ));
        }
        Ok(())
    }

    /// Makes a new issuer under the active root (scheduled renewal).
    pub fn renew_issuer(
        &self,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<RenewReport, TrustError> {
        let state = self.state();
        let active = state.active().ok_or(TrustError::NoActiveRoot)?;
        Ok(self.data.renew_issuer(&active.id, lifetime, now)?)
    }

    /// Adds a new root to the bundle (generated or imported), not signing yet.
    pub fn prepare(
        &self,
        source: &RootSource,
        obs: &Observations,
    ) -> Result<Vec<Event>, TrustError> {
        // Refuse before making a key nobody will use.
        if let Some(p) = self.state().prepared() {
            return Err(RotationError::AlreadyPrepared(p.id.clone()).into());
        }
        let (der, key) = match source {
            RootSource::Generate(lifetime) => crate::ca::store::new_root(obs.now, *lifetime)
                .map_err(|e| TrustError::Storage(e.to_string()))?,
            RootSource::Import(cert, key) => crate::ca::store::import_root(cert, key, obs.now)
                .map_err(|e| TrustError::BadInput(e.to_string()))?,
        };
        let id = fingerprint(&der);
        if self.state().roots.iter().any(|r| r.id == id) {
            return Err(TrustError::BadInput(format!(
                "root {} is already known to this CA",
                &id[..16]
            )));
        }
        let na = not_after(&der).map_err(|e| TrustError::BadInput(e.to_string()))?;
        if na <= obs.now + obs.propagation_wait + obs.max_leaf_ttl {
            return Err(TrustError::BadInput(format!(
                "the new root expires at {}, before it could be activated and sign a full-lifetime leaf; use a longer-lived root",
                crate::util::clock::rfc3339(na)
            )));
        }
        // The root's JWT-SVID key is born with it, so it is published from
        // the same bundle version on, long before it signs.
        let jwt = JwtKey::generate(self.next_jwt_key_type())
            .map_err(|e| TrustError::Storage(e.to_string()))?;
        self.data.write_jwt_key(&id, &jwt)?;
        self.data.write_root(&der, &key)?;
        self.apply(&Command::Prepare { id, not_after: na }, obs)
    }

    /// Applies one command: compute, commit to the journal, then update the
    /// derived files. A refused command changes nothing.
    pub fn apply(&self, cmd: &Command, obs: &Observations) -> Result<Vec<Event>, TrustError> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (next, events) = guard.apply(cmd, obs)?;
        if next == *guard {
            return Ok(events);
        }
        let step = step_name(cmd);
        failpoint("before-commit", step);
        self.journal.commit(&next)?;
        failpoint("after-commit", step);
        *guard = next;
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::InitOptions;

    fn obs(now: SystemTime) -> Observations {
        Observations::no_clients(now, Duration::from_secs(3600), Duration::from_secs(3600))
    }

    #[test]
    fn a_full_rotation_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let t0 = SystemTime::now();
        let init = d.init(&InitOptions::default(), t0).unwrap();
        let m = TrustManager::open(d.clone(), t0).unwrap();
        assert_eq!(m.state().active().unwrap().id, init.root_fingerprint);
        let r = m.reconcile(Duration::from_secs(86400), t0).unwrap();
        assert!(!r.bundle_written && r.issuer_renewed.is_none());

        let year = Duration::from_secs(365 * 86400);
        m.prepare(&RootSource::Generate(year), &obs(t0)).unwrap();
        m.reconcile(Duration::from_secs(86400), t0).unwrap();
        assert_eq!(d.read_cert_file("bundle.pem").unwrap().len(), 2);
        let new_id = m.state().prepared().unwrap().id.clone();

        let t1 = t0 + Duration::from_secs(7200);
        m.apply(&Command::Activate { force: false }, &obs(t1))
            .unwrap();
        let r = m.reconcile(Duration::from_secs(86400), t1).unwrap();
        assert_eq!(
            r.issuer_renewed.as_ref().unwrap().1,
            "the active root changed"
        );
        let issuer = d.issuer_chain().unwrap();
        assert!(signed_by(&issuer[0], &d.read_root_cert(&new_id).unwrap()));

        // A restart reads the same state back and has nothing to repair.
        let m2 = TrustManager::open(d.clone(), t1).unwrap();
        assert_eq!(m2.state(), m.state());
        let r = m2.reconcile(Duration::from_secs(86400), t1).unwrap();
        assert!(!r.bundle_written && r.issuer_renewed.is_none());

        let t2 = t1 + Duration::from_secs(3601);
        m2.apply(&Command::Retire, &obs(t2)).unwrap();
        m2.reconcile(Duration::from_secs(86400), t2).unwrap();
        let b = d.read_cert_file("bundle.pem").unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(fingerprint(&b[0]), new_id);
    }

    #[test]
    fn legacy_layout_is_adopted_and_expired_roots_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let t0 = SystemTime::now();
        let init = d
            .init(
                &InitOptions {
                    root_lifetime: Duration::from_secs(7200),
                    ..Default::default()
                },
                t0,
            )
            .unwrap();
        // Recreate the pre-rotation layout: root.crt/root.key, no roots/.
        let (crt, key) = d.root_paths(&init.root_fingerprint);
        std::fs::rename(&crt, d.file("root.crt")).unwrap();
        std::fs::rename(&key, d.file("root.key")).unwrap();
        // (That layout predates JWT-SVID keys too.)
        std::fs::remove_file(d.jwt_key_path(&init.root_fingerprint)).unwrap();
        std::fs::remove_dir(d.file("roots")).unwrap();
        let m = TrustManager::open(d.clone(), t0).unwrap();
        assert_eq!(m.state().active().unwrap().id, init.root_fingerprint);
        assert!(!d.file("root.crt").exists() && !d.file("root.key").exists());
        assert!(d.root_paths(&init.root_fingerprint).1.exists());

        // Three hours on, root and issuer have expired: reported, not repaired.
        let later = t0 + Duration::from_secs(3 * 3600);
        let r = m.reconcile(Duration::from_secs(86400), later).unwrap();
        assert!(r.problem.unwrap().contains("activate --force"));
        // Recovery: a new root, forced active; the issuer follows it.
        let mut o = obs(later);
        o.propagation_wait = Duration::ZERO;
        m.prepare(&RootSource::Generate(Duration::from_secs(86400 * 30)), &o)
            .unwrap();
        m.apply(&Command::Activate { force: true }, &o).unwrap();
        let r = m.reconcile(Duration::from_secs(86400), later).unwrap();
        assert!(r.problem.is_none() && r.issuer_renewed.is_some());
        assert!(d.load().unwrap().issuer.not_after > later);
    }

    fn kids(m: &TrustManager) -> Vec<String> {
        m.bundle()
            .unwrap()
            .jwt_keys
            .into_iter()
            .map(|k| k.key_id)
            .collect()
    }

    #[test]
    fn jwt_keys_rotate_with_their_roots() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let t0 = SystemTime::now();
        let init = d.init(&InitOptions::default(), t0).unwrap();
        let m = TrustManager::open(d.clone(), t0).unwrap();
        assert_eq!(kids(&m).len(), 1, "init makes the root's key");
        assert!(m.ensure_jwt_keys().unwrap().is_empty());
        // A data directory from before JWT-SVIDs: keys are made once, and
        // the bundle version moves because the published keys changed.
        std::fs::remove_file(d.jwt_key_path(&init.root_fingerprint)).unwrap();
        assert!(kids(&m).is_empty());
        let v0 = m.state().bundle_version;
        let made = m.ensure_jwt_keys().unwrap();
        assert_eq!(made.len(), 1);
        assert_eq!(m.state().bundle_version, v0 + 1);
        assert!(m.ensure_jwt_keys().unwrap().is_empty(), "only once");
        assert_eq!(m.state().bundle_version, v0 + 1);
        let old_id = m.state().active().unwrap().id.clone();
        let mode = |p: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&d.jwt_key_path(&old_id)), 0o600);
        let old_kid = m.active_jwt_key().unwrap().key.key_id().to_string();
        assert_eq!(kids(&m), vec![old_kid.clone()]);
        // A restart keeps the same key.
        let m = TrustManager::open(d.clone(), t0).unwrap();
        assert_eq!(m.active_jwt_key().unwrap().key.key_id(), old_kid);

        // Prepare: the new key is published (new version) but does not sign.
        let v1 = m.state().bundle_version;
        let year = Duration::from_secs(365 * 86400);
        m.prepare(&RootSource::Generate(year), &obs(t0)).unwrap();
        let b = m.bundle().unwrap();
        assert!(b.version > v1);
        assert_eq!(b.jwt_keys.len(), 2);
        assert_eq!(m.active_jwt_key().unwrap().key.key_id(), old_kid);
        let new_id = m.state().prepared().unwrap().id.clone();
        let new_kid = d.read_jwt_key(&new_id).unwrap().key_id().to_string();
        assert_ne!(new_kid, old_kid);
        assert_eq!(
            b.jwt_keys
                .iter()
                .find(|k| k.key_id == new_kid)
                .unwrap()
                .expires_at,
            Some(m.state().prepared().unwrap().not_after)
        );

        // Activate: the new key signs; the old one is still published.
        let t1 = t0 + Duration::from_secs(7200);
        m.apply(&Command::Activate { force: false }, &obs(t1))
            .unwrap();
        m.reconcile(Duration::from_secs(86400), t1).unwrap();
        assert_eq!(m.active_jwt_key().unwrap().key.key_id(), new_kid);
        assert_eq!(kids(&m).len(), 2);

        // Retire: the old key leaves the bundle and the disk.
        let v2 = m.state().bundle_version;
        let t2 = t1 + Duration::from_secs(3601);
        m.apply(&Command::Retire, &obs(t2)).unwrap();
        m.reconcile(Duration::from_secs(86400), t2).unwrap();
        assert!(m.state().bundle_version > v2);
        assert_eq!(kids(&m), vec![new_kid]);
        assert!(!d.jwt_key_path(&old_id).exists());
    }

    #[test]
    fn a_tainted_key_is_withdrawn_once_it_stops_signing() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        let t0 = SystemTime::now();
        d.init(&InitOptions::default(), t0).unwrap();
        let m = TrustManager::open(d.clone(), t0).unwrap();
        m.ensure_jwt_keys().unwrap();
        let year = Duration::from_secs(365 * 86400);
        m.prepare(&RootSource::Generate(year), &obs(t0)).unwrap();
        let old = m.state().active().unwrap().id.clone();
        let old_kid = d.read_jwt_key(&old).unwrap().key_id().to_string();

        // Tainting the signing root's key keeps it (nothing else signs yet).
        m.apply(&Command::Taint { id: old.clone() }, &obs(t0))
            .unwrap();
        assert!(kids(&m).contains(&old_kid));
        assert_eq!(m.active_jwt_key().unwrap().key.key_id(), old_kid);

        // Once the next root signs, the tainted key is withdrawn at once
        // (not kept until retirement), and the version says so.
        let v = m.state().bundle_version;
        let t1 = t0 + Duration::from_secs(7200);
        m.apply(&Command::Activate { force: false }, &obs(t1))
            .unwrap();
        assert_eq!(m.state().bundle_version, v + 1);
        assert!(!kids(&m).contains(&old_kid));
        assert_eq!(kids(&m).len(), 1);

        // A tainted prepared root's key is never published.
        m.prepare(&RootSource::Generate(year), &obs(t1)).unwrap();
        let p = m.state().prepared().unwrap().id.clone();
        assert_eq!(kids(&m).len(), 2);
        m.apply(&Command::Taint { id: p }, &obs(t1)).unwrap();
        assert_eq!(kids(&m).len(), 1);
    }
}
