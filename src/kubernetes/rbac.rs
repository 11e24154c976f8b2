//! The start-up permission check.
//!
//! Owns: asking the API server, with SelfSubjectAccessReviews, whether this
//! replica may make each call its configuration implies, and naming every
//! missing permission in one clear message, so a wrong ClusterRole shows at
//! start-up instead of as a failed TokenReview hours later. Must not: change
//! anything (the reviews are read-only questions).

use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SelfSubjectAccessReview,
    SelfSubjectAccessReviewSpec, SubjectAccessReviewStatus,
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

/// Which configured feature a rule serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feature {
    StateSecret,
    IssuerSecret,
    AuditKey,
    Reports,
    TokenReview,
    Bindings,
    Lease,
    Publish,
}

/// Where a rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The CA's own namespace.
    Own,
    /// Every namespace (or a cluster-scoped resource).
    Cluster,
}

/// Which object a rule is narrowed to (RBAC `resourceNames`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    /// Any object (creating cannot be narrowed by name).
    Any,
    /// The object the feature is configured with (its Secret, its Lease).
    Configured,
    /// The published bundle ConfigMap.
    Bundle,
}

/// One row of [`RULES`].
struct Rule {
    feature: Feature,
    verbs: &'static [&'static str],
    group: &'static str,
    resource: &'static str,
    scope: Scope,
    named: Named,
    why: &'static str,
}

const fn rule(
    feature: Feature,
    verbs: &'static [&'static str],
    (group, resource): (&'static str, &'static str),
    (scope, named): (Scope, Named),
    why: &'static str,
) -> Rule {
    Rule {
        feature,
        verbs,
        group,
        resource,
        scope,
        named,
        why,
    }
}

const STATE: &str = "sharing the CA state between replicas";
const ISSUER: &str = "keeping the issuer in its kubernetes.io/tls Secret";
const AUDIT_KEY: &str = "sharing the audit log's signing key";
const BINDINGS: &str = "refusing tokens whose pod or service account was deleted";
const PUBLISH: &str = "publishing the trust bundle";
/// An object meshca follows and writes (the state and issuer Secrets, the
/// bundle ConfigMap) is read, followed with a watch and updated with a
/// precondition; creating it is a separate `create` row, because RBAC cannot
/// narrow creation by name.
const FOLLOWED: &[&str] = &["get", "update", "list", "watch"];
/// An object meshca shares with other writers (the issuer Secret, the bundle
/// ConfigMaps) is written with server-side apply (`patch`), which changes
/// only meshca's fields; creating one through apply also needs `create`.
const APPLIED: &[&str] = &["get", "patch", "list", "watch"];

/// Every permission meshca can need, by feature, in the order they are
/// asked (and reported). A declarative table: add a row, not code.
#[rustfmt::skip]
const RULES: &[Rule] = &[
    rule(Feature::StateSecret, FOLLOWED, ("", "secrets"), (Scope::Own, Named::Configured), STATE),
    rule(Feature::StateSecret, &["create"], ("", "secrets"), (Scope::Own, Named::Any), STATE),
    rule(Feature::StateSecret, &["create"], ("", "events"), (Scope::Own, Named::Any), "reporting a refused shared state"),
    rule(Feature::IssuerSecret, APPLIED, ("", "secrets"), (Scope::Own, Named::Configured), ISSUER),
    rule(Feature::IssuerSecret, &["create"], ("", "secrets"), (Scope::Own, Named::Any), ISSUER),
    rule(Feature::IssuerSecret, &["create"], ("", "events"), (Scope::Own, Named::Any), "reporting a refused issuer"),
    rule(Feature::AuditKey, &["get"], ("", "secrets"), (Scope::Own, Named::Configured), AUDIT_KEY),
    rule(Feature::AuditKey, &["create"], ("", "secrets"), (Scope::Own, Named::Any), AUDIT_KEY),
    rule(Feature::Reports, &["get", "list", "watch", "create", "update", "delete"], ("", "configmaps"), (Scope::Own, Named::Any),
        "exchanging bundle-propagation reports between replicas"),
    rule(Feature::TokenReview, &["create"], ("authentication.k8s.io", "tokenreviews"), (Scope::Cluster, Named::Any), "validating workload tokens"),
    rule(Feature::Bindings, &["list", "watch"], ("", "pods"), (Scope::Cluster, Named::Any), BINDINGS),
    rule(Feature::Bindings, &["list", "watch"], ("", "serviceaccounts"), (Scope::Cluster, Named::Any), BINDINGS),
    rule(Feature::Lease, &["create"], ("coordination.k8s.io", "leases"), (Scope::Own, Named::Any), "leader election"),
    rule(Feature::Lease, &["get", "update"], ("coordination.k8s.io", "leases"), (Scope::Own, Named::Configured), "leader election"),
    rule(Feature::Publish, &["list", "watch"], ("", "namespaces"), (Scope::Cluster, Named::Any), PUBLISH),
    rule(Feature::Publish, &["create"], ("", "configmaps"), (Scope::Cluster, Named::Any), PUBLISH),
    rule(Feature::Publish, APPLIED, ("", "configmaps"), (Scope::Cluster, Named::Bundle), PUBLISH),
];

/// The API server paths the JWKS token source reads.
const JWKS_PATHS: [&str; 2] = ["/.well-known/openid-configuration", "/openid/v1/jwks"];

impl Uses<'_> {
    /// Whether `f` is configured, and the object name it is configured with.
    fn feature(&self, f: Feature) -> Option<Option<&str>> {
        let on = |b: bool| b.then_some(None);
        match f {
            Feature::StateSecret => self.state_secret.map(Some),
            Feature::IssuerSecret => self.issuer_secret.map(Some),
            Feature::AuditKey => self.audit_key_secret.map(Some),
            Feature::Lease => self.lease.map(Some),
            Feature::Reports => on(self.propagation_reports),
            Feature::TokenReview => on(self.tokenreview),
            Feature::Bindings => on(self.token_bindings),
            Feature::Publish => on(self.publish),
        }
    }
}

/// What a configuration needs: the [`RULES`] of its features, then the
/// JWKS paths, each permission once.
pub fn needs(u: &Uses<'_>) -> Vec<Need> {
    let mut v = Vec::new();
    for r in RULES {
        let Some(configured) = u.feature(r.feature) else {
            continue;
        };
        let name = match r.named {
            Named::Any => None,
            Named::Configured => configured,
            Named::Bundle => Some(super::publish::CONFIGMAP),
        };
        v.extend(r.verbs.iter().map(|verb| Need {
            verb,
            group: r.group,
            resource: r.resource,
            namespace: (r.scope == Scope::Own).then(|| u.namespace.to_string()),
            name: name.map(str::to_string),
            path: None,
            why: r.why,
        }));
    }
    if u.jwks {
        v.extend(JWKS_PATHS.map(|p| Need {
            verb: "get",
            group: "",
            resource: "",
            namespace: None,
            name: None,
            path: Some(p),
            why: "verifying workload tokens locally",
        }));
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

/// What a SelfSubjectAccessReview that did not allow a request says, in
/// words: who refused (no authorizer allowed it, or one denied it
/// outright), and the authorizers' own `reason` and `evaluationError` when
/// they give any. A real RBAC refusal usually gives neither: RBAC has no
/// opinion when no rule matches, so its `reason` is empty.
pub(crate) fn explain(st: &SubjectAccessReviewStatus) -> String {
    let reason = st.reason.as_deref().filter(|r| !r.is_empty());
    let error = st.evaluation_error.as_deref().filter(|e| !e.is_empty());
    let mut out = if st.denied == Some(true) {
        "denied outright by an authorizer (SelfSubjectAccessReview: allowed=false, denied=true)"
            .to_string()
    } else {
        let said = if reason.is_some() {
            ""
        } else {
            ", no reason given"
        };
        format!("not allowed: no authorizer allows it (SelfSubjectAccessReview: allowed=false{said}); bind a Role or ClusterRole that grants it (deploy/rbac.yaml)")
    };
    if let Some(r) = reason {
        out.push_str(&format!("; reason: {r}"));
    }
    if let Some(e) = error {
        out.push_str(&format!("; evaluation error: {e}"));
    }
    out
}

/// Asks about each need; returns those not allowed, each with what its
/// review said ([`explain`]). An API error is returned as is.
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
            out.push(format!("{n}: {}", explain(&st)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_on() -> Uses<'static> {
        Uses {
            tokenreview: true,
            jwks: true,
            token_bindings: true,
            publish: true,
            state_secret: Some("meshca-ca"),
            audit_key_secret: Some("meshca-audit-key"),
            issuer_secret: Some("meshca-issuer"),
            propagation_reports: true,
            lease: Some("meshca-leader"),
            namespace: "meshca",
        }
    }

    /// Every feature on: the questions asked, in order, once each. Taken
    /// from the hand-written `needs` this table replaced (which the table
    /// matched on all 512 combinations of features before it was removed).
    #[test]
    fn the_table_asks_what_the_code_it_replaced_asked() {
        let got: Vec<String> = needs(&all_on()).iter().map(|n| n.to_string()).collect();
        let want = [
        "get secrets/meshca-ca in namespace meshca (sharing the CA state between replicas)",
        "update secrets/meshca-ca in namespace meshca (sharing the CA state between replicas)",
        "list secrets/meshca-ca in namespace meshca (sharing the CA state between replicas)",
        "watch secrets/meshca-ca in namespace meshca (sharing the CA state between replicas)",
        "create secrets in namespace meshca (sharing the CA state between replicas)",
        "create events in namespace meshca (reporting a refused shared state)",
        "get secrets/meshca-issuer in namespace meshca (keeping the issuer in its kubernetes.io/tls Secret)",
        "patch secrets/meshca-issuer in namespace meshca (keeping the issuer in its kubernetes.io/tls Secret)",
        "list secrets/meshca-issuer in namespace meshca (keeping the issuer in its kubernetes.io/tls Secret)",
        "watch secrets/meshca-issuer in namespace meshca (keeping the issuer in its kubernetes.io/tls Secret)",
        "get secrets/meshca-audit-key in namespace meshca (sharing the audit log's signing key)",
        "get configmaps in namespace meshca (exchanging bundle-propagation reports between replicas)",
        "list configmaps in namespace meshca (exchanging bundle-propagation reports between replicas)",
        "watch configmaps in namespace meshca (exchanging bundle-propagation reports between replicas)",
        "create configmaps in namespace meshca (exchanging bundle-propagation reports between replicas)",
        "update configmaps in namespace meshca (exchanging bundle-propagation reports between replicas)",
        "delete configmaps in namespace meshca (exchanging bundle-propagation reports between replicas)",
        "create tokenreviews.authentication.k8s.io cluster-wide (validating workload tokens)",
        "list pods cluster-wide (refusing tokens whose pod or service account was deleted)",
        "watch pods cluster-wide (refusing tokens whose pod or service account was deleted)",
        "list serviceaccounts cluster-wide (refusing tokens whose pod or service account was deleted)",
        "watch serviceaccounts cluster-wide (refusing tokens whose pod or service account was deleted)",
        "create leases.coordination.k8s.io in namespace meshca (leader election)",
        "get leases.coordination.k8s.io/meshca-leader in namespace meshca (leader election)",
        "update leases.coordination.k8s.io/meshca-leader in namespace meshca (leader election)",
        "list namespaces cluster-wide (publishing the trust bundle)",
        "watch namespaces cluster-wide (publishing the trust bundle)",
        "create configmaps cluster-wide (publishing the trust bundle)",
        "get configmaps/meshca-trust-bundle cluster-wide (publishing the trust bundle)",
        "patch configmaps/meshca-trust-bundle cluster-wide (publishing the trust bundle)",
        "list configmaps/meshca-trust-bundle cluster-wide (publishing the trust bundle)",
        "watch configmaps/meshca-trust-bundle cluster-wide (publishing the trust bundle)",
        "get /.well-known/openid-configuration (verifying workload tokens locally)",
        "get /openid/v1/jwks (verifying workload tokens locally)",
        ];
        assert_eq!(got, want);
    }

    /// A real RBAC denial (`allowed: false`, empty reason) still says what
    /// is missing; a reason or evaluation error, when given, is kept.
    #[test]
    fn a_denial_is_explained_from_the_review_itself() {
        let plain = SubjectAccessReviewStatus {
            allowed: false,
            ..Default::default()
        };
        let e = explain(&plain);
        assert!(e.starts_with("not allowed: no authorizer allows it"), "{e}");
        assert!(!e.contains("reason:"), "{e}");
        let detailed = SubjectAccessReviewStatus {
            allowed: false,
            denied: Some(true),
            reason: Some("RBAC: clusterrole.rbac.authorization.k8s.io \"meshca\" not found".into()),
            evaluation_error: Some("webhook timed out".into()),
        };
        let e = explain(&detailed);
        assert!(e.starts_with("denied outright"), "{e}");
        assert!(e.contains("reason: RBAC: clusterrole"), "{e}");
        assert!(e.ends_with("evaluation error: webhook timed out"), "{e}");
    }

    #[test]
    fn each_feature_asks_only_its_own_rules() {
        let base = Uses {
            namespace: "meshca",
            ..Default::default()
        };
        assert!(needs(&base).is_empty());
        let state = needs(&Uses {
            state_secret: Some("s"),
            ..base.clone()
        });
        assert_eq!(state.len(), 6);
        assert!(state
            .iter()
            .all(|n| n.namespace.as_deref() == Some("meshca")));
        let jwks = needs(&Uses {
            jwks: true,
            ..base.clone()
        });
        assert_eq!(jwks.len(), 2);
        assert!(jwks
            .iter()
            .all(|n| n.path.is_some() && n.resource.is_empty()));
        // Every row is asked when its feature alone is on.
        for r in RULES {
            let mut u = base.clone();
            match r.feature {
                Feature::StateSecret => u.state_secret = Some("s"),
                Feature::IssuerSecret => u.issuer_secret = Some("i"),
                Feature::AuditKey => u.audit_key_secret = Some("a"),
                Feature::Reports => u.propagation_reports = true,
                Feature::TokenReview => u.tokenreview = true,
                Feature::Bindings => u.token_bindings = true,
                Feature::Lease => u.lease = Some("l"),
                Feature::Publish => u.publish = true,
            }
            let asked = needs(&u);
            for verb in r.verbs {
                assert!(
                    asked
                        .iter()
                        .any(|n| n.verb == *verb && n.resource == r.resource && n.why == r.why),
                    "{verb} {} ({}) not asked",
                    r.resource,
                    r.why
                );
            }
        }
    }
}
