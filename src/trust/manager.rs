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
use super::rotation::{Command, Event, Observations, RotationError, RotationState};
use crate::ca::store::{DataDir, RenewReport, StoreError};
use crate::ca::{fingerprint, signed_by, to_system_time, TrustBundle};

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
        })
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
            // Filled by the JWT-SVID key lifecycle (issue 14, part 2).
            jwt_keys: Vec::new(),
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
}
