//! The start-up permission check.
//!
//! Owns: asking the API server, with SelfSubjectAccessReviews, whether this
//! replica may make each call its configuration implies, and naming every
//! missing permission in one clear message, so a wrong ClusterRole shows at
//! start-up instead of as a failed TokenReview hours later. Must not: change
//! anything (the reviews are read-only questions).

use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// One permission: verb, API group, resource, namespace (None: cluster-wide), name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The verb.
    pub verb: &'static str,
    /// The API group ("" for core).
    pub group: &'static str,
    /// The resource.
    pub resource: &'static str,
    /// The namespace, or None for every namespace.
    pub namespace: Option<String>,
    /// The object name, when the rule can be narrowed to it (RBAC
    /// `resourceNames`; list and watch are narrowed through the
    /// `metadata.name` field selector meshca sends).
    pub name: Option<String>,
    /// A non-resource URL (then `resource` is empty).
    pub path: Option<&'static str>,
    /// Why meshca needs it.
    pub why: &'static str,
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = self.path {
            return write!(f, "{} {p} ({})", self.verb, self.why);
        }
        let g = if self.group.is_empty() {
            String::new()
        } else {
            format!(".{}", self.group)
        };
        write!(f, "{} {}{}", self.verb, self.resource, g)?;
        if let Some(n) = &self.name {
            write!(f, "/{n}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}")?,
            None => write!(f, " cluster-wide")?,
        }
        write!(f, " ({})", self.why)
    }
}

/// What the configuration uses from the API server.
#[derive(Debug, Clone, Default)]
pub struct Uses<'a> {
    /// TokenReview is a token source.
    pub tokenreview: bool,
    /// The API server's JWKS is a token source.
    pub jwks: bool,
    /// Pods and service accounts are watched (metadata only) so that tokens
    /// bound to deleted ones stop working (`watch_token_bindings`).
    pub token_bindings: bool,
    /// The trust bundle is published to namespaces.
    pub publish: bool,
    /// The Secret holding the shared CA state.
    pub state_secret: Option<&'a str>,
    /// The Secret holding the audit log's signing key.
    pub audit_key_secret: Option<&'a str>,
    /// The `kubernetes.io/tls` Secret mirroring the issuer.
    pub issuer_secret: Option<&'a str>,
    /// Replicas exchange propagation reports (ConfigMaps in `namespace`).
    pub propagation_reports: bool,
    /// The Lease for leader election.
    pub lease: Option<&'a str>,
    /// The CA's own namespace.
    pub namespace: &'a str,
}

/// What a configuration needs.
pub fn needs(u: &Uses<'_>) -> Vec<Need> {
    let mut v = Vec::new();
    let mut add = |verbs: &[&'static str],
                   group: &'static str,
                   resource: &'static str,
                   namespace: Option<&str>,
                   name: Option<&str>,
                   why: &'static str| {
        for verb in verbs {
            v.push(Need {
                verb,
                group,
                resource,
                namespace: namespace.map(str::to_string),
                name: name.map(str::to_string),
                path: None,
                why,
            });
        }
    };
    let ns = Some(u.namespace);
    // A Secret meshca follows and writes: read, followed with a watch,
    // updated with a precondition, created (which RBAC cannot narrow by
    // name), and reported on with Events when refused.
    let mut followed_secret = |name: &str, why: &'static str, refused: &'static str| {
        add(
            &["get", "update", "list", "watch"],
            "",
            "secrets",
            ns,
            Some(name),
            why,
        );
        add(&["create"], "", "secrets", ns, None, why);
        add(&["create"], "", "events", ns, None, refused);
    };
    if let Some(secret) = u.state_secret {
        followed_secret(
            secret,
            "sharing the CA state between replicas",
            "reporting a refused shared state",
        );
    }
    if let Some(secret) = u.issuer_secret {
        followed_secret(
            secret,
            "keeping the issuer in its kubernetes.io/tls Secret",
            "reporting a refused issuer",
        );
    }
    if let Some(secret) = u.audit_key_secret {
        let why = "sharing the audit log's signing key";
        add(&["get"], "", "secrets", ns, Some(secret), why);
        add(&["create"], "", "secrets", ns, None, why);
    }
    if u.propagation_reports {
        add(
            &["get", "list", "watch", "create", "update", "delete"],
            "",
            "configmaps",
            ns,
            None,
            "exchanging bundle-propagation reports between replicas",
        );
    }
    if u.tokenreview {
        add(
            &["create"],
            "authentication.k8s.io",
            "tokenreviews",
            None,
            None,
            "validating workload tokens",
        );
    }
    if u.token_bindings {
        let why = "refusing tokens whose pod or service account was deleted";
        add(&["list", "watch"], "", "pods", None, None, why);
        add(&["list", "watch"], "", "serviceaccounts", None, None, why);
    }
    if let Some(lease) = u.lease {
        add(
            &["create"],
            "coordination.k8s.io",
            "leases",
            ns,
            None,
            "leader election",
        );
        add(
            &["get", "update"],
            "coordination.k8s.io",
            "leases",
            ns,
            Some(lease),
            "leader election",
        );
    }
    if u.publish {
        let why = "publishing the trust bundle";
        add(&["list", "watch"], "", "namespaces", None, None, why);
        add(&["create"], "", "configmaps", None, None, why);
        add(
            &["get", "update", "list", "watch"],
            "",
            "configmaps",
            None,
            Some(super::publish::CONFIGMAP),
            why,
        );
    }
    if u.jwks {
        for p in ["/.well-known/openid-configuration", "/openid/v1/jwks"] {
            v.push(Need {
                verb: "get",
                group: "",
                resource: "",
                namespace: None,
                name: None,
                path: Some(p),
                why: "verifying workload tokens locally",
            });
        }
    }
    // One question per permission, even when two features need it.
    let mut seen = std::collections::HashSet::new();
    v.retain(|n| {
        seen.insert((
            n.verb,
            n.group,
            n.resource,
            n.namespace.clone(),
            n.name.clone(),
            n.path,
        ))
    });
    v
}

/// Asks about each need; returns those not allowed (with the API's reason
/// when it gives one). An API error is returned as is.
pub async fn missing(client: &kube::Client, needs: &[Need]) -> Result<Vec<String>, kube::Error> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut out = Vec::new();
    for n in needs {
        let spec = match n.path {
            Some(p) => SelfSubjectAccessReviewSpec {
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(p.into()),
                    verb: Some(n.verb.into()),
                }),
                ..Default::default()
            },
            None => SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(n.verb.into()),
                    group: Some(n.group.into()),
                    resource: Some(n.resource.into()),
                    namespace: n.namespace.clone(),
                    name: n.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        let review = SelfSubjectAccessReview {
            spec,
            ..Default::default()
        };
        let r = api.create(&PostParams::default(), &review).await?;
        let st = r.status.unwrap_or_default();
        if !st.allowed {
            out.push(match st.reason.filter(|r| !r.is_empty()) {
                Some(reason) => format!("{n}: {reason}"),
                None => n.to_string(),
            });
        }
    }
    Ok(out)
}
