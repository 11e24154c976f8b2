//! The live rotation: applies steps to a running CA.
//!
//! Owns: running a step (operator or automatic) through the
//! [`TrustManager`] off the async workers, then publishing the result to the
//! running [`Authority`] (bundle to every watcher, new issuer at once), one
//! log line and one audit entry per transition, the rotation metrics, and
//! the background loops: scheduled issuer renewal at 2/3 of its lifetime,
//! housekeeping of tainted roots, the optional automatic rotation policy and
//! expiry warnings. Steps are serialized by one async lock (they are rare;
//! issuance never takes it). Must not: decide whether a step is safe (see
//! `rotation`) or write files itself (see `manager`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{watch, Notify};

use super::manager::{Reconciled, RootSource, TrustError, TrustManager};
use super::propagation::{Propagation, Tracker};
use super::rotation::{Command, Event, Observations, Phase, RotationError};
use crate::audit::{AuditLog, Entry};
use crate::ca::Authority;
use crate::metrics::Metrics;
use crate::util::clock::{rfc3339, unix_millis, unix_secs};

/// Rotation settings (from `serve`'s configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime of a new issuer (clamped to its root).
    pub issuer_lifetime: Duration,
    /// Lifetime of a generated root.
    pub root_lifetime: Duration,
    /// The least time a prepared root stays in the bundle before activation.
    pub propagation_wait: Duration,
    /// The longest leaf lifetime (bounds how long a retired root is needed).
    pub max_leaf_ttl: Duration,
    /// Warn this long before a root or issuer expires.
    pub expiry_warning: Duration,
    /// Walk prepare → activate → retire automatically at this period.
    pub auto_rotate_every: Option<Duration>,
    /// How often housekeeping and the automatic policy run.
    pub check_interval: Duration,
}

/// State shared with other replicas (Kubernetes: a Secret). Steps pull it
/// first and push after; a push that loses a race is retried from the
/// state that won.
#[tonic::async_trait]
pub trait SharedState: Send + Sync + std::fmt::Debug {
    /// Brings the data directory to the shared state; true when it changed.
    async fn pull(&self) -> Result<bool, String>;
    /// Publishes the local state; `Ok(false)` when another replica wrote
    /// first (the caller pulls and retries).
    async fn push(&self) -> Result<bool, String>;
    /// A background re-read, serialized with steps by `lock`: like
    /// [`Self::pull`], but an implementation that reads over the network
    /// does so BEFORE taking `lock` (a slow server must not hold up a
    /// step), then applies under it unless a step moved the state on
    /// meanwhile. `Some(guard)` when the data directory changed: the
    /// caller reloads under the guard.
    async fn pull_serialized<'a>(
        &self,
        lock: &'a tokio::sync::Mutex<()>,
    ) -> Result<Option<tokio::sync::MutexGuard<'a, ()>>, String> {
        let guard = lock.lock().await;
        Ok(self.pull().await?.then_some(guard))
    }
}

/// How many times a step is retried after losing a race to another replica.
const SHARED_ATTEMPTS: usize = 3;

/// A step an operator (or the automatic policy) asks for.
#[derive(Debug, Clone)]
pub enum Step {
    /// Add a new root to the bundle.
    Prepare(RootSource),
    /// Make the prepared root sign.
    Activate {
        /// Skip the propagation gate.
        force: bool,
    },
    /// Remove retired roots whose leaves have expired.
    Retire,
    /// Mark a root compromised.
    Taint(String),
}

impl Step {
    fn name(&self) -> &'static str {
        match self {
            Step::Prepare(_) => "prepare",
            Step::Activate { .. } => "activate",
            Step::Retire => "retire",
            Step::Taint(_) => "taint",
        }
    }
}

/// The running rotation service.
#[derive(Debug)]
pub struct RotationService {
    mgr: Arc<TrustManager>,
    ca: Arc<Authority>,
    tracker: Arc<Tracker>,
    audit: Option<AuditLog>,
    settings: Settings,
    steps: tokio::sync::Mutex<()>,
    issuer_changed: Notify,
    shared: std::sync::OnceLock<Arc<dyn SharedState>>,
    leader: std::sync::OnceLock<watch::Receiver<bool>>,
    /// The fingerprint of an issuer installed from outside meshca (its
    /// owner renews it; meshca only steps in late, see the renewal loop).
    external_issuer: std::sync::Mutex<Option<String>>,
    /// Told the root states after every step and the shared state's
    /// changes (renewal by certificate, the revocation list).
    observers: std::sync::Mutex<Vec<Arc<dyn StateObserver>>>,
    metrics: Arc<Metrics>,
}

/// Something that follows the CA's trust state without `trust` knowing it
/// (renewal by certificate follows the root states; the revocation list is
/// re-read when another replica shared a change).
pub trait StateObserver: Send + Sync + std::fmt::Debug {
    /// The rotation state after a step, a reload or at start.
    fn roots_changed(&self, _state: &super::rotation::RotationState) {}
    /// The shared state changed: re-read what lives in the data directory.
    /// Runs on a blocking thread.
    fn reload(&self) -> Result<(), String> {
        Ok(())
    }
}

impl RotationService {
    /// Wraps the manager and the CA it drives; publishes the current state.
    pub fn new(
        mgr: Arc<TrustManager>,
        ca: Arc<Authority>,
        tracker: Arc<Tracker>,
        audit: Option<AuditLog>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let s = Arc::new(Self {
            metrics,
            mgr,
            ca,
            tracker,
            audit,
            settings,
            steps: tokio::sync::Mutex::new(()),
            issuer_changed: Notify::new(),
            shared: std::sync::OnceLock::new(),
            leader: std::sync::OnceLock::new(),
            external_issuer: std::sync::Mutex::new(None),
            observers: std::sync::Mutex::new(Vec::new()),
        });
        s.publish_metrics();
        s
    }

    /// The clock the service decides by (the CA's).
    pub fn clock(&self) -> &Arc<dyn crate::util::clock::Clock> {
        self.ca.clock()
    }

    /// The registry this service (and what it drives) reports to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// From now on the background singleton work (issuer renewal,
    /// housekeeping, automatic rotation) runs only while this replica leads.
    /// Operator steps run on any replica.
    pub fn set_leader(&self, leader: watch::Receiver<bool>) {
        let _ = self.leader.set(leader);
    }

    /// Makes an issuer made outside meshca (checked by
    /// [`TrustManager::install_external_issuer`]) the issuer of every
    /// replica, and records it in the audit log. `source` names where it
    /// came from (e.g. `Secret meshca/meshca-issuer`).
    pub async fn install_issuer(
        &self,
        chain_pem: Vec<u8>,
        key_pem: crate::util::secret::SecretBytes,
        source: &str,
    ) -> Result<String, String> {
        let _one_at_a_time = self.steps.lock().await;
        if let Err(e) = self.pull_shared().await {
            tracing::warn!(error = %e, "shared CA state: pull before installing an issuer failed");
        }
        let old = self.ca.issuer().fingerprint.clone();
        let (mgr, now) = (self.mgr.clone(), self.ca.clock().now());
        let fp = tokio::task::spawn_blocking(move || {
            mgr.install_external_issuer(&chain_pem, &key_pem, now)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.load_issuer().await.map_err(|e| e.to_string())?;
        if !self.push_shared().await.map_err(|e| e.to_string())? {
            return Err(
                "another replica changed the CA state meanwhile; its state is loaded, try again"
                    .into(),
            );
        }
        self.mark_external_issuer(&fp);
        self.metrics.rotation_transition("issuer_installed");
        tracing::info!(old = %old, new = %fp, source, "issuer installed from outside meshca");
        self.audit_entry(
            "issuer_installed",
            source,
            format!("issuer {old} replaced by {fp} from {source}"),
            Some(fp.clone()),
        )
        .await;
        Ok(fp)
    }

    /// Tells `observer` the root states now and after every step, and has
    /// it reload whenever the shared state changes.
    pub fn observe(&self, observer: Arc<dyn StateObserver>) {
        observer.roots_changed(&self.mgr.state());
        self.observers_mut().push(observer);
    }

    fn observers_mut(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn StateObserver>>> {
        // A panic while pushing cannot leave the Vec half-written.
        self.observers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observers(&self) -> Vec<Arc<dyn StateObserver>> {
        self.observers_mut().clone()
    }

    /// Makes a change to the data directory that is not a rotation step
    /// (e.g. the revocation list) and shares it like one: under the steps
    /// lock, on top of freshly pulled shared state, retried when another
    /// replica wrote first.
    pub async fn shared_change<T, E>(
        &self,
        change: impl Fn() -> Result<T, E> + Send + Sync + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<String> + From<TrustError> + Send + 'static,
    {
        let _one_at_a_time = self.steps.lock().await;
        let change = Arc::new(change);
        for _ in 1..=SHARED_ATTEMPTS {
            self.pull_shared().await?;
            let c = change.clone();
            let out = tokio::task::spawn_blocking(move || c())
                .await
                .map_err(|e| e.to_string())??;
            if self
                .push_shared()
                .await
                .map_err(|e| format!("the change was made here but could not be shared: {e}"))?
            {
                return Ok(out);
            }
        }
        Err(E::from(format!(
            "other replicas kept changing the CA state; the change did not happen after {SHARED_ATTEMPTS} attempts"
        )))
    }

    /// Notes that the issuer `fp` is renewed by someone else.
    pub fn mark_external_issuer(&self, fp: &str) {
        *self
            .external_issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(fp.to_string());
    }

    fn is_external_issuer(&self, fp: &str) -> bool {
        self.external_issuer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(fp)
    }

    fn leads(&self) -> bool {
        self.leader.get().is_none_or(|l| *l.borrow())
    }

    /// Shares the state with other replicas from now on.
    pub fn set_shared(&self, shared: Arc<dyn SharedState>) {
        let _ = self.shared.set(shared);
    }

    /// Re-reads the state from the data directory (after the shared state
    /// changed it) and publishes it to the running CA.
    pub async fn reload(&self) -> Result<(), TrustError> {
        let mgr = self.mgr.clone();
        let lifetime = self.settings.issuer_lifetime;
        let now = self.ca.clock().now();
        let rec = tokio::task::spawn_blocking(move || {
            mgr.reload()?;
            mgr.reconcile(lifetime, now)
        })
        .await
        .map_err(|e| TrustError::Storage(e.to_string()))??;
        self.publish(&rec).await?;
        self.load_issuer().await?;
        for o in self.observers() {
            tokio::task::spawn_blocking(move || o.reload())
                .await
                .map_err(|e| TrustError::Storage(e.to_string()))?
                .map_err(TrustError::Storage)?;
        }
        tracing::info!(
            bundle_version = self.mgr.state().bundle_version,
            "CA state reloaded from the shared state"
        );
        Ok(())
    }

    /// Pulls the shared state (if any); reloads when it changed.
    pub async fn pull_shared(&self) -> Result<(), TrustError> {
        if let Some(s) = self.shared.get() {
            if s.pull().await.map_err(TrustError::Shared)? {
                self.reload().await?;
            }
        }
        Ok(())
    }

    /// Pushes after a local change. Ok(false): another replica won; its
    /// state has been pulled and loaded.
    async fn push_shared(&self) -> Result<bool, TrustError> {
        let Some(s) = self.shared.get() else {
            return Ok(true);
        };
        if s.push().await.map_err(TrustError::Shared)? {
            return Ok(true);
        }
        self.pull_shared().await?;
        Ok(false)
    }

    /// Keeps this replica in line with the shared state until `stop` flips:
    /// pulls when `wake` fires (a watch event on the shared state) and, as
    /// a safety net for a watch that silently stalls, every `every`. The
    /// read happens without the steps lock (see
    /// [`SharedState::pull_serialized`]), so a stalled API server never
    /// keeps an operator's step waiting behind this loop.
    pub fn follow_shared(
        self: &Arc<Self>,
        every: Duration,
        wake: Arc<tokio::sync::Notify>,
        mut stop: watch::Receiver<bool>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = wake.notified() => {}
                    _ = stop.changed() => return,
                }
                let Some(shared) = me.shared.get() else {
                    continue;
                };
                match shared.pull_serialized(&me.steps).await {
                    Ok(Some(_one_at_a_time)) => {
                        if let Err(e) = me.reload().await {
                            tracing::warn!(error = %e, "shared CA state: reload failed; keeping the current state");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "shared CA state: pull failed; keeping the current state")
                    }
                }
            }
        });
    }

    /// The manager.
    pub fn manager(&self) -> &Arc<TrustManager> {
        &self.mgr
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Resolves when the issuer has been replaced (the server renews its
    /// own certificate under the new one).
    pub async fn issuer_changed(&self) {
        self.issuer_changed.notified().await
    }

    /// Propagation of the version that matters now: the prepared root's, or
    /// the current bundle's when nothing is prepared.
    pub fn propagation(&self, now: SystemTime) -> Propagation {
        let s = self.mgr.state();
        let v = s
            .prepared()
            .map(|p| p.added_in_bundle)
            .unwrap_or(s.bundle_version);
        self.tracker.summary(now, v)
    }

    /// What the state machine is told about the world.
    pub fn observations(&self, now: SystemTime) -> Observations {
        let p = self.propagation(now);
        Observations {
            now,
            watchers: p.clients,
            watchers_acked: p.acked,
            acked_version: p.version,
            propagation_wait: self.settings.propagation_wait,
            max_leaf_ttl: self.settings.max_leaf_ttl,
            uncounted: p.replica_problems.iter().map(|r| r.to_string()).collect(),
        }
    }

    /// Runs one step. `actor` says who asked (for the log and audit).
    pub async fn step(&self, step: Step, actor: &str) -> Result<Vec<Event>, TrustError> {
        let _one_at_a_time = self.steps.lock().await;
        for attempt in 1..=SHARED_ATTEMPTS {
            self.pull_shared().await?;
            let (events, obs) = self.step_locally(step.clone()).await?;
            match self.push_shared().await {
                Ok(true) => {
                    self.record(&events, actor, &obs).await;
                    return Ok(events);
                }
                Ok(false) => tracing::info!(
                    attempt,
                    "rotation step lost a race with another replica; retrying on its state"
                ),
                Err(e) => {
                    return Err(TrustError::Storage(format!(
                        "the step was applied here but could not be shared: {e}"
                    )))
                }
            }
        }
        Err(TrustError::Storage(format!(
            "other replicas kept changing the CA state; the step did not happen after {SHARED_ATTEMPTS} attempts"
        )))
    }

    async fn step_locally(&self, step: Step) -> Result<(Vec<Event>, Observations), TrustError> {
        let started = Instant::now();
        let now = self.ca.clock().now();
        let obs = self.observations(now);
        let name = step.name();
        let mgr = self.mgr.clone();
        let lifetime = self.settings.issuer_lifetime;
        let obs2 = obs.clone();
        let (events, rec) = tokio::task::spawn_blocking(move || {
            let obs = obs2;
            let events = match &step {
                Step::Prepare(src) => mgr.prepare(src, &obs)?,
                Step::Activate { force } => {
                    mgr.apply(&Command::Activate { force: *force }, &obs)?
                }
                Step::Retire => mgr.apply(&Command::Retire, &obs)?,
                Step::Taint(id) => mgr.apply(&Command::Taint { id: id.clone() }, &obs)?,
            };
            let rec = mgr.reconcile(lifetime, now)?;
            Ok::<_, TrustError>((events, rec))
        })
        .await
        .map_err(|e| TrustError::Storage(format!("rotation step panicked: {e}")))??;
        self.publish(&rec).await?;
        self.metrics.rotation_step(name, started.elapsed());
        Ok((events, obs))
    }

    /// Applies the journal's state to the running CA after a step or at start.
    pub async fn publish(&self, rec: &Reconciled) -> Result<(), TrustError> {
        let bundle = self.mgr.bundle()?;
        self.ca.set_bundle(bundle);
        self.load_jwt_key();
        let state = self.mgr.state();
        for o in self.observers() {
            o.roots_changed(&state);
        }
        if let Some((report, why)) = &rec.issuer_renewed {
            self.load_issuer().await?;
            tracing::info!(issuer = %report.fingerprint, not_after = %rfc3339(report.not_after), reason = why, "rotation: new issuer under the active root");
            self.metrics.rotation_transition("issuer_renewed");
            self.audit_entry(
                "issuer_renewed",
                why,
                format!(
                    "issuer {} (not after {})",
                    report.fingerprint,
                    rfc3339(report.not_after)
                ),
                Some(report.fingerprint.clone()),
            )
            .await;
        }
        if let Some(p) = &rec.problem {
            tracing::error!(problem = %p, "rotation: the CA cannot issue");
        }
        self.publish_metrics();
        Ok(())
    }

    /// Loads the active root's JWT-SVID key into the CA. Without one (a
    /// root shared by an older replica) minting fails closed until it comes.
    pub fn load_jwt_key(&self) {
        match self.mgr.active_jwt_key() {
            Ok(k) => {
                let same = self
                    .ca
                    .jwt_key()
                    .is_some_and(|c| c.key.key_id() == k.key.key_id());
                if !same {
                    tracing::info!(kid = %k.key.key_id(), alg = k.key.key_type().alg(), root = %k.root, "JWT-SVIDs are signed with a new key");
                    self.ca.set_jwt_key(Some(k));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the active root has no usable JWT-SVID signing key; JWT-SVIDs are refused until it has one");
                self.ca.set_jwt_key(None);
            }
        }
    }

    /// Loads the issuer from disk into the CA.
    pub async fn load_issuer(&self) -> Result<(), TrustError> {
        let data = self.mgr.data().clone();
        let active = self
            .mgr
            .state()
            .active()
            .map(|r| r.id.clone())
            .ok_or(TrustError::NoActiveRoot)?;
        let loaded = tokio::task::spawn_blocking(move || data.load())
            .await
            .map_err(|e| TrustError::Storage(e.to_string()))??;
        self.metrics
            .set_issuer_expiry(unix_secs(loaded.issuer.not_after));
        self.ca.set_issuer(loaded.issuer.with_root(active));
        self.issuer_changed.notify_waiters();
        Ok(())
    }

    fn publish_metrics(&self) {
        let s = self.mgr.state();
        let roots: Vec<crate::metrics::RootGauge> = s
            .in_bundle()
            .map(|r| crate::metrics::RootGauge {
                root: r.id[..16.min(r.id.len())].to_string(),
                state: format!(
                    "{}{}",
                    phase_name(r.phase),
                    if r.tainted { "-tainted" } else { "" }
                ),
                expiry_unix: unix_secs(r.not_after),
            })
            .collect();
        let m = &self.metrics;
        m.set_roots(&roots, s.bundle_version);
        let p = self.propagation(self.ca.clock().now());
        let short: std::collections::BTreeMap<String, usize> = p
            .leaves_by_root
            .iter()
            .map(|(k, v)| (k[..16.min(k.len())].to_string(), *v))
            .collect();
        m.set_propagation(&p.by_version, p.watchers, &short);
    }

    async fn record(&self, events: &[Event], actor: &str, obs: &Observations) {
        let m = &self.metrics;
        for e in events {
            let (kind, root, detail) = match e {
                Event::Prepared(id) => (
                    "prepared",
                    id.clone(),
                    "added to the trust bundle, not signing yet".to_string(),
                ),
                Event::Activated { new, old, forced } => (
                    "activated",
                    new.clone(),
                    format!(
                        "now signing; root {old} retired{}",
                        if *forced {
                            format!(
                                " (FORCED: {}/{} clients had seen bundle version {})",
                                obs.watchers_acked, obs.watchers, obs.acked_version
                            )
                        } else {
                            String::new()
                        }
                    ),
                ),
                Event::Removed(id) => (
                    "removed",
                    id.clone(),
                    "removed from the trust bundle".to_string(),
                ),
                Event::Tainted(id) => (
                    "tainted",
                    id.clone(),
                    "marked compromised: clients chained to it must re-certify".to_string(),
                ),
            };
            m.rotation_transition(kind);
            let version = self.mgr.state().bundle_version;
            tracing::warn!(transition = kind, root = %root, actor, bundle_version = version, detail = %detail, "rotation transition");
            self.audit_entry(kind, actor, format!("root {root}: {detail}"), None)
                .await;
        }
    }

    async fn audit_entry(
        &self,
        result: &str,
        reason: &str,
        detail: String,
        issuer: Option<String>,
    ) {
        let Some(log) = &self.audit else { return };
        let t = self.ca.clock().now();
        let s = self.mgr.state();
        let entry = Entry {
            time: rfc3339(t),
            time_unix_ms: unix_millis(t),
            kind: "rotation".into(),
            result: result.into(),
            reason: reason.into(),
            detail: Some(detail),
            issuer_fingerprint: issuer,
            root_fingerprint: s.active().map(|r| r.id.clone()),
            bundle_version: Some(s.bundle_version),
            ..Default::default()
        };
        if let Err(e) = log.append(entry).await {
            tracing::error!(error = %e, "could not record a rotation transition in the audit log");
        }
    }

    /// Starts the background loops; they end when `stop` flips.
    pub fn spawn(self: &Arc<Self>, stop: watch::Receiver<bool>) {
        let me = self.clone();
        let mut s1 = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = me.issuer_renewal_loop() => {}
                _ = s1.changed() => {}
            }
        });
        let me = self.clone();
        let mut s2 = stop;
        tokio::spawn(async move {
            tokio::select! {
                _ = me.housekeeping_loop() => {}
                _ = s2.changed() => {}
            }
        });
    }

    /// Renews the issuer under the active root at 2/3 of its lifetime.
    async fn issuer_renewal_loop(&self) {
        loop {
            let iss = self.ca.issuer();
            // notBefore is backdated; the lifetime counts from creation.
            let created = iss.not_before + crate::ca::BACKDATE;
            let life = iss.not_after.duration_since(created).unwrap_or_default();
            // An issuer someone else renews (cert-manager renews at 2/3 by
            // default) is left to them; meshca steps in only at 9/10, so a
            // dead owner cannot let the CA run out of an issuer.
            let external = self.is_external_issuer(&iss.fingerprint);
            let due = if external {
                created + life * 9 / 10
            } else {
                created + life * 2 / 3
            };
            let wait = due
                .duration_since(self.ca.clock().now())
                .unwrap_or_default()
                .max(Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.issuer_changed() => continue,
            }
            if !self.leads() {
                // The leader renews; the new issuer arrives through the
                // shared state. Look again in a second.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let _one_at_a_time = self.steps.lock().await;
            // Another replica may have renewed it already.
            if let Err(e) = self.pull_shared().await {
                tracing::warn!(error = %e, "shared CA state: pull before renewal failed");
            }
            if self.ca.issuer().fingerprint != iss.fingerprint {
                continue; // a rotation step replaced it meanwhile
            }
            if external {
                tracing::warn!(issuer = %iss.fingerprint, "the issuer installed from outside meshca was not renewed by its owner by 9/10 of its lifetime: meshca renews it");
            }
            let started = Instant::now();
            let (mgr, now) = (self.mgr.clone(), self.ca.clock().now());
            let lifetime = self.settings.issuer_lifetime;
            let r = tokio::task::spawn_blocking(move || mgr.renew_issuer(lifetime, now))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match r {
                Ok(report) => {
                    if let Err(e) = self.load_issuer().await {
                        tracing::error!(error = %e, "renewed issuer does not load");
                        continue;
                    }
                    match self.push_shared().await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(
                                "another replica renewed the issuer first; using its issuer"
                            );
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the renewed issuer could not be shared with other replicas")
                        }
                    }
                    self.metrics
                        .rotation_step("issuer_renewal", started.elapsed());
                    self.metrics.rotation_transition("issuer_renewed");
                    if report.clamped_to_root {
                        tracing::warn!(issuer = %report.fingerprint, not_after = %rfc3339(report.not_after), "the new issuer's lifetime was cut to the root's expiry: rotate the root (meshca rotation prepare)");
                    }
                    tracing::info!(old = %iss.fingerprint, new = %report.fingerprint, not_after = %rfc3339(report.not_after), "issuer renewed");
                    self.audit_entry(
                        "issuer_renewed",
                        "scheduled",
                        format!(
                            "issuer {} replaced by {} (not after {})",
                            iss.fingerprint,
                            report.fingerprint,
                            rfc3339(report.not_after)
                        ),
                        Some(report.fingerprint.clone()),
                    )
                    .await;
                }
                Err(e) => {
                    drop(_one_at_a_time);
                    tracing::error!(error = %e, "issuer renewal failed; retrying in 60s");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }

    /// Tainted-root removal, the automatic policy, expiry warnings, metrics.
    async fn housekeeping_loop(&self) {
        let mut warned: HashMap<String, SystemTime> = HashMap::new();
        loop {
            tokio::time::sleep(self.settings.check_interval).await;
            self.housekeeping_once(&mut warned).await;
        }
    }

    /// One round of housekeeping (public for tests).
    pub async fn housekeeping_once(&self, warned: &mut HashMap<String, SystemTime>) {
        let now = self.ca.clock().now();
        // Tainted roots leave the bundle once nothing depends on them.
        if self.leads() {
            let _one_at_a_time = self.steps.lock().await;
            let obs = self.observations(now);
            let mgr = self.mgr.clone();
            let lifetime = self.settings.issuer_lifetime;
            let r = tokio::task::spawn_blocking(move || {
                let ev = mgr.apply(&Command::Tick, &obs)?;
                let rec = if ev.is_empty() {
                    None
                } else {
                    Some(mgr.reconcile(lifetime, now)?)
                };
                Ok::<_, TrustError>((ev, rec, obs))
            })
            .await;
            match r {
                Ok(Ok((ev, Some(rec), obs))) => {
                    if let Err(e) = self.publish(&rec).await {
                        tracing::error!(error = %e, "rotation: publishing failed");
                    }
                    match self.push_shared().await {
                        Ok(true) => self.record(&ev, "housekeeping", &obs).await,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "housekeeping change could not be shared")
                        }
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "rotation housekeeping failed"),
                Err(e) => tracing::error!(error = %e, "rotation housekeeping panicked"),
            }
        }
        if let (Some(every), true) = (self.settings.auto_rotate_every, self.leads()) {
            self.auto_rotate(every, now).await;
        }
        self.warn_expiry(now, warned);
        self.publish_metrics();
    }

    /// The automatic policy: the same steps and gates an operator uses.
    async fn auto_rotate(&self, every: Duration, now: SystemTime) {
        let s = self.mgr.state();
        let step = if s.prepared().is_some() {
            Some(Step::Activate { force: false })
        } else if s.roots.iter().any(|r| r.phase == Phase::Retired) {
            Some(Step::Retire)
        } else {
            s.active()
                .and_then(|a| a.activated_at)
                .filter(|at| *at + every <= now)
                .map(|_| Step::Prepare(RootSource::Generate(self.settings.root_lifetime)))
        };
        let Some(step) = step else { return };
        let name = step.name();
        match self.step(step, "auto-rotate").await {
            Ok(_) => {}
            // Waiting on a gate is the normal case, not an error.
            Err(TrustError::Refused(
                RotationError::NotPropagated { .. }
                | RotationError::Uncounted(_)
                | RotationError::NothingToRetire(_),
            )) => tracing::debug!(step = name, "auto-rotate: waiting for the safety gate"),
            Err(e) => tracing::error!(step = name, error = %e, "auto-rotate step failed"),
        }
    }

    fn warn_expiry(&self, now: SystemTime, warned: &mut HashMap<String, SystemTime>) {
        let mut items: Vec<(String, SystemTime)> = self
            .mgr
            .state()
            .in_bundle()
            .map(|r| (format!("root {}", &r.id[..16.min(r.id.len())]), r.not_after))
            .collect();
        let iss = self.ca.issuer();
        items.push((format!("issuer {}", &iss.fingerprint[..16]), iss.not_after));
        let mut n = 0;
        for (what, at) in items {
            if at > now + self.settings.expiry_warning {
                continue;
            }
            n += 1;
            // Loud, but at most hourly per certificate.
            if warned
                .get(&what)
                .is_some_and(|t| now < *t + Duration::from_secs(3600))
            {
                continue;
            }
            warned.insert(what.clone(), now);
            if at <= now {
                tracing::error!(certificate = %what, expired_at = %rfc3339(at), "EXPIRED: see `meshca rotation status` and docs/rotation.md");
            } else {
                tracing::warn!(certificate = %what, expires_at = %rfc3339(at), "expires soon: see `meshca rotation status`");
            }
        }
        self.metrics.set_expiry_warnings(n);
    }
}

/// The lowercase name of a phase.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Prepared => "prepared",
        Phase::Active => "active",
        Phase::Retired => "retired",
        Phase::Removed => "removed",
    }
}
