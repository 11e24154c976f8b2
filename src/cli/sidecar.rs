//! `meshca agent` and `meshca proxy`: the commands a workload runs beside itself.
//!
//! Owns: their flags, wiring the agent to its outputs (files, Workload API)
//! and the proxy to its identity source, the small admin endpoint
//! (`/metrics`, `/live`, `/ready`), and running until SIGTERM/SIGINT. Must
//! not: hold logic of the agent or the proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use tokio::sync::watch;

use crate::agent::{self, AgentConfig, State};
use crate::config::{HumanDuration, LogFormat};
use crate::metrics::Metrics;
use crate::proxy::{self, ProxyConfig};

/// How to reach the CA and authenticate to it (shared by agent and proxy).
#[derive(Debug, Clone, Args)]
pub struct CaFlags {
    /// The CA: host:port, or several comma-separated; a name may resolve to
    /// several replicas (a headless Service), re-resolved on each connection.
    #[arg(long, env = "MESHCA_CA_ADDRESS", default_value = "127.0.0.1:8080")]
    pub ca_address: String,
    /// The name in the CA's server certificate [default: the CA's own mesh identity].
    #[arg(long, env = "MESHCA_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// PEM roots trusted for the CA at first contact (the bundle ConfigMap in Kubernetes).
    #[arg(
        long,
        env = "MESHCA_BOOTSTRAP_BUNDLE",
        default_value = "meshca-data/bundle.pem"
    )]
    pub bootstrap_bundle: PathBuf,
    /// The workload's service-account token file (re-read on every request).
    #[arg(long, env = "MESHCA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Requested certificate lifetime [default: the CA's].
    #[arg(long, env = "MESHCA_TTL")]
    pub ttl: Option<HumanDuration>,
    /// SPIFFE trust domain.
    #[arg(long, env = "MESHCA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The CA's namespace (part of its server name).
    #[arg(long, env = "MESHCA_CONTROL_PLANE_NAMESPACE", default_value = "meshca")]
    pub control_plane_namespace: String,
}

impl CaFlags {
    fn agent_config(&self) -> Result<AgentConfig, String> {
        let token_file = self
            .token_file
            .clone()
            .ok_or("--token-file is required (the projected service-account token)")?;
        Ok(AgentConfig {
            ca_address: self.ca_address.clone(),
            server_name: self.ca_server_name.clone().unwrap_or_else(|| {
                crate::identity::ca_server_name(&self.control_plane_namespace, &self.trust_domain)
            }),
            bootstrap_bundle: self.bootstrap_bundle.clone(),
            token_file,
            requested_ttl: self.ttl.map(|t| t.0),
        })
    }
}

/// `meshca agent` flags.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The CA.
    #[command(flatten)]
    pub ca: CaFlags,
    /// Write chain.pem, key.pem (0600) and bundle.pem here on every change.
    #[arg(long, env = "MESHCA_OUT_DIR")]
    pub out_dir: Option<PathBuf>,
    /// Run this (sh -c) after each file update.
    #[arg(long, env = "MESHCA_ON_UPDATE", requires = "out_dir")]
    pub on_update: Option<String>,
    /// Serve the SPIFFE Workload API on this Unix socket (unix:///path or /path).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub workload_api_socket: Option<String>,
    /// The Workload API socket's file mode, octal (default 666: any local
    /// uid may connect; the socket's directory is the access boundary).
    #[arg(long, env = "MESHCA_WORKLOAD_API_SOCKET_MODE", value_parser = parse_mode)]
    pub workload_api_socket_mode: Option<u32>,
    /// Admin HTTP (/metrics, /live, /ready).
    #[arg(long, env = "MESHCA_AGENT_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// `meshca proxy` flags.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Identity from this Workload API socket (an agent beside the proxy);
    /// without it the proxy runs an agent in-process (--token-file …).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub workload_api_socket: Option<String>,
    /// The CA (in-process agent only).
    #[command(flatten)]
    pub ca: CaFlags,
    /// Inbound: LISTEN=APP, e.g. 0.0.0.0:4143=127.0.0.1:8080 (mTLS in, plaintext to the app).
    #[arg(long)]
    pub inbound: Option<String>,
    /// Inbound: a SPIFFE ID allowed in (repeatable); a prefix when it ends in / or *.
    #[arg(long)]
    pub allow: Vec<String>,
    /// Outbound: LISTEN=UPSTREAM, e.g. 127.0.0.1:4140=api.shop.svc:4143 (plaintext in, mTLS out).
    #[arg(long)]
    pub outbound: Option<String>,
    /// Outbound: the SPIFFE ID the upstream must present.
    #[arg(long)]
    pub upstream_identity: Option<String>,
    /// How often the upstream name is re-resolved.
    #[arg(long, default_value = "5s")]
    pub resolve_interval: HumanDuration,
    /// Admin HTTP (/metrics, /live, /ready).
    #[arg(long, env = "MESHCA_PROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn split_pair(flag: &str, v: &str) -> Result<(SocketAddr, String), String> {
    let (l, t) = v
        .split_once('=')
        .ok_or_else(|| format!("--{flag} {v:?}: expected LISTEN=TARGET"))?;
    let l: SocketAddr = l
        .parse()
        .map_err(|e| format!("--{flag} {v:?}: listen address: {e}"))?;
    if t.rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_none()
    {
        return Err(format!("--{flag} {v:?}: target must be host:port"));
    }
    Ok((l, t.to_string()))
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Serves /metrics, /live and /ready (ready while a valid certificate is held).
async fn admin(
    addr: SocketAddr,
    state: watch::Receiver<State>,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    use axum::routing::get;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (admin): {e}"))?;
    let router = axum::Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/live", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let s = state.borrow().clone();
                async move {
                    match s.svid {
                        Some(v) if v.not_after > SystemTime::now() => {
                            (axum::http::StatusCode::OK, "ready\n".to_string())
                        }
                        Some(_) => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "certificate expired\n".to_string(),
                        ),
                        None => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "no certificate yet\n".to_string(),
                        ),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    Ok(())
}

/// An octal file mode such as 660 or 0o660.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "{s:?} is not a file mode; give octal permission bits such as 660 or 666"
        )),
    }
}

/// Runs `meshca agent` until a signal.
pub(crate) async fn run_agent(args: AgentArgs) -> Result<(), crate::cli::Error> {
    let _log = crate::cli::init_logging(args.log_format);
    let a = agent::start(args.ca.agent_config()?, Arc::new(Metrics::new()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = args.admin_listen {
        admin(addr, a.watch(), a.metrics().clone()).await?;
    }
    if let Some(dir) = args.out_dir.clone() {
        tokio::spawn(agent::files::follow(dir, args.on_update.clone(), a.watch()));
    }
    let api = match &args.workload_api_socket {
        Some(s) => {
            let path = agent::workload_api::socket_path(s)?;
            let mut stop = stop_rx.clone();
            let mode = args
                .workload_api_socket_mode
                .unwrap_or(agent::workload_api::DEFAULT_SOCKET_MODE);
            Some(
                agent::workload_api::serve_claimed(
                    path,
                    mode,
                    a.workload_source(),
                    args.ca.trust_domain.clone(),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await?,
            )
        }
        None => None,
    };
    if args.out_dir.is_none() && api.is_none() {
        tracing::warn!(
            "neither --out-dir nor --workload-api-socket: the certificate is only kept in memory"
        );
    }
    tokio::select! {
        r = a.ready(Duration::from_secs(3600 * 24 * 365)) => { r?; }
        _ = shutdown_signal() => return Ok(()),
    }
    shutdown_signal().await;
    tracing::info!("agent stopping");
    let _ = stop_tx.send(true);
    if let Some((task, claim)) = api {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        // Only if still ours: never a successor's socket.
        claim.release();
    }
    a.stop();
    Ok(())
}

/// Runs `meshca proxy` until a signal.
pub(crate) async fn run_proxy(args: ProxyArgs) -> Result<(), crate::cli::Error> {
    let _log = crate::cli::init_logging(args.log_format);
    let cfg = ProxyConfig {
        inbound: args
            .inbound
            .as_deref()
            .map(|v| split_pair("inbound", v))
            .transpose()?,
        allow: args.allow.clone(),
        outbound: args
            .outbound
            .as_deref()
            .map(|v| split_pair("outbound", v))
            .transpose()?,
        upstream_identity: args.upstream_identity.clone(),
        resolve_interval: args.resolve_interval.0,
    };
    // One registry for the process: the embedded agent's series and the
    // proxy's are served by the same /metrics.
    let metrics = Arc::new(Metrics::new());
    let (identity, _agent) = match &args.workload_api_socket {
        Some(s) => (
            proxy::identity::follow(agent::workload_api::socket_path(s)?),
            None,
        ),
        None => {
            let a = agent::start(args.ca.agent_config()?, metrics.clone())?;
            (a.watch(), Some(a))
        }
    };
    if let Some(addr) = args.admin_listen {
        admin(addr, identity.clone(), metrics.clone()).await?;
    }
    let p = proxy::start(cfg, identity, metrics).await?;
    tracing::info!(inbound = ?p.inbound_addr, outbound = ?p.outbound_addr, "meshca proxy running");
    shutdown_signal().await;
    tracing::info!("proxy stopping");
    Ok(())
}
