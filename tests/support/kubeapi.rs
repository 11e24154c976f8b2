//! A fake Kubernetes API server: the subset meshca uses, with the real
//! semantics — TokenReview (for tokens registered in [`Store::tokens`]),
//! SelfSubjectAccessReview, fixed documents (OIDC discovery, JWKS),
//! Namespaces (list, watch), Secrets, ConfigMaps and Leases
//! (get, list, create, replace, delete, watch; ConfigMaps and Secrets also
//! across namespaces) with resourceVersion preconditions (409 Conflict on a
//! stale write, 409 AlreadyExists on a duplicate create, 404 NotFound),
//! `metadata.name` field selectors, Kubernetes `Status` bodies, and watch
//! streams (newline-delimited `ADDED`/`MODIFIED`/`DELETED` events from a
//! resourceVersion; after [`Store::compact`], a watch from an older version
//! gets the `ERROR` event with a 410 `Expired` Status, as etcd compaction
//! causes). [`Store::partition`] drops every open watch and holds new ones
//! until [`Store::heal`], so tests can make changes a client cannot see.
//! Pods and ServiceAccounts (list, watch, get, delete) answer in the
//! metadata-only form (`PartialObjectMetadata[List]`, `meta.k8s.io/v1`) when
//! the client asks for it in `Accept`, as kube's `list_metadata` and
//! `watch_metadata` do; [`Store::forbidden`] answers 403 on chosen paths
//! with the real Status (`… is forbidden: User "…" cannot VERB resource …`),
//! and a denied SelfSubjectAccessReview says `allowed: false` with no reason,
//! as RBAC does.
//! Watches that ask for `allowWatchBookmarks=true` get periodic `BOOKMARK`
//! events (the real server's ~1 min, or [`Store::set_bookmark_interval`]);
//! [`Store::close_watches`] answers watches 200 and ends them right after
//! the events already due (a proxy or an overloaded server), [`Store::silence_open_watches`] makes
//! every open watch send nothing more while its connection stays open (a
//! dead peer behind a NAT), and [`Store::stall_gets`] accepts GETs of a
//! path and never answers them.
//! ConfigMaps and Secrets whose data exceeds the real 1 MiB limit are
//! refused on create and replace with the real 422 `Invalid` Status
//! ([`too_large`]; [`Store::object_limit`] lowers the limit for a test).
//! Faults of a real cluster, chosen per request ([`Match`]: bearer token,
//! method, path prefix): [`Store::stalled`] accepts and never answers (a
//! dead connection or a hung API server); [`Store::slow`] answers late (an
//! API server under load); [`Store::throttled`] answers
//! `429 TooManyRequests` with `Retry-After` as API Priority and Fairness
//! does; [`Store::skew`] makes the replica holding a token live on a clock
//! that is off by a fixed amount (the Lease times it writes are shifted
//! forward, those it reads back; see [`kubeconfig_for`] for a second
//! replica's credentials).
//! The issuer-discovery paths demand the bearer token (401
//! without it) and can fail on demand ([`Store::discovery_faults`]); a
//! legacy secret-based token is reviewed only for the API server's own
//! audiences, as the real server does.
//! Writes as kube-apiserver checks them: server-side apply (`PATCH` with
//! `application/apply-patch+yaml`, `fieldManager`, `force`) with field
//! ownership per manager (a later apply that omits a field it owned
//! removes it; fields others own stay; a `resourceVersion` in the applied
//! object is a precondition); a Secret's `type` is immutable (422); creates
//! in a namespace being deleted get 403 `NamespaceTerminating`
//! ([`Store::terminate_namespace`]); lists are counted as quorum or cache
//! reads ([`Store::lists`]) and ConfigMap writes in flight are counted
//! ([`Store::max_configmap_writes_in_flight`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// One change, as a watch reports it.
#[derive(Clone)]
struct Change {
    rv: u64,
    collection: String,
    name: String,
    kind: &'static str,
    object: Value,
}

/// A `watch::Sender` with a default (initial value `T::default()`), so
/// [`Store`] derives `Default` and a new field needs only its declaration.
pub struct Signal<T>(tokio::sync::watch::Sender<T>);

impl<T: Default> Default for Signal<T> {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(T::default()).0)
    }
}

impl<T> std::ops::Deref for Signal<T> {
    type Target = tokio::sync::watch::Sender<T>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The server's state: objects by (collection path, name).
#[derive(Default)]
pub struct Store {
    objects: Mutex<BTreeMap<(String, String), Value>>,
    rv: Mutex<u64>,
    changes: Mutex<Vec<Change>>,
    /// Bumped on every change (wakes watch streams).
    tick: Signal<u64>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: Mutex<u64>,
    /// True while watches are cut off.
    partitioned: Signal<bool>,
    /// Watch requests answered with 410 Gone.
    pub gone_served: AtomicUsize,
    /// Answer a watch from a compacted version with the HTTP status 410
    /// itself (as an API server behind some proxies, or an older one,
    /// does) instead of a 200 stream carrying an `ERROR` event.
    pub gone_as_status: std::sync::atomic::AtomicBool,
    /// Watch streams opened.
    pub watches_opened: AtomicUsize,
    /// Writes (create/replace) seen, by collection.
    pub writes: Mutex<Vec<String>>,
    /// SelfSubjectAccessReviews to deny, as "verb resource" (e.g. "list namespaces").
    pub denied: Mutex<Vec<String>>,
    /// Stale writes refused with 409 Conflict.
    pub conflicts: AtomicUsize,
    /// Holds the next PUT to this path back for this long before it is
    /// processed, so a write issued after it lands first (a deterministic
    /// race between two writers).
    pub delay_next_put: Mutex<Option<(String, std::time::Duration)>>,
    /// Tokens TokenReview accepts: token → (namespace, service account).
    pub tokens: Mutex<BTreeMap<String, (String, String)>>,
    /// TokenReviews answered.
    pub token_reviews: AtomicUsize,
    /// Fixed JSON documents by path (OIDC discovery, JWKS).
    pub documents: Mutex<BTreeMap<String, Value>>,
    /// Tokens TokenReview accepts that are bound to a pod: token → (pod
    /// name, pod uid), returned in `status.user.extra`.
    pub token_pods: Mutex<BTreeMap<String, (String, String)>>,
    /// Requests (lists and watches) answered in metadata-only form.
    pub metadata_requests: AtomicUsize,
    /// Requests for pods or service accounts answered with whole objects.
    pub full_pod_or_sa_requests: AtomicUsize,
    /// Paths (prefixes) answered `403 Forbidden`, as without RBAC, with
    /// the real Status body ([`forbidden_status`]).
    pub forbidden: Mutex<Vec<String>>,
    /// The period of BOOKMARK events (None: the real server's ~1 min).
    bookmark_interval: Signal<Option<std::time::Duration>>,
    /// BOOKMARK events sent.
    pub bookmarks_sent: AtomicUsize,
    /// Answer every watch 200 and end its body at once, after the events
    /// already due (none, or the changes since its resourceVersion).
    pub close_watches: std::sync::atomic::AtomicBool,
    /// Watches answered 200 and closed at once (not in `watches_opened`).
    pub watches_closed_at_once: AtomicUsize,
    /// Bumped by [`Store::silence_open_watches`]: a watch opened before
    /// the bump sends nothing more.
    silenced: Signal<u64>,
    /// GETs of a path to accept and never answer: (exact path, how many
    /// more; `usize::MAX`: all).
    pub stall_gets: Mutex<Option<(String, usize)>>,
    /// GETs stalled by [`Store::stall_gets`].
    pub gets_stalled: AtomicUsize,
    /// The data size limit of ConfigMaps and Secrets when set (default:
    /// the real 1 MiB, [`MAX_DATA_SIZE`]).
    pub object_limit: Mutex<Option<usize>>,
    /// Requests accepted and never answered (a stalled connection).
    pub stalled: Mutex<Vec<Match>>,
    /// Requests answered only after this long (an API server under load).
    pub slow: Mutex<Vec<(Match, std::time::Duration)>>,
    /// Requests answered `429 TooManyRequests` with `Retry-After`.
    pub throttled: Mutex<Vec<Throttle>>,
    /// 429s answered.
    pub throttled_served: AtomicUsize,
    /// Clock skew (milliseconds, + = ahead) of the replica using a bearer
    /// token, applied to the times in Lease bodies.
    pub skew: Mutex<BTreeMap<String, i64>>,
    /// Answers for the next requests to `/.well-known/openid-configuration`
    /// (HTTP codes, e.g. 503 or 401, with real Status bodies), one per
    /// request, before it is served normally.
    pub discovery_faults: Mutex<std::collections::VecDeque<u16>>,
    /// Requests to the issuer-discovery paths (`/.well-known/openid-configuration`,
    /// `/openid/v1/jwks`), and those of them without a valid bearer token (401).
    pub discovery_requests: AtomicUsize,
    /// See [`Store::discovery_requests`].
    pub discovery_unauthenticated: AtomicUsize,
    /// Server-side apply's field ownership (a minimal `managedFields`).
    managed: Mutex<Owners>,
    /// List requests, as `quorum PATH` (no resourceVersion: read from etcd)
    /// or `cache PATH` (a resourceVersion: served from the watch cache).
    pub lists: Mutex<Vec<String>>,
    /// Holds every ConfigMap write this long (so concurrency shows).
    pub configmap_write_delay: Mutex<Option<std::time::Duration>>,
    configmap_writes_in_flight: AtomicUsize,
    /// The most ConfigMap writes ever in flight at once.
    pub max_configmap_writes_in_flight: AtomicUsize,
    /// Writes refused 422 because they changed a Secret's `type`.
    pub immutable_type_refusals: AtomicUsize,
    /// Creates refused 403 because their namespace is being deleted.
    pub terminating_refusals: AtomicUsize,
}

/// The client's user, as the API server names it in a denial.
const CLIENT_USER: &str = "system:serviceaccount:meshca:meshca";
/// The bearer token of the kubeconfig [`start`] writes.
const CLIENT_TOKEN: &str = "meshca-sa-token";
/// The API server's own audiences (`--api-audiences`, by default its issuer).
const API_AUDIENCES: [&str; 1] = ["https://kubernetes.default.svc.cluster.local"];

/// The 403 Status a real kube-apiserver sends when RBAC does not allow a
/// request (apiserver `responsewriters.Forbidden` and `apierrors.NewForbidden`):
/// `configmaps is forbidden: User "…" cannot list resource "configmaps" in API
/// group "" in the namespace "x"`, reason `Forbidden`, details `{name?, group?,
/// kind: resource}`; a non-resource path gets `forbidden: User "…" cannot get
/// path "/openid/v1/jwks"`.
pub fn forbidden_status(method: &str, path: &str, watch: bool) -> (u16, Value) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => {
            let verb = method.to_ascii_lowercase();
            let message =
                format!("forbidden: User \"{CLIENT_USER}\" cannot {verb} path \"{path}\"");
            return (403, forbidden_body(message, json!({})));
        }
    };
    let (namespace, resource, name) = match rest {
        ["namespaces", ns, res, name, ..] => (Some(*ns), *res, Some(*name)),
        ["namespaces", ns, res] => (Some(*ns), *res, None),
        ["namespaces", ns] => (Some(*ns), "namespaces", Some(*ns)),
        [res, name, ..] => (None, *res, Some(*name)),
        [res] => (None, *res, None),
        [] => (None, "", None),
    };
    let verb = match (method, name.is_some()) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (m, _) => return (405, forbidden_body(format!("{m} {path}"), json!({}))),
    };
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let qualified = if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    };
    let subject = match name {
        Some(n) => format!("{qualified} \"{n}\""),
        None => qualified,
    };
    let message = format!(
        "{subject} is forbidden: User \"{CLIENT_USER}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
    );
    let mut details = json!({"kind": resource});
    if let Some(n) = name {
        details["name"] = json!(n);
    }
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    (403, forbidden_body(message, details))
}

fn forbidden_body(message: String, details: Value) -> Value {
    let mut v = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": "Forbidden", "code": 403});
    if details.as_object().is_some_and(|d| !d.is_empty()) {
        v["details"] = details;
    }
    v
}

/// Why a TokenReview of a legacy secret-based token fails for `audiences`:
/// the API server grants those tokens only its own audiences
/// (`WrapAudienceAgnosticToken`), so a review asking for any other audience
/// is not authenticated. None: not a legacy token, or an audience it has.
fn legacy_audience_error(token: &str, audiences: &Value) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?,
    )
    .ok()?;
    if claims["iss"] != "kubernetes/serviceaccount" {
        return None;
    }
    let asked: Vec<&str> = audiences
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if asked.is_empty() || asked.iter().any(|a| API_AUDIENCES.contains(a)) {
        return None;
    }
    Some(format!(
        "[invalid bearer token, token audiences {API_AUDIENCES:?} is invalid for the target audiences {asked:?}]"
    ))
}

/// kube-apiserver's limit on a ConfigMap's or Secret's data
/// (`core.MaxSecretSize`).
pub const MAX_DATA_SIZE: usize = 1024 * 1024;

/// The 422 kube-apiserver's validation answers for a ConfigMap or Secret
/// whose data is over `limit` bytes, else None. As `ValidateConfigMap`
/// counts: every key plus its value, `binaryData` values decoded; as
/// `ValidateSecret` counts: the decoded values of `data`.
fn too_large(kind: &str, name: &str, obj: &Value, limit: usize) -> Option<(u16, Value)> {
    use base64::Engine;
    let decoded = |v: &Value| {
        let b64 = v.as_str().unwrap_or_default();
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_or(b64.len(), |b| b.len())
    };
    let entries = |field: &str| -> Vec<(String, Value)> {
        obj[field]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let (size, field) = match kind {
        "ConfigMap" => {
            let text: usize = entries("data")
                .iter()
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum();
            let binary: usize = entries("binaryData")
                .iter()
                .map(|(k, v)| k.len() + decoded(v))
                .sum();
            (text + binary, "[]")
        }
        "Secret" => (
            entries("data").iter().map(|(_, v)| decoded(v)).sum(),
            "data",
        ),
        _ => return None,
    };
    if size <= limit {
        return None;
    }
    let msg = format!("Too long: must have at most {limit} bytes");
    Some((
        422,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{kind} \"{name}\" is invalid: {field}: {msg}"),
               "reason": "Invalid",
               "details": {"name": name, "kind": kind,
                           "causes": [{"reason": "FieldValueTooLong", "message": msg, "field": field}]},
               "code": 422}),
    ))
}

/// Which requests a fault applies to; `None` matches any.
#[derive(Debug, Clone, Default)]
pub struct Match {
    /// The bearer token (one replica's credentials).
    pub token: Option<String>,
    /// The HTTP method (`GET`, `PUT`, ...).
    pub method: Option<String>,
    /// A path prefix.
    pub prefix: String,
}

impl Match {
    /// Requests from the replica holding `token` under `prefix`.
    pub fn from(token: &str, prefix: &str) -> Self {
        Match {
            token: Some(token.into()),
            method: None,
            prefix: prefix.into(),
        }
    }

    /// Only requests with this method.
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.into());
        self
    }

    fn matches(&self, token: Option<&str>, method: &str, path: &str) -> bool {
        self.token.as_deref().is_none_or(|t| Some(t) == token)
            && self.method.as_deref().is_none_or(|m| m == method)
            && path.starts_with(&self.prefix)
    }
}

/// Answer `count` matching requests with 429 and `Retry-After: secs`.
#[derive(Debug, Clone)]
pub struct Throttle {
    /// The requests.
    pub on: Match,
    /// How many more to refuse (`usize::MAX`: until removed).
    pub count: usize,
    /// The `Retry-After` (and `details.retryAfterSeconds`) to send.
    pub retry_after: u64,
}

/// The bearer token of a request.
fn bearer(req: &hyper::Request<hyper::body::Incoming>) -> Option<String> {
    let v = req.headers().get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_string)
}

/// The real server's 429 (k8s.io/apiserver filters: max-in-flight and API
/// Priority and Fairness answer exactly this).
fn too_many_requests(retry_after: u64) -> hyper::Response<super::Body> {
    use http_body_util::BodyExt;
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "Too many requests, please try again later.", "reason": "TooManyRequests",
        "details": {"retryAfterSeconds": retry_after}, "code": 429});
    hyper::Response::builder()
        .status(429)
        .header("content-type", "application/json")
        .header("retry-after", retry_after.to_string())
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body.to_string())).boxed())
        .unwrap()
}

/// Shifts the MicroTime fields of a Lease (or of each Lease in a list) by
/// `ms`: what a replica whose clock is off by `ms` writes (+) and, when
/// comparing what it reads with its own clock, perceives (-).
fn shift_lease_times(v: &mut Value, ms: i64) {
    if let Some(items) = v["items"].as_array_mut() {
        items.iter_mut().for_each(|i| shift_lease_times(i, ms));
        return;
    }
    for field in ["renewTime", "acquireTime"] {
        let t = &mut v["spec"][field];
        let Some(parsed) = t
            .as_str()
            .and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok())
        else {
            continue;
        };
        let shifted = parsed + k8s_openapi::jiff::SignedDuration::from_millis(ms);
        *t = json!(shifted.to_string());
    }
}

/// A copy of kubeconfig `kc` (from [`start`]) that authenticates with
/// `token`: a second replica the fake can tell apart (faults, skew).
pub fn kubeconfig_for(kc: &std::path::Path, token: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(kc).unwrap();
    let out = kc.with_file_name(format!("kubeconfig-{token}"));
    std::fs::write(
        &out,
        text.replace("token: meshca-sa-token", &format!("token: {token}")),
    )
    .unwrap();
    out
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Whether a watch on `watched` sees changes in `collection`: the same
/// collection, or the cluster-wide form (`/api/v1/configmaps`) of a
/// namespaced one.
fn covers(watched: &str, collection: &str) -> bool {
    if watched == collection {
        return true;
    }
    match watched.strip_prefix("/api/v1/") {
        Some(res) if !res.contains('/') && res != "namespaces" => {
            collection.starts_with("/api/v1/namespaces/")
                && collection.ends_with(&format!("/{res}"))
        }
        _ => false,
    }
}

/// The name a `fieldSelector=metadata.name=X` asks for.
fn name_selector(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k != "fieldSelector" {
            return None;
        }
        let v = v.replace("%3D", "=").replace("%3d", "=");
        v.strip_prefix("metadata.name=").map(str::to_string)
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based `labelSelector` (`k=v,k2=v2`).
fn label_selector(query: &str) -> Vec<(String, String)> {
    query_param(query, "labelSelector")
        .map(percent_decode)
        .map(|sel| {
            sel.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn labels_match(obj: &Value, sel: &[(String, String)]) -> bool {
    sel.iter()
        .all(|(k, v)| obj["metadata"]["labels"][k].as_str() == Some(v.as_str()))
}

/// The metadata-only form of an object, as the API server sends it for
/// `Accept: application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1`.
fn partial(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
           "metadata": object["metadata"].clone()})
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
    })
}

/// What a watch request asks for.
struct WatchRequest {
    collection: String,
    name: Option<String>,
    labels: Vec<(String, String)>,
    from: Option<u64>,
    metadata_only: bool,
    /// `allowWatchBookmarks=true`.
    bookmarks: bool,
}

/// A BOOKMARK event at `rv`, as kube-apiserver sends it: an object of the
/// watched kind carrying only `metadata.resourceVersion` (the
/// `k8s.io/initial-events-end` annotation marks only the end of a
/// `sendInitialEvents` stream, which meshca does not ask for).
fn bookmark(w: &WatchRequest, rv: u64) -> hyper::body::Bytes {
    let (api_version, kind) = if w.metadata_only {
        ("meta.k8s.io/v1", "PartialObjectMetadata")
    } else {
        let kind = match w.collection.rsplit('/').next().unwrap_or_default() {
            "secrets" => "Secret",
            "configmaps" => "ConfigMap",
            "namespaces" => "Namespace",
            "pods" => "Pod",
            "serviceaccounts" => "ServiceAccount",
            "leases" => "Lease",
            _ => "Unknown",
        };
        let v = if kind == "Lease" {
            "coordination.k8s.io/v1"
        } else {
            "v1"
        };
        (v, kind)
    };
    let object = json!({"kind": kind, "apiVersion": api_version,
                        "metadata": {"resourceVersion": rv.to_string()}});
    hyper::body::Bytes::from(format!(
        "{}\n",
        json!({"type": "BOOKMARK", "object": object})
    ))
}

impl Store {
    /// The 422 for a ConfigMap or Secret over the data limit (see [`too_large`]).
    fn check_size(&self, kind: &str, name: &str, obj: &Value) -> Option<(u16, Value)> {
        let limit = self.object_limit.lock().unwrap().unwrap_or(MAX_DATA_SIZE);
        too_large(kind, name, obj, limit)
    }

    fn next_rv(&self) -> String {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        rv.to_string()
    }

    /// Records a change for watchers (the object carries its new version).
    fn record(&self, collection: &str, name: &str, kind: &'static str, object: &Value) {
        let rv: u64 = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        self.changes.lock().unwrap().push(Change {
            rv,
            collection: collection.into(),
            name: name.into(),
            kind,
            object: object.clone(),
        });
        self.tick.send_replace(rv);
    }

    /// Forgets history: watches from any version before now get 410 Gone.
    pub fn compact(&self) {
        let now = *self.rv.lock().unwrap();
        *self.compacted.lock().unwrap() = now;
        self.changes.lock().unwrap().retain(|c| c.rv > now);
    }

    /// Drops every open watch and holds new ones until [`Store::heal`].
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Adds (or replaces) a pod with a spec, bumping its resourceVersion.
    pub fn add_pod(&self, ns: &str, name: &str, uid: &str) {
        self.put(
            &format!("/api/v1/namespaces/{ns}/pods"),
            name,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": ns, "uid": uid},
                   "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "example/app:1", "env": [{"name": "BIG", "value": "x".repeat(2048)}]}]}}),
        );
    }

    /// Adds (or replaces) a service account.
    pub fn add_service_account(&self, ns: &str, name: &str, uid: &str) {
        self.put(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            name,
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": name, "namespace": ns, "uid": uid}}),
        );
    }

    /// Lets held watches proceed.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }

    /// Sends BOOKMARK events every `every` on watches that allow them
    /// (also re-times the watches already open).
    pub fn set_bookmark_interval(&self, every: std::time::Duration) {
        self.bookmark_interval.send_replace(Some(every));
    }

    /// Every watch open now sends nothing more (no event, no bookmark),
    /// and its connection stays open: what a client sees when the server
    /// or a NAT on the way lost the connection without a FIN or RST.
    /// Watches opened afterwards are served normally.
    pub fn silence_open_watches(&self) {
        self.silenced.send_modify(|e| *e += 1);
    }

    /// Holds one request forever if it is a GET [`Store::stall_gets`]
    /// names (the real server, or the network, accepting and never
    /// answering).
    async fn maybe_stall(&self, method: &str, path: &str) {
        {
            let mut stall = self.stall_gets.lock().unwrap();
            match stall.as_mut() {
                Some((p, n)) if method == "GET" && p == path && *n > 0 => {
                    if *n != usize::MAX {
                        *n -= 1;
                    }
                }
                _ => return,
            }
        }
        self.gets_stalled.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }

    /// Serves the API server's service-account issuer discovery:
    /// `/.well-known/openid-configuration` naming `issuer`, and `jwks` at
    /// `/openid/v1/jwks`.
    pub fn publish_oidc(&self, issuer: &str, jwks: &str) {
        let mut docs = self.documents.lock().unwrap();
        docs.insert(
            "/.well-known/openid-configuration".into(),
            json!({"issuer": issuer, "jwks_uri": "https://10.0.0.1:6443/openid/v1/jwks"}),
        );
        docs.insert(
            "/openid/v1/jwks".into(),
            serde_json::from_str(jwks).unwrap(),
        );
    }

    /// Adds a namespace with labels.
    pub fn add_namespace(&self, name: &str, labels: Value) {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels, "resourceVersion": self.next_rv()}});
        self.objects
            .lock()
            .unwrap()
            .insert(("/api/v1/namespaces".into(), name.into()), obj.clone());
        self.record("/api/v1/namespaces", name, "ADDED", &obj);
    }

    /// An object, if present.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.objects
            .lock()
            .unwrap()
            .get(&(collection.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object in a collection.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.objects
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Deletes an object directly (as another client would).
    pub fn remove(&self, collection: &str, name: &str) -> Option<Value> {
        let mut v = self
            .objects
            .lock()
            .unwrap()
            .remove(&(collection.to_string(), name.to_string()))?;
        self.managed
            .lock()
            .unwrap()
            .remove(&(collection.to_string(), name.to_string()));
        v["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.record(collection, name, "DELETED", &v);
        Some(v)
    }

    /// Overwrites an object directly, bumping its resourceVersion.
    pub fn put(&self, collection: &str, name: &str, mut obj: Value) {
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        let old = self
            .objects
            .lock()
            .unwrap()
            .insert((collection.to_string(), name.to_string()), obj.clone());
        self.took_over(collection, name, old.as_ref(), &obj);
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        self.record(collection, name, kind, &obj);
    }

    /// Serves a watch on `collection` from resourceVersion `from` as
    /// newline-delimited JSON events into `tx`, until the client goes away
    /// or the store is partitioned; with `bookmarks`, a BOOKMARK event
    /// every [`Store::set_bookmark_interval`].
    async fn serve_watch(
        self: Arc<Self>,
        w: WatchRequest,
        tx: tokio::sync::mpsc::Sender<hyper::body::Bytes>,
    ) {
        let mut partitioned = self.partitioned.subscribe();
        while *partitioned.borrow_and_update() {
            if partitioned.changed().await.is_err() {
                return;
            }
        }
        let mut silenced = self.silenced.subscribe();
        let epoch = *silenced.borrow_and_update();
        let close_at_once = self.close_watches.load(Ordering::SeqCst);
        let opened = if close_at_once {
            &self.watches_closed_at_once
        } else {
            &self.watches_opened
        };
        opened.fetch_add(1, Ordering::SeqCst);
        let metadata_only = w.metadata_only;
        let line = |kind: &str, object: &Value| {
            let object = if metadata_only && kind != "ERROR" {
                partial(object)
            } else {
                object.clone()
            };
            hyper::body::Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
        };
        let now = *self.rv.lock().unwrap();
        let mut last = w.from.filter(|v| *v != 0).unwrap_or(now);
        if last < *self.compacted.lock().unwrap() {
            self.gone_served.fetch_add(1, Ordering::SeqCst);
            let (_, st) = status(
                410,
                "Expired",
                format!("too old resource version: {last} ({now})"),
            );
            let _ = tx.send(line("ERROR", &st)).await;
            return;
        }
        let mut tick = self.tick.subscribe();
        let mut every = self.bookmark_interval.subscribe();
        let period =
            |e: &Option<std::time::Duration>| e.unwrap_or(std::time::Duration::from_secs(60));
        let mut next_bookmark = tokio::time::Instant::now() + period(&every.borrow_and_update());
        loop {
            tick.borrow_and_update();
            // A cut-off server sends nothing more, even for changes made
            // after the cut that woke this loop before the cut did.
            if *partitioned.borrow() {
                return;
            }
            if *silenced.borrow_and_update() != epoch {
                // Silent: the connection stays open, nothing arrives.
                tx.closed().await;
                return;
            }
            let (due, head) = self.due(&w, last);
            for c in due {
                last = c.rv;
                if tx.send(line(c.kind, &c.object)).await.is_err() {
                    return;
                }
            }
            if close_at_once {
                return;
            }
            tokio::select! {
                r = tick.changed() => if r.is_err() { return },
                r = partitioned.changed() => if r.is_err() || *partitioned.borrow() { return },
                _ = silenced.changed() => {}
                _ = every.changed() => {
                    next_bookmark = tokio::time::Instant::now() + period(&every.borrow_and_update());
                }
                _ = tokio::time::sleep_until(next_bookmark), if w.bookmarks => {
                    next_bookmark += period(&every.borrow());
                    // Everything up to the version scanned last was sent.
                    last = last.max(head);
                    if tx.send(bookmark(&w, last)).await.is_err() {
                        return;
                    }
                    self.bookmarks_sent.fetch_add(1, Ordering::SeqCst);
                }
                _ = tx.closed() => return,
            }
        }
    }

    /// The changes a watch has not seen after `last`, and the newest
    /// version recorded when they were collected.
    fn due(&self, w: &WatchRequest, last: u64) -> (Vec<Change>, u64) {
        let changes = self.changes.lock().unwrap();
        let head = changes.iter().map(|c| c.rv).max().unwrap_or(last);
        let due = changes
            .iter()
            .filter(|c| c.rv > last && covers(&w.collection, &c.collection))
            .filter(|c| w.name.as_ref().is_none_or(|n| *n == c.name))
            .filter(|c| labels_match(&c.object, &w.labels))
            .cloned()
            .collect();
        (due, head)
    }

    /// With [`Store::gone_as_status`]: once not partitioned, a watch from
    /// a compacted version gets the HTTP status 410.
    async fn gone_response(&self, from: Option<u64>) -> Option<hyper::Response<super::Body>> {
        let mut partitioned = self.partitioned.subscribe();
        while *partitioned.borrow_and_update() {
            if partitioned.changed().await.is_err() {
                break;
            }
        }
        let now = *self.rv.lock().unwrap();
        let last = from.filter(|v| *v != 0).unwrap_or(now);
        if last >= *self.compacted.lock().unwrap() {
            return None;
        }
        self.gone_served.fetch_add(1, Ordering::SeqCst);
        let (code, st) = status(
            410,
            "Expired",
            format!("too old resource version: {last} ({now})"),
        );
        Some(super::json_response(code, &st))
    }

    /// A stall (never answers) or a 429 for this request, if one applies.
    async fn fault(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
    ) -> Option<hyper::Response<super::Body>> {
        let stalled = (self.stalled.lock().unwrap().iter()).any(|m| m.matches(token, method, path));
        if stalled {
            // Accepted, then silence: the client must give up by itself.
            std::future::pending::<()>().await;
        }
        let slow = (self.slow.lock().unwrap().iter())
            .find(|(m, _)| m.matches(token, method, path))
            .map(|(_, d)| *d);
        if let Some(d) = slow {
            tokio::time::sleep(d).await;
        }
        let mut throttled = self.throttled.lock().unwrap();
        let t = throttled
            .iter_mut()
            .find(|t| t.count > 0 && t.on.matches(token, method, path))?;
        t.count = t.count.saturating_sub(1);
        self.throttled_served.fetch_add(1, Ordering::SeqCst);
        Some(too_many_requests(t.retry_after))
    }

    /// The skew of the replica using `token`, for Lease paths.
    fn skew_of(&self, token: Option<&str>, path: &str) -> Option<i64> {
        if !path.starts_with("/apis/coordination.k8s.io/") {
            return None;
        }
        self.skew.lock().unwrap().get(token?).copied()
    }

    /// The service-account issuer discovery paths as the real server guards
    /// them: 401 without a valid bearer token (anonymous requests are not
    /// granted `system:service-account-issuer-discovery` by default), and
    /// the queued [`Store::discovery_faults`]. None: serve the request.
    fn discovery_gate(
        &self,
        req: &hyper::Request<hyper::body::Incoming>,
        path: &str,
    ) -> Option<hyper::Response<super::Body>> {
        const PATHS: [&str; 2] = ["/.well-known/openid-configuration", "/openid/v1/jwks"];
        if !PATHS.contains(&path) {
            return None;
        }
        self.discovery_requests.fetch_add(1, Ordering::SeqCst);
        let bearer = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let known = bearer
            .is_some_and(|t| t == CLIENT_TOKEN || self.tokens.lock().unwrap().contains_key(t));
        if !known {
            self.discovery_unauthenticated
                .fetch_add(1, Ordering::SeqCst);
            let (code, st) = status(401, "Unauthorized", "Unauthorized".into());
            return Some(super::json_response(code, &st));
        }
        if path != PATHS[0] {
            return None;
        }
        let fault = self.discovery_faults.lock().unwrap().pop_front()?;
        let (code, st) = match fault {
            401 => status(401, "Unauthorized", "Unauthorized".into()),
            503 => status(503, "ServiceUnavailable", "the server is currently unable to handle the request".into()),
            c => status(c, "InternalError", format!("an error on the server (\"\") has prevented the request from succeeding (HTTP {c})")),
        };
        Some(super::json_response(code, &st))
    }

    /// Answers one HTTP request: a watch stream, or [`Store::handle`].
    async fn respond(
        self: Arc<Self>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<super::Body> {
        use http_body_util::{BodyExt, StreamBody};
        let uri = req.uri().to_string();
        let method = req.method().to_string();
        let (path, query) = uri.split_once('?').unwrap_or((&uri, ""));
        let metadata_only = req
            .headers()
            .get("accept")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
        let token = bearer(&req);
        if let Some(r) = self.fault(token.as_deref(), &method, path).await {
            return r;
        }
        let skew = self.skew_of(token.as_deref(), path);
        if let Some(refused) = self.discovery_gate(&req, path) {
            return refused;
        }
        if self
            .forbidden
            .lock()
            .unwrap()
            .iter()
            .any(|p| path.starts_with(p.as_str()))
        {
            let watch = query_param(query, "watch") == Some("true");
            let (code, st) = forbidden_status(&method, path, watch);
            return super::json_response(code, &st);
        }
        self.maybe_stall(&method, path).await;
        if path.ends_with("/pods") || path.ends_with("/serviceaccounts") {
            let counter = if metadata_only {
                &self.metadata_requests
            } else {
                &self.full_pod_or_sa_requests
            };
            counter.fetch_add(1, Ordering::SeqCst);
        }
        if method == "GET" && query_param(query, "watch") == Some("true") {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let from = query_param(query, "resourceVersion").and_then(|v| v.parse().ok());
            if self.gone_as_status.load(Ordering::SeqCst) {
                if let Some(gone) = self.gone_response(from).await {
                    return gone;
                }
            }
            let w = WatchRequest {
                collection: path.to_string(),
                name: name_selector(query),
                labels: label_selector(query),
                from,
                metadata_only,
                bookmarks: query_param(query, "allowWatchBookmarks") == Some("true"),
            };
            tokio::spawn(self.clone().serve_watch(w, tx));
            let body = StreamBody::new(tokio_stream::StreamExt::map(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                |b| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(b)),
            ));
            return hyper::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(body.boxed())
                .unwrap();
        }
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let delay = {
            let mut d = self.delay_next_put.lock().unwrap();
            match d.as_ref() {
                Some((p, _)) if method == "PUT" && p == path => d.take().map(|(_, t)| t),
                _ => None,
            }
        };
        if let Some(t) = delay {
            // The fake API server's configured response delay (a slow API server).
            tokio::time::sleep(t).await;
        }
        let body = match skew {
            Some(ms) => match serde_json::from_slice::<Value>(&body) {
                Ok(mut v) => {
                    shift_lease_times(&mut v, ms);
                    hyper::body::Bytes::from(v.to_string())
                }
                Err(_) => body,
            },
            None => body,
        };
        let counted = self.configmap_write_begins(&method, path).await;
        let (status, mut out) = if method == "PATCH" {
            self.patch(&uri, &content_type, &body)
        } else {
            self.handle(&method, &uri, &body)
        };
        self.configmap_write_ends(counted);
        if let Some(ms) = skew {
            shift_lease_times(&mut out, -ms);
        }
        if metadata_only && status == 200 {
            out = match out["items"].as_array() {
                Some(items) => {
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                    "metadata": out["metadata"].clone(),
                    "items": items.iter().map(partial).collect::<Vec<_>>()})
                }
                None => partial(&out),
            };
        }
        super::json_response(status, &out)
    }

    /// Handles one request.
    pub fn handle(&self, method: &str, uri: &str, body: &[u8]) -> (u16, Value) {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let name_filter = name_selector(query);
        let labels = label_selector(query);
        if method == "POST" && path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
            let mut review: Value = serde_json::from_slice(body).unwrap_or_default();
            let ra = &review["spec"]["resourceAttributes"];
            let nra = &review["spec"]["nonResourceAttributes"];
            let asked = if nra.is_object() {
                format!("{} ", nra["verb"].as_str().unwrap_or(""))
            } else {
                format!(
                    "{} {}",
                    ra["verb"].as_str().unwrap_or(""),
                    ra["resource"].as_str().unwrap_or("")
                )
            };
            let denied = self.denied.lock().unwrap().contains(&asked);
            // RBAC gives no opinion (and no reason) when no rule matches:
            // a real denial is `allowed: false` with an empty reason.
            review["status"] = if denied {
                json!({"allowed": false})
            } else {
                json!({"allowed": true})
            };
            review["apiVersion"] = json!("authorization.k8s.io/v1");
            review["kind"] = json!("SelfSubjectAccessReview");
            return (201, review);
        }
        if method == "POST" && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            self.token_reviews.fetch_add(1, Ordering::SeqCst);
            let review: Value = serde_json::from_slice(body).unwrap_or_default();
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            let auds = review["spec"]["audiences"].clone();
            let pod = self.token_pods.lock().unwrap().get(token).cloned();
            let legacy_refusal = legacy_audience_error(token, &auds);
            let status = match self.tokens.lock().unwrap().get(token) {
                Some(_) if legacy_refusal.is_some() => {
                    json!({"authenticated": false, "error": legacy_refusal})
                }
                Some((ns, sa)) => json!({
                    "authenticated": true,
                    "audiences": auds,
                    "user": {
                        "username": format!("system:serviceaccount:{ns}:{sa}"),
                        "uid": format!("uid-{ns}-{sa}"),
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                        "extra": match pod {
                            Some((name, uid)) => json!({
                                "authentication.kubernetes.io/pod-name": [name],
                                "authentication.kubernetes.io/pod-uid": [uid],
                            }),
                            None => json!({}),
                        },
                    }
                }),
                None => json!({"authenticated": false, "error": "[invalid bearer token]"}),
            };
            return (
                201,
                json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                       "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status}),
            );
        }
        if method == "GET" {
            if let Some(doc) = self.documents.lock().unwrap().get(path) {
                return (200, doc.clone());
            }
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        // (collection path, optional name, kind)
        let (collection, name, kind, list_kind) = match segs.as_slice() {
            ["api", "v1", res @ ("configmaps" | "secrets")] => (
                format!("/api/v1/{res}"),
                None,
                if *res == "secrets" {
                    "Secret"
                } else {
                    "ConfigMap"
                },
                if *res == "secrets" {
                    "SecretList"
                } else {
                    "ConfigMapList"
                },
            ),
            ["api", "v1", res @ ("pods" | "serviceaccounts")] => (
                format!("/api/v1/{res}"),
                None,
                if *res == "pods" {
                    "Pod"
                } else {
                    "ServiceAccount"
                },
                if *res == "pods" {
                    "PodList"
                } else {
                    "ServiceAccountList"
                },
            ),
            ["api", "v1", "namespaces", ns, res @ ("pods" | "serviceaccounts")] => (
                format!("/api/v1/namespaces/{ns}/{res}"),
                None,
                if *res == "pods" {
                    "Pod"
                } else {
                    "ServiceAccount"
                },
                if *res == "pods" {
                    "PodList"
                } else {
                    "ServiceAccountList"
                },
            ),
            ["api", "v1", "namespaces", ns, res @ ("pods" | "serviceaccounts"), n] => (
                format!("/api/v1/namespaces/{ns}/{res}"),
                Some(*n),
                if *res == "pods" {
                    "Pod"
                } else {
                    "ServiceAccount"
                },
                "",
            ),
            ["api", "v1", "namespaces"] => (
                "/api/v1/namespaces".to_string(),
                None,
                "Namespace",
                "NamespaceList",
            ),
            ["api", "v1", "namespaces", ns, "configmaps"] => (
                format!("/api/v1/namespaces/{ns}/configmaps"),
                None,
                "ConfigMap",
                "ConfigMapList",
            ),
            ["api", "v1", "namespaces", ns, "configmaps", n] => (
                format!("/api/v1/namespaces/{ns}/configmaps"),
                Some(*n),
                "ConfigMap",
                "",
            ),
            ["api", "v1", "namespaces", ns, "secrets"] => (
                format!("/api/v1/namespaces/{ns}/secrets"),
                None,
                "Secret",
                "SecretList",
            ),
            ["api", "v1", "namespaces", ns, "secrets", n] => (
                format!("/api/v1/namespaces/{ns}/secrets"),
                Some(*n),
                "Secret",
                "",
            ),
            ["api", "v1", "namespaces", ns, "events"] => (
                format!("/api/v1/namespaces/{ns}/events"),
                None,
                "Event",
                "EventList",
            ),
            ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"] => (
                format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
                None,
                "Lease",
                "LeaseList",
            ),
            ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", n] => (
                format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
                Some(*n),
                "Lease",
                "",
            ),
            _ => {
                return status(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource {path}"),
                )
            }
        };
        let api_version = if kind == "Lease" {
            "coordination.k8s.io/v1"
        } else {
            "v1"
        };
        let mut objects = self.objects.lock().unwrap();
        match (method, name) {
            ("GET", None) => {
                self.count_list(&collection, query);
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|((c, n), v)| {
                        covers(&collection, c)
                            && name_filter.as_ref().is_none_or(|f| f == n)
                            && labels_match(v, &labels)
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": api_version, "kind": list_kind,
                    "metadata": {"resourceVersion": self.rv.lock().unwrap().to_string()}, "items": items}),
                )
            }
            ("GET", Some(n)) => match objects.get(&(collection.clone(), n.to_string())) {
                Some(v) => (200, v.clone()),
                None => status(404, "NotFound", format!("{kind} \"{n}\" not found")),
            },
            ("POST", None) => {
                let mut obj: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return status(400, "BadRequest", e.to_string()),
                };
                let mut n = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                // generateName: the server picks a unique suffix.
                if n.is_empty() {
                    if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
                        n = format!("{prefix}{}", self.next_rv());
                        obj["metadata"]["name"] = json!(n);
                    }
                }
                if n.is_empty() {
                    return status(
                        422,
                        "Invalid",
                        format!("{kind} is invalid: metadata.name: Required value"),
                    );
                }
                if objects.contains_key(&(collection.clone(), n.clone())) {
                    return status(
                        409,
                        "AlreadyExists",
                        format!("{kind} \"{n}\" already exists"),
                    );
                }
                if let Some(refused) = self.check_size(kind, &n, &obj) {
                    return refused;
                }
                if let Some(refusal) = self.refuse_if_terminating(&objects, &collection, &n) {
                    return refusal;
                }
                if kind == "Secret" && obj["type"].is_null() {
                    obj["type"] = json!("Opaque");
                }
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                obj["metadata"]["uid"] = json!(format!("uid-{n}"));
                obj["apiVersion"] = json!(api_version);
                obj["kind"] = json!(kind);
                objects.insert((collection.clone(), n.clone()), obj.clone());
                self.took_over(&collection, &n, None, &obj);
                self.record(&collection, &n, "ADDED", &obj);
                self.writes
                    .lock()
                    .unwrap()
                    .push(format!("create {collection}"));
                (201, obj)
            }
            ("PUT", Some(n)) => {
                let mut obj: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return status(400, "BadRequest", e.to_string()),
                };
                let Some(cur) = objects.get(&(collection.clone(), n.to_string())) else {
                    return status(404, "NotFound", format!("{kind} \"{n}\" not found"));
                };
                if let Some(refused) = self.check_size(kind, n, &obj) {
                    return refused;
                }
                let given = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string);
                if let Some(g) = given {
                    if Some(g.as_str()) != cur["metadata"]["resourceVersion"].as_str() {
                        self.conflicts.fetch_add(1, Ordering::SeqCst);
                        return status(409, "Conflict", format!(
                            "Operation cannot be fulfilled on {kind} \"{n}\": the object has been modified; please apply your changes to the latest version and try again"));
                    }
                }
                if kind == "Secret" && secret_type(&obj) != secret_type(cur) {
                    self.immutable_type_refusals.fetch_add(1, Ordering::SeqCst);
                    return immutable_type(n, secret_type(&obj));
                }
                let old = cur.clone();
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                obj["apiVersion"] = json!(api_version);
                obj["kind"] = json!(kind);
                objects.insert((collection.clone(), n.to_string()), obj.clone());
                self.took_over(&collection, n, Some(&old), &obj);
                self.record(&collection, n, "MODIFIED", &obj);
                self.writes
                    .lock()
                    .unwrap()
                    .push(format!("replace {collection}"));
                (200, obj)
            }
            ("DELETE", Some(n))
                if delete_precondition_fails(
                    body,
                    objects.get(&(collection.clone(), n.to_string())),
                ) =>
            {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
                status(409, "Conflict", format!(
                    "Operation cannot be fulfilled on {kind} \"{n}\": the ResourceVersion in the precondition does not match the ResourceVersion in record. The object might have been modified"))
            }
            ("DELETE", Some(n)) => match objects.remove(&(collection.clone(), n.to_string())) {
                Some(mut v) => {
                    self.managed
                        .lock()
                        .unwrap()
                        .remove(&(collection.clone(), n.to_string()));
                    v["metadata"]["resourceVersion"] = json!(self.next_rv());
                    self.record(&collection, n, "DELETED", &v);
                    (200, v)
                }
                None => status(404, "NotFound", format!("{kind} \"{n}\" not found")),
            },
            _ => status(405, "MethodNotAllowed", format!("{method} {path}")),
        }
    }
}

/// Starts the fake API server; returns the store and a kubeconfig for it.
pub async fn start(dir: &std::path::Path) -> (Arc<Store>, std::path::PathBuf) {
    use base64::Engine;
    let store = Arc::new(Store::default());
    let s = store.clone();
    let (addr, ca_pem) =
        super::https_server(Arc::new(move |req| Box::pin(s.clone().respond(req)))).await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {b64}\nusers:\n- name: meshca\n  user:\n    token: meshca-sa-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: meshca\ncurrent-context: test\n",
        addr.port()
    );
    let p = dir.join("kubeconfig");
    std::fs::write(&p, text).unwrap();
    (store, p)
}

// ---- Writes as kube-apiserver checks them: server-side apply with field
// ownership, the immutable Secret `type`, namespaces being deleted, and
// read/write accounting (issue 13, defects 5-7).

/// Per object (collection, name), per field manager, the leaf fields it owns.
type Owners = BTreeMap<(String, String), BTreeMap<String, std::collections::BTreeSet<Field>>>;
/// A leaf field's path (`["data", "ca.crt"]`).
type Field = Vec<String>;
/// The manager the fake books non-apply writes (create, update, `put`) to.
const UPDATER: &str = "(update)";

/// The leaf fields of `v`: map keys are fields of their own (labels,
/// annotations, data keys are granular, as in the real schema); lists and
/// scalars are atomic. Identity and server-set metadata are not fields.
fn leaves(v: &Value) -> std::collections::BTreeSet<Field> {
    fn walk(v: &Value, path: &mut Field, out: &mut std::collections::BTreeSet<Field>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, x) in m {
                    path.push(k.clone());
                    walk(x, path, out);
                    path.pop();
                }
            }
            _ => {
                out.insert(path.clone());
            }
        }
    }
    const SKIP: [&str; 8] = [
        "name",
        "namespace",
        "resourceVersion",
        "uid",
        "creationTimestamp",
        "managedFields",
        "generation",
        "deletionTimestamp",
    ];
    let mut out = std::collections::BTreeSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out.retain(|f| {
        !(f.len() == 1 && (f[0] == "apiVersion" || f[0] == "kind" || f[0] == "status"))
            && !(f.len() == 2 && f[0] == "metadata" && SKIP.contains(&f[1].as_str()))
    });
    out
}

fn field_at<'a>(v: &'a Value, f: &[String]) -> Option<&'a Value> {
    f.iter().try_fold(v, |v, k| v.get(k))
}

fn set_field(v: &mut Value, f: &[String], x: Value) {
    let mut cur = v;
    for k in f {
        if !cur.is_object() {
            *cur = json!({});
        }
        cur = cur
            .as_object_mut()
            .unwrap()
            .entry(k.clone())
            .or_insert(Value::Null);
    }
    *cur = x;
}

/// Removes a field, and the maps it leaves empty.
fn remove_field(v: &mut Value, f: &[String]) {
    let Some((last, parents)) = f.split_last() else {
        return;
    };
    if let Some(Value::Object(m)) = field_at_mut(v, parents) {
        m.remove(last);
        if m.is_empty() && !parents.is_empty() {
            remove_field(v, parents);
        }
    }
}

fn field_at_mut<'a>(v: &'a mut Value, f: &[String]) -> Option<&'a mut Value> {
    f.iter().try_fold(v, |v, k| v.get_mut(k))
}

/// `/api/v1/namespaces/NS/...` → NS.
fn namespace_of(collection: &str) -> Option<&str> {
    let mut segs = collection.split('/');
    segs.find(|s| *s == "namespaces")?;
    segs.next().filter(|s| !s.is_empty())
}

/// A Secret's type as the server stores it (defaulted to `Opaque`).
fn secret_type(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("Opaque")
}

/// kube-apiserver's answer to a change of an immutable Secret `type`.
fn immutable_type(name: &str, wanted: &str) -> (u16, Value) {
    let (code, mut st) = status(
        422,
        "Invalid",
        format!(
            "Secret \"{name}\" is invalid: type: Invalid value: \"{wanted}\": field is immutable"
        ),
    );
    st["details"] = json!({"name": name, "kind": "Secret", "causes": [
        {"reason": "FieldValueInvalid", "message": format!("Invalid value: \"{wanted}\": field is immutable"), "field": "type"}]});
    (code, st)
}

impl Store {
    /// Marks namespace `name` as being deleted (`deletionTimestamp` set,
    /// `status.phase` Terminating), as `kubectl delete namespace` does
    /// while finalizers run; watchers see a MODIFIED event.
    pub fn terminate_namespace(&self, name: &str) {
        let key = ("/api/v1/namespaces".to_string(), name.to_string());
        let mut obj = self.objects.lock().unwrap().get(&key).cloned().unwrap();
        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        obj["status"] = json!({"phase": "Terminating"});
        self.put("/api/v1/namespaces", name, obj);
    }

    /// kube-apiserver's NamespaceLifecycle admission: no new object in a
    /// namespace being deleted (`resource` is the plural, e.g. `configmaps`).
    fn refuse_if_terminating(
        &self,
        objects: &BTreeMap<(String, String), Value>,
        collection: &str,
        name: &str,
    ) -> Option<(u16, Value)> {
        let ns = namespace_of(collection)?;
        let nso = objects.get(&("/api/v1/namespaces".to_string(), ns.to_string()))?;
        if nso["status"]["phase"] != "Terminating" {
            return None;
        }
        self.terminating_refusals.fetch_add(1, Ordering::SeqCst);
        let resource = collection.rsplit('/').next().unwrap_or_default();
        let (code, mut st) = status(
            403,
            "Forbidden",
            format!("{resource} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated"),
        );
        st["details"] = json!({"name": name, "kind": resource, "causes": [
            {"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]});
        Some((code, st))
    }

    /// A non-apply write (create, update, [`Store::put`]) owns what it
    /// changed: appliers lose those fields (they stay, owned by the writer).
    fn took_over(&self, collection: &str, name: &str, old: Option<&Value>, new: &Value) {
        let mut managed = self.managed.lock().unwrap();
        let owners = managed
            .entry((collection.to_string(), name.to_string()))
            .or_default();
        let new_leaves = leaves(new);
        let changed: Vec<Field> = new_leaves
            .iter()
            .filter(|f| old.and_then(|o| field_at(o, f)) != field_at(new, f))
            .cloned()
            .collect();
        for (m, fields) in owners.iter_mut() {
            fields.retain(|f| new_leaves.contains(f));
            if m != UPDATER {
                fields.retain(|f| !changed.contains(f));
            }
        }
        owners.entry(UPDATER.into()).or_default().extend(changed);
    }

    /// Counts a list: with a resourceVersion the watch cache serves it,
    /// without one it is a quorum read from etcd.
    fn count_list(&self, collection: &str, query: &str) {
        let cached = query_param(query, "resourceVersion").is_some_and(|v| !v.is_empty());
        let kind = if cached { "cache" } else { "quorum" };
        self.lists
            .lock()
            .unwrap()
            .push(format!("{kind} {collection}"));
    }

    /// Quorum lists of `collection` so far.
    pub fn quorum_lists(&self, collection: &str) -> usize {
        let want = format!("quorum {collection}");
        self.lists
            .lock()
            .unwrap()
            .iter()
            .filter(|l| **l == want)
            .count()
    }

    /// A ConfigMap write begins: counted in flight, then held for
    /// [`Store::configmap_write_delay`]. Returns whether it was counted.
    async fn configmap_write_begins(&self, method: &str, path: &str) -> bool {
        if method == "GET" || !path.contains("/configmaps") {
            return false;
        }
        let now = self
            .configmap_writes_in_flight
            .fetch_add(1, Ordering::SeqCst)
            + 1;
        self.max_configmap_writes_in_flight
            .fetch_max(now, Ordering::SeqCst);
        let delay = *self.configmap_write_delay.lock().unwrap();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        true
    }

    fn configmap_write_ends(&self, counted: bool) {
        if counted {
            self.configmap_writes_in_flight
                .fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// `PATCH` on a namespaced ConfigMap or Secret.
    fn patch(&self, uri: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (collection, name, kind) = match segs.as_slice() {
            ["api", "v1", "namespaces", ns, res @ ("configmaps" | "secrets"), n] => (
                format!("/api/v1/namespaces/{ns}/{res}"),
                *n,
                if *res == "secrets" {
                    "Secret"
                } else {
                    "ConfigMap"
                },
            ),
            _ => return status(405, "MethodNotAllowed", format!("PATCH {path}")),
        };
        if content_type.split(';').next() != Some("application/apply-patch+yaml") {
            return status(415, "UnsupportedMediaType", format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type})"));
        }
        let Some(manager) = query_param(query, "fieldManager").filter(|m| !m.is_empty()) else {
            return status(
                400,
                "BadRequest",
                "PATCH requests with apply content type require a fieldManager".into(),
            );
        };
        let force = query_param(query, "force") == Some("true");
        // YAML is a superset of JSON; kube sends JSON.
        let applied: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return status(400, "BadRequest", e.to_string()),
        };
        if applied["metadata"]["name"].as_str() != Some(name) {
            return status(
                400,
                "BadRequest",
                format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    applied["metadata"]["name"].as_str().unwrap_or_default()
                ),
            );
        }
        self.apply(&collection, name, kind, manager, force, applied)
    }

    /// Server-side apply of `applied` by `manager`.
    fn apply(
        &self,
        collection: &str,
        name: &str,
        kind: &'static str,
        manager: &str,
        force: bool,
        applied: Value,
    ) -> (u16, Value) {
        let mut objects = self.objects.lock().unwrap();
        let key = (collection.to_string(), name.to_string());
        let fields = leaves(&applied);
        let Some(cur) = objects.get(&key).cloned() else {
            if let Some(refusal) = self.refuse_if_terminating(&objects, collection, name) {
                return refusal;
            }
            let mut obj = applied;
            obj["metadata"]["resourceVersion"] = json!(self.next_rv());
            obj["metadata"]["uid"] = json!(format!("uid-{name}"));
            obj["apiVersion"] = json!("v1");
            obj["kind"] = json!(kind);
            if kind == "Secret" && obj["type"].is_null() {
                obj["type"] = json!("Opaque");
            }
            if let Some(refused) = self.check_size(kind, name, &obj) {
                return refused;
            }
            objects.insert(key.clone(), obj.clone());
            let owners = BTreeMap::from([(manager.to_string(), fields)]);
            self.managed.lock().unwrap().insert(key, owners);
            self.record(collection, name, "ADDED", &obj);
            self.writes
                .lock()
                .unwrap()
                .push(format!("apply {collection}"));
            return (201, obj);
        };
        if let Some(rv) = applied["metadata"]["resourceVersion"].as_str() {
            if Some(rv) != cur["metadata"]["resourceVersion"].as_str() {
                self.conflicts.fetch_add(1, Ordering::SeqCst);
                return status(409, "Conflict", format!(
                    "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"));
            }
        }
        if kind == "Secret"
            && !applied["type"].is_null()
            && secret_type(&applied) != secret_type(&cur)
        {
            self.immutable_type_refusals.fetch_add(1, Ordering::SeqCst);
            return immutable_type(name, secret_type(&applied));
        }
        let mut managed = self.managed.lock().unwrap();
        let owners = managed.entry(key.clone()).or_default();
        let saved = owners.clone();
        // A field set to another value than another manager's is a conflict,
        // or, forced, changes hands; the same value is shared.
        let mut conflicts = Vec::new();
        for f in &fields {
            if field_at(&cur, f) == field_at(&applied, f) {
                continue;
            }
            for (m, owned) in owners.iter_mut().filter(|(m, _)| *m != manager) {
                if owned.contains(f) {
                    if force {
                        owned.remove(f);
                    } else {
                        conflicts.push(format!("conflict with \"{m}\": .{}", f.join(".")));
                    }
                }
            }
        }
        if !conflicts.is_empty() {
            return status(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    conflicts.join(", ")
                ),
            );
        }
        let mut next = cur.clone();
        let before = owners.remove(manager).unwrap_or_default();
        for f in before.difference(&fields) {
            if !owners.values().any(|o| o.contains(f)) {
                remove_field(&mut next, f);
            }
        }
        for f in &fields {
            set_field(
                &mut next,
                f,
                field_at(&applied, f).cloned().unwrap_or(Value::Null),
            );
        }
        owners.insert(manager.to_string(), fields);
        drop(managed);
        if next == cur {
            // A no-op apply writes nothing and keeps the resourceVersion.
            return (200, cur);
        }
        if let Some(refused) = self.check_size(kind, name, &next) {
            // Refused: nothing changes hands.
            self.managed.lock().unwrap().insert(key, saved);
            return refused;
        }
        next["metadata"]["resourceVersion"] = json!(self.next_rv());
        objects.insert(key, next.clone());
        self.record(collection, name, "MODIFIED", &next);
        self.writes
            .lock()
            .unwrap()
            .push(format!("apply {collection}"));
        (200, next)
    }
}

/// Whether a DELETE's `preconditions.resourceVersion` (in its
/// DeleteOptions body) names another version than the stored object's, as
/// the real server checks it (409 Conflict).
fn delete_precondition_fails(body: &[u8], current: Option<&Value>) -> bool {
    let opts: Value = serde_json::from_slice(body).unwrap_or_default();
    match (opts["preconditions"]["resourceVersion"].as_str(), current) {
        (Some(want), Some(cur)) => cur["metadata"]["resourceVersion"].as_str() != Some(want),
        _ => false,
    }
}
