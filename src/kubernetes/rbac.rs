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
    /// The object name, when the rule can be narrowed to it.
    pub name: Option<&'static str>,
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
        if let Some(n) = self.name {
            write!(f, "/{n}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}")?,
            None => write!(f, " cluster-wide")?,
        }
        write!(f, " ({})", self.why)
    }
}

/// What a configuration needs.
pub fn needs(
    tokenreview: bool,
    publish: bool,
    jwks: bool,
    state_secret: Option<&str>,
    control_plane_ns: &str,
) -> Vec<Need> {
    let mut v = Vec::new();
    if let Some(secret) = state_secret {
        let ns = Some(control_plane_ns.to_string());
        // The Secret's name is configurable, so the rule cannot be narrowed
        // by name in this check; deploy/rbac.yaml narrows it to meshca-ca.
        let _ = secret;
        for verb in ["get", "create", "update"] {
            v.push(Need {
                verb,
                group: "",
                resource: "secrets",
                namespace: ns.clone(),
                name: None,
                path: None,
                why: "sharing the CA state between replicas",
            });
        }
        v.push(Need {
            verb: "create",
            group: "",
            resource: "events",
            namespace: ns,
            name: None,
            path: None,
            why: "reporting a refused shared state",
        });
    }
    if jwks {
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
    if tokenreview {
        v.push(Need {
            verb: "create",
            group: "authentication.k8s.io",
            resource: "tokenreviews",
            namespace: None,
            name: None,
            path: None,
            why: "validating workload tokens",
        });
    }
    if publish || state_secret.is_some() {
        let ns = Some(control_plane_ns.to_string());
        v.extend(lease_needs(ns));
    }
    if publish {
        v.push(Need {
            verb: "list",
            group: "",
            resource: "namespaces",
            namespace: None,
            name: None,
            path: None,
            why: "publishing the trust bundle",
        });
        v.push(Need {
            verb: "create",
            group: "",
            resource: "configmaps",
            namespace: None,
            name: None,
            path: None,
            why: "publishing the trust bundle",
        });
        v.push(Need {
            verb: "get",
            group: "",
            resource: "configmaps",
            namespace: None,
            name: Some("meshca-trust-bundle"),
            path: None,
            why: "publishing the trust bundle",
        });
        v.push(Need {
            verb: "update",
            group: "",
            resource: "configmaps",
            namespace: None,
            name: Some("meshca-trust-bundle"),
            path: None,
            why: "publishing the trust bundle",
        });
    }
    v
}

fn lease_needs(ns: Option<String>) -> Vec<Need> {
    vec![
        Need {
            verb: "create",
            group: "coordination.k8s.io",
            resource: "leases",
            namespace: ns.clone(),
            name: None,
            path: None,
            why: "leader election",
        },
        Need {
            verb: "get",
            group: "coordination.k8s.io",
            resource: "leases",
            namespace: ns.clone(),
            name: Some("meshca-leader"),
            path: None,
            why: "leader election",
        },
        Need {
            verb: "update",
            group: "coordination.k8s.io",
            resource: "leases",
            namespace: ns,
            name: Some("meshca-leader"),
            path: None,
            why: "leader election",
        },
    ]
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
                    name: n.name.map(str::to_string),
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
