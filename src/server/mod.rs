//! `meshca serve`: wires the CA, authentication and the three gRPC APIs onto
//! one TLS port, plus the admin HTTP endpoint.
//!
//! Owns: start-up (load or initialize the data directory, build the token
//! chain), the rustls server configuration with the CA's own auto-renewed
//! certificate, the accept loop, and graceful shutdown (stop accepting, drain
//! in-flight requests). Must not: contain issuance policy (see `ca`) or wire
//! translation (see `api`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::routing::get;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::api::{self, Core};
use crate::authn::{self, jwt, Authenticator, Method, Source};
use crate::ca::store::{lock_data_dir, DataDir, InitOptions};
use crate::ca::{Authority, Policy};
use crate::config::{AuthnSource, ServeConfig};
use crate::identity::Workload;
use crate::metrics::Metrics;
use crate::proto;
use crate::tls::crypto_provider;
use crate::util::clock::{Clock, SystemClock};

/// How long shutdown waits for open connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, drains in-flight requests and waits for the end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
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

/// Builds the token chain from configuration.
pub async fn build_authenticator(
    cfg: &ServeConfig,
    data: &DataDir,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> Result<Authenticator, String> {
    let mut sources = Vec::new();
    let dev_mode = cfg.jwks_file.is_none()
        && !cfg.jwks_kubernetes
        && cfg.jwks_url.is_none()
        && cfg.oidc_issuer_url.is_none()
        && cfg.kubeconfig.is_none();
    for s in &cfg.authn_order {
        match s {
            AuthnSource::Jwks => {
                let mut issuers = cfg.jwt_issuers.clone();
                let (source, setting) = if cfg.jwks_kubernetes {
                    let kc = cfg
                        .kubeconfig
                        .as_ref()
                        .ok_or("invalid setting jwks_kubernetes: needs kubeconfig")?;
                    let client = authn::tokenreview::TokenReviewer::client_from_kubeconfig(kc)
                        .await
                        .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
                    // The API server names its service-account issuer; tokens
                    // carry it as `iss`. Unreachable now: keep the configured
                    // issuers and let the JWKS refresh catch up.
                    match jwt::kube_issuer(&client).await {
                        Ok(iss) => {
                            tracing::info!(issuer = %iss, "Kubernetes service-account issuer (OIDC discovery)");
                            if !issuers.contains(&iss) {
                                issuers.push(iss);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "Kubernetes OIDC discovery failed; accepting the configured jwt_issuers")
                        }
                    }
                    (jwt::JwksSource::Kubernetes(client), "jwks_kubernetes")
                } else if let Some(f) = &cfg.jwks_file {
                    (jwt::JwksSource::File(f.clone()), "jwks_file")
                } else if cfg.jwks_url.is_some() || cfg.oidc_issuer_url.is_some() {
                    let ca = match &cfg.jwks_ca_file {
                        Some(p) => Some(std::fs::read(p).map_err(|e| {
                            format!("invalid setting jwks_ca_file: {}: {e}", p.display())
                        })?),
                        None => None,
                    };
                    let fetcher = authn::fetch::Fetcher::new(ca.as_deref())
                        .map_err(|e| format!("invalid setting jwks_ca_file: {e}"))?;
                    match (&cfg.jwks_url, &cfg.oidc_issuer_url) {
                        (Some(url), _) => (
                            jwt::JwksSource::Url {
                                url: url.clone(),
                                fetcher: Box::new(fetcher),
                            },
                            "jwks_url",
                        ),
                        (None, Some(issuer)) => {
                            let url = fetcher.discover_jwks_uri(issuer).await.map_err(|e| {
                                format!("invalid setting oidc_issuer_url: discovery failed: {e}")
                            })?;
                            tracing::info!(%issuer, jwks_uri = %url, "OIDC discovery");
                            (
                                jwt::JwksSource::Url {
                                    url,
                                    fetcher: Box::new(fetcher),
                                },
                                "oidc_issuer_url",
                            )
                        }
                        (None, None) => unreachable!("checked above"),
                    }
                } else {
                    continue;
                };
                let v = jwt::JwksVerifier::new(
                    source,
                    issuers,
                    clock.clone(),
                    cfg.allow_legacy_tokens,
                    Method::Jwks,
                )
                .await
                .map_err(|e| format!("invalid setting {setting}: {e}"))?;
                sources.push(Source::Jwks(Arc::new(v)));
            }
            AuthnSource::Tokenreview => {
                if let Some(k) = &cfg.kubeconfig {
                    let client = authn::tokenreview::TokenReviewer::client_from_kubeconfig(k)
                        .await
                        .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
                    let issuers = review_issuers(cfg, &client).await;
                    tracing::info!(
                        ?issuers,
                        "TokenReview: tokens from other issuers are refused without a review"
                    );
                    sources.push(Source::TokenReview(Box::new(
                        authn::tokenreview::TokenReviewer::new(
                            client,
                            clock.clone(),
                            cfg.tokenreview_qps,
                            cfg.tokenreview_burst,
                            issuers,
                            cfg.allow_legacy_tokens,
                            metrics.clone(),
                        ),
                    )));
                }
            }
        }
    }
    if dev_mode {
        let signer = authn::devtoken::DevSigner::from_pem(
            &data
                .read_key("token-signer.key")
                .map_err(|e| e.to_string())?,
        )?;
        let v = jwt::JwksVerifier::new(
            jwt::JwksSource::Static(signer.jwks().to_string()),
            vec![authn::devtoken::DEV_ISSUER.to_string()],
            clock,
            false,
            Method::DevKey,
        )
        .await?;
        tracing::warn!(
            "no token source configured (--jwks-file / --kubeconfig): trusting the development token signer in {} (tokens from `meshca token`); do not use this in production",
            data.path().display()
        );
        sources.push(Source::Jwks(Arc::new(v)));
    }
    if sources.is_empty() {
        return Err(
            "no token source is usable: check authn_order against jwks_file/kubeconfig".into(),
        );
    }
    Ok(Authenticator::new(sources))
}

/// The issuers whose tokens TokenReview may be asked about: `jwt_issuers`
/// (default: the OIDC issuer URL, else the Kubernetes default
/// `https://kubernetes.default.svc.cluster.local`) plus the issuer the API
/// server announces (`/.well-known/openid-configuration`) when it answers
/// within 5 s at start-up.
async fn review_issuers(cfg: &ServeConfig, client: &kube::Client) -> Vec<String> {
    let mut issuers = cfg.jwt_issuers.clone();
    match tokio::time::timeout(Duration::from_secs(5), jwt::kube_issuer(client)).await {
        Ok(Ok(iss)) if !issuers.contains(&iss) => issuers.push(iss),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::info!(error = %e, "the API server does not announce its service-account issuer; TokenReview accepts the jwt_issuers only"),
        Err(_) => tracing::warn!("the API server did not announce its service-account issuer within 5s; TokenReview accepts the jwt_issuers only"),
    }
    issuers
}

/// Issues the CA's own serving certificate and builds a rustls config.
fn server_tls(
    ca: &Authority,
    cfg: &ServeConfig,
) -> Result<(Arc<ServerConfig>, std::time::SystemTime), String> {
    let key = crate::ca::CaKey::generate_p256().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let me = Workload {
        namespace: cfg.mesh.control_plane_ns.clone(),
        service_account: crate::identity::CA_SERVICE_ACCOUNT
            .parse()
            .expect("valid name"),
    };
    let issued = ca
        .issue_with_dns(&me, &cfg.server_dns_names, csr.der(), Some(cfg.max_ttl))
        .map_err(|e| format!("cannot issue the server certificate: {e}"))?;
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(issued.intermediates.iter().cloned());
    // rustls takes its own copy; ours (and `key`) are zeroized on drop.
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.to_pkcs8_der().expose().to_vec(),
    ));
    let provider = crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for r in &issued.bundle.roots {
        roots
            .add(r.clone())
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("server certificate: {e}"))?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(sc), issued.refresh_at))
}

/// Rebuilds the renewal index from the audit log (the leaves granted within
/// the longest leaf lifetime), so certificates issued before a restart can
/// still renew.
fn load_renewal_index(
    renewal: &crate::authn::renewal::Renewal,
    db: &std::path::Path,
    now: std::time::SystemTime,
    max_ttl: Duration,
) -> Result<(), String> {
    let store = crate::audit::store::SqliteStore::open_read_only(db).map_err(|e| e.to_string())?;
    let n = renewal
        .load_from_audit(&store, now, max_ttl + crate::ca::BACKDATE)
        .map_err(|e| format!("rebuilding the renewal index from the audit log: {e}"))?;
    tracing::info!(certificates = n, "renewal index loaded from the audit log");
    Ok(())
}

/// Drops expired certificates from the renewal index once a minute.
fn spawn_renewal_pruning(renewal: Arc<crate::authn::renewal::Renewal>, clock: Arc<dyn Clock>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            renewal.prune(clock.now());
        }
    });
}

/// A throw-away self-signed server certificate, for when the CA cannot
/// issue (recovery mode): the server keeps running so an operator can
/// rotate, and clients see a certificate they do not trust rather than no
/// server at all.
fn fallback_tls(cfg: &ServeConfig) -> Result<Arc<ServerConfig>, String> {
    let key = crate::ca::CaKey::generate_p256().map_err(|e| e.to_string())?;
    let mut names = cfg.server_dns_names.clone();
    names.push(server_identity(cfg));
    let cert = rcgen::CertificateParams::new(names)
        .map_err(|e| e.to_string())?
        .self_signed(&key)
        .map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.to_pkcs8_der().expose().to_vec(),
    ));
    let mut sc = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| format!("server certificate: {e}"))?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(sc))
}

/// The DNS identity the server certificate carries (clients verify it).
pub fn server_identity(cfg: &ServeConfig) -> String {
    crate::identity::ca_server_name(
        cfg.mesh.control_plane_ns.as_str(),
        cfg.mesh.trust_domain.as_str(),
    )
}

/// Starts the server: loads (or creates) the CA and binds both ports.
pub async fn start(cfg: ServeConfig) -> Result<Running, String> {
    if cfg.kubernetes {
        tracing::info!(
            namespace = %cfg.mesh.control_plane_ns,
            replica = %cfg.replica,
            state_secret = ?cfg.state_secret,
            audit_key_secret = ?cfg.audit_key_secret,
            publish_bundle = cfg.publish.is_some(),
            "in-cluster mode"
        );
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let data = DataDir::new(&cfg.data_dir);
    // Replicated: the shared state (a Secret), when it exists, is the CA;
    // this replica's data directory becomes a copy of it.
    let shared = match (&cfg.state_secret, &cfg.kubeconfig) {
        (Some(name), Some(kc)) => {
            let client = crate::authn::tokenreview::TokenReviewer::client_from_kubeconfig(kc)
                .await
                .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
            std::fs::create_dir_all(&cfg.data_dir)
                .map_err(|e| format!("{}: {e}", cfg.data_dir.display()))?;
            let ss = Arc::new(crate::kubernetes::state::SecretState::new(
                client,
                cfg.mesh.control_plane_ns.as_str(),
                name,
                &cfg.replica,
                data.clone(),
                metrics.clone(),
            ));
            if ss.pull().await.map_err(|e| e.to_string())? {
                tracing::info!(secret = %name, "loaded the CA state shared by the other replicas");
            }
            Some(ss)
        }
        _ => None,
    };
    if !data.is_initialized() {
        let opts = InitOptions {
            issuer_lifetime: cfg.issuer_lifetime,
            import_root: cfg.init_root.clone(),
            ..Default::default()
        };
        let report = data
            .init(&opts, clock.now())
            .map_err(|e| format!("initializing {}: {e}", cfg.data_dir.display()))?;
        tracing::info!(
            data_dir = %cfg.data_dir.display(),
            root = %report.root_fingerprint,
            issuer = %report.issuer_fingerprint,
            imported = report.imported,
            "data directory was empty: created the CA (root {}, and a new issuer)",
            if report.imported { "imported" } else { "generated" }
        );
    }
    // One server per data directory: offline `meshca rotation` commands
    // take the same lock, so they cannot race a running server.
    let lock = lock_data_dir(&data).map_err(|e| e.to_string())?;
    let mgr = Arc::new(
        crate::trust::manager::TrustManager::open(data.clone(), clock.now())
            .map_err(|e| e.to_string())?,
    );
    // Finish whatever a crash interrupted, renew an expired issuer under a
    // still-valid root; an expired root is reported, not fatal (recovery is
    // `rotation prepare` + `activate --force` against this running server).
    let reconciled = mgr
        .reconcile(cfg.issuer_lifetime, clock.now())
        .map_err(|e| e.to_string())?;
    let loaded = data.load().map_err(|e| e.to_string())?;
    let active_root = mgr
        .state()
        .active()
        .map(|r| r.id.clone())
        .ok_or("the rotation state has no active root")?;
    let policy = Policy {
        mesh: cfg.mesh.clone(),
        default_ttl: cfg.default_ttl,
        max_ttl: cfg.max_ttl,
        min_ttl: cfg.min_ttl,
    };
    let ca = Arc::new(Authority::new(
        policy,
        clock.clone(),
        loaded.issuer.with_root(active_root),
        loaded.roots,
    ));
    ca.set_bundle(mgr.bundle().map_err(|e| e.to_string())?);
    metrics.set_issuer_expiry(crate::util::clock::unix_secs(ca.issuer().not_after));
    let mut authn = build_authenticator(&cfg, &data, clock.clone(), metrics.clone()).await?;
    // A token whose pod or service account is gone must stop working
    // within seconds, even when verified locally: keep a metadata-only
    // watch of both (started below, once there is a stop signal).
    let bindings = match (&cfg.kubeconfig, cfg.watch_token_bindings) {
        (Some(kc), true) => {
            let client = crate::authn::tokenreview::TokenReviewer::client_from_kubeconfig(kc)
                .await
                .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
            let objects = Arc::new(crate::kubernetes::bindings::BoundObjects::new(
                metrics.clone(),
            ));
            authn = authn.with_bindings(objects.clone());
            Some((client, objects))
        }
        _ => None,
    };
    let authn = Arc::new(authn);
    tracing::info!(sources = ?authn.describe(), "token sources");
    for j in authn.remote_jwks() {
        let every = cfg.jwks_refresh_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                j.refresh_now().await;
            }
        });
    }
    let tracker = Arc::new(crate::trust::propagation::Tracker::default());
    let connections =
        api::connections::Connections::new(cfg.limits.max_connections, metrics.clone());
    let mut core = Core::new(
        ca.clone(),
        authn,
        cfg.audiences.clone(),
        cfg.rate_limit,
        cfg.rate_burst,
        metrics.clone(),
    )
    .with_identity_limit(
        cfg.limits.identity_rate_limit,
        cfg.limits.identity_rate_burst,
    )
    .with_watch_settings(cfg.limits.watch)
    .with_connections(connections.clone())
    .with_tracker(tracker.clone());
    // The operator's revocations: a list that does not parse stops the
    // start rather than re-admitting what was shut out.
    let revocations = Arc::new(crate::revocation::Revocations::open(
        &cfg.data_dir,
        metrics.clone(),
    )?);
    let renewal = Arc::new(crate::authn::renewal::Renewal::new(
        cfg.renewal_max_age,
        metrics.clone(),
    ));
    core = core
        .with_revocations(revocations.clone())
        .with_renewal(renewal.clone());
    let mut audit_guard = None;
    let mut audit_log = None;
    let mut refusal_gate = None;
    if cfg.audit_log {
        // Replicas sharing one CA each keep their own log (their own tree
        // and checkpoints), named by replica so auditors can tell them apart.
        let log_name = match &cfg.state_secret {
            Some(_) => format!("{}/{}", cfg.mesh.trust_domain, cfg.replica),
            None => cfg.mesh.trust_domain.to_string(),
        };
        if let (Some(name), Some(kc)) = (&cfg.audit_key_secret, &cfg.kubeconfig) {
            let client = crate::authn::tokenreview::TokenReviewer::client_from_kubeconfig(kc)
                .await
                .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
            let outcome = crate::kubernetes::audit_key::sync(
                client,
                cfg.mesh.control_plane_ns.as_str(),
                name,
                &cfg.data_dir,
            )
            .await
            .map_err(|e| format!("the audit signing key (setting audit_key_secret): {e}"))?;
            tracing::info!(secret = %name, ?outcome, "audit signing key shared through a Secret");
        }
        let (log, guard) = crate::audit::AuditLog::open_limited(
            &cfg.data_dir,
            &log_name,
            clock.clone(),
            metrics.clone(),
            cfg.audit_max_bytes,
        )
        .map_err(|e| e.to_string())?;
        let every = cfg.audit_checkpoint_interval;
        let ticker = log.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                ticker.request_checkpoint();
            }
        });
        let gate = Arc::new(crate::audit::intake::RefusalGate::new(
            cfg.audit_refusal,
            clock.clone(),
        ));
        // Summaries of folded refusals are appended once their window ends.
        let (drainer, g) = (log.clone(), gate.clone());
        let every =
            (cfg.audit_refusal.window / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                append_summaries(&drainer, &g, false).await;
            }
        });
        core = core.with_audit(log.clone()).with_refusal_gate(gate.clone());
        load_renewal_index(&renewal, log.db_path(), clock.now(), cfg.max_ttl)?;
        refusal_gate = Some(gate);
        audit_log = Some(log);
        audit_guard = Some(guard);
    } else {
        tracing::warn!(
            "the audit log is off (audit_log = false): decisions are not recorded durably"
        );
    }
    let core = Arc::new(core);
    let rotation = crate::trust::service::RotationService::new(
        mgr,
        ca.clone(),
        tracker.clone(),
        audit_log.clone(),
        cfg.rotation_settings(),
        metrics.clone(),
    );
    rotation.observe(renewal.clone());
    rotation.observe(revocations.clone());
    rotation
        .publish(&reconciled)
        .await
        .map_err(|e| e.to_string())?;
    spawn_renewal_pruning(renewal.clone(), clock.clone());
    if let Some(ss) = shared {
        rotation.set_shared(ss.clone());
        if !ss.is_shared() {
            // First replica: this CA becomes the shared one, unless another
            // replica created it meanwhile (then adopt theirs).
            match crate::trust::service::SharedState::push(ss.as_ref()).await? {
                true => tracing::info!("created the shared CA state"),
                false => {
                    rotation.pull_shared().await.map_err(|e| e.to_string())?;
                    tracing::info!("another replica created the shared CA state first; adopted it");
                }
            }
        }
    }
    let admin_token = crate::admin::rotation::ensure_token(&cfg.data_dir)?;

    let (tls, refresh_at) = match server_tls(&ca, &cfg) {
        Ok(x) => x,
        Err(e) => {
            // Recovery mode: nothing can be issued until an operator
            // rotates, but the server must run to accept that rotation.
            tracing::error!(error = %e, "the CA cannot issue its own server certificate; serving a temporary self-signed one until a rotation brings the CA back (see `meshca rotation status`)");
            (fallback_tls(&cfg)?, clock.now() + Duration::from_secs(30))
        }
    };
    let tls = Arc::new(ArcSwap::new(tls));

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {} (setting listen): {e}", cfg.listen))?;
    let grpc_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin = TcpListener::bind(cfg.admin_listen).await.map_err(|e| {
        format!(
            "cannot listen on {} (setting admin_listen): {e}",
            cfg.admin_listen
        )
    })?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let mut leading: Option<watch::Receiver<bool>> = None;
    let (stop_tx, stop_rx) = watch::channel(false);

    rotation.spawn(stop_rx.clone());
    if let Some((client, objects)) = bindings {
        crate::kubernetes::bindings::follow(client, objects, stop_rx.clone());
    }
    if let (Some(name), Some(kc)) = (&cfg.state_secret, &cfg.kubeconfig) {
        let client = crate::authn::tokenreview::TokenReviewer::client_from_kubeconfig(kc)
            .await
            .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let ns = cfg.mesh.control_plane_ns.to_string();
        tokio::spawn(crate::kubernetes::watch::follow::<
            k8s_openapi::api::core::v1::Secret,
        >(
            client,
            move |c| kube::Api::namespaced(c, &ns),
            crate::kubernetes::watch::Target {
                resource: "secrets",
                name: Some(name.clone()),
                labels: None,
            },
            wake.clone(),
            stop_rx.clone(),
            metrics.clone(),
        ));
        rotation.follow_shared(cfg.state_poll_interval, wake, stop_rx.clone());
    }

    let singleton = cfg.state_secret.is_some() || cfg.issuer_secret.is_some();
    let election = match (&cfg.publish, singleton, &cfg.kubeconfig) {
        (Some(p), _, Some(kc)) => Some((p.lease.clone(), p.lease_duration, kc.clone())),
        (None, true, Some(kc)) => Some((
            "meshca-leader".to_string(),
            Duration::from_secs(15),
            kc.clone(),
        )),
        _ => None,
    };

    // In Kubernetes: say at start-up which permissions are missing.
    if let Some(kc) = cfg.kubeconfig.clone() {
        let needs = crate::kubernetes::rbac::needs(&crate::kubernetes::rbac::Uses {
            tokenreview: cfg.authn_order.contains(&AuthnSource::Tokenreview),
            token_bindings: cfg.watch_token_bindings,
            jwks: cfg.jwks_kubernetes && cfg.authn_order.contains(&AuthnSource::Jwks),
            publish: cfg.publish.is_some(),
            state_secret: cfg.state_secret.as_deref(),
            audit_key_secret: cfg.audit_key_secret.as_deref().filter(|_| cfg.audit_log),
            issuer_secret: cfg.issuer_secret.as_deref(),
            propagation_reports: cfg.state_secret.is_some(),
            lease: election.as_ref().map(|(l, _, _)| l.as_str()),
            namespace: cfg.mesh.control_plane_ns.as_str(),
        });
        let check = async {
            let client =
                crate::authn::tokenreview::TokenReviewer::client_from_kubeconfig(&kc).await?;
            crate::kubernetes::rbac::missing(&client, &needs)
                .await
                .map_err(|e| e.to_string())
        };
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

    // In Kubernetes: one replica at a time (holding the Lease) does the
    // singleton work — publishing the bundle ConfigMaps, and with shared
    // state the issuer renewal, housekeeping and automatic rotation.
    if let Some((lease, lease_duration, kc)) = election {
        let client = crate::authn::tokenreview::TokenReviewer::client_from_kubeconfig(&kc)
            .await
            .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
        let leader = crate::kubernetes::lease::run(
            client.clone(),
            crate::kubernetes::lease::Settings {
                namespace: cfg.mesh.control_plane_ns.to_string(),
                name: lease,
                identity: cfg.replica.clone(),
                lease_duration,
                retry_period: (lease_duration / 5).max(Duration::from_millis(100)),
            },
            stop_rx.clone(),
            metrics.clone(),
        );
        if cfg.state_secret.is_some() {
            rotation.set_leader(leader.clone());
        }
        if let Some(p) = cfg.publish.clone() {
            // New namespaces and deleted or edited ConfigMaps wake the
            // publisher at once; the resync period is the safety net.
            let wake = Arc::new(tokio::sync::Notify::new());
            tokio::spawn(crate::kubernetes::watch::follow::<
                k8s_openapi::api::core::v1::Namespace,
            >(
                client.clone(),
                kube::Api::all,
                crate::kubernetes::watch::Target {
                    resource: "namespaces",
                    name: None,
                    labels: None,
                },
                wake.clone(),
                stop_rx.clone(),
                metrics.clone(),
            ));
            tokio::spawn(crate::kubernetes::watch::follow::<
                k8s_openapi::api::core::v1::ConfigMap,
            >(
                client.clone(),
                kube::Api::all,
                crate::kubernetes::watch::Target {
                    resource: "configmaps",
                    name: Some(crate::kubernetes::publish::CONFIGMAP.to_string()),
                    labels: None,
                },
                wake.clone(),
                stop_rx.clone(),
                metrics.clone(),
            ));
            tokio::spawn(crate::kubernetes::publish::run(
                client.clone(),
                crate::kubernetes::publish::Settings {
                    namespace_labels: p.namespace_labels.clone(),
                    resync: p.resync,
                },
                ca.watch_bundle(),
                leader.clone(),
                wake,
                metrics.clone(),
            ));
        }
        if cfg.state_secret.is_some() {
            // Replicas share one CA: the activation gate must count every
            // replica's clients.
            tokio::spawn(crate::kubernetes::reports::run(
                client.clone(),
                crate::kubernetes::reports::Settings {
                    namespace: cfg.mesh.control_plane_ns.to_string(),
                    replica: cfg.replica.clone(),
                    interval: cfg.propagation_report_interval,
                },
                tracker.clone(),
                Some(leader.clone()),
                stop_rx.clone(),
                metrics.clone(),
            ));
        }
        if let Some(name) = cfg.issuer_secret.clone() {
            tokio::spawn(crate::kubernetes::issuer_secret::run(
                client.clone(),
                crate::kubernetes::issuer_secret::Settings {
                    namespace: cfg.mesh.control_plane_ns.to_string(),
                    name,
                    replica: cfg.replica.clone(),
                },
                rotation.clone(),
                Some(leader.clone()),
                stop_rx.clone(),
            ));
        }
        leading = Some(leader);
    }

    // File-based consumers: the bundle file follows every change.
    if let Some(path) = cfg.bundle_file.clone() {
        let mut bundle = ca.watch_bundle();
        let mut stop = stop_rx.clone();
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

    // Renew the server certificate before it expires, and rebuild the TLS
    // config when the trust bundle changes.
    {
        let tls = tls.clone();
        let ca = ca.clone();
        let cfg = cfg.clone();
        let mut stop = stop_rx.clone();
        let mut bundle = ca.watch_bundle();
        let rotation = rotation.clone();
        tokio::spawn(async move {
            let mut refresh_at = refresh_at;
            loop {
                let wait = refresh_at
                    .duration_since(ca.clock().now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    r = bundle.changed() => { if r.is_err() { return; } }
                    _ = rotation.issuer_changed() => {}
                    _ = stop.changed() => return,
                }
                match server_tls(&ca, &cfg) {
                    Ok((c, next)) => {
                        tls.store(c);
                        refresh_at = next;
                        tracing::info!(next_renewal = %crate::util::clock::rfc3339(next), "renewed the CA's server certificate");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "server certificate renewal failed; retrying in 30s");
                        refresh_at = ca.clock().now() + Duration::from_secs(30);
                    }
                }
            }
        });
    }

    // Accept loop: TLS handshakes run concurrently, finished streams feed tonic.
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(accept_loop(
        listener,
        tls.clone(),
        connections.clone(),
        cfg.limits.handshake_timeout,
        conn_tx,
        stop_rx.clone(),
        metrics.clone(),
    ));
    if let Some(idle) = cfg.limits.idle_timeout {
        let conns = connections.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => { conns.close_idle(idle); }
                    _ = stop.changed() => return,
                }
            }
        });
    }

    let native = proto::meshca::identity_server::IdentityServer::new(api::native::NativeService(
        core.clone(),
    ))
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);
    let linkerd = proto::linkerd::identity_server::IdentityServer::new(
        api::linkerd::LinkerdService(core.clone()),
    )
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);
    let istio = proto::istio::istio_certificate_service_server::IstioCertificateServiceServer::new(
        api::istio::IstioService(core.clone()),
    )
    .max_decoding_message_size(api::MAX_MESSAGE_BYTES);

    let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
    let mut grpc_stop = stop_rx.clone();
    let limits = cfg.limits.clone();
    let grpc = tokio::spawn(async move {
        let r = grpc_builder(&limits)
            .layer(api::connections::RequestLayer::new(
                connections,
                api::MAX_MESSAGE_BYTES,
            ))
            .add_service(native)
            .add_service(linkerd)
            .add_service(istio)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });

    let open_metrics = metrics.clone();
    let ready_ca = ca.clone();
    let ready_authn = core.authn.clone();
    let ready_audit = audit_log.clone();
    // Open to probes and Prometheus: nothing here changes or reveals the CA.
    let open = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    open_metrics.render(),
                )
            }),
        )
        .route("/live", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let ca = ready_ca.clone();
                let authn = ready_authn.clone();
                let audit = ready_audit.clone();
                async move {
                    // Without a writable audit log every certificate is
                    // withheld: take this replica out of rotation, say why.
                    if let Some(p) = audit.as_ref().and_then(|l| l.storage_problem()) {
                        return (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: the audit log cannot write ({p}); certificates are refused with UNAVAILABLE until it can: free space on the data volume (docs/audit.md, \"Sizing\")\n"),
                        );
                    }
                    let now = ca.clock().now();
                    let iss = ca.issuer();
                    if iss.not_after > now {
                        // Keys are loaded; can a token be checked?
                        match authn.readiness() {
                            Ok(()) => (axum::http::StatusCode::OK, "ready\n".to_string()),
                            Err(e) => (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                format!("not ready: {e}\n"),
                            ),
                        }
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!(
                                "not ready: issuer {} expired at {}; see `meshca rotation status`\n",
                                &iss.fingerprint[..16],
                                crate::util::clock::rfc3339(iss.not_after)
                            ),
                        )
                    }
                }
            }),
        );
    // For operators and auditors: the admin token on every method. Every
    // route that reads or changes CA state (revocation too) belongs here.
    let protected = crate::admin::rotation::routes(rotation.clone(), &admin_token);
    let protected = protected.merge(crate::admin::revocation::routes(
        crate::revocation::RevocationService::new(
            revocations.clone(),
            audit_log.clone(),
            Some(rotation.clone()),
            clock.clone(),
        ),
        &admin_token,
    ));
    let protected = match &audit_log {
        Some(log) => protected.merge(crate::admin::audit::routes(log.clone())),
        None => protected,
    };
    let router = open.merge(crate::admin::guard::protect(protected, &admin_token));
    let router = crate::admin::guard::check_hosts(
        router,
        crate::admin::guard::HostRule::new(admin_addr, &cfg.admin_allowed_hosts),
    );
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(async move {
        let r = axum::serve(admin, router)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.changed().await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "admin server failed");
        }
    });

    let final_log = audit_log.clone();
    let task = tokio::spawn(async move {
        let _ = shutdown_rx.await;
        let _ = stop_tx.send(true);
        // Graceful: in-flight requests finish and clients get GOAWAY. A
        // client that keeps its connection open past the grace period is cut.
        let mut grpc = grpc;
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut grpc)
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open {}s after shutdown began; closing them",
                DRAIN_TIMEOUT.as_secs()
            );
            grpc.abort();
        }
        let mut admin_task = admin_task;
        if tokio::time::timeout(Duration::from_secs(1), &mut admin_task)
            .await
            .is_err()
        {
            admin_task.abort();
        }
        // In-flight requests are done: record the folded refusals, then
        // sign the final checkpoint.
        if let (Some(log), Some(gate)) = (&final_log, &refusal_gate) {
            append_summaries(log, gate, true).await;
        }
        if let Some(g) = audit_guard {
            let _ = tokio::task::spawn_blocking(move || g.stop()).await;
        }
        drop(lock);
    });

    let server_name = server_identity(&cfg);
    tracing::info!(%grpc_addr, %admin_addr, server_name = %server_name, trust_domain = %cfg.mesh.trust_domain, "meshca serving");
    Ok(Running {
        leading,
        metrics,
        grpc_addr,
        admin_addr,
        ca,
        server_name,
        audit: audit_log,
        shutdown: Some(shutdown_tx),
        task,
    })
}

/// Appends the summary entries of folded refusals that are due.
async fn append_summaries(
    log: &crate::audit::AuditLog,
    gate: &crate::audit::intake::RefusalGate,
    all: bool,
) {
    for e in gate.drain(all) {
        if let Err(err) = log.append(e).await {
            tracing::error!(error = %err, "could not record a summary of folded refusals in the audit log");
        }
    }
}

/// The HTTP/2 settings of the gRPC listener.
fn grpc_builder(limits: &crate::config::Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(limits.keepalive_interval)
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .http2_max_header_list_size(limits.max_header_bytes)
}

/// Accepts TCP connections under the connection cap and runs their TLS
/// handshakes concurrently, each with a deadline; finished ones go to tonic.
/// A connection over the cap is closed at once (the client sees a reset
/// and retries) rather than left waiting in the backlog.
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<ServerConfig>>,
    conns: Arc<api::connections::Connections>,
    handshake_timeout: Duration,
    conn_tx: tokio::sync::mpsc::Sender<
        std::io::Result<
            tokio_rustls::server::TlsStream<api::connections::Guarded<tokio::net::TcpStream>>,
        >,
    >,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Some(slot) = conns.try_open(peer) else {
            metrics.grpc_connection_refused("limit");
            // One line a minute at most: a flood must not flood the log.
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                last_warning = Some(std::time::Instant::now());
                tracing::warn!(%peer, open = conns.open(), "gRPC connection refused: grpc_max_connections reached (see meshca_grpc_connections_refused_total)");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
        let conn_tx = conn_tx.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let io = api::connections::Guarded::new(tcp, slot);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                Ok(Ok(s)) => {
                    let _ = conn_tx.send(Ok(s)).await;
                }
                Ok(Err(e)) => {
                    metrics.grpc_connection_closed("handshake_failed");
                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                }
                Err(_) => {
                    metrics.grpc_connection_closed("handshake_timeout");
                    tracing::debug!(%peer, "TLS handshake timed out")
                }
            }
        });
    }
}
