//! The `serve` command line: every setting as a flag (`--name`), an
//! environment variable (`MESHCA_*`) and a TOML key (`name`), all optional.
//!
//! Owns: the names, help texts and value parsers of the settings. Must not:
//! apply defaults or validate (see `resolve` and each domain's `Settings`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::authn::settings::AuthnSource;
use crate::util::duration::HumanDuration;

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
    /// Key type of new JWT-SVID signing keys: es256 (ECDSA P-256) or rs256
    /// (RSA 2048) [default: es256]. Existing keys keep their type until
    /// their root rotates out.
    #[arg(long, env = "MESHCA_JWT_SVID_KEY_TYPE")]
    pub jwt_svid_key_type: Option<String>,
    /// JWT-SVID lifetime when a request names none [default: 5m].
    #[arg(long, env = "MESHCA_JWT_SVID_DEFAULT_TTL")]
    pub jwt_svid_default_ttl: Option<HumanDuration>,
    /// Longest JWT-SVID lifetime; longer requests are clamped [default: 1h].
    #[arg(long, env = "MESHCA_JWT_SVID_MAX_TTL")]
    pub jwt_svid_max_ttl: Option<HumanDuration>,
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
    /// Ignored, with a warning: the API server authenticates legacy
    /// secret-based tokens only for its own audiences, so no setting can
    /// make meshca accept them. Kept so existing configurations still start.
    #[arg(long, env = "MESHCA_ALLOW_LEGACY_TOKENS", hide = true)]
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
    /// A Kubernetes watch that receives nothing (no event, no bookmark) for
    /// this long is abandoned and re-established: the API server sends a
    /// bookmark about once a minute, so silence means a dead connection
    /// [default: 180s].
    #[arg(long, env = "MESHCA_WATCH_IDLE_TIMEOUT")]
    pub watch_idle_timeout: Option<HumanDuration>,
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
    /// Serve this trust domain's SPIFFE bundle endpoint (HTTPS) on this
    /// address [default: off]. See docs/federation.md.
    #[arg(long, env = "MESHCA_FEDERATION_LISTEN")]
    pub federation_listen: Option<SocketAddr>,
    /// The bundle endpoint's profile: https_spiffe (an X509-SVID the CA
    /// issues itself) or https_web (federation_cert_file/key_file) [default: https_spiffe].
    #[arg(long, env = "MESHCA_FEDERATION_PROFILE")]
    pub federation_profile: Option<String>,
    /// https_web: the endpoint's certificate chain (PEM, leaf first).
    #[arg(long, env = "MESHCA_FEDERATION_CERT_FILE")]
    pub federation_cert_file: Option<PathBuf>,
    /// https_web: the endpoint's private key (PEM).
    #[arg(long, env = "MESHCA_FEDERATION_KEY_FILE")]
    pub federation_key_file: Option<PathBuf>,
    /// The path the bundle is served at [default: /].
    #[arg(long, env = "MESHCA_FEDERATION_PATH")]
    pub federation_path: Option<String>,
    /// The spiffe_refresh_hint this CA publishes [default: 5m].
    #[arg(long, env = "MESHCA_FEDERATION_REFRESH_HINT")]
    pub federation_refresh_hint: Option<HumanDuration>,
    /// Follow another trust domain's bundle endpoint (repeatable):
    /// `td=example.org,url=https://…,profile=https_spiffe,endpoint_spiffe_id=spiffe://…,bundle=FILE`
    /// or `td=…,url=…,profile=https_web[,ca=FILE]`. In the environment,
    /// separate several with `;`. In TOML, an array of such strings or tables.
    #[arg(
        long = "federate-with",
        env = "MESHCA_FEDERATE_WITH",
        value_delimiter = ';'
    )]
    pub federate_with: Option<Vec<crate::federation::settings::FollowSpec>>,
}
