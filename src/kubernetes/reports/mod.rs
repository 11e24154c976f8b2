//! Bundle-propagation reports exchanged between replicas.
//!
//! Owns: publishing this replica's tracked clients (who was sent which
//! bundle version, see `trust::propagation`) as a ConfigMap of its own,
//! `meshca-propagation-<replica>` in the CA's namespace (label
//! `meshca.io/propagation-report`; wire format in `format`), and loading
//! the other replicas' reports into the tracker, so the activation gate and
//! `rotation status` on any replica count every client of the CA, not only
//! its own. Must not: decide whether a step is safe (the gate does, from
//! what this records in the tracker).
//!
//! The rules (docs/kubernetes.md, "Propagation reports"):
//! - A report is rewritten only when it changed in a way the gate cares
//!   about, at most once per `interval`, plus a heartbeat every
//!   `heartbeat` (12 intervals) so readers can tell it is alive.
//! - Freshness is the reader's observation (`freshness`): a report not
//!   seen changing for `stale_after` (3 heartbeats) is stale.
//! - A replica is live while its report exists. A replica that stops
//!   deletes its report (bounded in time): it is gone, its clients
//!   reconnect elsewhere. A report that is stale, unreadable, or says its
//!   replica could not publish its clients makes the gate refuse (fail
//!   closed), naming the replica, until it is fresh again, is deleted (by
//!   an operator, or by the leader once unchanged for `abandon_after`, an
//!   hour), or the operator forces the activation.
//! - Until this replica has read the reports once, and whenever it could
//!   not read them for `stale_after`, the gate refuses too.

mod format;
mod freshness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::trust::propagation::{Export, RemoteClients, ReplicaProblem, ReportsHealth, Tracker};
use crate::util::clock::{unix_secs, Clock};

use super::error::{kube_err, Error};
use format::{Decoded, Encoded};
pub use format::{Header, Report, BUDGET, FORMAT, KEY, OBJECT_LIMIT, ROWS_KEY};
use freshness::Observed;

/// The label that marks a report.
pub(crate) const LABEL: &str = "meshca.io/propagation-report";
/// An unchanged report is rewritten every this many intervals.
pub const HEARTBEAT_INTERVALS: u32 = 12;
/// A report not seen changing for this many heartbeats is stale.
pub const STALE_HEARTBEATS: u32 = 3;
/// The leader deletes reports not seen changing for this long.
pub const ABANDONED: Duration = Duration::from_secs(3600);
/// How long a stopping replica tries to delete its report.
pub const STOP_DEADLINE: Duration = Duration::from_secs(2);

/// Where, how often, and by which clock.
#[derive(Clone)]
pub struct Settings {
    /// The CA's namespace.
    pub namespace: String,
    /// This replica.
    pub replica: String,
    /// How often this replica checks whether its report changed, and reads
    /// the others' (a watch also wakes it when one changes).
    pub interval: Duration,
    /// How often an unchanged report is rewritten, so readers see it alive.
    pub heartbeat: Duration,
    /// A report not seen changing for this long is stale.
    pub stale_after: Duration,
    /// The leader deletes a report not seen changing for this long.
    pub abandon_after: Duration,
    /// This replica's clock: freshness is judged by it.
    pub clock: Arc<dyn Clock>,
    /// How the reports watch is paced.
    pub watch: super::watch::Pacing,
}

impl Settings {
    /// The documented timing for `interval`: heartbeat 12 intervals,
    /// stale after 3 heartbeats, abandoned after an hour (or 3 heartbeats
    /// when longer); the default watch pacing.
    pub fn new(namespace: &str, replica: &str, interval: Duration, clock: Arc<dyn Clock>) -> Self {
        let heartbeat = interval * HEARTBEAT_INTERVALS;
        let stale_after = heartbeat * STALE_HEARTBEATS;
        Self {
            namespace: namespace.to_string(),
            replica: replica.to_string(),
            interval,
            heartbeat,
            stale_after,
            abandon_after: ABANDONED.max(stale_after),
            clock,
            watch: super::watch::Pacing::default(),
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("namespace", &self.namespace)
            .field("replica", &self.replica)
            .field("interval", &self.interval)
            .field("heartbeat", &self.heartbeat)
            .field("stale_after", &self.stale_after)
            .field("abandon_after", &self.abandon_after)
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

/// The ConfigMap name for a replica: DNS-1123, at most 253 characters.
pub(crate) fn configmap_name(replica: &str) -> String {
    let mut n: String = replica
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    n = n.trim_matches(|c| c == '-' || c == '.').to_string();
    let mut name = format!("meshca-propagation-{n}");
    name.truncate(253);
    name.trim_end_matches(['-', '.']).to_string()
}

fn report_cm(s: &Settings, enc: Encoded) -> ConfigMap {
    let (data, binary_data) = enc.into_data();
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(configmap_name(&s.replica)),
            namespace: Some(s.namespace.clone()),
            labels: Some({
                let mut l = super::managed_by();
                l.insert(LABEL.to_string(), "true".to_string());
                l
            }),
            ..Default::default()
        },
        data: Some(data),
        binary_data,
        ..Default::default()
    }
}

/// Writes this replica's report: replaces it (only this replica writes
/// it, so no precondition), or creates it. Returns its new resourceVersion.
async fn write(api: &Api<ConfigMap>, s: &Settings, enc: Encoded) -> Result<Option<String>, Error> {
    let name = configmap_name(&s.replica);
    let what = |verb: &str| format!("{verb} ConfigMap {}/{name}", s.namespace);
    let cm = report_cm(s, enc);
    let res = match api.replace(&name, &PostParams::default(), &cm).await {
        Err(kube::Error::Api(st)) if st.code == 404 => api
            .create(&PostParams::default(), &cm)
            .await
            .map_err(kube_err(what("creating"))),
        r => r.map_err(kube_err(what("replacing"))),
    };
    match res {
        Ok(cm) => Ok(cm.metadata.resource_version),
        // A create racing a leftover of a previous pod of the same name:
        // the next round replaces it.
        Err(e) if e.is_conflict() => Ok(None),
        Err(e) => Err(e),
    }
}

/// What this replica last wrote.
struct Written {
    export: Export,
    at: Instant,
    rv: Option<String>,
}

/// This replica's side: decides when to write, and writes.
#[derive(Default)]
struct Publisher {
    seq: u64,
    last: Option<Written>,
    /// No write before this (one write per interval at most).
    next: Option<Instant>,
}

/// Whether `new` differs from what was written in a way a reader's gate
/// would notice before the next heartbeat: a client added, gone, on another
/// version, root or watch state; or one whose written `live_until` comes
/// within two heartbeats of `now` while it really lives longer (a reader
/// would drop a live client).
fn changed(old: &Export, new: &Export, now: u64, heartbeat: Duration) -> bool {
    if old.rows.len() != new.rows.len() || old.sample != new.sample {
        return true;
    }
    let horizon = now.saturating_add(2 * heartbeat.as_secs().max(1));
    old.rows.iter().zip(&new.rows).any(|(a, b)| {
        (a.id, a.version, a.watching, &a.root) != (b.id, b.version, b.watching, &b.root)
            || (b.live_until > a.live_until && a.live_until <= horizon)
    })
}

impl Publisher {
    fn due(&self, e: &Export, s: &Settings, now: SystemTime) -> bool {
        let mono = Instant::now();
        if self.next.is_some_and(|n| mono < n) {
            return false;
        }
        match &self.last {
            None => true,
            Some(w) => {
                mono.duration_since(w.at) >= s.heartbeat
                    || changed(&w.export, e, unix_secs(now), s.heartbeat)
            }
        }
    }

    /// Writes the report if due; a report too big for the object limit, or
    /// refused by the API server, becomes a refusal the others see.
    async fn publish(&mut self, api: &Api<ConfigMap>, s: &Settings, tracker: &Tracker) {
        if self.next.is_some_and(|n| Instant::now() < n) {
            return; // one write per interval at most: not even a look
        }
        let now = s.clock.now();
        let export = tracker.export_rows(now);
        if !self.due(&export, s, now) {
            return;
        }
        self.seq += 1;
        self.next = Some(Instant::now() + s.interval);
        let (updated, seq) = (unix_secs(now), self.seq);
        let enc = format::encode(&s.replica, &export, updated, seq)
            .and_then(|enc| match enc.size() <= BUDGET {
                true => Ok(enc),
                false => format::refusal(&s.replica, &too_many(&export, enc.size()), updated, seq),
            })
            .map_err(|e| Error::invalid("this replica's propagation report", e));
        let res = match enc {
            Ok(enc) => write_or_refuse(api, s, enc, updated, seq).await,
            Err(e) => Err(e),
        };
        let own = match res {
            Ok((rv, refused)) => {
                self.last = Some(Written {
                    export,
                    at: Instant::now(),
                    rv,
                });
                refused
            }
            Err(e) => {
                self.last = None;
                Some(e.to_string())
            }
        };
        if let Some(e) = &own {
            tracing::warn!(error = %e, "could not publish this replica's propagation report: the other replicas refuse to activate a root until it is");
        }
        let mut health = tracker.reports();
        health.own_report = own;
        tracker.set_reports(health);
    }
}

/// Writes `enc`; when the API server refuses it (422 or 413: too large, or
/// invalid), writes a refusal saying so instead. Returns the new
/// resourceVersion and, when a refusal was written, why.
async fn write_or_refuse(
    api: &Api<ConfigMap>,
    s: &Settings,
    enc: Encoded,
    updated: u64,
    seq: u64,
) -> Result<(Option<String>, Option<String>), Error> {
    let refused = enc.refused();
    match write(api, s, enc).await {
        Ok(rv) => Ok((rv, refused)),
        Err(Error::Api {
            code: 413 | 422,
            message,
            ..
        }) => {
            let why = format!("the API server refused this replica's report: {message}");
            let marker = format::refusal(&s.replica, &why, updated, seq)
                .map_err(|e| Error::invalid("this replica's propagation report", e))?;
            Ok((write(api, s, marker).await?, Some(why)))
        }
        Err(e) => Err(e),
    }
}

fn too_many(e: &Export, size: usize) -> String {
    format!(
        "its {} clients need a report of {size} bytes, more than one ConfigMap holds ({BUDGET} bytes)",
        e.rows.len()
    )
}

/// This replica's view of the others' reports.
struct Reader {
    observed: Observed,
    /// When a list last succeeded (local clock).
    listed: Option<Instant>,
    /// The last list failure.
    error: Option<String>,
    /// The problems last logged (each is logged once, when it appears).
    logged: BTreeSet<String>,
}

/// What one list found.
struct Loaded {
    remote: BTreeMap<String, RemoteClients>,
    problems: Vec<ReplicaProblem>,
    own_present: bool,
    abandoned: Vec<(String, Option<String>)>,
}

impl Reader {
    /// Lists the reports and records them (and what is wrong with them) in
    /// the tracker; deletes abandoned ones when `leading`.
    async fn load(
        &mut self,
        api: &Api<ConfigMap>,
        s: &Settings,
        tracker: &Tracker,
        leading: bool,
    ) -> bool {
        let lp = ListParams::default().labels(&format!("{LABEL}=true"));
        let listed = api.list(&lp).await.map_err(kube_err(format!(
            "listing the propagation reports in namespace {}",
            s.namespace
        )));
        let mut health = tracker.reports();
        let own_present = match listed {
            Ok(list) => {
                self.listed = Some(Instant::now());
                self.error = None;
                let l = self.read(list.items, s);
                for (name, rv) in l.abandoned.iter().filter(|_| leading) {
                    delete(api, name, rv.clone()).await;
                    tracing::info!(configmap = %name, "deleted a propagation report abandoned by a replica that is gone");
                }
                for (replica, clients) in &l.remote {
                    tracker.set_remote_rows(replica, clients.clone());
                }
                tracker.retain_remote(&l.remote.keys().cloned().collect());
                health.problems = l.problems;
                l.own_present
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the other replicas' propagation reports");
                self.error = Some(e.to_string());
                health.problems.retain(|p| p.replica != "*");
                true
            }
        };
        if let Some(p) = self.unread(s) {
            health.problems.insert(0, p);
        }
        self.log_changes(&health.problems);
        tracker.set_reports(health);
        own_present
    }

    /// Logs each problem once when it appears, and when all are gone.
    fn log_changes(&mut self, problems: &[ReplicaProblem]) {
        let now: BTreeSet<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.replica, p.problem))
            .collect();
        for p in problems {
            if !self
                .logged
                .contains(&format!("{}: {}", p.replica, p.problem))
            {
                tracing::warn!(replica = %p.replica, problem = %p.problem, detail = %p.detail, "a replica's clients cannot be counted: root activation is refused until they can");
            }
        }
        if now.is_empty() && !self.logged.is_empty() {
            tracing::info!("every replica's propagation report is counted again");
        }
        self.logged = now;
    }

    /// The problem of not having read the reports lately, if so.
    fn unread(&self, s: &Settings) -> Option<ReplicaProblem> {
        let fresh = self.listed.is_some_and(|t| t.elapsed() <= s.stale_after);
        (!fresh).then(|| ReplicaProblem {
            replica: "*".into(),
            problem: "unread".into(),
            detail: match (&self.listed, &self.error) {
                (None, None) => "this replica has not read the other replicas' propagation reports yet".into(),
                (_, e) => format!(
                    "this replica could not read the other replicas' propagation reports for {}s: {}",
                    s.stale_after.as_secs(),
                    e.as_deref().unwrap_or("no answer")
                ),
            },
        })
    }

    /// Sorts the listed reports into counted, problems and abandoned.
    fn read(&mut self, items: Vec<ConfigMap>, s: &Settings) -> Loaded {
        let now = s.clock.now();
        let own = configmap_name(&s.replica);
        let mut l = Loaded {
            remote: BTreeMap::new(),
            problems: Vec::new(),
            own_present: false,
            abandoned: Vec::new(),
        };
        let mut present = BTreeSet::new();
        for cm in items {
            let name = cm.metadata.name.clone().unwrap_or_default();
            if name == own {
                l.own_present = true;
                continue;
            }
            let rv = cm.metadata.resource_version.clone().unwrap_or_default();
            present.insert(name.clone());
            let age = self.observed.observe(&name, &rv, now);
            let decoded = format::decode(cm.data.as_ref(), cm.binary_data.as_ref());
            let replica = match &decoded {
                Ok(Decoded::Clients(r, _) | Decoded::Refused(r, _)) => r.clone(),
                Err(_) => name.trim_start_matches("meshca-propagation-").to_string(),
            };
            let problem = |problem: &str, detail: String| ReplicaProblem {
                replica: replica.clone(),
                problem: problem.into(),
                detail: format!("{detail} (ConfigMap {}/{name})", s.namespace),
            };
            if age > s.abandon_after {
                l.abandoned.push((name.clone(), Some(rv)));
            }
            if age > s.stale_after {
                l.problems.push(problem("stale", format!(
                    "not seen changing for {}s (a live replica rewrites it every {}s); the replica may have died without removing it",
                    age.as_secs(),
                    s.heartbeat.as_secs()
                )));
                continue;
            }
            // A report speaks only for the replica its object is named
            // after: a ConfigMap naming another replica (forged, or copied)
            // would otherwise replace that replica's clients with its own.
            if decoded.is_ok() && configmap_name(&replica) != name {
                l.problems.push(problem(
                    "misnamed",
                    format!(
                    "it claims to be replica {replica}'s report, whose ConfigMap is {}; delete it",
                    configmap_name(&replica)
                ),
                ));
                continue;
            }
            match decoded {
                Ok(Decoded::Clients(r, clients)) => {
                    l.remote.insert(r, clients);
                }
                Ok(Decoded::Refused(_, why)) => l.problems.push(problem("refused", why)),
                Err(why) => l.problems.push(problem("unreadable", why)),
            }
        }
        self.observed.retain(&present);
        l
    }
}

/// Deletes this replica's report at stop. A write cut short by the stop
/// may still have landed, leaving the version this replica knows behind
/// (409 on the precondition): then the version read now is deleted, since
/// no other pod of this name runs while this one does.
async fn delete_own(api: &Api<ConfigMap>, name: &str, rv: Option<String>) {
    let dp = |rv| DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: rv,
            uid: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &dp(rv)).await {
        Err(kube::Error::Api(st)) if st.code == 409 => {
            let current = api.get_opt(name).await.ok().flatten();
            if let Some(cm) = current {
                if let Err(e) = api.delete(name, &dp(cm.metadata.resource_version)).await {
                    tracing::debug!(configmap = %name, error = %e, "propagation report not deleted");
                }
            }
        }
        Err(e) => tracing::debug!(configmap = %name, error = %e, "propagation report not deleted"),
        Ok(_) => {}
    }
}

async fn delete(api: &Api<ConfigMap>, name: &str, rv: Option<String>) {
    // Only the version read: a report rewritten meanwhile (its replica
    // came back, or a new pod of the same name) stays.
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: rv,
            uid: None,
        }),
        ..DeleteParams::default()
    };
    if let Err(e) = api.delete(name, &dp).await {
        tracing::debug!(configmap = %name, error = %e, "propagation report not deleted");
    }
}

/// Publishes (when changed, and as a heartbeat) and reads every interval
/// (and when a report changes), until `stop` flips; then deletes this
/// replica's report, giving up after [`STOP_DEADLINE`].
pub async fn run(
    client: kube::Client,
    s: Settings,
    tracker: Arc<Tracker>,
    leader: Option<watch::Receiver<bool>>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &s.namespace);
    let wake = Arc::new(Notify::new());
    let ns = s.namespace.clone();
    tokio::spawn(super::watch::follow::<ConfigMap>(
        client,
        move |c| Api::namespaced(c, &ns),
        super::watch::Target {
            resource: "configmaps",
            name: None,
            labels: Some(format!("{LABEL}=true")),
            pacing: s.watch,
        },
        wake.clone(),
        stop.clone(),
        metrics,
    ));
    let mut publisher = Publisher::default();
    let mut reader = Reader {
        observed: Observed::default(),
        listed: None,
        error: None,
        // Not yet read is the normal start: not worth a warning.
        logged: BTreeSet::from(["*: unread".to_string()]),
    };
    // Fail closed from the start: nothing read yet.
    tracker.set_reports(ReportsHealth {
        problems: reader.unread(&s).into_iter().collect(),
        own_report: None,
    });
    loop {
        let leading = leader.as_ref().is_some_and(|l| *l.borrow());
        let round = async {
            publisher.publish(&api, &s, &tracker).await;
            if !reader.load(&api, &s, &tracker, leading).await {
                // Someone deleted this replica's report: write it again.
                publisher.last = None;
            }
        };
        tokio::select! {
            _ = round => {}
            _ = stop.changed() => break,
        }
        tokio::select! {
            _ = tokio::time::sleep(s.interval) => {}
            _ = wake.notified() => {}
            _ = stop.changed() => break,
        }
    }
    // Stopping: this replica's clients reconnect elsewhere. Only the
    // version this replica wrote is deleted.
    let rv = publisher.last.and_then(|w| w.rv);
    let name = configmap_name(&s.replica);
    if tokio::time::timeout(STOP_DEADLINE, delete_own(&api, &name, rv))
        .await
        .is_err()
    {
        tracing::warn!(configmap = %name, "could not delete this replica's propagation report in time: the other replicas see it stale");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::propagation::Row;

    #[test]
    fn report_names_are_valid_object_names() {
        assert_eq!(
            configmap_name("meshca-7d9f-x2"),
            "meshca-propagation-meshca-7d9f-x2"
        );
        assert_eq!(configmap_name("Host_A:1"), "meshca-propagation-host-a-1");
        assert!(configmap_name(&"x".repeat(400)).len() <= 253);
    }

    fn export(rows: &[(u64, u64, u64)]) -> Export {
        Export {
            rows: rows
                .iter()
                .map(|&(id, version, live_until)| Row {
                    id,
                    version,
                    live_until,
                    watching: false,
                    root: None,
                })
                .collect(),
            sample: Vec::new(),
        }
    }

    /// 20,000 clients of replica b, through its report, are counted by
    /// replica a with the right versions, once each when a knows some of
    /// them too, and laggards named from the sample.
    #[test]
    fn twenty_thousand_clients_travel_through_one_report() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let hour = Duration::from_secs(3600);
        let (a, b) = (Tracker::default(), Tracker::default());
        let key = |i: usize| {
            format!(
                "spiffe://cluster.local/ns/n{}/sa/w{i} 10.1.{}.{}",
                i % 50,
                i / 256 % 256,
                i % 256
            )
        };
        for i in 0..20_000 {
            // Every 1000th client is still on version 1.
            b.certified(
                &key(i),
                if i % 1000 == 0 { 1 } else { 2 },
                now + hour,
                Some("r2"),
            );
        }
        // a knows client 0 too, with version 2 (it renewed through a).
        a.certified(&key(0), 2, now + 2 * hour, Some("r2"));
        let enc = format::encode("b", &b.export_rows(now), unix_secs(now), 1).unwrap();
        assert!(enc.size() <= 20_000 * 14 + 4096, "{} bytes", enc.size());
        let (data, binary) = enc.into_data();
        let Decoded::Clients(replica, clients) =
            format::decode(Some(&data), binary.as_ref()).unwrap()
        else {
            panic!("not clients")
        };
        a.set_remote_rows(&replica, clients);
        let p = a.summary(now, 2);
        assert_eq!(p.clients, 20_000, "client 0 counts once");
        assert_eq!(p.acked, 20_000 - 19, "client 0 has version 2 through a");
        assert_eq!(p.other_replicas, vec!["b".to_string()]);
        // 19 laggards: the sample names up to 10, the rest are counted.
        let named = p
            .lagging
            .iter()
            .filter(|l| l.ends_with("(has version 1)"))
            .count();
        assert!((9..=10).contains(&named), "{:?}", p.lagging);
        let rest = p.lagging.last().unwrap();
        assert!(
            rest.starts_with(&format!("{} client(s) of other replicas", 19 - named)),
            "{rest}"
        );
        assert_eq!(p.leaves_by_root.get("r2"), Some(&20_000));
    }

    /// Only what a reader's gate would notice before the next heartbeat
    /// triggers a write: not a certificate renewed far from its expiry.
    #[test]
    fn only_changes_that_matter_before_the_next_heartbeat_are_written() {
        let hb = Duration::from_secs(60);
        let now = 1_000_000;
        let old = export(&[(1, 2, now + 3600), (2, 2, now + 100)]);
        assert!(!changed(&old, &old.clone(), now, hb));
        // Renewed long before expiry: waits for the heartbeat.
        let renewed = export(&[(1, 2, now + 7200), (2, 2, now + 100)]);
        assert!(!changed(&old, &renewed, now, hb));
        // Renewed with its written expiry within two heartbeats: written.
        let soon = export(&[(1, 2, now + 3600), (2, 2, now + 3700)]);
        assert!(changed(&old, &soon, now, hb));
        // A new version, a new client, a client gone: written.
        assert!(changed(
            &old,
            &export(&[(1, 3, now + 3600), (2, 2, now + 100)]),
            now,
            hb
        ));
        assert!(changed(&old, &export(&[(1, 2, now + 3600)]), now, hb));
        let mut watching = old.clone();
        watching.rows[0].watching = true;
        assert!(changed(&old, &watching, now, hb));
    }
}
