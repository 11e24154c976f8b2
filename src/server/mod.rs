//! `meshca serve`: wires the CA, authentication and the three gRPC APIs onto
//! one TLS port, plus the admin HTTP endpoint.
//!
//! Owns: start-up as a sequence of named steps, one file each — open the CA
//! (`ca`), the authenticator (`authn`), the audit log (`audit`), the
//! request services and rotation (`services`), the server certificate
//! (`tls`), the Kubernetes controllers (`controllers`), the gRPC listener
//! (`listener`), the admin endpoint (`admin`) and graceful shutdown
//! (`drain`). Each step returns a small struct the next ones take. Must
//! not: contain issuance policy (see `ca`), wire translation (see `api`) or
//! routing of admin requests (see `admin`).

mod admin;
mod audit;
mod authn;
mod ca;
mod controllers;
mod drain;
mod federation;
mod listener;
mod services;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::ca::Authority;
use crate::config::ServeConfig;
use crate::kubernetes::client::Factory;
use crate::metrics::Metrics;
use crate::util::clock::{Clock, SystemClock};

/// Any error a step passes up: the domain's own typed error, or its message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The start-up steps of `serve`, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Data directory, shared state, lock, trust manager, the authority.
    OpenCa,
    /// The token-source chain.
    Authenticator,
    /// The audit log and its signing key.
    AuditLog,
    /// Revocations, renewal index, rotation service and shared state.
    Services,
    /// The admin token.
    Admin,
    /// The CA's own server certificate.
    Tls,
    /// Binding the gRPC and admin ports.
    Listen,
    /// The Kubernetes controllers.
    Controllers,
    /// Federation: bundle document and endpoint, followers.
    Federation,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::OpenCa => "open the CA",
            Step::Authenticator => "build the authenticator",
            Step::AuditLog => "open the audit log",
            Step::Services => "start the CA services",
            Step::Admin => "set up the admin endpoint",
            Step::Tls => "set up TLS",
            Step::Listen => "listen",
            Step::Controllers => "start the Kubernetes controllers",
            Step::Federation => "start SPIFFE federation",
        })
    }
}

/// `serve` could not start: which step failed, and why. The message is the
/// cause's own (operators and tests read it unchanged); the step is for
/// callers that need to tell them apart.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ServeError {
    /// The step that failed.
    pub step: Step,
    /// What went wrong.
    pub source: BoxError,
}

impl ServeError {
    fn at(step: Step) -> impl FnOnce(BoxError) -> ServeError {
        move |source| ServeError { step, source }
    }
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// The CA.
    pub ca: Arc<Authority>,
    /// The DNS identity in the server certificate (what clients verify).
    pub server_name: String,
    /// The audit log, when on.
    pub audit: Option<crate::audit::AuditLog>,
    /// Whether this replica leads (with `publish_bundle` or `state_secret`).
    pub leading: Option<watch::Receiver<bool>>,
    /// This server's instruments (what its `/metrics` renders).
    pub metrics: Arc<Metrics>,
    /// The SPIFFE bundle endpoint's address, when `federation_listen` is set.
    pub federation_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests and waits for the end.
    pub async fn shutdown(mut self) {
        self.trigger_shutdown();
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops by itself.
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }

    /// Signals shutdown without waiting.
    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The DNS identity the server certificate carries (clients verify it).
pub fn server_identity(cfg: &ServeConfig) -> String {
    crate::identity::ca_server_name(
        cfg.issuance.mesh.control_plane_ns.as_str(),
        cfg.issuance.mesh.trust_domain.as_str(),
    )
}

/// Starts the server: loads (or creates) the CA and binds both ports.
pub async fn start(cfg: ServeConfig) -> Result<Running, ServeError> {
    log_mode(&cfg);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let kube = Factory::new(cfg.kubernetes.kubeconfig.clone());

    let opened = ca::open(&cfg, &kube, clock.clone(), &metrics)
        .await
        .map_err(ServeError::at(Step::OpenCa))?;
    let authn = authn::build(&cfg, &opened.data, &kube, clock.clone(), &metrics)
        .await
        .map_err(ServeError::at(Step::Authenticator))?;
    let audit = audit::open(&cfg, &kube, clock.clone(), &metrics)
        .await
        .map_err(ServeError::at(Step::AuditLog))?;
    let parts = services::CaParts {
        ca: opened.ca.clone(),
        manager: opened.manager,
        reconciled: opened.reconciled,
        shared: opened.shared,
    };
    let services = services::start(&cfg, parts, &authn, &audit, clock.clone(), &metrics)
        .await
        .map_err(ServeError::at(Step::Services))?;
    let admin_token = admin::token(&cfg).map_err(ServeError::at(Step::Admin))?;
    let tls = tls::Tls::initial(&opened.ca, &cfg).map_err(ServeError::at(Step::Tls))?;
    let sockets = listener::Sockets::bind(&cfg)
        .await
        .map_err(ServeError::at(Step::Listen))?;

    let stop = drain::Stop::new();
    services.rotation.spawn(stop.signal());
    let controllers = controllers::spawn(
        &cfg,
        &kube,
        &services,
        authn.bindings,
        &metrics,
        stop.signal(),
    )
    .await
    .map_err(ServeError::at(Step::Controllers))?;
    controllers::spawn_bundle_file(&cfg, &opened.ca, stop.signal());
    let federation_addr = federation::start(&cfg, &services.core, &metrics, stop.signal())
        .await
        .map_err(ServeError::at(Step::Federation))?;
    let rotation = services.rotation.clone();
    tls.spawn_renewal(opened.ca.clone(), cfg.clone(), rotation, stop.signal());
    let (grpc_addr, admin_addr) = (sockets.grpc_addr, sockets.admin_addr);
    let tasks = drain::Tasks {
        grpc: listener::serve_grpc(
            sockets.grpc,
            tls.config,
            services.core.clone(),
            services.connections.clone(),
            &cfg.api.limits,
            metrics.clone(),
            stop.signal(),
        ),
        admin: admin::serve(
            sockets.admin,
            admin_addr,
            &cfg,
            &services,
            admin_token,
            clock,
            metrics.clone(),
            stop.signal(),
        ),
        controllers: controllers.tasks,
    };
    let audit_log = audit.log.clone();
    let (shutdown, task) = drain::spawn(stop, tasks, audit.into_final(), opened.lock);

    let server_name = server_identity(&cfg);
    tracing::info!(%grpc_addr, %admin_addr, server_name = %server_name, trust_domain = %cfg.issuance.mesh.trust_domain, "meshca serving");
    Ok(Running {
        leading: controllers.leading,
        metrics,
        federation_addr,
        grpc_addr,
        admin_addr,
        ca: opened.ca,
        server_name,
        audit: audit_log,
        shutdown: Some(shutdown),
        task,
    })
}

/// One line saying which in-cluster features are on.
fn log_mode(cfg: &ServeConfig) {
    if cfg.kubernetes.kubernetes {
        tracing::info!(
            namespace = %cfg.issuance.mesh.control_plane_ns,
            replica = %cfg.replica,
            state_secret = ?cfg.kubernetes.state_secret,
            audit_key_secret = ?cfg.kubernetes.audit_key_secret,
            publish_bundle = cfg.kubernetes.publish.is_some(),
            "in-cluster mode"
        );
    }
}
