//! A fake Kubernetes API server: the subset meshca uses, with the real
//! semantics — Namespaces (list), ConfigMaps and Leases (get, create,
//! replace, delete) with resourceVersion preconditions (409 Conflict on a
//! stale write, 409 AlreadyExists on a duplicate create, 404 NotFound), and
//! Kubernetes `Status` bodies. Served over HTTPS by `https_json_server`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// The server's state: objects by (collection path, name).
#[derive(Default)]
pub struct Store {
    objects: Mutex<BTreeMap<(String, String), Value>>,
    rv: Mutex<u64>,
    /// Writes (create/replace) seen, by collection.
    pub writes: Mutex<Vec<String>>,
    /// SelfSubjectAccessReviews to deny, as "verb resource" (e.g. "list namespaces").
    pub denied: Mutex<Vec<String>>,
    /// Fixed JSON documents by path (OIDC discovery, JWKS).
    pub documents: Mutex<BTreeMap<String, Value>>,
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

impl Store {
    fn next_rv(&self) -> String {
        let mut rv = self.rv.lock().unwrap();
        *rv += 1;
        rv.to_string()
    }

    /// Adds a namespace with labels.
    pub fn add_namespace(&self, name: &str, labels: Value) {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels, "resourceVersion": self.next_rv()}});
        self.objects
            .lock()
            .unwrap()
            .insert(("/api/v1/namespaces".into(), name.into()), obj);
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
        self.objects
            .lock()
            .unwrap()
            .remove(&(collection.to_string(), name.to_string()))
    }

    /// Overwrites an object directly, bumping its resourceVersion.
    pub fn put(&self, collection: &str, name: &str, mut obj: Value) {
        obj["metadata"]["resourceVersion"] = json!(self.next_rv());
        self.objects
            .lock()
            .unwrap()
            .insert((collection.to_string(), name.to_string()), obj);
    }

    /// Handles one request.
    pub fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
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
            review["status"] = if denied {
                json!({"allowed": false, "reason": "RBAC: no rule grants it"})
            } else {
                json!({"allowed": true})
            };
            review["apiVersion"] = json!("authorization.k8s.io/v1");
            review["kind"] = json!("SelfSubjectAccessReview");
            return (201, review);
        }
        if method == "GET" {
            if let Some(doc) = self.documents.lock().unwrap().get(path) {
                return (200, doc.clone());
            }
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        // (collection path, optional name, kind)
        let (collection, name, kind, list_kind) = match segs.as_slice() {
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
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|((c, _), _)| *c == collection)
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
                let n = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if objects.contains_key(&(collection.clone(), n.clone())) {
                    return status(
                        409,
                        "AlreadyExists",
                        format!("{kind} \"{n}\" already exists"),
                    );
                }
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                obj["metadata"]["uid"] = json!(format!("uid-{n}"));
                obj["apiVersion"] = json!(api_version);
                obj["kind"] = json!(kind);
                objects.insert((collection.clone(), n), obj.clone());
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
                let given = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string);
                if let Some(g) = given {
                    if Some(g.as_str()) != cur["metadata"]["resourceVersion"].as_str() {
                        return status(409, "Conflict", format!(
                            "Operation cannot be fulfilled on {kind} \"{n}\": the object has been modified; please apply your changes to the latest version and try again"));
                    }
                }
                obj["metadata"]["resourceVersion"] = json!(self.next_rv());
                obj["apiVersion"] = json!(api_version);
                obj["kind"] = json!(kind);
                objects.insert((collection.clone(), n.to_string()), obj.clone());
                self.writes
                    .lock()
                    .unwrap()
                    .push(format!("replace {collection}"));
                (200, obj)
            }
            ("DELETE", Some(n)) => match objects.remove(&(collection.clone(), n.to_string())) {
                Some(v) => (200, v),
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
    let (addr, ca_pem) = super::https_json_server(Arc::new(move |m: &str, p: &str, b: &[u8]| {
        s.handle(m, p, b)
    }))
    .await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {b64}\nusers:\n- name: meshca\n  user:\n    token: meshca-sa-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: meshca\ncurrent-context: test\n",
        addr.port()
    );
    let p = dir.join("kubeconfig");
    std::fs::write(&p, text).unwrap();
    (store, p)
}
