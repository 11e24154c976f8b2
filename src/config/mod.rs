//! Typed, validated configuration for `meshca serve`.
//!
//! Owns: the settings, their defaults, and precedence — command-line flags
//! over `MESHCA_*` environment variables (both through clap) over the TOML
//! file named by `--config`. Invalid values fail at start-up with a message
//! naming the setting. Must not: open sockets or files other than the TOML
//! file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::util::duration::{parse_bytes, parse_duration, HumanDuration};

use crate::api::Audiences;
use crate::identity::Mesh;

/// Token sources, in the order they are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthnSource {
    /// Local JWT verification against a JWKS.
    Jwks,
    /// Kubernetes TokenReview.
    Tokenreview,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Every `serve` setting. All optional here; defaults apply after merging
/// flags, environment and file. The same names (with `_`) are the TOML keys.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML configuration file (lowest precedence).
    #[arg(long, env = "MESHCA_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// In-cluster mode: kubeconfig `in-cluster`, the namespace from the pod's
    /// service account, tokens checked against the API server's JWKS with
    /// TokenReview as fallback, CA state shared through Secret `meshca-ca`,
    /// the audit signing key in Secret `meshca-audit-key`, and the bundle
    /// published to namespaces by an elected leader. Each can still be set
    /// explicitly. [default: on when running in a pod (KUBERNETES_SERVICE_HOST
    /// set and a service-account token mounted); `--kubernetes=false` turns it off]
    #[arg(
        long,
        env = "MESHCA_KUBERNETES",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub kubernetes: Option<bool>,
    /// Data directory holding the CA's keys and certificates [default: ./meshca-data].
    #[arg(long, env = "MESHCA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC (TLS) listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "MESHCA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listen address for /metrics, /live, /ready [default: 127.0.0.1:9990].
    #[arg(long, env = "MESHCA_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// SPIFFE trust domain [default: cluster.local].
    #[arg(long, env = "MESHCA_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Namespace the CA runs in; part of every DNS identity [default: meshca].
    #[arg(long, env = "MESHCA_CONTROL_PLANE_NAMESPACE")]
    pub control_plane_namespace: Option<String>,
    /// Extra DNS names for the CA's own server certificate (repeatable).
    #[arg(
        long = "server-dns-name",
        env = "MESHCA_SERVER_DNS_NAMES",
        value_delimiter = ','
    )]
    pub server_dns_names: Option<Vec<String>>,
    /// Leaf lifetime when a request names none [default: 24h].
    #[arg(long, env = "MESHCA_DEFAULT_TTL")]
    pub default_ttl: Option<HumanDuration>,
    /// Longest leaf lifetime; longer requests are clamped [default: 24h].
    #[arg(long, env = "MESHCA_MAX_TTL")]
    pub max_ttl: Option<HumanDuration>,
    /// Shortest leaf lifetime accepted [default: 5m].
    #[arg(long, env = "MESHCA_MIN_TTL")]
    pub min_ttl: Option<HumanDuration>,
    /// Token audience for the native API [default: meshca].
    #[arg(long, env = "MESHCA_NATIVE_AUDIENCE")]
    pub native_audience: Option<String>,
    /// Token audience for the Linkerd API [default: identity.l5d.io].
    #[arg(long, env = "MESHCA_LINKERD_AUDIENCE")]
    pub linkerd_audience: Option<String>,
    /// Token audience for the Istio API [default: istio-ca].
    #[arg(long, env = "MESHCA_ISTIO_AUDIENCE")]
    pub istio_audience: Option<String>,
    /// JWKS file for local token verification.
    #[arg(long, env = "MESHCA_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (HTTPS) for local token verification, e.g. the API server's
    /// /openid/v1/jwks.
    #[arg(long, env = "MESHCA_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// OIDC issuer URL whose discovery document names the JWKS
    /// (<issuer>/.well-known/openid-configuration).
    #[arg(long, env = "MESHCA_OIDC_ISSUER_URL")]
    pub oidc_issuer_url: Option<String>,
    /// PEM CA bundle trusted when fetching the JWKS / discovery document
    /// [default: the system roots].
    #[arg(long, env = "MESHCA_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    /// How often a fetched JWKS is refreshed [default: 5m].
    #[arg(long, env = "MESHCA_JWKS_REFRESH_INTERVAL")]
    pub jwks_refresh_interval: Option<HumanDuration>,
    /// Accepted token issuers for JWKS verification (repeatable)
    /// [default: the OIDC issuer URL if set, else https://kubernetes.default.svc.cluster.local].
    #[arg(long = "jwt-issuer", env = "MESHCA_JWT_ISSUERS", value_delimiter = ',')]
    pub jwt_issuers: Option<Vec<String>>,
    /// Kubeconfig used for TokenReview (enables TokenReview); `in-cluster` uses the pod's service account.
    #[arg(long, env = "MESHCA_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// TokenReview requests per second toward the API server [default: 50].
    #[arg(long, env = "MESHCA_TOKENREVIEW_QPS")]
    pub tokenreview_qps: Option<f64>,
    /// TokenReview burst [default: 100].
    #[arg(long, env = "MESHCA_TOKENREVIEW_BURST")]
    pub tokenreview_burst: Option<u32>,
    /// Order of token sources [default: jwks,tokenreview].
    #[arg(long, env = "MESHCA_AUTHN_ORDER", value_delimiter = ',')]
    pub authn_order: Option<Vec<AuthnSource>>,
    /// Accept legacy secret-based tokens (checked by TokenReview only).
    #[arg(long, env = "MESHCA_ALLOW_LEGACY_TOKENS")]
    pub allow_legacy_tokens: Option<bool>,
    /// Certificates per second allowed per identity [default: 5].
    #[arg(long, env = "MESHCA_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// Burst per pod [default: 20].
    #[arg(long, env = "MESHCA_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Certificates per second for all pods of one service account together [default: 100].
    #[arg(long, env = "MESHCA_IDENTITY_RATE_LIMIT")]
    pub identity_rate_limit: Option<f64>,
    /// Burst for all pods of one service account together (sized for a 1,000-replica rollout) [default: 1000].
    #[arg(long, env = "MESHCA_IDENTITY_RATE_BURST")]
    pub identity_rate_burst: Option<u32>,
    /// Close a trust-bundle stream whose client has not consumed an update
    /// for this long; it stops counting for the activation gate [default: 30s].
    #[arg(long, env = "MESHCA_WATCH_STALL_TIMEOUT")]
    pub watch_stall_timeout: Option<HumanDuration>,
    /// Anonymous trust-bundle streams allowed per client IP address [default: 16].
    #[arg(long, env = "MESHCA_WATCH_ANONYMOUS_PER_IP")]
    pub watch_anonymous_per_ip: Option<usize>,
    /// Anonymous trust-bundle streams allowed in total [default: 4096].
    #[arg(long, env = "MESHCA_WATCH_ANONYMOUS_MAX")]
    pub watch_anonymous_max: Option<usize>,
    /// Open gRPC connections allowed (TLS handshakes included); more are closed at accept [default: 10000].
    #[arg(long, env = "MESHCA_GRPC_MAX_CONNECTIONS")]
    pub grpc_max_connections: Option<usize>,
    /// HTTP/2 streams allowed at once on one gRPC connection [default: 100].
    #[arg(long, env = "MESHCA_GRPC_MAX_CONCURRENT_STREAMS")]
    pub grpc_max_concurrent_streams: Option<u32>,
    /// Time a client has to complete the TLS handshake [default: 10s].
    #[arg(long, env = "MESHCA_GRPC_HANDSHAKE_TIMEOUT")]
    pub grpc_handshake_timeout: Option<HumanDuration>,
    /// HTTP/2 PING interval on idle gRPC connections (0: off) [default: 30s].
    #[arg(long, env = "MESHCA_GRPC_KEEPALIVE_INTERVAL")]
    pub grpc_keepalive_interval: Option<HumanDuration>,
    /// Close a gRPC connection whose PING is not answered within this [default: 10s].
    #[arg(long, env = "MESHCA_GRPC_KEEPALIVE_TIMEOUT")]
    pub grpc_keepalive_timeout: Option<HumanDuration>,
    /// Close a gRPC connection with no open request for this long (0: never) [default: 5m].
    #[arg(long, env = "MESHCA_GRPC_IDLE_TIMEOUT")]
    pub grpc_idle_timeout: Option<HumanDuration>,
    /// Largest HTTP/2 header list (all request headers and metadata) in bytes [default: 16384].
    #[arg(long, env = "MESHCA_GRPC_MAX_HEADER_BYTES")]
    pub grpc_max_header_bytes: Option<u32>,
    /// How long after a token authentication certificates descending from it
    /// may renew by presenting themselves (mTLS, no token); 0 turns renewal
    /// by certificate off [default: 24h].
    #[arg(long, env = "MESHCA_RENEWAL_MAX_AGE")]
    pub renewal_max_age: Option<HumanDuration>,
    /// Keep the tamper-evident audit log (audit.db in the data directory) [default: true].
    #[arg(long, env = "MESHCA_AUDIT_LOG")]
    pub audit_log: Option<bool>,
    /// How often the audit log signs a checkpoint when it has grown [default: 10s].
    #[arg(long, env = "MESHCA_AUDIT_CHECKPOINT_INTERVAL")]
    pub audit_checkpoint_interval: Option<HumanDuration>,
    /// Refusal entries per second one peer address may add to the audit log;
    /// refusals beyond it are counted into one summary entry [default: 2].
    #[arg(long, env = "MESHCA_AUDIT_REFUSAL_RATE")]
    pub audit_refusal_rate: Option<f64>,
    /// Largest size of the audit log's files (bytes, or with a K/M/G/Ki/Mi/Gi
    /// suffix); past it, issuance fails closed as on a full disk. Set it below
    /// the data volume's sizeLimit [default: none].
    #[arg(long, env = "MESHCA_AUDIT_MAX_BYTES")]
    pub audit_max_bytes: Option<String>,
    /// Burst of refusal entries per peer address [default: 20].
    #[arg(long, env = "MESHCA_AUDIT_REFUSAL_BURST")]
    pub audit_refusal_burst: Option<u32>,
    /// Identical refusals (same peer, API, reason, detail) within this window
    /// become one entry with a count [default: 60s].
    #[arg(long, env = "MESHCA_AUDIT_REFUSAL_WINDOW")]
    pub audit_refusal_window: Option<HumanDuration>,
    /// Extra names (or addresses) the admin endpoint answers to in `Host`,
    /// besides its listen address (and `localhost` on loopback); anything else
    /// is refused with 421 as a DNS-rebinding guard [default: none].
    #[arg(
        long = "admin-allowed-host",
        env = "MESHCA_ADMIN_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub admin_allowed_hosts: Option<Vec<String>>,
    /// Log format [default: text].
    #[arg(long, env = "MESHCA_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Lifetime of each issuer (renewed at 2/3 of it, clamped to the root) [default: 30d].
    #[arg(long, env = "MESHCA_ISSUER_LIFETIME")]
    pub issuer_lifetime: Option<HumanDuration>,
    /// Lifetime of a root generated by `rotation prepare` or the automatic policy [default: 365d].
    #[arg(long, env = "MESHCA_ROOT_LIFETIME")]
    pub root_lifetime: Option<HumanDuration>,
    /// Least time a prepared root stays in the bundle before `activate` is allowed [default: max_ttl].
    #[arg(long, env = "MESHCA_PROPAGATION_WAIT")]
    pub propagation_wait: Option<HumanDuration>,
    /// Rotate the root automatically at this period (prepare → activate → retire, same gates) [default: off].
    #[arg(long = "auto-rotate-root-every", env = "MESHCA_AUTO_ROTATE_ROOT_EVERY")]
    pub auto_rotate_root_every: Option<HumanDuration>,
    /// Warn (log + metric) when a root or issuer expires within this [default: 7d].
    #[arg(long, env = "MESHCA_EXPIRY_WARNING")]
    pub expiry_warning: Option<HumanDuration>,
    /// How often rotation housekeeping and the automatic policy run [default: 30s].
    #[arg(long, env = "MESHCA_ROTATION_CHECK_INTERVAL")]
    pub rotation_check_interval: Option<HumanDuration>,
    /// Also write the trust bundle (PEM) to this file on every change, for file-based consumers.
    #[arg(long, env = "MESHCA_BUNDLE_FILE")]
    pub bundle_file: Option<PathBuf>,
    /// When the data directory is empty, import this root certificate (PEM)
    /// instead of generating one (e.g. a mounted kubernetes.io/tls Secret's tls.crt).
    #[arg(long, env = "MESHCA_INIT_ROOT_CERT", requires = "init_root_key")]
    pub init_root_cert: Option<PathBuf>,
    /// The key of --init-root-cert (PEM).
    #[arg(long, env = "MESHCA_INIT_ROOT_KEY", requires = "init_root_cert")]
    pub init_root_key: Option<PathBuf>,
    /// Publish the trust bundle as ConfigMap meshca-trust-bundle (key ca.crt)
    /// in every namespace; one replica at a time does it, elected by a Lease
    /// (needs kubeconfig) [default: false].
    #[arg(long, env = "MESHCA_PUBLISH_BUNDLE")]
    pub publish_bundle: Option<bool>,
    /// Publish only to namespaces with these labels (k=v,k2=v2) [default: all].
    #[arg(long, env = "MESHCA_BUNDLE_NAMESPACE_SELECTOR")]
    pub bundle_namespace_selector: Option<String>,
    /// Verify tokens against the API server's own JWKS (/openid/v1/jwks,
    /// issuer from /.well-known/openid-configuration) through the Kubernetes
    /// client of `kubeconfig` [default: false].
    #[arg(long, env = "MESHCA_JWKS_KUBERNETES")]
    pub jwks_kubernetes: Option<bool>,
    /// How often the published ConfigMaps are re-checked (recreated if deleted) [default: 30s].
    #[arg(long, env = "MESHCA_BUNDLE_RESYNC_INTERVAL")]
    pub bundle_resync_interval: Option<HumanDuration>,
    /// Name of the leader-election Lease (in control_plane_namespace) [default: meshca-leader].
    #[arg(long, env = "MESHCA_LEADER_ELECTION_LEASE")]
    pub leader_election_lease: Option<String>,
    /// How long a leader's Lease lasts without renewal [default: 15s].
    #[arg(long, env = "MESHCA_LEADER_ELECTION_LEASE_DURATION")]
    pub leader_election_lease_duration: Option<HumanDuration>,
    /// This replica's identity in the Lease [default: $POD_NAME, else the host name].
    #[arg(long, env = "POD_NAME")]
    pub replica_name: Option<String>,
    /// Share the CA's state (roots, issuer, rotation journal) with other
    /// replicas through this Secret in control_plane_namespace (needs kubeconfig).
    #[arg(long, env = "MESHCA_STATE_SECRET")]
    pub state_secret: Option<String>,
    /// How often a replica re-reads the shared state even without a watch
    /// event (a safety net: changes arrive through a watch) [default: 60s].
    #[arg(long, env = "MESHCA_STATE_POLL_INTERVAL")]
    pub state_poll_interval: Option<HumanDuration>,
    /// Keep the audit log's signing key in this Secret (in
    /// control_plane_namespace), so every replica signs its checkpoints with
    /// one key auditors trust (needs kubeconfig).
    #[arg(long, env = "MESHCA_AUDIT_KEY_SECRET")]
    pub audit_key_secret: Option<String>,
    /// Keep the issuer in this `kubernetes.io/tls` Secret (tls.crt, tls.key,
    /// ca.crt) in control_plane_namespace: meshca writes its issuer there,
    /// and installs a newer valid issuer someone else writes there (an
    /// operator, cert-manager). Needs kubeconfig.
    #[arg(long, env = "MESHCA_ISSUER_SECRET")]
    pub issuer_secret: Option<String>,
    /// With a shared state: how often each replica publishes which bundle
    /// version its clients have (ConfigMap meshca-propagation-<replica>)
    /// and reads the others', for the activation gate [default: 5s].
    #[arg(long, env = "MESHCA_PROPAGATION_REPORT_INTERVAL")]
    pub propagation_report_interval: Option<HumanDuration>,
    /// Keep a metadata-only watch of pods and service accounts (needs
    /// kubeconfig, and list/watch on both) and refuse a token whose bound
    /// pod or service account no longer exists, or was recreated under a new
    /// UID, within seconds of the deletion, even when the token was verified
    /// locally [default: on in in-cluster mode, else off].
    #[arg(long, env = "MESHCA_WATCH_TOKEN_BINDINGS")]
    pub watch_token_bindings: Option<bool>,
}

/// The error for a Kubernetes feature set without credentials.
const NEEDS_KUBECONFIG: &str = "needs kubeconfig (in a pod: kubeconfig = \"in-cluster\")";

macro_rules! merge_fields {
    ($hi:expr, $lo:expr; $($f:ident),* $(,)?) => {
        ServeArgs { config: $hi.config.clone(), $($f: $hi.$f.clone().or_else(|| $lo.$f.clone()),)* }
    };
}

impl ServeArgs {
    /// Fills unset fields from the TOML file named by `--config`, if any.
    pub fn with_file(self) -> Result<Self, String> {
        let Some(path) = &self.config else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        let file: ServeArgs =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        Ok(merge_fields!(self, file;
            data_dir, listen, admin_listen, trust_domain, control_plane_namespace,
            server_dns_names, default_ttl, max_ttl, min_ttl, native_audience,
            linkerd_audience, istio_audience, jwks_file, jwks_url, oidc_issuer_url,
            jwks_ca_file, jwks_refresh_interval, jwt_issuers, kubeconfig,
            tokenreview_qps, tokenreview_burst, authn_order, allow_legacy_tokens,
            rate_limit, rate_burst, audit_log, audit_checkpoint_interval, log_format,
            audit_refusal_rate, audit_refusal_burst, audit_refusal_window, admin_allowed_hosts,
            audit_max_bytes,
            issuer_lifetime, root_lifetime, propagation_wait, auto_rotate_root_every,
            expiry_warning, rotation_check_interval, bundle_file, init_root_cert, init_root_key,
            publish_bundle, bundle_namespace_selector, bundle_resync_interval, jwks_kubernetes,
            leader_election_lease, leader_election_lease_duration, replica_name, state_secret,
            state_poll_interval, kubernetes, audit_key_secret, issuer_secret,
            propagation_report_interval, watch_token_bindings,
            identity_rate_limit, identity_rate_burst, watch_stall_timeout,
            watch_anonymous_per_ip, watch_anonymous_max, grpc_max_connections,
            grpc_max_concurrent_streams, grpc_handshake_timeout, grpc_keepalive_interval,
            grpc_keepalive_timeout, grpc_idle_timeout, grpc_max_header_bytes, renewal_max_age,
        ))
    }

    /// Fills in the in-cluster defaults when `kubernetes` is on, or unset
    /// and `pod` says this runs in a pod. Settings given explicitly win.
    pub fn with_kubernetes(
        mut self,
        pod: Option<crate::kubernetes::detect::Pod>,
    ) -> Result<Self, String> {
        let on = self.kubernetes.unwrap_or(pod.is_some());
        self.kubernetes = Some(on);
        if !on {
            return Ok(self);
        }
        if pod.is_none() && self.kubeconfig.is_none() {
            return Err(format!(
                "invalid setting kubernetes: this is not a pod (no KUBERNETES_SERVICE_HOST or no token in {}); set kubeconfig to run against a cluster from outside",
                crate::kubernetes::detect::SERVICE_ACCOUNT_DIR
            ));
        }
        self.kubeconfig
            .get_or_insert_with(|| crate::authn::tokenreview::IN_CLUSTER.into());
        if self.control_plane_namespace.is_none() {
            self.control_plane_namespace = pod.and_then(|p| p.namespace);
        }
        self.state_secret.get_or_insert_with(|| "meshca-ca".into());
        self.audit_key_secret
            .get_or_insert_with(|| "meshca-audit-key".into());
        self.issuer_secret
            .get_or_insert_with(|| "meshca-issuer".into());
        self.publish_bundle.get_or_insert(true);
        self.watch_token_bindings.get_or_insert(true);
        if self.jwks_file.is_none() && self.jwks_url.is_none() && self.oidc_issuer_url.is_none() {
            self.jwks_kubernetes.get_or_insert(true);
        }
        Ok(self)
    }

    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let this = self.with_kubernetes(crate::kubernetes::detect::pod())?;
        this.resolve_detected()
    }

    /// [`ServeArgs::resolve`] after in-cluster detection.
    pub fn resolve_detected(self) -> Result<ServeConfig, String> {
        let bad = |setting: &str, e: String| format!("invalid setting {setting}: {e}");
        let mesh = Mesh {
            trust_domain: self
                .trust_domain
                .as_deref()
                .unwrap_or("cluster.local")
                .parse()
                .map_err(|e: crate::identity::NameError| bad("trust_domain", e.to_string()))?,
            control_plane_ns: self
                .control_plane_namespace
                .as_deref()
                .unwrap_or("meshca")
                .parse()
                .map_err(|e: crate::identity::NameError| {
                    bad("control_plane_namespace", e.to_string())
                })?,
        };
        let default_ttl = self.default_ttl.map_or(Duration::from_secs(86400), |d| d.0);
        let max_ttl = self.max_ttl.map_or(Duration::from_secs(86400), |d| d.0);
        let min_ttl = self.min_ttl.map_or(Duration::from_secs(300), |d| d.0);
        if max_ttl < min_ttl {
            return Err(bad("max_ttl", "must not be shorter than min_ttl".into()));
        }
        if default_ttl > max_ttl || default_ttl < min_ttl {
            return Err(bad(
                "default_ttl",
                "must lie between min_ttl and max_ttl".into(),
            ));
        }
        let rate_limit = self.rate_limit.unwrap_or(5.0);
        if rate_limit.is_nan() || rate_limit <= 0.0 {
            return Err(bad("rate_limit", "must be a positive number".into()));
        }
        let limits = self.limits()?;
        let tokenreview_qps = self.tokenreview_qps.unwrap_or(50.0);
        if tokenreview_qps.is_nan() || tokenreview_qps <= 0.0 {
            return Err(bad("tokenreview_qps", "must be a positive number".into()));
        }
        let server_dns_names = self.server_dns_names.unwrap_or_default();
        for n in &server_dns_names {
            n.parse::<crate::identity::DnsIdentity>()
                .map_err(|e| bad("server_dns_names", e.to_string()))?;
        }
        let audiences = Audiences {
            native: self.native_audience.unwrap_or_else(|| "meshca".into()),
            linkerd: self
                .linkerd_audience
                .unwrap_or_else(|| "identity.l5d.io".into()),
            istio: self.istio_audience.unwrap_or_else(|| "istio-ca".into()),
        };
        for (k, v) in [
            ("native_audience", &audiences.native),
            ("linkerd_audience", &audiences.linkerd),
            ("istio_audience", &audiences.istio),
        ] {
            if v.is_empty() {
                return Err(bad(k, "must not be empty".into()));
            }
        }
        if let Some(p) = &self.jwks_file {
            if !p.exists() {
                return Err(bad("jwks_file", format!("{} does not exist", p.display())));
            }
        }
        let jwks_sources = [
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
            self.oidc_issuer_url.is_some(),
        ];
        if jwks_sources.iter().filter(|x| **x).count() > 1 {
            return Err(bad(
                "jwks_file",
                "set only one of jwks_file, jwks_url and oidc_issuer_url".into(),
            ));
        }
        for (k, v) in [
            ("jwks_url", &self.jwks_url),
            ("oidc_issuer_url", &self.oidc_issuer_url),
        ] {
            if let Some(u) = v {
                if !u.starts_with("https://") {
                    return Err(bad(k, format!("{u:?} must be an https:// URL")));
                }
            }
        }
        if let Some(p) = &self.jwks_ca_file {
            if !p.exists() {
                return Err(bad(
                    "jwks_ca_file",
                    format!("{} does not exist", p.display()),
                ));
            }
        }
        let audit_checkpoint_interval = self
            .audit_checkpoint_interval
            .map_or(Duration::from_secs(10), |d| d.0);
        if audit_checkpoint_interval < Duration::from_millis(100) {
            return Err(bad(
                "audit_checkpoint_interval",
                "must be at least 100ms".into(),
            ));
        }
        let audit_refusal_rate = self.audit_refusal_rate.unwrap_or(2.0);
        if !(audit_refusal_rate > 0.0 && audit_refusal_rate.is_finite()) {
            return Err(bad(
                "audit_refusal_rate",
                "must be a positive number".into(),
            ));
        }
        let audit_refusal_window = self
            .audit_refusal_window
            .map_or(Duration::from_secs(60), |d| d.0);
        if audit_refusal_window < Duration::from_millis(10) {
            return Err(bad("audit_refusal_window", "must be at least 10ms".into()));
        }
        let audit_max_bytes = match self.audit_max_bytes.as_deref() {
            None => None,
            Some(v) => match parse_bytes(v) {
                Some(n) if n >= 64 * 1024 => Some(n),
                Some(_) => return Err(bad("audit_max_bytes", "must be at least 64Ki".into())),
                None => {
                    return Err(bad(
                        "audit_max_bytes",
                        format!("{v:?} is not a size (write bytes, or 500Mi, 2Gi, 1G)"),
                    ))
                }
            },
        };
        let admin_allowed_hosts = self.admin_allowed_hosts.clone().unwrap_or_default();
        for h in &admin_allowed_hosts {
            if h.trim().is_empty() || h.contains(['/', ' ', '@']) {
                return Err(bad(
                    "admin_allowed_hosts",
                    format!("{h:?} is not a host name or address"),
                ));
            }
        }
        let jwks_refresh_interval = self
            .jwks_refresh_interval
            .map_or(Duration::from_secs(300), |d| d.0);
        if jwks_refresh_interval < Duration::from_secs(10) {
            return Err(bad("jwks_refresh_interval", "must be at least 10s".into()));
        }
        if let Some(p) = &self.kubeconfig {
            if p.as_os_str() != crate::authn::tokenreview::IN_CLUSTER && !p.exists() {
                return Err(bad("kubeconfig", format!("{} does not exist", p.display())));
            }
        }
        let issuer_lifetime = self
            .issuer_lifetime
            .map_or(Duration::from_secs(30 * 86400), |d| d.0);
        if issuer_lifetime < max_ttl.max(Duration::from_secs(60)) {
            return Err(bad(
                "issuer_lifetime",
                format!(
                    "must be at least max_ttl ({}s), or leaves would be cut short",
                    max_ttl.as_secs()
                ),
            ));
        }
        let root_lifetime = self
            .root_lifetime
            .map_or(Duration::from_secs(365 * 86400), |d| d.0);
        let propagation_wait = self.propagation_wait.map_or(max_ttl, |d| d.0);
        if root_lifetime <= propagation_wait + max_ttl {
            return Err(bad(
                "root_lifetime",
                "must exceed propagation_wait + max_ttl (a new root must outlive its own activation)".into(),
            ));
        }
        let auto_rotate_root_every = self.auto_rotate_root_every.map(|d| d.0);
        if let Some(every) = auto_rotate_root_every {
            // Overlap: the next root is prepared `every` after activation and
            // needs propagation_wait before it can sign; the old one must
            // still be valid then, plus one leaf lifetime.
            if every + propagation_wait + max_ttl >= root_lifetime {
                return Err(bad(
                    "auto_rotate_root_every",
                    format!(
                        "must be shorter than root_lifetime ({}s) minus propagation_wait and max_ttl, so roots overlap",
                        root_lifetime.as_secs()
                    ),
                ));
            }
        }
        let rotation_check_interval = self
            .rotation_check_interval
            .map_or(Duration::from_secs(30), |d| d.0);
        if rotation_check_interval < Duration::from_millis(100) {
            return Err(bad(
                "rotation_check_interval",
                "must be at least 100ms".into(),
            ));
        }
        let replica = self.replica_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            format!(
                "{}-{:08x}",
                if host.is_empty() { "meshca" } else { &host },
                rand::random::<u32>()
            )
        });
        // Settings that talk to the API server need credentials.
        if self.kubeconfig.is_none() {
            for (setting, set) in [
                ("issuer_secret", self.issuer_secret.is_some()),
                ("audit_key_secret", self.audit_key_secret.is_some()),
                ("state_secret", self.state_secret.is_some()),
                ("publish_bundle", self.publish_bundle == Some(true)),
                ("jwks_kubernetes", self.jwks_kubernetes == Some(true)),
                (
                    "watch_token_bindings",
                    self.watch_token_bindings == Some(true),
                ),
            ] {
                if set {
                    return Err(bad(setting, NEEDS_KUBECONFIG.into()));
                }
            }
        }
        let publish = match self.publish_bundle.unwrap_or(false) {
            false => None,
            true => {
                let lease_duration = self
                    .leader_election_lease_duration
                    .map_or(Duration::from_secs(15), |d| d.0);
                if lease_duration < Duration::from_secs(1) {
                    return Err(bad(
                        "leader_election_lease_duration",
                        "must be at least 1s".into(),
                    ));
                }
                Some(PublishConfig {
                    namespace_labels: crate::kubernetes::publish::parse_selector(
                        self.bundle_namespace_selector.as_deref().unwrap_or(""),
                    )
                    .map_err(|e| bad("bundle_namespace_selector", e))?,
                    resync: self
                        .bundle_resync_interval
                        .map_or(Duration::from_secs(30), |d| d.0)
                        .max(Duration::from_millis(100)),
                    lease: self
                        .leader_election_lease
                        .clone()
                        .unwrap_or_else(|| "meshca-leader".into()),
                    lease_duration,
                })
            }
        };
        let jwks_kubernetes = self.jwks_kubernetes.unwrap_or(false);
        if jwks_kubernetes
            && (self.jwks_file.is_some()
                || self.jwks_url.is_some()
                || self.oidc_issuer_url.is_some())
        {
            return Err(bad(
                "jwks_kubernetes",
                "set only one of jwks_file, jwks_url, oidc_issuer_url and jwks_kubernetes".into(),
            ));
        }
        Ok(ServeConfig {
            replica,
            kubernetes: self.kubernetes.unwrap_or(false),
            audit_key_secret: self.audit_key_secret.clone(),
            issuer_secret: self.issuer_secret.clone(),
            propagation_report_interval: self
                .propagation_report_interval
                .map_or(Duration::from_secs(5), |d| d.0)
                .max(Duration::from_millis(100)),
            state_secret: self.state_secret.clone(),
            state_poll_interval: self
                .state_poll_interval
                .map_or(Duration::from_secs(60), |d| d.0)
                .max(Duration::from_millis(100)),
            jwks_kubernetes,
            watch_token_bindings: self.watch_token_bindings.unwrap_or(false),
            publish,
            issuer_lifetime,
            root_lifetime,
            propagation_wait,
            auto_rotate_root_every,
            expiry_warning: self
                .expiry_warning
                .map_or(Duration::from_secs(7 * 86400), |d| d.0),
            rotation_check_interval,
            bundle_file: self.bundle_file,
            init_root: match (self.init_root_cert, self.init_root_key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    return Err(bad(
                        "init_root_cert",
                        "init_root_cert and init_root_key go together".into(),
                    ))
                }
            },
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("meshca-data")),
            listen: self
                .listen
                .unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid")),
            admin_listen: self
                .admin_listen
                .unwrap_or_else(|| "127.0.0.1:9990".parse().expect("valid")),
            mesh,
            server_dns_names,
            default_ttl,
            max_ttl,
            min_ttl,
            audiences,
            jwks_file: self.jwks_file,
            jwt_issuers: self.jwt_issuers.unwrap_or_else(|| {
                vec![self
                    .oidc_issuer_url
                    .clone()
                    .unwrap_or_else(|| crate::authn::devtoken::DEV_ISSUER.to_string())]
            }),
            jwks_url: self.jwks_url,
            oidc_issuer_url: self.oidc_issuer_url,
            jwks_ca_file: self.jwks_ca_file,
            jwks_refresh_interval,
            kubeconfig: self.kubeconfig,
            tokenreview_qps,
            tokenreview_burst: self.tokenreview_burst.unwrap_or(100),
            authn_order: self
                .authn_order
                .unwrap_or_else(|| vec![AuthnSource::Jwks, AuthnSource::Tokenreview]),
            allow_legacy_tokens: self.allow_legacy_tokens.unwrap_or(false),
            rate_limit,
            rate_burst: self.rate_burst.unwrap_or(20),
            limits,
            renewal_max_age: self
                .renewal_max_age
                .map_or(Duration::from_secs(86400), |d| d.0),
            audit_log: self.audit_log.unwrap_or(true),
            audit_checkpoint_interval,
            audit_refusal: crate::audit::intake::Limits {
                rate: audit_refusal_rate,
                burst: self.audit_refusal_burst.unwrap_or(20).max(1),
                window: audit_refusal_window,
            },
            admin_allowed_hosts,
            audit_max_bytes,
            log_format: self.log_format.unwrap_or_default(),
        })
    }
}

/// The resolved, validated `serve` configuration. Immutable once built.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Mesh names.
    pub mesh: Mesh,
    /// Extra server DNS names.
    pub server_dns_names: Vec<String>,
    /// Default leaf TTL.
    pub default_ttl: Duration,
    /// Maximum leaf TTL.
    pub max_ttl: Duration,
    /// Minimum leaf TTL.
    pub min_ttl: Duration,
    /// Audiences per API.
    pub audiences: Audiences,
    /// JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL.
    pub jwks_url: Option<String>,
    /// OIDC issuer for discovery.
    pub oidc_issuer_url: Option<String>,
    /// CA bundle for JWKS fetches.
    pub jwks_ca_file: Option<PathBuf>,
    /// Periodic JWKS refresh.
    pub jwks_refresh_interval: Duration,
    /// Accepted JWT issuers.
    pub jwt_issuers: Vec<String>,
    /// Kubeconfig for TokenReview.
    pub kubeconfig: Option<PathBuf>,
    /// TokenReview QPS.
    pub tokenreview_qps: f64,
    /// TokenReview burst.
    pub tokenreview_burst: u32,
    /// Source order.
    pub authn_order: Vec<AuthnSource>,
    /// Legacy tokens allowed.
    pub allow_legacy_tokens: bool,
    /// Per-pod rate.
    pub rate_limit: f64,
    /// Per-pod burst.
    pub rate_burst: u32,
    /// The per-service-account ceiling, watcher and listener limits.
    pub limits: Limits,
    /// Renewal by certificate is refused this long after the token
    /// authentication a chain descends from (zero: off).
    pub renewal_max_age: Duration,
    /// Audit log on.
    pub audit_log: bool,
    /// Checkpoint signing interval.
    pub audit_checkpoint_interval: Duration,
    /// How many refusals per peer reach the audit log, and the window in
    /// which identical ones are folded into one entry.
    pub audit_refusal: crate::audit::intake::Limits,
    /// Extra `Host` names the admin endpoint answers to.
    pub admin_allowed_hosts: Vec<String>,
    /// Size limit of the audit log's files (None: the volume's).
    pub audit_max_bytes: Option<u64>,
    /// Log format.
    pub log_format: LogFormat,
    /// Issuer lifetime.
    pub issuer_lifetime: Duration,
    /// Generated root lifetime.
    pub root_lifetime: Duration,
    /// Least time a prepared root is in the bundle before activation.
    pub propagation_wait: Duration,
    /// Automatic root rotation period (None: off).
    pub auto_rotate_root_every: Option<Duration>,
    /// Expiry warning threshold.
    pub expiry_warning: Duration,
    /// Rotation housekeeping period.
    pub rotation_check_interval: Duration,
    /// Extra bundle output file.
    pub bundle_file: Option<PathBuf>,
    /// Root (certificate, key) to import when the data directory is empty.
    pub init_root: Option<(PathBuf, PathBuf)>,
    /// Bundle ConfigMap publishing with leader election (None: off).
    pub publish: Option<PublishConfig>,
    /// JWKS from the API server through the Kubernetes client.
    pub jwks_kubernetes: bool,
    /// This replica's name.
    pub replica: String,
    /// In-cluster mode is on (explicitly or detected).
    pub kubernetes: bool,
    /// The Secret holding the audit log's signing key (None: the data directory's).
    pub audit_key_secret: Option<String>,
    /// The `kubernetes.io/tls` Secret mirroring the issuer (None: none).
    pub issuer_secret: Option<String>,
    /// How often replicas exchange propagation reports.
    pub propagation_report_interval: Duration,
    /// The Secret holding the shared CA state (None: local only).
    pub state_secret: Option<String>,
    /// How often the shared state is checked.
    pub state_poll_interval: Duration,
    /// Refuse tokens whose pod or service account is gone (a metadata-only watch).
    pub watch_token_bindings: bool,
}

/// Limits and fairness: the per-service-account rate ceiling, the
/// trust-bundle watchers, and the gRPC listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Certificates per second for one service account (all its pods).
    pub identity_rate_limit: f64,
    /// Burst of the above.
    pub identity_rate_burst: u32,
    /// Bundle watchers.
    pub watch: crate::api::watchers::WatchSettings,
    /// Open connections.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// HTTP/2 keepalive PING interval (None: off).
    pub keepalive_interval: Option<Duration>,
    /// HTTP/2 keepalive PING deadline.
    pub keepalive_timeout: Duration,
    /// Idle connection timeout (None: never).
    pub idle_timeout: Option<Duration>,
    /// Largest header list, bytes.
    pub max_header_bytes: u32,
}

impl ServeArgs {
    fn limits(&self) -> Result<Limits, String> {
        let bad = |setting: &str, e: &str| format!("invalid setting {setting}: {e}");
        let d = |v: Option<HumanDuration>, default: u64| {
            v.map_or(Duration::from_secs(default), |d| d.0)
        };
        let identity_rate_limit = self
            .identity_rate_limit
            .unwrap_or(crate::api::IDENTITY_RATE);
        if identity_rate_limit.is_nan() || identity_rate_limit <= 0.0 {
            return Err(bad("identity_rate_limit", "must be a positive number"));
        }
        let positive = |setting: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(bad(setting, "must be at least 1")),
            v => Ok(v.unwrap_or(default)),
        };
        let watch = crate::api::watchers::WatchSettings {
            stall_timeout: d(self.watch_stall_timeout, 30),
            anonymous_per_ip: positive("watch_anonymous_per_ip", self.watch_anonymous_per_ip, 16)?,
            anonymous_max: positive("watch_anonymous_max", self.watch_anonymous_max, 4096)?,
        };
        if watch.stall_timeout < Duration::from_millis(100) {
            return Err(bad("watch_stall_timeout", "must be at least 100ms"));
        }
        let handshake_timeout = d(self.grpc_handshake_timeout, 10);
        if handshake_timeout < Duration::from_millis(100) {
            return Err(bad("grpc_handshake_timeout", "must be at least 100ms"));
        }
        let max_header_bytes = self.grpc_max_header_bytes.unwrap_or(16 * 1024);
        if max_header_bytes < 1024 {
            return Err(bad("grpc_max_header_bytes", "must be at least 1024"));
        }
        let keepalive_interval = Some(d(self.grpc_keepalive_interval, 30)).filter(|d| !d.is_zero());
        let keepalive_timeout = d(self.grpc_keepalive_timeout, 10);
        if keepalive_interval.is_some() && keepalive_timeout.is_zero() {
            return Err(bad("grpc_keepalive_timeout", "must be more than 0"));
        }
        Ok(Limits {
            identity_rate_limit,
            identity_rate_burst: self
                .identity_rate_burst
                .unwrap_or(crate::api::IDENTITY_BURST),
            watch,
            max_connections: positive("grpc_max_connections", self.grpc_max_connections, 10_000)?,
            max_concurrent_streams: match self.grpc_max_concurrent_streams {
                Some(0) => return Err(bad("grpc_max_concurrent_streams", "must be at least 1")),
                v => v.unwrap_or(100),
            },
            handshake_timeout,
            keepalive_interval,
            keepalive_timeout,
            idle_timeout: Some(d(self.grpc_idle_timeout, 300)).filter(|d| !d.is_zero()),
            max_header_bytes,
        })
    }
}

/// `publish_bundle` and its leader election.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// Namespace label selector (empty: all).
    pub namespace_labels: std::collections::BTreeMap<String, String>,
    /// Resync period.
    pub resync: Duration,
    /// Lease name (in the control-plane namespace).
    pub lease: String,
    /// Lease duration.
    pub lease_duration: Duration,
}

impl ServeConfig {
    /// The rotation settings.
    pub fn rotation_settings(&self) -> crate::trust::service::Settings {
        crate::trust::service::Settings {
            issuer_lifetime: self.issuer_lifetime,
            root_lifetime: self.root_lifetime,
            propagation_wait: self.propagation_wait,
            max_leaf_ttl: self.max_ttl,
            expiry_warning: self.expiry_warning,
            auto_rotate_every: self.auto_rotate_root_every,
            check_interval: self.rotation_check_interval,
        }
    }

    /// Defaults with a given data directory and ephemeral ports (tests, bench).
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let mut c = ServeArgs {
            kubernetes: Some(false),
            ..Default::default()
        }
        .resolve()
        .expect("defaults are valid");
        c.data_dir = data_dir;
        c.listen = "127.0.0.1:0".parse().expect("valid");
        c.admin_listen = "127.0.0.1:0".parse().expect("valid");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn pod(ns: &str) -> Option<crate::kubernetes::detect::Pod> {
        Some(crate::kubernetes::detect::Pod {
            namespace: Some(ns.into()),
        })
    }

    #[test]
    fn in_cluster_mode_fills_defaults_and_explicit_settings_win() {
        use clap::Parser;
        let detected = ServeArgs::default()
            .with_kubernetes(pod("mesh-system"))
            .unwrap()
            .resolve_detected()
            .unwrap();
        assert!(detected.kubernetes);
        assert_eq!(
            detected.kubeconfig.as_deref(),
            Some(std::path::Path::new("in-cluster"))
        );
        assert_eq!(detected.mesh.control_plane_ns.as_str(), "mesh-system");
        assert_eq!(detected.state_secret.as_deref(), Some("meshca-ca"));
        assert_eq!(
            detected.audit_key_secret.as_deref(),
            Some("meshca-audit-key")
        );
        assert_eq!(detected.issuer_secret.as_deref(), Some("meshca-issuer"));
        assert!(detected.publish.is_some());
        assert!(detected.jwks_kubernetes);
        assert!(
            detected.watch_token_bindings,
            "in-cluster: tokens die with their pod"
        );
        assert_eq!(
            detected.authn_order,
            vec![AuthnSource::Jwks, AuthnSource::Tokenreview]
        );

        let explicit = Cmd::try_parse_from([
            "x",
            "--kubernetes",
            "--state-secret",
            "ca-state",
            "--publish-bundle",
            "false",
            "--control-plane-namespace",
            "ops",
            "--watch-token-bindings",
            "false",
        ])
        .unwrap()
        .serve
        .with_kubernetes(pod("mesh-system"))
        .unwrap()
        .resolve_detected()
        .unwrap();
        assert_eq!(explicit.state_secret.as_deref(), Some("ca-state"));
        assert!(explicit.publish.is_none());
        assert_eq!(explicit.mesh.control_plane_ns.as_str(), "ops");
        assert!(!explicit.watch_token_bindings);
        // Outside a cluster it is off, and asking for it needs credentials.
        assert!(!ServeConfig::for_tests("d".into()).watch_token_bindings);
        let e = ServeArgs {
            kubernetes: Some(false),
            watch_token_bindings: Some(true),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            e.contains("invalid setting watch_token_bindings: needs kubeconfig"),
            "{e}"
        );

        let off = Cmd::try_parse_from(["x", "--kubernetes=false"])
            .unwrap()
            .serve
            .with_kubernetes(pod("mesh-system"))
            .unwrap()
            .resolve_detected()
            .unwrap();
        assert!(!off.kubernetes);
        assert!(off.kubeconfig.is_none() && off.state_secret.is_none());

        // Outside a pod, --kubernetes needs a kubeconfig.
        let e = Cmd::try_parse_from(["x", "--kubernetes"])
            .unwrap()
            .serve
            .with_kubernetes(None)
            .unwrap_err();
        assert!(e.contains("not a pod") && e.contains("kubeconfig"), "{e}");
        // Not detected and not asked: nothing changes.
        let plain = ServeArgs::default()
            .with_kubernetes(None)
            .unwrap()
            .resolve_detected()
            .unwrap();
        assert!(!plain.kubernetes && plain.state_secret.is_none());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            "90s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(90)
        );
        assert_eq!(
            "24h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(86400)
        );
        assert_eq!("7d".parse::<HumanDuration>().unwrap().to_string(), "7d");
        assert_eq!(
            "300".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(300)
        );
        assert!("3w".parse::<HumanDuration>().is_err());
        assert!("h".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn file_is_lowest_precedence_and_errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("meshca.toml");
        std::fs::write(
            &f,
            "trust_domain = \"example.org\"\nmax_ttl = \"2h\"\ndefault_ttl = \"1h\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f.clone()),
            max_ttl: Some("3h".parse().unwrap()),
            ..Default::default()
        };
        let c = args.with_file().unwrap().resolve().unwrap();
        assert_eq!(c.mesh.trust_domain.as_str(), "example.org");
        assert_eq!(c.max_ttl, Duration::from_secs(3 * 3600), "flag beats file");
        assert_eq!(c.default_ttl, Duration::from_secs(3600));

        std::fs::write(&f, "trust_domain = \"Bad_Domain\"\n").unwrap();
        let e = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .with_file()
        .unwrap()
        .resolve()
        .unwrap_err();
        assert!(e.contains("trust_domain"), "{e}");

        std::fs::write(&f, "no_such_setting = 1\n").unwrap();
        let e = ServeArgs {
            config: Some(f),
            ..Default::default()
        }
        .with_file()
        .unwrap_err();
        assert!(e.contains("no_such_setting"), "{e}");

        let e = ServeArgs {
            min_ttl: Some("2d".parse().unwrap()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(e.contains("max_ttl"), "{e}");
    }
}
