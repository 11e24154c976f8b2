//! Step "controllers": the background work that follows the outside world —
//! in Kubernetes the token-bindings watch, the shared-state watch, the
//! start-up permission check, leader election and, on the leader, bundle
//! publishing, propagation reports and the issuer Secret; outside it the
//! trust-bundle file. All of them take the one shared `kube::Client`.
//!
//! Must not: decide rotation steps or authentication (the services do).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::ca::Authority;
use crate::config::{AuthnSource, ServeConfig};
use crate::kubernetes::bindings::BoundObjects;
use crate::kubernetes::client::Factory;
use crate::kubernetes::{self as k8s, watch::Target};
use crate::metrics::Metrics;

use super::services::Services;
use super::BoxError;

/// The Lease one replica holds to do the singleton work.
struct Election {
    lease: String,
    duration: Duration,
}

/// The running controllers.
#[derive(Default)]
pub(super) struct Controllers {
    /// Whether this replica leads, when there is an election.
    pub leading: Option<watch::Receiver<bool>>,
    /// Tasks that end once `stop` flips (the Lease hand-back, the report
    /// deletion): shutdown awaits them before the process exits.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Starts the Kubernetes controllers the configuration asks for.
pub(super) async fn spawn(
    cfg: &ServeConfig,
    kube: &Factory,
    services: &Services,
    bindings: Option<Arc<BoundObjects>>,
    metrics: &Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> Result<Controllers, BoxError> {
    let client = match kube.client().await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Controllers::default()),
        // Built lazily, as before: only the features that need the API
        // server fail on bad credentials; the permission check only warns.
        Err(e) => {
            if bindings.is_some()
                || cfg.kubernetes.state_secret.is_some()
                || election(cfg).is_some()
            {
                return Err(format!("invalid setting kubeconfig: {e}").into());
            }
            tracing::warn!(error = %e, "could not check Kubernetes permissions (SelfSubjectAccessReview)");
            return Ok(Controllers::default());
        }
    };
    let mut tasks = Vec::new();
    if let Some(objects) = bindings {
        let pacing = cfg.kubernetes.watch_pacing();
        k8s::bindings::follow(client.clone(), objects, pacing, stop.clone());
    }
    if let Some(name) = &cfg.kubernetes.state_secret {
        tasks.push(follow_shared_state(
            cfg,
            &client,
            name,
            services,
            metrics,
            stop.clone(),
        ));
    }
    let election = election(cfg);
    check_permissions(cfg, &client, election.as_ref(), metrics).await;
    let Some(election) = election else {
        return Ok(Controllers {
            leading: None,
            tasks,
        });
    };
    let leading = run_singletons(cfg, client, election, services, metrics, stop, &mut tasks);
    Ok(Controllers {
        leading: Some(leading),
        tasks,
    })
}

/// Changes to the shared-state Secret wake the rotation service at once;
/// `state_poll_interval` is the safety net.
fn follow_shared_state(
    cfg: &ServeConfig,
    client: &kube::Client,
    name: &str,
    services: &Services,
    metrics: &Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let wake = Arc::new(Notify::new());
    let ns = cfg.issuance.mesh.control_plane_ns.to_string();
    let watch = tokio::spawn(k8s::watch::follow::<Secret>(
        client.clone(),
        move |c| kube::Api::namespaced(c, &ns),
        Target {
            resource: "secrets",
            name: Some(name.to_string()),
            labels: None,
            pacing: cfg.kubernetes.watch_pacing(),
        },
        wake.clone(),
        stop.clone(),
        metrics.clone(),
    ));
    services
        .rotation
        .follow_shared(cfg.kubernetes.state_poll_interval, wake, stop);
    watch
}

/// The election, when some singleton work is configured: bundle publishing
/// (its own Lease settings), or a shared state / issuer Secret (defaults).
fn election(cfg: &ServeConfig) -> Option<Election> {
    let singleton = cfg.kubernetes.state_secret.is_some() || cfg.kubernetes.issuer_secret.is_some();
    match (&cfg.kubernetes.publish, singleton) {
        _ if cfg.kubernetes.kubeconfig.is_none() => None,
        (Some(p), _) => Some(Election {
            lease: p.lease.clone(),
            duration: p.lease_duration,
        }),
        (None, true) => Some(Election {
            lease: "meshca-leader".to_string(),
            duration: Duration::from_secs(15),
        }),
        (None, false) => None,
    }
}

/// Says at start-up which Kubernetes permissions are missing (never fatal).
async fn check_permissions(
    cfg: &ServeConfig,
    client: &kube::Client,
    election: Option<&Election>,
    metrics: &Metrics,
) {
    let needs = k8s::rbac::needs(&k8s::rbac::Uses {
        tokenreview: cfg.authn.authn_order.contains(&AuthnSource::Tokenreview),
        token_bindings: cfg.kubernetes.watch_token_bindings,
        jwks: cfg.authn.jwks_kubernetes && cfg.authn.authn_order.contains(&AuthnSource::Jwks),
        publish: cfg.kubernetes.publish.is_some(),
        state_secret: cfg.kubernetes.state_secret.as_deref(),
        audit_key_secret: cfg
            .kubernetes
            .audit_key_secret
            .as_deref()
            .filter(|_| cfg.audit.audit_log),
        issuer_secret: cfg.kubernetes.issuer_secret.as_deref(),
        propagation_reports: cfg.kubernetes.state_secret.is_some(),
        lease: election.map(|e| e.lease.as_str()),
        namespace: cfg.issuance.mesh.control_plane_ns.as_str(),
    });
    let check = k8s::rbac::missing(client, &needs);
    match tokio::time::timeout(Duration::from_secs(10), check).await {
        Ok(Ok(missing)) if missing.is_empty() => {
            tracing::info!(checked = needs.len(), "Kubernetes permissions: all present")
        }
        Ok(Ok(missing)) => {
            metrics.set_rbac_missing(missing.len());
            tracing::error!(missing = ?missing, "Kubernetes permissions missing: grant them (see deploy/rbac.yaml) or these features will fail");
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not check Kubernetes permissions (SelfSubjectAccessReview)")
        }
        Err(_) => {
            tracing::warn!("could not check Kubernetes permissions: no answer within 10s")
        }
    }
}

/// One replica at a time (holding the Lease) does the singleton work:
/// publishing the bundle ConfigMaps, and with shared state the issuer
/// renewal, housekeeping and automatic rotation.
fn run_singletons(
    cfg: &ServeConfig,
    client: kube::Client,
    election: Election,
    services: &Services,
    metrics: &Arc<Metrics>,
    stop: watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> watch::Receiver<bool> {
    let namespace = cfg.issuance.mesh.control_plane_ns.to_string();
    let (leader, election_task) = k8s::lease::run(
        client.clone(),
        k8s::lease::Settings {
            namespace: namespace.clone(),
            name: election.lease,
            identity: cfg.replica.clone(),
            lease_duration: election.duration,
        },
        stop.clone(),
        metrics.clone(),
    );
    tasks.push(election_task);
    if cfg.kubernetes.state_secret.is_some() {
        services.rotation.set_leader(leader.clone());
    }
    if let Some(p) = &cfg.kubernetes.publish {
        spawn_publisher(
            &client,
            (
                k8s::publish::Settings {
                    namespace_labels: p.namespace_labels.clone(),
                    resync: p.resync,
                    refresh_hint: cfg.federation.refresh_hint,
                },
                cfg.kubernetes.watch_pacing(),
            ),
            services,
            &leader,
            metrics,
            &stop,
            tasks,
        );
    }
    if cfg.kubernetes.state_secret.is_some() {
        // Replicas share one CA: the activation gate must count every
        // replica's clients.
        tasks.push(tokio::spawn(k8s::reports::run(
            client.clone(),
            k8s::reports::Settings {
                watch: cfg.kubernetes.watch_pacing(),
                ..k8s::reports::Settings::new(
                    &namespace,
                    &cfg.replica,
                    cfg.kubernetes.propagation_report_interval,
                    services.rotation.clock().clone(),
                )
            },
            services.tracker.clone(),
            Some(leader.clone()),
            stop.clone(),
            metrics.clone(),
        )));
    }
    if let Some(name) = cfg.kubernetes.issuer_secret.clone() {
        tasks.push(tokio::spawn(k8s::issuer_secret::run(
            client,
            k8s::issuer_secret::Settings {
                namespace,
                name,
                replica: cfg.replica.clone(),
                watch: cfg.kubernetes.watch_pacing(),
            },
            services.rotation.clone(),
            Some(leader.clone()),
            stop,
        )));
    }
    leader
}

/// The bundle ConfigMap in every selected namespace, on the leader. The
/// publisher works from watch caches of the namespaces and the bundle
/// ConfigMaps (every replica keeps them, so a new leader starts warm); their
/// changes wake it at once; the resync period is the safety net.
fn spawn_publisher(
    client: &kube::Client,
    (settings, pacing): (k8s::publish::Settings, k8s::watch::Pacing),
    services: &Services,
    leader: &watch::Receiver<bool>,
    metrics: &Arc<Metrics>,
    stop: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) {
    let (caches, watches) = k8s::publish::Caches::follow(client, pacing, metrics, stop);
    tasks.extend(watches);
    // Ends once the election task has ended (its sender dropped).
    tasks.push(tokio::spawn(k8s::publish::run(
        client.clone(),
        settings,
        services.core.ca.watch_bundle(),
        leader.clone(),
        caches,
        metrics.clone(),
    )));
}

/// File-based consumers: the bundle file (`bundle_file`) follows every
/// change of the trust bundle.
pub(super) fn spawn_bundle_file(
    cfg: &ServeConfig,
    ca: &Authority,
    mut stop: watch::Receiver<bool>,
) {
    let Some(path) = cfg.bundle_file.clone() else {
        return;
    };
    let mut bundle = ca.watch_bundle();
    tokio::spawn(async move {
        loop {
            let pem = bundle.borrow_and_update().to_pem();
            match crate::util::secret::write_public(&path, pem.as_bytes()) {
                Ok(()) => tracing::info!(file = %path.display(), "trust bundle written"),
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot write the trust bundle file")
                }
            }
            tokio::select! {
                r = bundle.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    });
}
