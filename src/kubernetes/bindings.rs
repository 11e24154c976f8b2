//! The pods and service accounts that exist, by UID: a metadata-only
//! list + watch kept in memory, so a locally verified token whose pod or
//! service account was deleted (or recreated under a new UID) stops working
//! within the round trip of one watch event, as it would under TokenReview,
//! without an API-server call per request.
//!
//! Owns: [`BoundObjects`] (two UID tables, sharded, behind
//! [`crate::authn::binding::BindingCheck`]), and [`follow`], which fills
//! them through the shared list/watch loop ([`super::watch::run`]). Lists
//! and watches ask for `PartialObjectMetadata`, so the API server sends
//! metadata only, never pod specs. Must not: decide
//! authentication (that is `authn`), or keep more than a UID and a digest
//! of namespace/name per object.
//!
//! Fail closed: until both tables have listed once, and while a watch has
//! been failing for longer than [`STALE_AFTER`], every check answers
//! `Unknown`; the token chain then asks TokenReview or answers UNAVAILABLE.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PartialObjectMeta};
use kube::core::ObjectMeta;
use tokio::sync::watch;

use crate::authn::binding::{Binding, BindingCheck, ObjectRef, Presence};
use crate::metrics::Metrics;

/// How long a watch may keep failing before the tables count as stale
/// (deletions could be missed) and checks answer `Unknown`.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
const SHARDS: usize = 16;

/// A UID in 16 bytes: a UUID's value, or the digest of anything else.
fn uid_key(uid: &str) -> u128 {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    if hex.len() == 32 {
        if let Ok(v) = u128::from_str_radix(&hex, 16) {
            return v;
        }
    }
    let d = ring::digest::digest(&ring::digest::SHA256, uid.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    // Keep digests apart from UUID values that happen to match.
    u128::from_be_bytes(b) ^ 1
}

/// `namespace/name` in 8 bytes (a digest: names come from the API server,
/// which also guarantees UIDs unique, so this only double-checks).
fn name_key(namespace: &str, name: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(namespace.as_bytes());
    ctx.update(b"/");
    ctx.update(name.as_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_be_bytes(b)
}

fn millis_since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +1: 0 means "healthy" in `failing_since`.
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One kind of object: UID → digest of namespace/name.
pub struct Table {
    kind: &'static str,
    shards: Vec<RwLock<HashMap<u128, u64>>>,
    synced: AtomicBool,
    /// When the watch started failing (ms since start), 0 while healthy.
    failing_since: AtomicU64,
}

impl Table {
    fn new(kind: &'static str) -> Self {
        Self {
            kind,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            synced: AtomicBool::new(false),
            failing_since: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u128) -> &RwLock<HashMap<u128, u64>> {
        &self.shards[(key as usize) % SHARDS]
    }

    /// Records that `namespace/name` exists with `uid`.
    pub fn insert(&self, uid: &str, namespace: &str, name: &str) {
        let k = uid_key(uid);
        self.shard(k)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k, name_key(namespace, name));
    }

    /// Forgets `uid`.
    pub fn remove(&self, uid: &str) {
        let k = uid_key(uid);
        self.shard(k)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&k);
    }

    /// Replaces the whole content (after a list), one shard at a time: an
    /// object present before and after never disappears in between.
    fn replace_all(&self, objects: &[(String, String, String)]) {
        let mut fresh: Vec<HashMap<u128, u64>> = (0..SHARDS).map(|_| HashMap::new()).collect();
        for (uid, ns, name) in objects {
            let k = uid_key(uid);
            fresh[(k as usize) % SHARDS].insert(k, name_key(ns, name));
        }
        for (shard, new) in self.shards.iter().zip(fresh) {
            *shard.write().unwrap_or_else(|e| e.into_inner()) = new;
        }
        self.synced.store(true, Ordering::Release);
    }

    /// How many objects are known.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// True when no object is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_current(&self) -> bool {
        self.is_current_at(millis_since_start())
    }

    fn is_current_at(&self, now_ms: u64) -> bool {
        if !self.synced.load(Ordering::Acquire) {
            return false;
        }
        match self.failing_since.load(Ordering::Acquire) {
            0 => true,
            t => now_ms.saturating_sub(t) < STALE_AFTER.as_millis() as u64,
        }
    }

    fn healthy(&self) {
        self.failing_since.store(0, Ordering::Release);
    }

    fn failing(&self) {
        let _ = self.failing_since.compare_exchange(
            0,
            millis_since_start(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Present with the same namespace/name?
    fn has(&self, namespace: &str, r: &ObjectRef<'_>) -> bool {
        let k = uid_key(r.uid);
        self.shard(k)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&k)
            .is_some_and(|n| *n == name_key(namespace, r.name))
    }
}

/// The pods and service accounts that exist.
pub struct BoundObjects {
    /// Pods by UID.
    pub pods: Table,
    /// Service accounts by UID.
    pub service_accounts: Table,
    metrics: Arc<Metrics>,
}

impl BoundObjects {
    /// Empty tables (not synced yet), reporting to `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            pods: Table::new("pod"),
            service_accounts: Table::new("serviceaccount"),
            metrics,
        }
    }
}

impl std::fmt::Debug for BoundObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundObjects")
            .field("pods", &self.pods.len())
            .field("service_accounts", &self.service_accounts.len())
            .finish()
    }
}

fn truncated(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl BindingCheck for BoundObjects {
    fn check(&self, b: &Binding<'_>) -> Presence {
        for t in [&self.pods, &self.service_accounts] {
            if !t.is_current() {
                return Presence::Unknown(format!(
                    "the {} watch is not synced with the Kubernetes API server yet, so a deleted {} cannot be ruled out",
                    t.kind, t.kind
                ));
            }
        }
        let checks = [
            (&self.service_accounts, b.service_account),
            (&self.pods, b.pod),
        ];
        for (table, r) in checks {
            let Some(r) = r else { continue };
            if !table.has(b.namespace, &r) {
                self.metrics.binding_refused(table.kind);
                return Presence::Gone {
                    kind: table.kind,
                    why: format!(
                        "the {} {}/{} (uid {}) this token is bound to no longer exists; the token died with it: present a fresh token",
                        table.kind,
                        truncated(b.namespace),
                        truncated(r.name),
                        truncated(r.uid)
                    ),
                };
            }
        }
        Presence::Present
    }

    fn is_synced(&self) -> bool {
        self.pods.is_current() && self.service_accounts.is_current()
    }
}

/// Keeps `objects` in step with the cluster until `stop` flips.
pub(crate) fn follow(
    client: kube::Client,
    objects: Arc<BoundObjects>,
    pacing: super::watch::Pacing,
    stop: watch::Receiver<bool>,
) {
    tokio::spawn(follow_table::<Pod>(
        client.clone(),
        ("pods", pacing),
        objects.clone(),
        |o| &o.pods,
        stop.clone(),
    ));
    tokio::spawn(follow_table::<ServiceAccount>(
        client,
        ("serviceaccounts", pacing),
        objects,
        |o| &o.service_accounts,
        stop,
    ));
}

fn triple(meta: &ObjectMeta) -> Option<(String, String, String)> {
    Some((
        meta.uid.clone()?,
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone()?,
    ))
}

/// Lists and watches one kind (metadata only) with [`watch::run`] into
/// its table; 410 forces a fresh list, errors back off and, past
/// [`STALE_AFTER`], make checks answer Unknown.
async fn follow_table<K>(
    client: kube::Client,
    (resource, pacing): (&'static str, super::watch::Pacing),
    objects: Arc<BoundObjects>,
    pick: fn(&BoundObjects) -> &Table,
    stop: watch::Receiver<bool>,
) where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K: Send + Sync + 'static,
{
    let target = super::watch::Target {
        resource,
        name: None,
        labels: None,
        pacing,
    };
    // A watch that opens again is healthy even before its first event.
    let o = objects.clone();
    let on_open: super::watch::OnOpen = Arc::new(move || pick(&o).healthy());
    let mut filler = Filler {
        resource,
        objects,
        pick,
        listing: Vec::new(),
    };
    let spec = super::watch::Spec {
        target: &target,
        on_open: Some(on_open),
        metrics: filler.objects.metrics.clone(),
    };
    super::watch::run(
        client,
        Api::<PartialObjectMeta<K>>::all,
        spec,
        &mut filler,
        stop,
    )
    .await
}

/// Fills one table from the watch: a list replaces the table at once when
/// complete (so a deletion missed during an outage disappears), events
/// then add and remove single objects.
struct Filler {
    resource: &'static str,
    objects: Arc<BoundObjects>,
    pick: fn(&BoundObjects) -> &Table,
    /// The list in progress.
    listing: Vec<(String, String, String)>,
}

impl Filler {
    fn table(&self) -> &Table {
        (self.pick)(&self.objects)
    }

    fn count(&self) {
        let t = self.table();
        self.objects.metrics.set_binding_objects(t.kind, t.len());
    }
}

impl<K: kube::Resource> super::watch::Follower<PartialObjectMeta<K>> for Filler {
    fn relisting(&mut self) {
        self.listing.clear();
    }

    fn listed(&mut self, o: PartialObjectMeta<K>) {
        self.listing.extend(triple(&o.metadata));
    }

    fn synced(&mut self) {
        let items = std::mem::take(&mut self.listing);
        self.table().replace_all(&items);
        self.table().healthy();
        self.count();
        tracing::info!(
            resource = self.resource,
            objects = items.len(),
            "token-binding cache synced"
        );
    }

    fn applied(&mut self, o: PartialObjectMeta<K>) {
        if let Some((uid, ns, name)) = triple(&o.metadata) {
            self.table().insert(&uid, &ns, &name);
            self.count();
        }
    }

    fn deleted(&mut self, o: PartialObjectMeta<K>) {
        if let Some((uid, _, _)) = triple(&o.metadata) {
            self.table().remove(&uid);
            self.count();
        }
    }

    fn failing(&mut self) {
        self.table().failing();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_and_names_are_checked_together() {
        let o = BoundObjects::new(Arc::default());
        let sa_uid = "0f6f8e5e-0000-4000-8000-000000000001";
        let pod_uid = "0f6f8e5e-0000-4000-8000-000000000002";
        let b = Binding {
            namespace: "shop",
            service_account: Some(ObjectRef {
                name: "web",
                uid: sa_uid,
            }),
            pod: Some(ObjectRef {
                name: "web-1",
                uid: pod_uid,
            }),
        };
        assert!(matches!(o.check(&b), Presence::Unknown(_)), "not synced");
        o.pods
            .replace_all(&[(pod_uid.into(), "shop".into(), "web-1".into())]);
        o.service_accounts
            .replace_all(&[(sa_uid.into(), "shop".into(), "web".into())]);
        assert_eq!(o.check(&b), Presence::Present);
        // Same name, new UID: the old token's pod is gone.
        o.pods.remove(pod_uid);
        o.pods
            .insert("11111111-0000-4000-8000-000000000002", "shop", "web-1");
        assert!(matches!(o.check(&b), Presence::Gone { kind: "pod", .. }));
        // A UID that exists under another namespace/name does not count.
        o.pods.insert(pod_uid, "other", "web-1");
        assert!(matches!(o.check(&b), Presence::Gone { kind: "pod", .. }));
        o.pods.insert(pod_uid, "shop", "web-1");
        o.service_accounts.remove(sa_uid);
        assert!(matches!(
            o.check(&b),
            Presence::Gone {
                kind: "serviceaccount",
                ..
            }
        ));
        // A failing watch makes answers Unknown only after STALE_AFTER.
        o.service_accounts.insert(sa_uid, "shop", "web");
        o.pods.failing();
        assert_eq!(o.check(&b), Presence::Present);
        let since = o.pods.failing_since.load(Ordering::Acquire);
        assert!(o
            .pods
            .is_current_at(since + STALE_AFTER.as_millis() as u64 - 1));
        assert!(!o.pods.is_current_at(since + STALE_AFTER.as_millis() as u64));
        o.pods.healthy();
        assert_eq!(o.check(&b), Presence::Present);
    }

    fn meta(uid: &str, name: &str) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                namespace: Some("shop".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_list_replaces_the_table_and_events_edit_it() {
        use super::super::watch::Follower;
        let objects = Arc::new(BoundObjects::new(Arc::default()));
        let mut filler = Filler {
            resource: "pods",
            objects: objects.clone(),
            pick: |o| &o.pods,
            listing: Vec::new(),
        };
        let f: &mut dyn Follower<PartialObjectMeta<Pod>> = &mut filler;
        let gauge = || {
            objects
                .metrics
                .render()
                .lines()
                .find(|l| l.starts_with("meshca_token_binding_objects{kind=\"pod\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        f.relisting();
        f.listed(meta("a", "web-a"));
        f.listed(meta("b", "web-b"));
        assert!(
            !objects.pods.is_current(),
            "not synced before the list ends"
        );
        f.synced();
        assert!(objects.pods.is_current());
        assert_eq!(objects.pods.len(), 2);
        f.applied(meta("c", "web-c"));
        f.deleted(meta("a", "web-a"));
        assert_eq!(objects.pods.len(), 2);
        assert_eq!(gauge(), Some(2.0));
        // A re-list (after 410) that no longer has c: c is gone, even
        // though its deletion event was never seen.
        f.relisting();
        f.listed(meta("b", "web-b"));
        f.synced();
        assert_eq!(objects.pods.len(), 1);
        assert_eq!(gauge(), Some(1.0));
        let r = |uid| ObjectRef { name: "web-c", uid };
        assert!(!objects.pods.has("shop", &r("c")));
        // A failure starts the stale clock; a synced list stops it.
        f.failing();
        assert_ne!(objects.pods.failing_since.load(Ordering::Acquire), 0);
        f.relisting();
        f.synced();
        assert_eq!(objects.pods.failing_since.load(Ordering::Acquire), 0);
    }
}
