//! Which trust-bundle version each client has seen.
//!
//! Owns: the in-memory record of clients — bundle watchers
//! (`WatchTrustBundle`) and renewing clients (native and Istio `Certify`,
//! whose responses carry the bundle) — keyed by `SPIFFE ID + peer IP`, each
//! with the highest bundle version delivered to it and how long it matters
//! (while it watches, or until its latest certificate expires). The
//! activation gate asks it how many live clients have seen a version.
//! Sharded so the per-request update rarely shares a lock. Must not: decide
//! whether a rotation step is safe (see `rotation`).
//!
//! Only authenticated clients are recorded here (renewals, and watchers that
//! presented a client certificate or a token): an anonymous watcher must not
//! be able to hold rotation hostage, so `api::watchers` caps it instead.
//! A watcher that stops consuming updates is marked stalled: it stops
//! counting until something is delivered to it again (it caught up).
//!
//! "Seen" means the message carrying that version was handed to the client's
//! connection (a stream item yielded, a response returned). Linkerd's
//! `Certify` response carries no bundle, so Linkerd proxies are not tracked:
//! the propagation wait covers them.
//!
//! Other replicas' clients arrive as [`Row`]s (see `kubernetes::reports`):
//! a client is identified across replicas by [`client_id`], the first 8
//! bytes of the SHA-256 of its key, so a report needs ~13 bytes per client
//! instead of the key itself. A replica whose clients cannot be counted (its
//! report stale, unreadable or refused) is a [`ReplicaProblem`]: the
//! activation gate refuses while there is one.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

const SHARDS: usize = 16;

/// How long a stalled client is remembered as stalled with no stream open.
pub(crate) const STALLED_MEMORY: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Clone)]
struct Client {
    /// [`client_id`] of its key (what other replicas know it by).
    id: u64,
    version: u64,
    live_until: SystemTime,
    watching: u32,
    root: Option<String>,
    /// A watch stream of this client was closed for not consuming an update:
    /// it does not count until a delivery shows it has caught up. The mark
    /// is remembered until this time even with no stream open, so a client
    /// that reconnects and again does not read is not counted again.
    stalled: Option<SystemTime>,
}

impl Client {
    fn live(&self, now: SystemTime) -> bool {
        self.watching > 0 || self.live_until > now
    }

    /// Counts toward the activation gate.
    fn counted(&self, now: SystemTime) -> bool {
        self.live(now) && self.stalled.is_none()
    }

    /// Worth keeping in memory.
    fn kept(&self, now: SystemTime) -> bool {
        self.live(now) || self.stalled.is_some_and(|t| t > now)
    }
}

/// The tracker (one per server).
#[derive(Debug)]
pub struct Tracker {
    shards: Vec<Mutex<HashMap<String, Client>>>,
    /// What other replicas reported, by replica: their clients count too,
    /// since a client may renew through one replica and watch another.
    remote: Mutex<BTreeMap<String, RemoteClients>>,
    /// Replicas whose clients cannot be counted, and this replica's own
    /// report trouble (see [`Tracker::set_reports`]).
    reports: Mutex<ReportsHealth>,
    /// Anonymous watchers: reported, never counted by the gate.
    anonymous: AtomicUsize,
}

/// What the exchange of reports says about the other replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportsHealth {
    /// Replicas whose clients cannot be counted: the gate refuses.
    pub problems: Vec<ReplicaProblem>,
    /// Why this replica's own report could not be published (the others
    /// then see it stale or refused), if it could not.
    pub own_report: Option<String>,
}

/// Why a replica's clients cannot be counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaProblem {
    /// The replica (`*` when this replica cannot read the reports at all).
    pub replica: String,
    /// `stale`, `unreadable`, `refused` or `unread`.
    pub problem: String,
    /// A sentence for the operator.
    pub detail: String,
}

impl std::fmt::Display for ReplicaProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.replica == "*" {
            write!(f, "{}", self.detail)
        } else {
            write!(
                f,
                "replica {}: report {}: {}",
                self.replica, self.problem, self.detail
            )
        }
    }
}

/// One client in another replica's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// [`client_id`] of its key.
    pub id: u64,
    /// Highest bundle version delivered.
    pub version: u64,
    /// Unix seconds until which its latest certificate keeps it relevant.
    pub live_until: u64,
    /// Watching the bundle right now.
    pub watching: bool,
    /// The root that signed its latest certificate.
    pub root: Option<String>,
}

/// What one replica reported: its clients, and the names of a few of them
/// (those with the oldest versions, so `rotation status` can name laggards).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteClients {
    /// Every counted client, by [`client_id`].
    pub rows: Vec<Row>,
    /// Keys of some of them, by [`client_id`].
    pub names: BTreeMap<u64, String>,
}

/// The identity of a client across replicas: the first 8 bytes of the
/// SHA-256 of its key. Stable across processes and versions (unlike
/// `DefaultHasher`), and a second preimage costs 2^64 work, so a workload
/// cannot make its row stand for another's.
pub fn client_id(key: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            remote: Mutex::new(BTreeMap::new()),
            reports: Mutex::new(ReportsHealth::default()),
            anonymous: AtomicUsize::new(0),
        }
    }
}

/// One tracked client, as replicas exchange them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientView {
    /// SPIFFE ID and peer IP.
    pub key: String,
    /// Highest bundle version delivered.
    pub version: u64,
    /// Unix seconds until which its latest certificate keeps it relevant.
    pub live_until: u64,
    /// Watching the bundle right now.
    pub watching: bool,
    /// The root that signed its latest certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

impl Row {
    fn client(&self) -> Client {
        Client {
            id: self.id,
            version: self.version,
            // Read from another replica's ConfigMap: clamp, never overflow.
            live_until: crate::util::clock::from_unix_secs(self.live_until),
            watching: u32::from(self.watching),
            root: self.root.clone(),
            stalled: None,
        }
    }
}

impl From<Vec<ClientView>> for RemoteClients {
    /// A report of the first format (keys in full).
    fn from(views: Vec<ClientView>) -> Self {
        let mut out = RemoteClients::default();
        for v in views {
            let id = client_id(&v.key);
            out.rows.push(Row {
                id,
                version: v.version,
                live_until: v.live_until,
                watching: v.watching,
                root: v.root,
            });
            out.names.insert(id, v.key);
        }
        out
    }
}

/// What this replica tells the others (see [`Tracker::export_rows`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Export {
    /// Every counted client, sorted by id.
    pub rows: Vec<Row>,
    /// Up to [`SAMPLE`] clients with the oldest versions: (key, version).
    pub sample: Vec<(String, u64)>,
}

/// How many clients a report names in full.
pub const SAMPLE: usize = 10;

/// What the tracker knows at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propagation {
    /// The version asked about.
    pub version: u64,
    /// Live clients (watchers and holders of unexpired certificates).
    pub clients: usize,
    /// Of those, how many have seen `version` or later.
    pub acked: usize,
    /// Connected watchers.
    pub watchers: usize,
    /// Of those, how many have been sent `version` or later.
    pub watchers_acked: usize,
    /// Live clients by the highest version they have seen.
    pub by_version: BTreeMap<u64, usize>,
    /// Live certificates per root fingerprint (the latest certificate of
    /// each tracked client, since this server started).
    pub leaves_by_root: BTreeMap<String, usize>,
    /// Some clients that have not seen `version` (for the operator).
    pub lagging: Vec<String>,
    /// Anonymous watchers connected to this replica: not counted by the
    /// activation gate (they could hold it hostage), shown for the operator.
    #[serde(default)]
    pub anonymous_watchers: usize,
    /// Other replicas whose reports are counted (empty: this one only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_replicas: Vec<String>,
    /// Replicas whose clients cannot be counted: the activation gate
    /// refuses while there is one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_problems: Vec<ReplicaProblem>,
    /// Why this replica's own report could not be published, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_report_error: Option<String>,
}

/// A connected watcher; dropping it ends the watch.
#[derive(Debug)]
pub struct WatchHandle {
    tracker: Arc<Tracker>,
    key: String,
}

impl WatchHandle {
    /// Records that `version` was sent to this watcher (it is caught up:
    /// a stream always sends the current version).
    pub(crate) fn delivered(&self, version: u64) {
        self.tracker.with(&self.key, |c| {
            c.version = c.version.max(version);
            c.stalled = None;
        });
    }

    /// Stops counting this client: its stream did not consume an update in
    /// time and is being closed. Remembered for [`STALLED_MEMORY`] after `now`.
    pub fn stalled(&self, now: SystemTime) {
        self.tracker
            .with(&self.key, |c| c.stalled = Some(now + STALLED_MEMORY));
    }

    /// The key it is tracked under.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.tracker
            .with(&self.key, |c| c.watching = c.watching.saturating_sub(1));
    }
}

/// A connected anonymous watcher; dropping it ends the watch.
#[derive(Debug)]
pub(crate) struct AnonymousHandle(Arc<Tracker>);

impl Drop for AnonymousHandle {
    fn drop(&mut self) {
        self.0.anonymous.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tracker {
    /// Notes an anonymous watcher (reported, not counted by the gate).
    pub(crate) fn watch_anonymous(self: &Arc<Self>) -> AnonymousHandle {
        self.anonymous.fetch_add(1, Ordering::AcqRel);
        AnonymousHandle(self.clone())
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Client>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    fn with(&self, key: &str, f: impl FnOnce(&mut Client)) {
        let mut m = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let c = m.entry(key.to_string()).or_insert_with(|| Client {
            id: client_id(key),
            version: 0,
            live_until: SystemTime::UNIX_EPOCH,
            watching: 0,
            root: None,
            stalled: None,
        });
        f(c);
    }

    /// Records a certificate handed out together with bundle `version`.
    pub fn certified(&self, key: &str, version: u64, not_after: SystemTime, root: Option<&str>) {
        self.with(key, |c| {
            c.version = c.version.max(version);
            c.stalled = None;
            c.live_until = c.live_until.max(not_after);
            if root.is_some() {
                c.root = root.map(str::to_string);
            }
        });
    }

    /// Starts tracking a watcher.
    pub fn watch(self: &Arc<Self>, key: String) -> WatchHandle {
        self.with(&key, |c| c.watching += 1);
        WatchHandle {
            tracker: self.clone(),
            key,
        }
    }

    /// This replica's live clients, for other replicas.
    pub fn export(&self, now: SystemTime) -> Vec<ClientView> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let m = shard.lock().unwrap_or_else(|e| e.into_inner());
            out.extend(
                m.iter()
                    .filter(|(_, c)| c.counted(now))
                    .map(|(k, c)| ClientView {
                        key: k.clone(),
                        version: c.version,
                        live_until: crate::util::clock::unix_secs(c.live_until),
                        watching: c.watching > 0,
                        root: c.root.clone(),
                    }),
            );
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// This replica's counted clients as rows (sorted by id), with the
    /// keys of the [`SAMPLE`] oldest (lowest version, then key).
    pub fn export_rows(&self, now: SystemTime) -> Export {
        let mut out = Export::default();
        let mut oldest: Vec<(u64, String)> = Vec::new();
        for shard in &self.shards {
            let m = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, c) in m.iter().filter(|(_, c)| c.counted(now)) {
                out.rows.push(Row {
                    id: c.id,
                    version: c.version,
                    live_until: crate::util::clock::unix_secs(c.live_until),
                    watching: c.watching > 0,
                    root: c.root.clone(),
                });
                oldest.push((c.version, k.clone()));
                if oldest.len() >= 4 * SAMPLE {
                    oldest.sort();
                    oldest.truncate(SAMPLE);
                }
            }
        }
        out.rows.sort_by_key(|r| r.id);
        oldest.sort();
        oldest.truncate(SAMPLE);
        out.sample = oldest.into_iter().map(|(v, k)| (k, v)).collect();
        out
    }

    /// Replaces what `replica` reported (an empty list forgets it).
    pub fn set_remote(&self, replica: &str, clients: Vec<ClientView>) {
        self.set_remote_rows(replica, clients.into());
    }

    /// Replaces what `replica` reported, as rows (none forgets it).
    pub fn set_remote_rows(&self, replica: &str, clients: RemoteClients) {
        let mut r = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        if clients.rows.is_empty() {
            r.remove(replica);
        } else {
            r.insert(replica.to_string(), clients);
        }
    }

    /// Records what the exchange of reports found wrong (replaces the last).
    pub fn set_reports(&self, health: ReportsHealth) {
        *self.reports.lock().unwrap_or_else(|e| e.into_inner()) = health;
    }

    /// What the exchange of reports found wrong, as last recorded.
    pub fn reports(&self) -> ReportsHealth {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets every replica not in `keep`.
    pub(crate) fn retain_remote(&self, keep: &std::collections::BTreeSet<String>) {
        self.remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keep.contains(k));
    }

    /// Summarizes live clients against `version`, forgetting dead ones. A
    /// client known to several replicas counts once, with the highest
    /// version any of them delivered.
    pub fn summary(&self, now: SystemTime, version: u64) -> Propagation {
        let health = self.reports();
        let mut p = Propagation {
            version,
            anonymous_watchers: self.anonymous.load(Ordering::Acquire),
            replica_problems: health.problems,
            own_report_error: health.own_report,
            ..Default::default()
        };
        // By client id: (merged record, its key when some replica named it).
        let mut merged: HashMap<u64, (Client, Option<String>)> = HashMap::new();
        let mut merge = |c: Client, name: Option<&String>| match merged.get_mut(&c.id) {
            Some((m, n)) => {
                m.version = m.version.max(c.version);
                if c.live_until > m.live_until {
                    m.live_until = c.live_until;
                    if c.root.is_some() {
                        m.root = c.root;
                    }
                }
                m.watching += c.watching;
                if n.is_none() {
                    *n = name.cloned();
                }
            }
            None => {
                merged.insert(c.id, (c, name.cloned()));
            }
        };
        for shard in &self.shards {
            let mut m = shard.lock().unwrap_or_else(|e| e.into_inner());
            m.retain(|_, c| c.kept(now));
            for (k, c) in m.iter().filter(|(_, c)| c.counted(now)) {
                merge(c.clone(), Some(k));
            }
        }
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        p.other_replicas = remote.keys().cloned().collect();
        for r in remote.values() {
            for row in &r.rows {
                let c = row.client();
                if c.live(now) {
                    merge(c, r.names.get(&row.id));
                }
            }
        }
        drop(remote);
        let mut unnamed = 0usize;
        for (c, name) in merged.values() {
            p.clients += 1;
            *p.by_version.entry(c.version).or_insert(0) += 1;
            let acked = c.version >= version;
            if acked {
                p.acked += 1;
            } else if let Some(k) = name {
                if p.lagging.len() < 10 {
                    p.lagging.push(format!("{k} (has version {})", c.version));
                }
            } else {
                unnamed += 1;
            }
            if c.watching > 0 {
                p.watchers += 1;
                if acked {
                    p.watchers_acked += 1;
                }
            }
            if let (Some(r), true) = (&c.root, c.live_until > now) {
                *p.leaves_by_root.entry(r.clone()).or_insert(0) += 1;
            }
        }
        p.lagging.sort();
        if unnamed > 0 {
            p.lagging.push(format!(
                "{unnamed} client(s) of other replicas (unnamed: a report names only its {SAMPLE} oldest clients)"
            ));
        }
        p
    }
}

/// The key a client is tracked under.
pub(crate) fn client_key(spiffe_id: &str, peer: Option<std::net::SocketAddr>) -> String {
    match peer {
        Some(p) => format!("{spiffe_id} {}", p.ip()),
        None => spiffe_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn watchers_and_renewing_clients_are_counted_until_they_stop_mattering() {
        let t = Arc::new(Tracker::default());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        t.certified("a 10.0.0.1", 1, now + hour, Some("r1"));
        t.certified("b 10.0.0.2", 1, now + 2 * hour, Some("r1"));
        let w = t.watch("a 10.0.0.1".into());
        w.delivered(2);
        let p = t.summary(now, 2);
        assert_eq!(
            (p.clients, p.acked, p.watchers, p.watchers_acked),
            (2, 1, 1, 1)
        );
        assert_eq!(p.lagging, vec!["b 10.0.0.2 (has version 1)".to_string()]);
        assert_eq!(p.leaves_by_root.get("r1"), Some(&2));
        // b renews and gets version 2 with its new certificate.
        t.certified("b 10.0.0.2", 2, now + 3 * hour, Some("r2"));
        let p = t.summary(now, 2);
        assert_eq!((p.clients, p.acked), (2, 2));
        assert_eq!(p.by_version.get(&2), Some(&2));
        // After a's certificate expires it still counts while it watches...
        let later = now + Duration::from_secs(5400);
        assert_eq!(t.summary(later, 2).clients, 2);
        // ...and not once it has gone.
        drop(w);
        let p = t.summary(later, 2);
        assert_eq!((p.clients, p.watchers), (1, 0));
        assert_eq!(t.summary(now + 4 * hour, 2).clients, 0);
    }

    #[test]
    fn a_stalled_watcher_stops_counting_until_a_delivery_shows_it_caught_up() {
        let t = Arc::new(Tracker::default());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        // It renewed (version 1, certificate live for an hour), then watches.
        t.certified("web 10.0.0.1", 1, now + hour, Some("r1"));
        let w = t.watch("web 10.0.0.1".into());
        let anon = t.watch_anonymous();
        assert_eq!((t.summary(now, 2).clients, t.summary(now, 2).acked), (1, 0));
        w.stalled(now);
        drop(w);
        let p = t.summary(now, 2);
        assert_eq!((p.clients, p.watchers), (0, 0), "{p:?}");
        assert_eq!(p.anonymous_watchers, 1);
        assert!(t.export(now).is_empty(), "not reported to other replicas");
        // It reconnects and still does not read: not counted.
        let w = t.watch("web 10.0.0.1".into());
        assert_eq!(t.summary(now, 2).clients, 0);
        // It catches up: counted again, as acked.
        w.delivered(2);
        let p = t.summary(now, 2);
        assert_eq!((p.clients, p.acked, p.watchers), (1, 1, 1));
        drop(anon);
        assert_eq!(t.summary(now, 2).anonymous_watchers, 0);
        // A stalled mark with no stream open is forgotten after a while.
        w.stalled(now);
        drop(w);
        assert_eq!(
            t.shards
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>(),
            1
        );
        t.summary(now + 2 * hour, 2);
        assert_eq!(
            t.shards
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>(),
            0
        );
    }

    #[test]
    fn a_client_known_to_several_replicas_counts_once_with_its_newest_version() {
        let t = Tracker::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        // Here: renewed long ago (version 1).
        t.certified("web 10.0.0.1", 1, now + hour, Some("r1"));
        // Replica b: the same client renewed there with version 2, and a
        // watcher only b knows, still on version 1.
        let unix = |d: Duration| crate::util::clock::unix_secs(now + d);
        t.set_remote(
            "b",
            vec![
                ClientView {
                    key: "web 10.0.0.1".into(),
                    version: 2,
                    live_until: unix(2 * hour),
                    watching: false,
                    root: Some("r2".into()),
                },
                ClientView {
                    key: "db 10.0.0.2".into(),
                    version: 1,
                    live_until: 0,
                    watching: true,
                    root: None,
                },
            ],
        );
        let p = t.summary(now, 2);
        assert_eq!((p.clients, p.acked, p.watchers), (2, 1, 1));
        assert_eq!(p.other_replicas, vec!["b".to_string()]);
        assert_eq!(p.lagging, vec!["db 10.0.0.2 (has version 1)".to_string()]);
        assert_eq!(p.leaves_by_root.get("r2"), Some(&1));
        // b goes away: only what this replica knows is left.
        t.retain_remote(&Default::default());
        let p = t.summary(now, 2);
        assert_eq!((p.clients, p.acked), (1, 0));
        assert_eq!(t.export(now).len(), 1);
    }
}
