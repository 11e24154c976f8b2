//! Bundle-propagation reports exchanged between replicas.
//!
//! Owns: publishing this replica's tracked clients (who was sent which
//! bundle version, see `trust::propagation`) as a ConfigMap of its own,
//! `meshca-propagation-<replica>` in the CA's namespace (label
//! `meshca.io/propagation-report`), and loading the other replicas' reports
//! into the tracker, so the activation gate and `rotation status` on any
//! replica count every client of the CA, not only its own. A report older
//! than three intervals no longer counts (its replica is gone; its clients
//! reconnect elsewhere and are tracked there). A replica deletes its own
//! report when it stops; the leader deletes reports left behind by
//! replicas that died. Must not: decide whether a step is safe.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::trust::propagation::{ClientView, Tracker};

use super::error::{kube_err, Error};

/// The label that marks a report.
pub(crate) const LABEL: &str = "meshca.io/propagation-report";
/// The data key holding the report.
pub const KEY: &str = "report.json";
/// Reports older than this many intervals are ignored.
const STALE_INTERVALS: u32 = 3;
/// The leader deletes reports older than this.
const ABANDONED: Duration = Duration::from_secs(3600);

/// Where and how often.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The CA's namespace.
    pub namespace: String,
    /// This replica.
    pub replica: String,
    /// How often this replica publishes and reads.
    pub interval: Duration,
    /// How the reports watch is paced.
    pub watch: super::watch::Pacing,
}

/// One replica's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The replica.
    pub replica: String,
    /// When it was written (Unix seconds).
    pub updated: u64,
    /// Its live clients.
    pub clients: Vec<ClientView>,
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

fn report_cm(s: &Settings, r: &Report, rv: Option<String>) -> Result<ConfigMap, Error> {
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(configmap_name(&s.replica)),
            namespace: Some(s.namespace.clone()),
            resource_version: rv,
            labels: Some({
                let mut l = super::managed_by();
                l.insert(LABEL.to_string(), "true".to_string());
                l
            }),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            KEY.to_string(),
            serde_json::to_string(r).map_err(|e| Error::invalid("this replica's report", e))?,
        )])),
        ..Default::default()
    })
}

/// Writes this replica's report (create, or replace on top of the current
/// version).
pub async fn publish(api: &Api<ConfigMap>, s: &Settings, r: &Report) -> Result<(), Error> {
    let name = configmap_name(&s.replica);
    let what = |verb: &str| format!("{verb} ConfigMap {}/{name}", s.namespace);
    let rv = api
        .get_opt(&name)
        .await
        .map_err(kube_err(what("reading")))?
        .and_then(|c| c.metadata.resource_version);
    let cm = report_cm(s, r, rv.clone())?;
    let res = match rv {
        None => api.create(&PostParams::default(), &cm).await,
        Some(_) => api.replace(&name, &PostParams::default(), &cm).await,
    };
    match res.map_err(kube_err(what("writing"))) {
        Ok(_) => Ok(()),
        // Only this replica writes its report; a conflict is a leftover
        // from a previous pod with the same name. The next round wins.
        Err(e) if e.is_conflict() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads every other replica's report into `tracker`; returns the names of
/// reports abandoned long ago (for the leader to delete).
pub async fn load(
    api: &Api<ConfigMap>,
    s: &Settings,
    tracker: &Tracker,
    now: SystemTime,
) -> Result<Vec<String>, Error> {
    let lp = ListParams::default().labels(&format!("{LABEL}=true"));
    let list = api.list(&lp).await.map_err(kube_err(format!(
        "listing the propagation reports in namespace {}",
        s.namespace
    )))?;
    let now_s = crate::util::clock::unix_secs(now);
    let fresh_s = (s.interval * STALE_INTERVALS).as_secs().max(1);
    let mut keep = BTreeSet::new();
    let mut abandoned = Vec::new();
    for cm in list.items {
        let Some(text) = cm.data.as_ref().and_then(|d| d.get(KEY)) else {
            continue;
        };
        let Ok(r) = serde_json::from_str::<Report>(text) else {
            tracing::warn!(configmap = ?cm.metadata.name, "unreadable propagation report ignored");
            continue;
        };
        if r.replica == s.replica {
            continue;
        }
        let age = now_s.saturating_sub(r.updated);
        if age <= fresh_s {
            tracker.set_remote(&r.replica, r.clients);
            keep.insert(r.replica);
        } else if age > ABANDONED.as_secs() {
            abandoned.extend(cm.metadata.name);
        }
    }
    tracker.retain_remote(&keep);
    Ok(abandoned)
}

/// Publishes and reads every interval (and reads when a report changes),
/// until `stop` flips; then deletes this replica's report.
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
    let mut next_publish = tokio::time::Instant::now();
    loop {
        let now = SystemTime::now();
        if tokio::time::Instant::now() >= next_publish {
            next_publish += s.interval;
            let r = Report {
                replica: s.replica.clone(),
                updated: crate::util::clock::unix_secs(now),
                clients: tracker.export(now),
            };
            if let Err(e) = publish(&api, &s, &r).await {
                tracing::warn!(error = %e, "could not publish this replica's propagation report");
            }
        }
        match load(&api, &s, &tracker, now).await {
            Ok(abandoned) if leader.as_ref().is_some_and(|l| *l.borrow()) => {
                for name in abandoned {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                    tracing::info!(configmap = %name, "deleted a propagation report abandoned by a replica that is gone");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read the other replicas' propagation reports")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_publish) => {}
            _ = wake.notified() => {}
            _ = stop.changed() => break,
        }
    }
    // Stopping: this replica's clients reconnect elsewhere.
    let _ = api
        .delete(&configmap_name(&s.replica), &DeleteParams::default())
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_are_valid_object_names() {
        assert_eq!(
            configmap_name("meshca-7d9f-x2"),
            "meshca-propagation-meshca-7d9f-x2"
        );
        assert_eq!(configmap_name("Host_A:1"), "meshca-propagation-host-a-1");
        assert!(configmap_name(&"x".repeat(400)).len() <= 253);
    }
}
