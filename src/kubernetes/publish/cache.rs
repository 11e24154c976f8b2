//! What the bundle publisher knows of the cluster without asking: the
//! namespaces and the bundle ConfigMaps, mirrored from their list + watch
//! (the one loop in [`crate::kubernetes::watch::run`], with its backoff,
//! 410 handling and restart metrics), so a publish round reads memory, not
//! the API server. After the initial list only watch events arrive (a list
//! again only after a `410 Gone`): a namespace event costs no list at all.
//!
//! Owns: the two mirrors (a slim record per object, by key) and waking the
//! publisher when either changes. Must not: write anything, or decide what
//! to publish.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PartialObjectMeta;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::kubernetes::watch::{self as kwatch, Follower, Pacing, Spec, Target};
use crate::metrics::Metrics;

/// What one object's metadata tells the publisher.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Its labels (namespaces: for the selector).
    pub labels: BTreeMap<String, String>,
    /// Its `meshca.io/bundle-sha256` annotation (ConfigMaps).
    pub digest: Option<String>,
    /// Its resourceVersion.
    pub resource_version: Option<String>,
    /// Being deleted (`deletionTimestamp` set; a namespace's
    /// `status.phase` is then `Terminating`).
    pub terminating: bool,
}

/// One mirrored collection: the objects by key, and whether the first list
/// has completed.
#[derive(Debug, Default)]
pub(crate) struct Side {
    /// By key (a namespace's name; a ConfigMap's namespace).
    pub objects: BTreeMap<String, Seen>,
    /// The first list is in.
    pub synced: bool,
    /// Bumped by every list; with `touched`, tells whether an event about
    /// a key arrived since some moment ([`Side::touch`]).
    epoch: u64,
    touched: BTreeMap<String, u64>,
    events: u64,
}

/// When a key was last changed by the watch: compare two to learn whether
/// anything arrived in between.
pub(crate) type Touch = (u64, u64);

impl Side {
    /// A side that has been listed with `objects`.
    #[cfg(test)]
    pub fn listed(objects: BTreeMap<String, Seen>) -> Self {
        Self {
            objects,
            synced: true,
            ..Default::default()
        }
    }

    /// The key's last change.
    pub fn touch(&self, key: &str) -> Touch {
        (self.epoch, self.touched.get(key).copied().unwrap_or(0))
    }

    fn changed(&mut self, key: &str) {
        self.events += 1;
        self.touched.insert(key.to_string(), self.events);
    }
}

/// The key an object is filed under.
type KeyOf = fn(&ObjectMeta) -> Option<String>;

/// A [`Follower`] that keeps a [`Side`] in step with the watch.
struct Mirror {
    side: Arc<Mutex<Side>>,
    /// The objects of a list in progress (they replace the side at its end,
    /// so objects deleted while the watch was down disappear).
    pending: Option<BTreeMap<String, Seen>>,
    key: KeyOf,
    wake: Arc<Notify>,
}

fn seen(m: &ObjectMeta) -> Seen {
    Seen {
        labels: m.labels.clone().unwrap_or_default(),
        digest: m
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::DIGEST_ANNOTATION))
            .cloned(),
        resource_version: m.resource_version.clone(),
        terminating: m.deletion_timestamp.is_some(),
    }
}

impl Mirror {
    fn lock(&self) -> std::sync::MutexGuard<'_, Side> {
        self.side.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K> Follower<PartialObjectMeta<K>> for Mirror {
    fn relisting(&mut self) {
        self.pending = Some(BTreeMap::new());
    }
    fn listed(&mut self, o: PartialObjectMeta<K>) {
        if let (Some(p), Some(k)) = (self.pending.as_mut(), (self.key)(&o.metadata)) {
            p.insert(k, seen(&o.metadata));
        }
    }
    fn synced(&mut self) {
        let listed = self.pending.take().unwrap_or_default();
        {
            let mut side = self.lock();
            side.objects = listed;
            side.synced = true;
            side.epoch += 1;
            side.touched.clear();
        }
        self.wake.notify_one();
    }
    fn applied(&mut self, o: PartialObjectMeta<K>) {
        if let Some(k) = (self.key)(&o.metadata) {
            let mut side = self.lock();
            side.changed(&k);
            side.objects.insert(k, seen(&o.metadata));
            drop(side);
            self.wake.notify_one();
        }
    }
    fn deleted(&mut self, o: PartialObjectMeta<K>) {
        if let Some(k) = (self.key)(&o.metadata) {
            let mut side = self.lock();
            side.changed(&k);
            side.objects.remove(&k);
            drop(side);
            self.wake.notify_one();
        }
    }
}

/// The publisher's view of the cluster: namespaces by name, bundle
/// ConfigMaps by namespace; `wake` fires on every change.
#[derive(Clone, Default)]
pub struct Caches {
    namespaces: Arc<Mutex<Side>>,
    configmaps: Arc<Mutex<Side>>,
    pub(crate) wake: Arc<Notify>,
}

impl Caches {
    /// Starts following the namespaces and the bundle ConfigMaps (every
    /// namespace's `meshca-trust-bundle`, by a `metadata.name` field
    /// selector), paced by `pacing`, until `stop` flips; returns the caches
    /// and the two watch tasks (for shutdown to await).
    pub fn follow(
        client: &kube::Client,
        pacing: Pacing,
        metrics: &Arc<Metrics>,
        stop: &watch::Receiver<bool>,
    ) -> (Self, Vec<JoinHandle<()>>) {
        let caches = Self::default();
        let mirror = |side: &Arc<Mutex<Side>>, key: KeyOf| Mirror {
            side: side.clone(),
            pending: None,
            key,
            wake: caches.wake.clone(),
        };
        let mut ns = mirror(&caches.namespaces, |m| m.name.clone());
        let (c, metrics2, stop2) = (client.clone(), metrics.clone(), stop.clone());
        let namespaces = tokio::spawn(async move {
            let target = Target {
                resource: "namespaces",
                name: None,
                labels: None,
                pacing,
            };
            let spec = Spec {
                target: &target,
                on_open: None,
                metrics: metrics2,
            };
            kwatch::run::<Namespace, _>(c, kube::Api::all, spec, &mut ns, stop2).await
        });
        let mut cms = mirror(&caches.configmaps, |m| m.namespace.clone());
        let (c, metrics, stop) = (client.clone(), metrics.clone(), stop.clone());
        let configmaps = tokio::spawn(async move {
            let target = Target {
                resource: "configmaps",
                name: Some(super::CONFIGMAP.to_string()),
                labels: None,
                pacing,
            };
            let spec = Spec {
                target: &target,
                on_open: None,
                metrics,
            };
            kwatch::run::<ConfigMap, _>(c, kube::Api::all, spec, &mut cms, stop).await
        });
        (caches, vec![namespaces, configmaps])
    }

    /// Runs `f` over (namespaces, ConfigMaps) once both have been listed;
    /// None before.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Side, &Side) -> R) -> Option<R> {
        let ns = self
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let cms = self
            .configmaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (ns.synced && cms.synced).then(|| f(&ns, &cms))
    }

    /// meshca wrote (or checked) the ConfigMap in namespace `ns`: records
    /// what it now is, unless the watch has said anything about it since
    /// `since` (then the watch is at least as fresh). Without this, a round
    /// that starts before the watch event of the previous round's write
    /// arrives would write the same namespace again.
    pub(crate) fn wrote(&self, ns: &str, since: Touch, now: Seen) {
        let mut cms = self
            .configmaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if cms.touch(ns) == since {
            cms.objects.insert(ns.to_string(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn meta(name: &str, rv: &str) -> PartialObjectMeta<Namespace> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn a_relist_replaces_what_was_known_and_events_update_it() {
        let caches = Caches::default();
        let mut m = Mirror {
            side: caches.namespaces.clone(),
            pending: None,
            key: |m| m.name.clone(),
            wake: caches.wake.clone(),
        };
        caches.configmaps.lock().unwrap().synced = true;
        assert!(caches.read(|_, _| ()).is_none(), "not listed yet");
        let f: &mut dyn Follower<PartialObjectMeta<Namespace>> = &mut m;
        f.relisting();
        f.listed(meta("a", "1"));
        f.listed(meta("gone-while-down", "2"));
        f.synced();
        let mut b = meta("b", "3");
        b.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        f.applied(b);
        f.deleted(meta("a", "4"));
        let names = caches.read(|ns, _| ns.objects.clone()).unwrap();
        assert_eq!(names.keys().collect::<Vec<_>>(), ["b", "gone-while-down"]);
        assert!(names["b"].terminating);
        // A fresh list (after a 410) forgets what it does not list.
        f.relisting();
        f.listed(meta("b", "5"));
        f.synced();
        let names = caches.read(|ns, _| ns.objects.clone()).unwrap();
        assert_eq!(names.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(names["b"].resource_version.as_deref(), Some("5"));
        assert!(!names["b"].terminating);
    }

    #[test]
    fn a_write_is_recorded_only_if_the_watch_said_nothing_since() {
        let caches = Caches::default();
        let mut m = Mirror {
            side: caches.configmaps.clone(),
            pending: None,
            key: |m| m.namespace.clone(),
            wake: caches.wake.clone(),
        };
        caches.namespaces.lock().unwrap().synced = true;
        let cm = |ns: &str, rv: &str| PartialObjectMeta::<ConfigMap> {
            types: None,
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            _phantom: Default::default(),
        };
        let f: &mut dyn Follower<PartialObjectMeta<ConfigMap>> = &mut m;
        f.relisting();
        f.synced();
        let rv = |caches: &Caches, ns: &str| {
            caches
                .read(|_, cms| cms.objects.get(ns).and_then(|s| s.resource_version.clone()))
                .unwrap()
        };
        let wrote = |rv: &str| Seen {
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        // Nothing arrived between planning and writing: recorded.
        let since = caches.read(|_, cms| cms.touch("a")).unwrap();
        caches.wrote("a", since, wrote("7"));
        assert_eq!(rv(&caches, "a").as_deref(), Some("7"));
        // Someone deleted it right after the write, and the watch said so
        // before the write was recorded: the deletion stands.
        let since = caches.read(|_, cms| cms.touch("b")).unwrap();
        f.applied(cm("b", "8"));
        f.deleted(cm("b", "9"));
        caches.wrote("b", since, wrote("8"));
        assert_eq!(rv(&caches, "b"), None);
        // A relist in between also wins.
        let since = caches.read(|_, cms| cms.touch("c")).unwrap();
        f.relisting();
        f.synced();
        caches.wrote("c", since, wrote("10"));
        assert_eq!(rv(&caches, "c"), None);
    }
}
