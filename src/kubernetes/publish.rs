//! Publishing the trust bundle as a ConfigMap in every namespace.
//!
//! Owns: making `meshca-trust-bundle` (key `ca.crt`, the PEM roots; key
//! `bundle.spiffe.json`, the SPIFFE bundle document with the JWT-SVID keys) exist
//! with the current bundle in every namespace, or in those whose labels
//! match a selector: created where missing (so a deleted one comes back),
//! put right where stale or edited. Runs on the leader only, at every
//! bundle change, whenever a watched namespace or ConfigMap changes, and
//! every resync period.
//!
//! Reads come from watch caches ([`cache`]), never from a list per round:
//! a round compares the mirrored ConfigMaps with the bundle and writes only
//! the namespaces whose ConfigMap is missing or differs, at most
//! [`WRITE_CONCURRENCY`] at a time. A ConfigMap whose resourceVersion is the
//! one meshca last wrote or checked is current; one carrying another
//! bundle's digest annotation is rewritten; one with the right digest but an
//! unknown version (edited by someone, or written before this process
//! started) is read once and rewritten only if its `ca.crt` differs.
//!
//! Writes are server-side apply (field manager `meshca`, forced): meshca
//! owns only `data.ca.crt`, `data.bundle.spiffe.json`, its label and its
//! two annotations (the digest covers both keys), so labels,
//! annotations, ownerReferences, `binaryData` and other data keys that
//! others put there stay. Namespaces being deleted (`deletionTimestamp`, or
//! a 403 `NamespaceTerminating` answer) are skipped quietly and are not
//! failures. Must not: decide leadership or change the bundle.

mod cache;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::watch;

use crate::ca::TrustBundle;

pub use cache::Caches;
use cache::{Seen, Side, Touch};

/// The ConfigMap's name.
pub const CONFIGMAP: &str = "meshca-trust-bundle";
/// The key holding the PEM roots.
pub const KEY: &str = "ca.crt";
/// The key holding the SPIFFE bundle document (X.509 authorities and
/// JWT-SVID keys), the same JSON as `bundle.spiffe.json` in the data
/// directory and on the federation endpoint.
pub const SPIFFE_KEY: &str = "bundle.spiffe.json";
/// The annotation holding the SHA-256 (hex) of the published `ca.crt`, so
/// the watch cache (metadata only) tells a stale ConfigMap from a current one.
pub const DIGEST_ANNOTATION: &str = "meshca.io/bundle-sha256";
/// At most this many ConfigMap writes (or reads) in flight at once.
pub const WRITE_CONCURRENCY: usize = 8;

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Only namespaces with all these labels (empty: every namespace).
    pub namespace_labels: BTreeMap<String, String>,
    /// Full resync period (compares the caches again; catches anything a
    /// wake-up missed).
    pub resync: Duration,
    /// The `spiffe_refresh_hint` of the published document.
    pub refresh_hint: Duration,
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Synced {
    /// ConfigMaps created.
    pub created: usize,
    /// ConfigMaps updated.
    pub updated: usize,
    /// Already current (no write).
    pub unchanged: usize,
    /// Namespaces being deleted: skipped, not failures.
    pub terminating: usize,
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

/// The bundle as published: its PEM, SPIFFE document, digest and version.
struct Published {
    pem: String,
    /// Empty if it could not be encoded (logged; `ca.crt` still goes out).
    spiffe: String,
    digest: String,
    version: u64,
}

impl Published {
    fn new(b: &TrustBundle, refresh_hint: Duration) -> Self {
        let pem = b.to_pem();
        let spiffe = crate::trust::spiffe_bundle::SpiffeBundle::from_trust_bundle(
            b,
            b.version,
            refresh_hint,
        )
        .to_json()
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot encode the SPIFFE bundle document for the ConfigMaps");
            String::new()
        });
        // Over both keys: a change of the JWT-SVID keys alone (same roots)
        // must rewrite the ConfigMaps too.
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        h.update(pem.as_bytes());
        h.update(b"\0");
        h.update(spiffe.as_bytes());
        Self {
            pem,
            spiffe,
            digest: hex::encode(h.finish()),
            version: b.version,
        }
    }

    /// The data keys meshca owns.
    fn data(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::from([(KEY.to_string(), self.pem.clone())]);
        if !self.spiffe.is_empty() {
            d.insert(SPIFFE_KEY.to_string(), self.spiffe.clone());
        }
        d
    }

    /// True when a ConfigMap's data holds exactly what would be published.
    fn matches(&self, data: Option<&BTreeMap<String, String>>) -> bool {
        let Some(data) = data else { return false };
        self.data().iter().all(|(k, v)| data.get(k) == Some(v))
    }

    /// The fields meshca owns (server-side apply): nothing else.
    fn desired(&self, ns: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(CONFIGMAP.into()),
                namespace: Some(ns.into()),
                labels: Some(super::managed_by()),
                annotations: Some(BTreeMap::from([
                    (
                        "meshca.io/bundle-version".to_string(),
                        self.version.to_string(),
                    ),
                    (DIGEST_ANNOTATION.to_string(), self.digest.clone()),
                ])),
                ..Default::default()
            },
            data: Some(self.data()),
            ..Default::default()
        }
    }
}

/// What this process learnt from its own writes.
#[derive(Default)]
struct Known {
    digest: String,
    /// The ConfigMap resourceVersions known to hold the bundle `digest`
    /// (written or checked), by namespace; forgotten when the bundle changes.
    versions: HashMap<String, String>,
    /// Namespaces whose create was refused because they are being deleted,
    /// with the namespace's resourceVersion then: not tried again until the
    /// namespace changes (the watch soon shows it terminating or gone).
    terminating: HashMap<String, Option<String>>,
}

impl Known {
    fn for_bundle(&mut self, digest: &str) -> &mut Self {
        if self.digest != digest {
            self.digest = digest.to_string();
            self.versions.clear();
        }
        self
    }

    /// Forgets namespaces that no longer exist, so neither map grows
    /// forever as namespaces come and go.
    fn forget_gone(&mut self, namespaces: &Side) {
        self.versions
            .retain(|k, _| namespaces.objects.contains_key(k));
        self.terminating
            .retain(|k, _| namespaces.objects.contains_key(k));
    }
}

/// What a namespace needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// No ConfigMap: create it.
    Create,
    /// Another bundle's: rewrite it.
    Update,
    /// The right digest but an unknown version: read, rewrite if it differs.
    Verify,
}

/// One namespace to write: its name, what it needs, the namespace's
/// resourceVersion and its ConfigMap's last watch change when planned.
type Job = (String, Step, Option<String>, Touch);

/// The namespaces to write, from the caches alone; and how many are
/// current and how many are being deleted.
fn plan(
    namespaces: &Side,
    configmaps: &Side,
    s: &Settings,
    digest: &str,
    known: &Known,
) -> (Vec<Job>, usize, usize) {
    let (mut jobs, mut current, mut terminating) = (Vec::new(), 0, 0);
    for (name, ns) in &namespaces.objects {
        if !s
            .namespace_labels
            .iter()
            .all(|(k, v)| ns.labels.get(k) == Some(v))
        {
            continue;
        }
        if ns.terminating || known.terminating.get(name) == Some(&ns.resource_version) {
            terminating += 1;
            continue;
        }
        let step = match configmaps.objects.get(name) {
            None => Step::Create,
            Some(cm)
                if cm.resource_version.is_some()
                    && known.versions.get(name) == cm.resource_version.as_ref() =>
            {
                current += 1;
                continue;
            }
            Some(cm) if cm.digest.as_deref() != Some(digest) => Step::Update,
            Some(_) => Step::Verify,
        };
        jobs.push((
            name.clone(),
            step,
            ns.resource_version.clone(),
            configmaps.touch(name),
        ));
    }
    (jobs, current, terminating)
}

/// How one namespace ended.
#[derive(Debug)]
enum Done {
    Created(Option<String>),
    Updated(Option<String>),
    Unchanged(Option<String>),
    Terminating,
}

/// The API server's answer for a namespace that is being (or has been)
/// deleted: 403 with cause `NamespaceTerminating`, or 404 for the namespace.
fn namespace_gone(e: &kube::Error) -> bool {
    let kube::Error::Api(st) = e else {
        return false;
    };
    let details = st.details.as_ref();
    match st.code {
        403 => details.is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")),
        404 => details.is_some_and(|d| d.kind == "namespaces"),
        _ => false,
    }
}

async fn apply(
    api: &Api<ConfigMap>,
    ns: &str,
    b: &Published,
) -> Result<Option<String>, kube::Error> {
    let pp = PatchParams::apply(super::FIELD_MANAGER).force();
    let cm = api
        .patch(CONFIGMAP, &pp, &Patch::Apply(b.desired(ns)))
        .await?;
    Ok(cm.metadata.resource_version)
}

async fn sync_namespace(
    client: kube::Client,
    ns: &str,
    step: Step,
    b: &Published,
) -> Result<Done, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let r = match step {
        Step::Create => apply(&api, ns, b).await.map(Done::Created),
        Step::Update => apply(&api, ns, b).await.map(Done::Updated),
        Step::Verify => match api.get_opt(CONFIGMAP).await {
            Ok(Some(cm)) if b.matches(cm.data.as_ref()) => {
                Ok(Done::Unchanged(cm.metadata.resource_version))
            }
            Ok(Some(_)) => apply(&api, ns, b).await.map(Done::Updated),
            Ok(None) => apply(&api, ns, b).await.map(Done::Created),
            Err(e) => Err(e),
        },
    };
    match r {
        Err(e) if namespace_gone(&e) => Ok(Done::Terminating),
        other => other,
    }
}

/// One round: plans from the caches (None until they have been listed),
/// then writes at most [`WRITE_CONCURRENCY`] namespaces at a time.
async fn round(
    client: &kube::Client,
    caches: &Caches,
    s: &Settings,
    b: &Published,
    known: &mut Known,
) -> Option<Synced> {
    let known = known.for_bundle(&b.digest);
    let (jobs, current, terminating) = caches.read(|ns, cms| {
        known.forget_gone(ns);
        plan(ns, cms, s, &b.digest, known)
    })?;
    let mut out = Synced {
        unchanged: current,
        terminating,
        ..Default::default()
    };
    let mut results = futures_util::stream::iter(jobs)
        .map(|(ns, step, ns_version, since)| async move {
            let r = sync_namespace(client.clone(), &ns, step, b).await;
            (ns, ns_version, since, r)
        })
        .buffer_unordered(WRITE_CONCURRENCY);
    while let Some((ns, ns_version, since, r)) = results.next().await {
        let rv = match r {
            Ok(Done::Created(rv)) => {
                out.created += 1;
                rv
            }
            Ok(Done::Updated(rv)) => {
                out.updated += 1;
                rv
            }
            Ok(Done::Unchanged(rv)) => {
                out.unchanged += 1;
                rv
            }
            Ok(Done::Terminating) => {
                out.terminating += 1;
                known.terminating.insert(ns.clone(), ns_version);
                None
            }
            Err(e) => {
                out.failed.push(format!("{ns}: {e}"));
                None
            }
        };
        let Some(rv) = rv else {
            known.versions.remove(&ns);
            continue;
        };
        let now = Seen {
            digest: Some(b.digest.clone()),
            resource_version: Some(rv.clone()),
            ..Default::default()
        };
        caches.wrote(&ns, since, now);
        known.versions.insert(ns, rv);
    }
    Some(out)
}

fn report(metrics: &crate::metrics::Metrics, version: u64, r: &Synced) {
    metrics.bundle_configmap_writes("created", r.created);
    metrics.bundle_configmap_writes("updated", r.updated);
    metrics.bundle_configmap_writes("failed", r.failed.len());
    if r.created + r.updated > 0 || !r.failed.is_empty() {
        tracing::info!(version, created = r.created, updated = r.updated, unchanged = r.unchanged, failed = ?r.failed, "trust bundle ConfigMaps synced");
    }
    if r.terminating > 0 {
        tracing::debug!(
            namespaces = r.terminating,
            "trust bundle ConfigMaps: skipped namespaces being deleted"
        );
    }
}

/// Publishes while `leader` is true: at once on gaining leadership (once
/// the caches have been listed), on every bundle change, when the caches
/// change and every resync period.
pub async fn run(
    client: kube::Client,
    s: Settings,
    mut bundle: watch::Receiver<std::sync::Arc<TrustBundle>>,
    mut leader: watch::Receiver<bool>,
    caches: Caches,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) {
    let mut known = Known::default();
    loop {
        if !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let b = Published::new(&bundle.borrow_and_update(), s.refresh_hint);
        if let Some(r) = round(&client, &caches, &s, &b, &mut known).await {
            report(&metrics, b.version, &r);
        }
        tokio::select! {
            _ = tokio::time::sleep(s.resync) => {}
            _ = caches.wake.notified() => {}
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

    fn seen(labels: &[(&str, &str)], digest: Option<&str>, rv: &str, terminating: bool) -> Seen {
        Seen {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            digest: digest.map(str::to_string),
            resource_version: Some(rv.into()),
            terminating,
        }
    }

    #[test]
    fn a_round_writes_only_what_is_missing_or_differs() {
        let on = [("mesh", "on")];
        let namespaces: BTreeMap<String, Seen> = [
            ("current", seen(&on, None, "1", false)),
            ("missing", seen(&on, None, "2", false)),
            ("stale", seen(&on, None, "3", false)),
            ("edited", seen(&on, None, "4", false)),
            ("leaving", seen(&on, None, "5", true)),
            ("unselected", seen(&[], None, "6", false)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let configmaps: BTreeMap<String, Seen> = [
            ("current", seen(&[], Some("d"), "10", false)),
            ("stale", seen(&[], Some("old"), "11", false)),
            ("edited", seen(&[], Some("d"), "12", false)),
            ("leaving", seen(&[], Some("old"), "13", false)),
            ("unselected", seen(&[], Some("old"), "14", false)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let known = Known {
            digest: "d".into(),
            versions: HashMap::from([
                ("current".to_string(), "10".to_string()),
                // meshca wrote 9; someone wrote 12 since.
                ("edited".to_string(), "9".to_string()),
            ]),
            // Refused as terminating when the namespace was at version 2:
            // not tried again until the namespace changes.
            terminating: HashMap::from([("missing".to_string(), Some("1".to_string()))]),
        };
        let s = Settings {
            namespace_labels: BTreeMap::from([("mesh".into(), "on".into())]),
            resync: Duration::from_secs(60),
            refresh_hint: Duration::from_secs(300),
        };
        let (namespaces, configmaps) = (Side::listed(namespaces), Side::listed(configmaps));
        let (jobs, current, terminating) = plan(&namespaces, &configmaps, &s, "d", &known);
        let steps = |jobs: Vec<Job>| {
            jobs.into_iter()
                .map(|(n, s, ..)| (n, s))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            steps(jobs),
            [
                ("edited".to_string(), Step::Verify),
                ("missing".to_string(), Step::Create),
                ("stale".to_string(), Step::Update),
            ]
        );
        assert_eq!((current, terminating), (1, 1));
        // Refused at the namespace's current version: skipped.
        let mut known = known;
        known.terminating.insert("missing".into(), Some("2".into()));
        let (jobs, _, terminating) = plan(&namespaces, &configmaps, &s, "d", &known);
        assert_eq!(steps(jobs).len(), 2);
        assert_eq!(terminating, 2);
        // Deleted namespaces are forgotten.
        let mut ns = namespaces;
        ns.objects.remove("missing");
        ns.objects.remove("current");
        known.forget_gone(&ns);
        assert!(known.terminating.is_empty());
        assert_eq!(known.versions.keys().collect::<Vec<_>>(), ["edited"]);
    }

    #[test]
    fn a_namespace_being_deleted_is_told_from_a_refusal() {
        let st = |code: u16, kind: &str, cause: &str| {
            // As the API server sends it (StatusDetails has no Default).
            let body = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "code": code, "reason": "Forbidden",
                "details": {"kind": kind, "causes": [{"reason": cause}]}});
            kube::Error::Api(Box::new(serde_json::from_value(body).unwrap()))
        };
        assert!(namespace_gone(&st(
            403,
            "configmaps",
            "NamespaceTerminating"
        )));
        assert!(namespace_gone(&st(404, "namespaces", "")));
        // RBAC says no: a failure an operator must see.
        assert!(!namespace_gone(&st(403, "configmaps", "")));
        assert!(!namespace_gone(&st(404, "configmaps", "")));
        assert!(!namespace_gone(&st(
            422,
            "configmaps",
            "NamespaceTerminating"
        )));
    }

    #[test]
    fn the_configmap_carries_the_jwt_keys_and_a_jwt_change_alone_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = crate::ca::store::DataDir::new(dir.path());
        let now = std::time::SystemTime::now();
        d.init(&Default::default(), now).unwrap();
        let m = crate::trust::manager::TrustManager::open(d, now).unwrap();
        let b = m.bundle().unwrap();
        let kid = b.jwt_keys[0].key_id.clone();
        let hint = Duration::from_secs(300);
        let p = Published::new(&b, hint);
        let doc: serde_json::Value =
            serde_json::from_str(&p.desired("ns").data.unwrap()[SPIFFE_KEY]).unwrap();
        let jwt: Vec<_> = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == "jwt-svid")
            .collect();
        assert_eq!(jwt.len(), 1);
        assert_eq!(jwt[0]["kid"], kid.as_str());
        assert_eq!(doc["spiffe_sequence"], b.version);
        // Same roots, another JWT key set: another digest, and a ConfigMap
        // holding the old document no longer matches.
        let mut other = b.clone();
        other.jwt_keys.clear();
        let q = Published::new(&other, hint);
        assert_eq!(q.pem, p.pem);
        assert_ne!(q.digest, p.digest);
        assert!(p.matches(Some(&p.data())));
        assert!(!q.matches(Some(&p.data())));
    }
}
