//! Publishing the trust bundle as a ConfigMap in every namespace.
//!
//! Owns: making `meshca-trust-bundle` (key `ca.crt`, the PEM roots) exist
//! with the current bundle in every namespace, or in those whose labels
//! match a selector: created where missing (so a deleted one comes back),
//! updated where stale, with resourceVersion preconditions (a 409 means
//! someone else wrote meanwhile: read again and retry, never overwrite
//! blindly). Runs on the leader only, at every bundle change, whenever a
//! watched namespace or ConfigMap changes, and every resync period. Must not: decide leadership or change the bundle.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use tokio::sync::watch;

use crate::ca::TrustBundle;

/// The ConfigMap's name.
pub const CONFIGMAP: &str = "meshca-trust-bundle";
/// The key holding the PEM roots.
pub const KEY: &str = "ca.crt";

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Only namespaces with all these labels (empty: every namespace).
    pub namespace_labels: BTreeMap<String, String>,
    /// Full resync period (catches deletions and new namespaces).
    pub resync: Duration,
}

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Synced {
    /// ConfigMaps created.
    pub created: usize,
    /// ConfigMaps updated.
    pub updated: usize,
    /// Already current.
    pub unchanged: usize,
    /// Namespaces that failed (with why).
    pub failed: Vec<String>,
}

/// Parses `k=v,k2=v2`.
pub(crate) fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("namespace selector {p:?}: expected key=value"))
        })
        .collect()
}

fn desired(ns: &str, pem: &str, version: u64) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIGMAP.into()),
            namespace: Some(ns.into()),
            labels: Some(super::managed_by()),
            annotations: Some(
                [("meshca.io/bundle-version".to_string(), version.to_string())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        data: Some([(KEY.to_string(), pem.to_string())].into_iter().collect()),
        ..Default::default()
    }
}

/// Makes every selected namespace hold the bundle once.
pub(crate) async fn sync_once(
    client: &kube::Client,
    s: &Settings,
    bundle: &TrustBundle,
) -> Result<Synced, kube::Error> {
    let pem = bundle.to_pem();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    // One list of the existing ConfigMaps (by name, across namespaces), so
    // an idle resync costs two calls, not one per namespace.
    let existing: BTreeMap<String, ConfigMap> = Api::<ConfigMap>::all(client.clone())
        .list(&ListParams::default().fields(&format!("metadata.name={CONFIGMAP}")))
        .await?
        .items
        .into_iter()
        .filter_map(|cm| Some((cm.metadata.namespace.clone()?, cm)))
        .collect();
    let mut out = Synced::default();
    for ns in namespaces.list(&ListParams::default()).await?.items {
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        if !s
            .namespace_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
        {
            continue;
        }
        let Some(name) = ns.metadata.name.clone() else {
            continue;
        };
        match sync_namespace(client, &name, &pem, bundle.version, existing.get(&name)).await {
            Ok(Change::Created) => out.created += 1,
            Ok(Change::Updated) => out.updated += 1,
            Ok(Change::Unchanged) => out.unchanged += 1,
            Err(e) => out.failed.push(format!("{name}: {e}")),
        }
    }
    Ok(out)
}

enum Change {
    Created,
    Updated,
    Unchanged,
}

async fn sync_namespace(
    client: &kube::Client,
    ns: &str,
    pem: &str,
    version: u64,
    listed: Option<&ConfigMap>,
) -> Result<Change, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    // A conflict means another writer got in between: re-read and retry.
    let mut attempts = 0;
    let mut known = Some(listed.cloned());
    loop {
        attempts += 1;
        let current = match known.take() {
            Some(c) => c,
            None => api.get_opt(CONFIGMAP).await?,
        };
        let r = match current {
            None => api
                .create(&PostParams::default(), &desired(ns, pem, version))
                .await
                .map(|_| Change::Created),
            Some(cm)
                if cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(KEY))
                    .map(String::as_str)
                    == Some(pem) =>
            {
                return Ok(Change::Unchanged)
            }
            Some(cm) => {
                let mut next = desired(ns, pem, version);
                next.metadata.resource_version = cm.metadata.resource_version.clone();
                // Keep what others put there, replace only our key.
                let mut data = cm.data.clone().unwrap_or_default();
                data.insert(KEY.into(), pem.into());
                next.data = Some(data);
                api.replace(CONFIGMAP, &PostParams::default(), &next)
                    .await
                    .map(|_| Change::Updated)
            }
        };
        match r {
            Err(kube::Error::Api(st)) if st.code == 409 && attempts < 5 => continue,
            other => return other,
        }
    }
}

/// Publishes while `leader` is true: at once on gaining leadership, on every
/// bundle change, when `wake` fires (a namespace or ConfigMap changed) and
/// every resync period.
pub async fn run(
    client: kube::Client,
    s: Settings,
    mut bundle: watch::Receiver<std::sync::Arc<TrustBundle>>,
    mut leader: watch::Receiver<bool>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    loop {
        if !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let b = bundle.borrow_and_update().clone();
        let r = sync_once(&client, &s, &b).await;
        if let Ok(r) = &r {
            let m = &metrics;
            m.bundle_configmap_writes("created", r.created);
            m.bundle_configmap_writes("updated", r.updated);
            m.bundle_configmap_writes("failed", r.failed.len());
        }
        match r {
            Ok(r) if r.created + r.updated > 0 || !r.failed.is_empty() => {
                tracing::info!(version = b.version, created = r.created, updated = r.updated, unchanged = r.unchanged, failed = ?r.failed, "trust bundle ConfigMaps synced")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "trust bundle ConfigMaps: cannot list namespaces"),
        }
        tokio::select! {
            _ = tokio::time::sleep(s.resync) => {}
            _ = wake.notified() => {}
            r = bundle.changed() => if r.is_err() { return },
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        assert!(parse_selector("").unwrap().is_empty());
        let m = parse_selector("mesh=on, team = a").unwrap();
        assert_eq!(m.get("mesh").map(String::as_str), Some("on"));
        assert_eq!(m.get("team").map(String::as_str), Some("a"));
        assert!(parse_selector("mesh").is_err());
    }
}
