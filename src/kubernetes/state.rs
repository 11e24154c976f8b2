//! The CA's state shared by replicas through a Kubernetes Secret.
//!
//! Owns: the mapping between the data directory and one Opaque Secret
//! (`rotation.json`, every root in the bundle as `root.<sha256>.crt|key`
//! and its JWT-SVID signing key `root.<sha256>.jwt.key`,
//! `issuer.crt`, `issuer.key`, and `revocations.json` once an operator has
//! revoked or denied anything): reading it into the data directory after
//! validating it (the journal parses, every root's fingerprint and key
//! match, the issuer's key matches and it is signed by the active root — a
//! Secret that fails is refused with a Kubernetes Event and the last good
//! state is kept), and writing the local state back with a resourceVersion
//! precondition, so a conflicting write fails (409) and the caller retries
//! from fresh state instead of overwriting. A deleted Secret is recreated
//! from the last good local state (deleting a bad edit is the way back).
//! Every call for the Secret is bounded by [`CALL_DEADLINE`], and a
//! background re-read fetches before it takes the rotation steps lock
//! ([`SharedState::pull_serialized`]), so a stalled API server never holds
//! a rotation step up for longer than one call's deadline.
//! Must not: decide rotation steps.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use x509_parser::prelude::*;

use crate::ca::jwt::JwtKey;
use crate::ca::store::DataDir;
use crate::ca::{fingerprint, pem_to_certs, CaKey};
use crate::trust::journal::Journal;
use crate::trust::rotation::RotationState;
use crate::trust::service::SharedState;
use crate::util::secret::SecretBytes;

use super::error::{kube_err, Error};

/// Secret data, private keys included: zeroized when dropped.
#[derive(Default, PartialEq, Eq)]
pub struct Snapshot(BTreeMap<String, Vec<u8>>);

impl Snapshot {
    fn new() -> Self {
        Self::default()
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

impl std::ops::Deref for Snapshot {
    type Target = BTreeMap<String, Vec<u8>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Snapshot {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The longest one call for the state Secret may take. A Secret read or
/// write answers in milliseconds; one that hangs (a dead connection, an
/// overloaded server) must not hold a rotation step, or the steps lock,
/// any longer.
pub(crate) const CALL_DEADLINE: Duration = Duration::from_secs(10);

/// `call`, abandoned after `deadline` with [`Error::Timeout`].
async fn bounded<T>(
    deadline: Duration,
    what: String,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(deadline, call).await {
        Ok(r) => r.map_err(kube_err(what)),
        Err(_) => Err(Error::Timeout {
            what,
            after: deadline,
        }),
    }
}

/// The Secret-backed state of one replica.
pub(crate) struct SecretState {
    api: Api<Secret>,
    /// The deadline of each API call ([`CALL_DEADLINE`]).
    deadline: Duration,
    client: kube::Client,
    name: String,
    namespace: String,
    replica: String,
    data: DataDir,
    /// The resourceVersion our local files correspond to.
    based_on: Mutex<Option<String>>,
    /// The last resourceVersion refused, so one bad write is reported once
    /// (one Event), not at every watch event or poll.
    refused: Mutex<Option<String>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for SecretState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretState")
            .field("secret", &self.name)
            .finish_non_exhaustive()
    }
}

fn read(data: &DataDir, name: &str) -> Result<Vec<u8>, String> {
    let p = data.file(name);
    std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The local state as Secret data.
pub fn snapshot(data: &DataDir) -> Result<Snapshot, String> {
    let mut m = Snapshot::new();
    let journal = read(data, crate::trust::journal::FILE)?;
    let state: RotationState =
        serde_json::from_slice(&journal).map_err(|e| format!("rotation.json: {e}"))?;
    m.insert("rotation.json".into(), journal);
    for r in state.in_bundle() {
        let (crt, key) = data.root_paths(&r.id);
        m.insert(
            format!("root.{}.crt", r.id),
            std::fs::read(&crt).map_err(|e| format!("{}: {e}", crt.display()))?,
        );
        m.insert(
            format!("root.{}.key", r.id),
            crate::util::secret::read_private(&key)
                .map_err(|e| format!("{}: {e}", key.display()))?
                .expose()
                .to_vec(),
        );
        // Its JWT-SVID key travels with it, so every replica signs with and
        // publishes the same one (absent for a root made by an older meshca).
        let jwt = data.jwt_key_path(&r.id);
        match crate::util::secret::read_private(&jwt) {
            Ok(k) => {
                m.insert(format!("root.{}.jwt.key", r.id), k.expose().to_vec());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", jwt.display())),
        }
    }
    // The operator's revocations travel with the CA so every replica
    // enforces them (absent until the first revocation).
    match std::fs::read(data.file(crate::revocation::FILE)) {
        Ok(b) => {
            m.insert(crate::revocation::FILE.into(), b);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", crate::revocation::FILE)),
    }
    m.insert("issuer.crt".into(), read(data, "issuer.crt")?);
    m.insert(
        "issuer.key".into(),
        data.read_key("issuer.key")
            .map_err(|e| e.to_string())?
            .expose()
            .to_vec(),
    );
    Ok(m)
}

fn key_matches(cert_der: &[u8], key_pem: &[u8]) -> Result<CaKey, String> {
    let key = CaKey::from_pem(&SecretBytes::new(key_pem.to_vec())).map_err(|e| e.to_string())?;
    let (_, c) = X509Certificate::from_der(cert_der).map_err(|e| e.to_string())?;
    if c.public_key().raw != key.spki_der().as_slice() {
        return Err("the key does not belong to the certificate".into());
    }
    Ok(key)
}

/// Checks a snapshot and writes it into the data directory (roots, then
/// the issuer, then the journal, so the journal never names files that are
/// not there yet).
pub fn apply(data: &DataDir, m: &Snapshot) -> Result<(), String> {
    let get = |k: &str| m.get(k).ok_or_else(|| format!("the Secret lacks {k}"));
    let state: RotationState =
        serde_json::from_slice(get("rotation.json")?).map_err(|e| format!("rotation.json: {e}"))?;
    let active = state
        .active()
        .ok_or("rotation.json names no active root")?
        .id
        .clone();
    let mut roots = Vec::new();
    for r in state.in_bundle() {
        let der = pem_to_certs(get(&format!("root.{}.crt", r.id))?)
            .map_err(|e| format!("root {}: {e}", r.id))?
            .swap_remove(0);
        if fingerprint(&der) != r.id {
            return Err(format!("root.{}.crt holds another certificate", r.id));
        }
        let key = key_matches(&der, get(&format!("root.{}.key", r.id))?)
            .map_err(|e| format!("root {}: {e}", r.id))?;
        // A Secret written by an older meshca has no JWT-SVID keys: the
        // local ones (if any) stay.
        let jwt = match m.get(&format!("root.{}.jwt.key", r.id)) {
            Some(pem) => Some(
                JwtKey::from_pem(&SecretBytes::new(pem.clone()))
                    .map_err(|e| format!("root {}: {e}", r.id))?,
            ),
            None => None,
        };
        roots.push((r.id.clone(), der, key, jwt));
    }
    let issuer_pem = get("issuer.crt")?;
    let issuer = pem_to_certs(issuer_pem).map_err(|e| format!("issuer.crt: {e}"))?;
    let issuer_key = get("issuer.key")?;
    key_matches(&issuer[0], issuer_key).map_err(|e| format!("issuer: {e}"))?;
    let active_der = &roots
        .iter()
        .find(|(id, ..)| *id == active)
        .ok_or("the active root is missing")?
        .1;
    if !crate::ca::signed_by(&issuer[0], active_der) {
        return Err("the issuer is not signed by the active root".into());
    }
    let revocations = m.get(crate::revocation::FILE);
    if let Some(b) = revocations {
        crate::revocation::validate(b)?;
    }
    // Valid: write.
    if let Some(b) = revocations {
        // A Secret without the list (written by an older meshca) keeps the
        // local one: a denial is never dropped by an upgrade.
        crate::util::secret::write_public(&data.file(crate::revocation::FILE), b)
            .map_err(|e| format!("{}: {e}", crate::revocation::FILE))?;
    }
    for (id, der, key, jwt) in &roots {
        if let Some(jwt) = jwt {
            data.write_jwt_key(id, jwt).map_err(|e| e.to_string())?;
        }
        data.write_root(der, key).map_err(|e| e.to_string())?;
    }
    data.install_issuer(issuer_pem, &SecretBytes::new(issuer_key.clone()))
        .map_err(|e| e.to_string())?;
    Journal::new(data.path())
        .adopt(&state)
        .map_err(|e| e.to_string())
}

impl SecretState {
    /// The Secret `name` in `namespace`, mirrored into `data`.
    pub(crate) fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        replica: &str,
        data: DataDir,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            metrics,
            api: Api::namespaced(client.clone(), namespace),
            deadline: CALL_DEADLINE,
            client,
            name: name.into(),
            namespace: namespace.into(),
            replica: replica.into(),
            data,
            based_on: Mutex::new(None),
            refused: Mutex::new(None),
        }
    }

    /// The same, with another deadline per call (tests).
    #[cfg(test)]
    fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    fn based_on(&self) -> Option<String> {
        self.based_on
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_based_on(&self, rv: Option<String>) {
        *self.based_on.lock().unwrap_or_else(|e| e.into_inner()) = rv;
    }

    /// Brings the data directory to the Secret's state. Ok(true) when files
    /// changed; Ok(false) when there is no Secret or nothing new. A Secret
    /// that fails validation is reported (Event + error) and not applied.
    pub(crate) async fn pull(&self) -> Result<bool, Error> {
        let fetched = self.fetch().await?;
        self.adopt(fetched).await
    }

    /// Reads the Secret (None: there is none), within the deadline.
    async fn fetch(&self) -> Result<Option<Secret>, Error> {
        let get = self.api.get_opt(&self.name);
        bounded(self.deadline, self.what("reading"), get).await
    }

    /// [`Self::pull`] once the Secret has been read.
    async fn adopt(&self, fetched: Option<Secret>) -> Result<bool, Error> {
        let Some(secret) = fetched else {
            if self.is_shared() {
                // It was deleted (e.g. by an operator removing a bad edit):
                // put this replica's last good state back. If another
                // replica does so first, the create fails (409) and the
                // next event brings theirs.
                self.set_based_on(None);
                *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = None;
                match self.push().await {
                    Ok(()) => {
                        tracing::warn!(secret = %self.name, "the shared CA state Secret was deleted; recreated it from this replica's last good state")
                    }
                    Err(e) if e.is_conflict() => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(false);
        };
        let rv = secret.metadata.resource_version.clone();
        if rv.is_some() && rv == self.based_on() {
            return Ok(false);
        }
        if rv.is_some() && *self.refused.lock().unwrap_or_else(|e| e.into_inner()) == rv {
            return Err(Error::invalid(
                format!("the CA state in Secret {}", self.name),
                format_args!(
                    "resourceVersion {} was refused; keeping the last good state",
                    rv.unwrap_or_default()
                ),
            ));
        }
        let secret = super::KeySecret(secret);
        let mut remote = Snapshot::new();
        for (k, v) in secret.0.data.iter().flatten() {
            remote.insert(k.clone(), v.0.clone());
        }
        drop(secret);
        let data = self.data.clone();
        let r = tokio::task::spawn_blocking(move || {
            let local = snapshot(&data).ok();
            if local.as_ref() == Some(&remote) {
                return Ok(false);
            }
            apply(&data, &remote).map(|_| true)
        })
        .await
        .map_err(|e| Error::invalid(format!("applying Secret {}", self.name), e))?;
        match r {
            Ok(changed) => {
                self.set_based_on(rv);
                Ok(changed)
            }
            Err(e) => {
                let msg = format!(
                    "refused the CA state in Secret {}: {e}; keeping the last good state",
                    self.name
                );
                tracing::error!(secret = %self.name, error = %e, "shared CA state refused");
                self.event("InvalidCAState", &msg).await;
                self.metrics.secret_refused("state");
                *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = rv;
                Err(Error::invalid(
                    format!("refused the CA state in Secret {}", self.name),
                    format_args!("{e}; keeping the last good state"),
                ))
            }
        }
    }

    /// Writes the local state to the Secret, on top of the version it was
    /// based on. A 409 (another replica wrote first: pull and retry the
    /// step) is [`Error::Conflict`].
    pub(crate) async fn push(&self) -> Result<(), Error> {
        let data = self.data.clone();
        let local = || format!("the local CA state for Secret {}", self.name);
        let snap = tokio::task::spawn_blocking(move || snapshot(&data))
            .await
            .map_err(|e| Error::invalid(local(), e))?
            .map_err(|e| Error::invalid(local(), e))?;
        let secret = super::KeySecret(Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: self.based_on(),
                labels: Some(super::managed_by()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                snap.iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                    .collect(),
            ),
            ..Default::default()
        });
        let pp = PostParams::default();
        let r = match self.based_on() {
            None => {
                let create = self.api.create(&pp, &secret.0);
                bounded(self.deadline, self.what("creating"), create).await
            }
            Some(_) => {
                let replace = self.api.replace(&self.name, &pp, &secret.0);
                bounded(self.deadline, self.what("updating"), replace).await
            }
        };
        let s = super::KeySecret(r?);
        self.set_based_on(s.0.metadata.resource_version.clone());
        Ok(())
    }

    /// `verb Secret ns/name`, for errors.
    fn what(&self, verb: &str) -> String {
        format!("{verb} Secret {}/{}", self.namespace, self.name)
    }

    async fn event(&self, reason: &str, message: &str) {
        let post = super::event::warn_secret(
            self.client.clone(),
            &self.namespace,
            &self.name,
            &self.replica,
            reason,
            message,
        );
        // Best effort, like the Event itself: the refusal is logged anyway.
        if tokio::time::timeout(self.deadline, post).await.is_err() {
            tracing::warn!(secret = %self.name, reason, "the Event could not be posted within the deadline");
        }
    }
}

#[tonic::async_trait]
impl SharedState for SecretState {
    async fn pull(&self) -> Result<bool, String> {
        SecretState::pull(self).await.map_err(|e| e.to_string())
    }

    async fn pull_serialized<'a>(
        &self,
        lock: &'a tokio::sync::Mutex<()>,
    ) -> Result<Option<tokio::sync::MutexGuard<'a, ()>>, String> {
        let base = self.based_on();
        // The network read, without the lock: a stalled server holds up
        // only this re-read, never a step.
        let fetched = self.fetch().await.map_err(|e| e.to_string())?;
        let guard = lock.lock().await;
        if self.based_on() != base {
            // A step read (and maybe wrote) the Secret meanwhile: what was
            // fetched may be older than the local state. The next event
            // or poll brings anything newer.
            return Ok(None);
        }
        let changed = self.adopt(fetched).await.map_err(|e| e.to_string())?;
        Ok(changed.then_some(guard))
    }

    async fn push(&self) -> Result<bool, String> {
        match SecretState::push(self).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl SecretState {
    /// True once this replica's files correspond to a version of the Secret.
    pub(crate) fn is_shared(&self) -> bool {
        self.based_on().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::InitOptions;

    /// A state Secret client against an API server that accepts
    /// connections and never answers (a stalled server, a dead peer), with
    /// a 300 ms deadline per call; and a data directory holding a CA.
    async fn stalled() -> (SecretState, tempfile::TempDir) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                held.push(c);
            }
        });
        let cfg = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let now = std::time::SystemTime::now();
        data.init(&InitOptions::default(), now).unwrap();
        crate::trust::manager::TrustManager::open(data.clone(), now).unwrap();
        let ss = SecretState::new(client, "meshca", "meshca-ca", "a", data, Default::default())
            .with_deadline(Duration::from_millis(300));
        (ss, dir)
    }

    #[tokio::test]
    async fn every_secret_call_is_bounded_by_its_deadline() {
        let (ss, _dir) = stalled().await;
        let limit = Duration::from_secs(5);
        let e = tokio::time::timeout(limit, ss.pull())
            .await
            .expect("the read gave up")
            .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(
                "reading Secret meshca/meshca-ca: no answer from the API server within 300ms"
            ),
            "{e}"
        );
        let e = tokio::time::timeout(limit, ss.push())
            .await
            .expect("the write gave up")
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("creating Secret meshca/meshca-ca: no answer"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_background_pull_reads_without_the_steps_lock() {
        let (ss, _dir) = stalled().await;
        let ss = std::sync::Arc::new(ss);
        let steps = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        let (s2, l2) = (ss.clone(), steps.clone());
        let pull = tokio::spawn(async move { s2.pull_serialized(&l2).await.map(|g| g.is_some()) });
        // While the read hangs, a step can take the lock.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pull.is_finished());
        assert!(
            steps.try_lock().is_ok(),
            "the re-read holds the steps lock across its read"
        );
        let r = pull.await.unwrap();
        assert!(r.unwrap_err().contains("no answer"));
    }

    #[test]
    fn revocations_travel_in_the_shared_state() {
        let now = std::time::SystemTime::now();
        let a = tempfile::tempdir().unwrap();
        let da = DataDir::new(a.path());
        da.init(&InitOptions::default(), now).unwrap();
        crate::trust::manager::TrustManager::open(da.clone(), now).unwrap();
        // No revocation yet: the Secret carries no list.
        assert!(!snapshot(&da).unwrap().contains_key(crate::revocation::FILE));
        let revs = crate::revocation::Revocations::open(a.path(), Default::default()).unwrap();
        let web = crate::revocation::parse_identity("shop/web").unwrap();
        revs.apply(
            &crate::revocation::Change::Deny {
                identity: web.clone(),
                reason: "x".into(),
            },
            "test",
            now,
        )
        .unwrap();
        let snap = snapshot(&da).unwrap();
        assert!(snap.contains_key(crate::revocation::FILE));

        // Another replica applies it and enforces the denial.
        let b = tempfile::tempdir().unwrap();
        let db = DataDir::new(b.path());
        apply(&db, &snap).unwrap();
        let theirs = crate::revocation::Revocations::open(b.path(), Default::default()).unwrap();
        assert!(theirs.denied(&web).is_some());

        // A Secret written by an older meshca (no list) keeps the local one.
        let mut old = Snapshot::new();
        for (k, v) in snap.iter().filter(|(k, _)| *k != crate::revocation::FILE) {
            old.insert(k.clone(), v.clone());
        }
        apply(&db, &old).unwrap();
        theirs.reload().unwrap();
        assert!(theirs.denied(&web).is_some());

        // A list that does not validate refuses the whole Secret.
        let mut bad = Snapshot::new();
        for (k, v) in snap.iter() {
            bad.insert(k.clone(), v.clone());
        }
        bad.insert(
            crate::revocation::FILE.into(),
            br#"{"identities":{"nope":{"time":"t"}}}"#.to_vec(),
        );
        assert!(apply(&db, &bad).unwrap_err().contains("revocations.json"));
    }

    #[test]
    fn jwt_keys_travel_in_the_shared_state_and_bad_ones_are_refused() {
        let now = std::time::SystemTime::now();
        let a = tempfile::tempdir().unwrap();
        let da = DataDir::new(a.path());
        let id = da
            .init(&InitOptions::default(), now)
            .unwrap()
            .root_fingerprint;
        crate::trust::manager::TrustManager::open(da.clone(), now).unwrap();
        let name = format!("root.{id}.jwt.key");
        let snap = snapshot(&da).unwrap();
        assert!(snap.contains_key(&name));
        // Another replica takes the same key (and so the same kid).
        let b = tempfile::tempdir().unwrap();
        let db = DataDir::new(b.path());
        apply(&db, &snap).unwrap();
        let kid = |d: &DataDir| d.read_jwt_key(&id).unwrap().key_id().to_string();
        assert_eq!(kid(&db), kid(&da));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(db.jwt_key_path(&id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A Secret without JWT keys (an older meshca) keeps the local one.
        let mut old = Snapshot::new();
        for (k, v) in snap.iter().filter(|(k, _)| **k != name) {
            old.insert(k.clone(), v.clone());
        }
        apply(&db, &old).unwrap();
        assert_eq!(kid(&db), kid(&da));
        // An unusable key refuses the whole Secret and writes nothing.
        let c = tempfile::tempdir().unwrap();
        let dc = DataDir::new(c.path());
        let mut bad = Snapshot::new();
        for (k, v) in snap.iter() {
            bad.insert(k.clone(), v.clone());
        }
        bad.insert(
            name,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec(),
        );
        let e = apply(&dc, &bad).unwrap_err();
        assert!(e.contains(&id) && e.contains("JWT-SVID key"), "{e}");
        assert!(!dc.jwt_key_path(&id).exists() && !dc.file("rotation.json").exists());
    }
}
