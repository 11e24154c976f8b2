//! Named Prometheus instruments and their text exposition.
//!
//! Owns: every metric meshca exports, registered per family (issuance, trust,
//! agent, proxy, audit, Kubernetes, authentication edges, limits, renewal).
//! Makes no decisions: callers record what happened. There is no global
//! registry: each `serve`, agent and proxy creates one [`Metrics`] and passes
//! the `Arc` to what it builds, so a process running several (the tests)
//! keeps their series apart. Instruments are atomics: recording takes no lock.

mod federation;

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuanceLabels {
    api: &'static str,
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValidationLabels {
    method: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootLabels {
    root: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootLabel {
    root: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    direction: &'static str,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SecretLabel {
    secret: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    resource: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

/// One root as the rotation metrics show it.
#[derive(Debug, Clone)]
pub(crate) struct RootGauge {
    /// Fingerprint (hex, shortened by the caller).
    pub root: String,
    /// Phase (`prepared`, `active`, `retired`), with `-tainted` appended when tainted.
    pub state: String,
    /// Expiry, Unix seconds.
    pub expiry_unix: u64,
}

fn step_histogram() -> Histogram {
    // 1 ms … ~33 s (a step makes keys and fsyncs files)
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// All of meshca's instruments, one registry. Each `serve`, agent and proxy
/// owns one (`Arc<Metrics>`) and hands it to the components it builds; its
/// `/metrics` renders that instance, so two servers in one process (tests)
/// never share a series.
pub struct Metrics {
    registry: Registry,
    issuance: IssuanceMetrics,
    trust: TrustMetrics,
    agent: AgentMetrics,
    proxy: ProxyMetrics,
    audit: AuditMetrics,
    kubernetes: KubernetesMetrics,
    authn_edges: AuthnEdgeMetrics,
    limits: LimitMetrics,
    renewal: RenewalMetrics,
    federation: federation::FederationMetrics,
}

/// Registers `metric` under `name` and hands back the caller's handle (a
/// clone shares the same atomics).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Certificate requests: decisions, latency, credential checks.
struct IssuanceMetrics {
    decisions: Family<IssuanceLabels, Counter>,
    jwt_svids: Family<IssuanceLabels, Counter>,
    latency: Family<ApiLabel, Histogram, fn() -> Histogram>,
    validations: Family<ValidationLabels, Counter>,
    tokenreview_latency: Histogram,
    in_flight: Gauge,
}

impl IssuanceMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            decisions: register(
                r,
                "issuance",
                "Issuance decisions by API, result (granted/refused) and reason",
                Family::default(),
            ),
            jwt_svids: register(
                r,
                "jwt_svid_decisions",
                "JWT-SVID mint decisions by API, result (granted/refused) and reason",
                Family::default(),
            ),
            latency: register(
                r,
                "issuance_duration_seconds",
                "Time from request to response for certificate requests",
                Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ),
            validations: register(
                r,
                "token_validations",
                "Credential validations by method and result",
                Family::default(),
            ),
            tokenreview_latency: register(
                r,
                "tokenreview_duration_seconds",
                "Latency of TokenReview calls to the Kubernetes API server",
                latency_histogram(),
            ),
            in_flight: register(
                r,
                "in_flight_requests",
                "Certificate requests being processed",
                Gauge::default(),
            ),
        }
    }
}

/// The trust state: roots, issuer, bundle propagation, rotation steps.
struct TrustMetrics {
    root_expiry: Gauge,
    issuer_expiry: Gauge,
    bundle_version: Gauge,
    roots: Family<RootLabels, Gauge>,
    bundle_clients: Family<VersionLabel, Gauge>,
    bundle_watchers: Gauge,
    leaves_alive: Family<RootLabel, Gauge>,
    steps: Family<StepLabel, Histogram, fn() -> Histogram>,
    transitions: Family<StepLabel, Counter>,
    expiry_warnings: Gauge,
}

impl TrustMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            root_expiry: register(r, "root_expiry_timestamp_seconds", "Unix time at which the earliest-expiring trust anchor expires", Gauge::default()),
            issuer_expiry: register(r, "issuer_expiry_timestamp_seconds", "Unix time at which the active issuer expires", Gauge::default()),
            bundle_version: register(r, "trust_bundle_version", "Version of the trust bundle being served", Gauge::default()),
            roots: register(r, "trust_root_expiry_timestamp_seconds", "Expiry (Unix time) of each root in the trust bundle, labelled by fingerprint prefix and rotation state", Family::default()),
            bundle_clients: register(r, "trust_bundle_clients", "Live clients (bundle watchers and holders of unexpired certificates) by the highest bundle version delivered to them", Family::default()),
            bundle_watchers: register(r, "trust_bundle_watchers", "Connected WatchTrustBundle streams", Gauge::default()),
            leaves_alive: register(r, "leaves_alive", "Unexpired certificates per root (latest certificate of each client seen since start)", Family::default()),
            steps: register(r, "rotation_step_duration_seconds", "Time taken by each rotation step (key generation, journal commit, derived files)", Family::new_with_constructor(step_histogram as fn() -> Histogram)),
            transitions: register(r, "rotation_transitions", "Rotation transitions by kind (prepared, activated, removed, tainted, issuer_renewed)", Family::default()),
            expiry_warnings: register(r, "expiry_warnings", "Roots and issuers within the expiry-warning threshold (or expired)", Gauge::default()),
        }
    }
}

/// `meshca agent`: the certificate and bundle it holds.
struct AgentMetrics {
    expiry: Gauge,
    renewals: Family<ResultLabel, Counter>,
    bundle_version: Gauge,
    federated_bundles: Gauge,
}

impl AgentMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            expiry: register(
                r,
                "agent_certificate_expiry_timestamp_seconds",
                "Expiry (Unix time) of the certificate the agent holds",
                Gauge::default(),
            ),
            renewals: register(
                r,
                "agent_renewals",
                "Agent certificate requests by result (ok, error)",
                Family::default(),
            ),
            bundle_version: register(
                r,
                "agent_trust_bundle_version",
                "Version of the trust bundle the agent holds",
                Gauge::default(),
            ),
            federated_bundles: register(
                r,
                "agent_federated_bundles",
                "Federated trust domains whose bundles the agent holds",
                Gauge::default(),
            ),
        }
    }
}

/// `meshca proxy`: handshakes, connections, bytes.
struct ProxyMetrics {
    handshakes: Family<HandshakeLabels, Counter>,
    open: Family<DirectionLabel, Gauge>,
    bytes: Family<DirectionLabel, Counter>,
    peers: Family<PeerLabels, Counter>,
}

impl ProxyMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            handshakes: register(r, "proxy_handshakes", "Proxy connections by direction, result and reason (unknown_ca, identity_not_allowed, expired, ...)", Family::default()),
            open: register(r, "proxy_open_connections", "Proxied connections open now", Family::default()),
            bytes: register(r, "proxy_bytes", "Bytes copied through the proxy (both ways) by direction", Family::default()),
            peers: register(r, "proxy_peer_connections", "Established proxy connections by direction and peer SPIFFE ID", Family::default()),
        }
    }
}

/// The audit log's writer.
struct AuditMetrics {
    write_failures: Counter,
    storage_ok: Gauge,
    refusals_folded: Counter,
}

impl AuditMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            write_failures: register(r, "audit_write_failures", "Audit log commits that failed (disk full, I/O error); issuance is refused with UNAVAILABLE meanwhile", Counter::default()),
            storage_ok: register(r, "audit_storage_ok", "1 when the audit log's last write (or recovery probe) succeeded, 0 while it cannot write", Gauge::default()),
            refusals_folded: register(r, "audit_refusals_folded", "Refusals not written as entries of their own (identical repeats, or past the per-peer intake limit); each is counted in a summary entry", Counter::default()),
        }
    }
}

/// The Kubernetes controllers: permissions, watches, leadership, writes.
struct KubernetesMetrics {
    rbac_missing: Gauge,
    watch_restarts: Family<WatchLabels, Counter>,
    leader: Gauge,
    bundle_configmaps: Family<ResultLabel, Counter>,
    secrets_refused: Family<SecretLabel, Counter>,
}

impl KubernetesMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            rbac_missing: register(r, "kubernetes_permissions_missing", "Kubernetes permissions the configuration needs but the service account lacks (checked at start-up)", Gauge::default()),
            watch_restarts: register(r, "kubernetes_watch_restarts", "Kubernetes watches restarted, by resource and reason (closed: resumed; gone: 410, listed again; error: backed off; idle: nothing, not even a bookmark, within watch_idle_timeout: re-established)", Family::default()),
            leader: register(r, "kubernetes_leader", "1 while this replica holds the leader-election Lease (does the singleton work), else 0", Gauge::default()),
            bundle_configmaps: register(r, "bundle_configmap_writes", "Trust-bundle ConfigMap writes by result (created, updated, failed)", Family::default()),
            secrets_refused: register(r, "kubernetes_secrets_refused", "Secret versions refused after validation, by Secret role (state, issuer)", Family::default()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

/// Renewal by certificate (`KindLabel` and `ReasonLabel` are shared with the
/// authentication metrics below) and the operator's kill switch.
struct RenewalMetrics {
    index: Gauge,
    refusals: Family<ReasonLabel, Counter>,
    revocations: Family<KindLabel, Gauge>,
    revocation_refusals: Family<KindLabel, Counter>,
    revocation_changes: Family<ActionLabel, Counter>,
}

impl RenewalMetrics {
    fn register(registry: &mut Registry) -> Self {
        let index = Gauge::default();
        registry.register(
            "renewal_index_entries",
            "Unexpired certificates this replica granted and would accept for renewal by certificate",
            index.clone(),
        );
        let refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "renewal_refusals",
            "Renewals by certificate refused, by reason (unknown_serial, not_issued_here, root_not_trusted, revoked, too_old, disabled, identity_mismatch)",
            refusals.clone(),
        );
        let revocations = Family::<KindLabel, Gauge>::default();
        registry.register(
            "revocations",
            "Entries in the operator's revocation list, by kind (serial, identity)",
            revocations.clone(),
        );
        let revocation_refusals = Family::<KindLabel, Counter>::default();
        registry.register(
            "revocation_refusals",
            "Requests refused because of the revocation list, by kind (serial: renewal by a revoked certificate; identity: a denied identity)",
            revocation_refusals.clone(),
        );
        let revocation_changes = Family::<ActionLabel, Counter>::default();
        registry.register(
            "revocation_changes",
            "Operator changes to the revocation list (serial_revoked, identity_denied, serial_lifted, identity_lifted)",
            revocation_changes.clone(),
        );
        Self {
            index,
            refusals,
            revocations,
            revocation_refusals,
            revocation_changes,
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A registry with every meshca instrument at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meshca");
        let r = &mut registry;
        Self {
            issuance: IssuanceMetrics::register(r),
            trust: TrustMetrics::register(r),
            agent: AgentMetrics::register(r),
            proxy: ProxyMetrics::register(r),
            audit: AuditMetrics::register(r),
            kubernetes: KubernetesMetrics::register(r),
            authn_edges: AuthnEdgeMetrics::register(r),
            limits: LimitMetrics::register(r),
            renewal: RenewalMetrics::register(r),
            federation: federation::FederationMetrics::register(r),
            registry,
        }
    }

    /// Records one issuance decision.
    pub fn issuance(
        &self,
        api: &'static str,
        granted: bool,
        reason: &'static str,
        latency: Duration,
    ) {
        self.issuance
            .decisions
            .get_or_create(&IssuanceLabels {
                api,
                result: if granted { "granted" } else { "refused" },
                reason,
            })
            .inc();
        self.issuance
            .latency
            .get_or_create(&ApiLabel { api })
            .observe(latency.as_secs_f64());
    }

    /// Records one JWT-SVID mint decision.
    pub fn jwt_svid(&self, api: &'static str, granted: bool, reason: &'static str) {
        self.issuance
            .jwt_svids
            .get_or_create(&IssuanceLabels {
                api,
                result: if granted { "granted" } else { "refused" },
                reason,
            })
            .inc();
    }

    /// Records one credential validation.
    pub fn validation(&self, method: &'static str, result: &'static str) {
        self.issuance
            .validations
            .get_or_create(&ValidationLabels { method, result })
            .inc();
    }

    /// Records one TokenReview round trip.
    pub(crate) fn observe_tokenreview(&self, d: Duration) {
        self.issuance.tokenreview_latency.observe(d.as_secs_f64());
    }

    /// Replaces the per-root gauges and the bundle version.
    pub(crate) fn set_roots(&self, roots: &[RootGauge], bundle_version: u64) {
        self.trust.roots.clear();
        for r in roots {
            self.trust
                .roots
                .get_or_create(&RootLabels {
                    root: r.root.clone(),
                    state: r.state.clone(),
                })
                .set(r.expiry_unix as i64);
        }
        if let Some(min) = roots.iter().map(|r| r.expiry_unix).min() {
            self.trust.root_expiry.set(min as i64);
        }
        self.trust.bundle_version.set(bundle_version as i64);
    }

    /// Replaces the propagation gauges.
    pub(crate) fn set_propagation(
        &self,
        by_version: &std::collections::BTreeMap<u64, usize>,
        watchers: usize,
        leaves_by_root: &std::collections::BTreeMap<String, usize>,
    ) {
        self.trust.bundle_clients.clear();
        for (v, n) in by_version {
            self.trust
                .bundle_clients
                .get_or_create(&VersionLabel { version: *v })
                .set(*n as i64);
        }
        self.trust.bundle_watchers.set(watchers as i64);
        self.trust.leaves_alive.clear();
        for (r, n) in leaves_by_root {
            self.trust
                .leaves_alive
                .get_or_create(&RootLabel { root: r.clone() })
                .set(*n as i64);
        }
    }

    /// Records one rotation step and how long it took.
    pub fn rotation_step(&self, step: &'static str, took: Duration) {
        self.trust
            .steps
            .get_or_create(&StepLabel { step })
            .observe(took.as_secs_f64());
    }

    /// Counts a transition.
    pub(crate) fn rotation_transition(&self, kind: &'static str) {
        self.trust
            .transitions
            .get_or_create(&StepLabel { step: kind })
            .inc();
    }

    /// How many certificates are within the warning threshold.
    pub(crate) fn set_expiry_warnings(&self, n: usize) {
        self.trust.expiry_warnings.set(n as i64);
    }

    /// The agent's certificate expiry.
    pub(crate) fn agent_expiry(&self, unix: u64) {
        self.agent.expiry.set(unix as i64);
    }

    /// Counts an agent certificate request.
    pub(crate) fn agent_renewal(&self, ok: bool) {
        self.agent
            .renewals
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// The agent's bundle version.
    pub(crate) fn agent_bundle(&self, version: u64) {
        self.agent.bundle_version.set(version as i64);
    }

    /// How many federated trust domains' bundles the agent holds.
    pub(crate) fn agent_federated_bundles(&self, n: usize) {
        self.agent.federated_bundles.set(n as i64);
    }

    /// Counts a proxy handshake outcome.
    pub(crate) fn proxy_handshake(&self, direction: &'static str, ok: bool, reason: &'static str) {
        self.proxy
            .handshakes
            .get_or_create(&HandshakeLabels {
                direction,
                result: if ok { "ok" } else { "refused" },
                reason,
            })
            .inc();
    }

    /// Counts an established connection by peer identity.
    pub(crate) fn proxy_peer(&self, direction: &'static str, peer: &str) {
        self.proxy
            .peers
            .get_or_create(&PeerLabels {
                direction,
                peer: peer.to_string(),
            })
            .inc();
    }

    /// Counts bytes copied.
    pub(crate) fn proxy_bytes(&self, direction: &'static str, n: u64) {
        self.proxy
            .bytes
            .get_or_create(&DirectionLabel { direction })
            .inc_by(n);
    }

    /// Marks a proxied connection open until the guard drops.
    pub(crate) fn proxy_open(&self, direction: &'static str) -> OpenGuard {
        let g = self
            .proxy
            .open
            .get_or_create(&DirectionLabel { direction })
            .clone();
        g.inc();
        OpenGuard(g)
    }

    /// Whether this replica leads.
    pub(crate) fn set_leader(&self, leading: bool) {
        self.kubernetes.leader.set(i64::from(leading));
    }

    /// Counts bundle ConfigMap writes.
    pub(crate) fn bundle_configmap_writes(&self, result: &'static str, n: usize) {
        self.kubernetes
            .bundle_configmaps
            .get_or_create(&ResultLabel { result })
            .inc_by(n as u64);
    }

    /// The number of grants in the renewal index.
    pub(crate) fn set_renewal_index(&self, n: usize) {
        self.renewal.index.set(n as i64);
    }

    /// Counts a renewal by certificate refused for `reason`.
    pub(crate) fn renewal_refused(&self, reason: &'static str) {
        self.renewal
            .refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The size of the revocation list.
    pub(crate) fn set_revocations(&self, serials: usize, identities: usize) {
        let r = &self.renewal.revocations;
        r.get_or_create(&KindLabel { kind: "serial" })
            .set(serials as i64);
        r.get_or_create(&KindLabel { kind: "identity" })
            .set(identities as i64);
    }

    /// Counts a request refused by the revocation list (`serial` or `identity`).
    pub(crate) fn revocation_refused(&self, kind: &'static str) {
        self.renewal
            .revocation_refusals
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// Counts an operator change to the revocation list.
    pub(crate) fn revocation_change(&self, action: &'static str) {
        self.renewal
            .revocation_changes
            .get_or_create(&ActionLabel { action })
            .inc();
    }

    /// Counts a refused Secret version.
    pub(crate) fn secret_refused(&self, secret: &'static str) {
        self.kubernetes
            .secrets_refused
            .get_or_create(&SecretLabel { secret })
            .inc();
    }

    /// Counts a restarted Kubernetes watch.
    pub(crate) fn kubernetes_watch_restart(&self, resource: &'static str, reason: &'static str) {
        self.kubernetes
            .watch_restarts
            .get_or_create(&WatchLabels { resource, reason })
            .inc();
    }

    /// Missing Kubernetes permissions found at start-up.
    pub(crate) fn set_rbac_missing(&self, n: usize) {
        self.kubernetes.rbac_missing.set(n as i64);
    }

    /// Records the outcome of an audit log write.
    pub(crate) fn audit_write(&self, ok: bool) {
        if !ok {
            self.audit.write_failures.inc();
        }
        self.audit.storage_ok.set(i64::from(ok));
    }

    /// Counts a refusal folded into a summary entry.
    pub(crate) fn audit_refusal_folded(&self) {
        self.audit.refusals_folded.inc();
    }

    /// Sets the issuer's expiry (Unix seconds).
    pub(crate) fn set_issuer_expiry(&self, unix: u64) {
        self.trust.issuer_expiry.set(unix as i64);
    }

    /// Marks a request in flight until the guard drops.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        self.issuance.in_flight.inc();
        InFlight(&self.issuance.in_flight)
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Decrements an open-connections gauge on drop.
#[derive(Debug)]
pub(crate) struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements the in-flight gauge on drop.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: &'static str,
}

/// Token-authentication edges (issue 11 §6): the token-binding cache and
/// what never reaches TokenReview.
#[derive(Default)]
struct AuthnEdgeMetrics {
    binding_objects: Family<KindLabel, Gauge>,
    binding_refusals: Family<KindLabel, Counter>,
    tokenreview_local_refusals: Family<ReasonLabel, Counter>,
    tokenreview_throttled: Family<ScopeLabel, Counter>,
}

impl AuthnEdgeMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "token_binding_objects",
            "Pods and service accounts known to the token-binding cache, by kind",
            m.binding_objects.clone(),
        );
        registry.register(
            "token_binding_refusals",
            "Verified tokens refused because the pod or service account they are bound to no longer exists, by kind",
            m.binding_refusals.clone(),
        );
        registry.register(
            "tokenreview_local_refusals",
            "Tokens refused without asking TokenReview, by reason (not_jwt, issuer, legacy)",
            m.tokenreview_local_refusals.clone(),
        );
        registry.register(
            "tokenreview_throttled",
            "TokenReviews not sent because a budget was spent, by scope (peer: the caller's fair share; global: the QPS/burst toward the API server)",
            m.tokenreview_throttled.clone(),
        );
        m
    }
}

impl Metrics {
    /// How many objects of `kind` the token-binding cache knows.
    pub(crate) fn set_binding_objects(&self, kind: &'static str, n: usize) {
        self.authn_edges
            .binding_objects
            .get_or_create(&KindLabel { kind })
            .set(n as i64);
    }

    /// A verified token refused because its bound `kind` object is gone.
    pub(crate) fn binding_refused(&self, kind: &'static str) {
        self.authn_edges
            .binding_refusals
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A token refused before TokenReview.
    pub(crate) fn tokenreview_refused_locally(&self, reason: &'static str) {
        self.authn_edges
            .tokenreview_local_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A TokenReview not sent because the `scope` budget was spent.
    pub(crate) fn tokenreview_throttled(&self, scope: &'static str) {
        self.authn_edges
            .tokenreview_throttled
            .get_or_create(&ScopeLabel { scope })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabel {
    auth: &'static str,
}

/// The gRPC listener's limits, bundle watchers and rate limiting.
struct LimitMetrics {
    grpc_connections: Gauge,
    grpc_refused: Family<ReasonLabel, Counter>,
    grpc_closed: Family<ReasonLabel, Counter>,
    watch_streams: Family<AuthLabel, Gauge>,
    watch_refused: Family<ReasonLabel, Counter>,
    rate_limited: Family<ScopeLabel, Counter>,
}

impl LimitMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            grpc_connections: Gauge::default(),
            grpc_refused: Family::default(),
            grpc_closed: Family::default(),
            watch_streams: Family::default(),
            watch_refused: Family::default(),
            rate_limited: Family::default(),
        };
        registry.register(
            "grpc_connections",
            "Open gRPC connections (including TLS handshakes in progress)",
            m.grpc_connections.clone(),
        );
        registry.register(
            "grpc_connections_refused",
            "gRPC connections closed at accept, by reason (limit: grpc_max_connections reached)",
            m.grpc_refused.clone(),
        );
        registry.register(
            "grpc_connections_closed",
            "gRPC connections closed by meshca, by reason (handshake_timeout, handshake_failed, idle, stalled)",
            m.grpc_closed.clone(),
        );
        registry.register(
            "bundle_watch_streams",
            "Open WatchTrustBundle streams by auth (authenticated: counted by the activation gate; anonymous: not counted, capped)",
            m.watch_streams.clone(),
        );
        registry.register(
            "bundle_watch_refused",
            "WatchTrustBundle streams refused or closed, by reason (anonymous_per_ip, anonymous_total: caps reached; unauthenticated: a bad credential; stalled: an update not consumed within watch_stall_timeout)",
            m.watch_refused.clone(),
        );
        registry.register(
            "rate_limited",
            "Certificate requests refused by the rate limit, by scope (pod: one pod's bucket; identity: the service account's ceiling)",
            m.rate_limited.clone(),
        );
        m
    }
}

/// Decrements a labelled gauge on drop.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Sets the number of open gRPC connections.
    pub(crate) fn set_grpc_connections(&self, n: usize) {
        self.limits.grpc_connections.set(n as i64);
    }

    /// Counts a connection refused at accept.
    pub(crate) fn grpc_connection_refused(&self, reason: &'static str) {
        self.limits
            .grpc_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a connection meshca closed.
    pub(crate) fn grpc_connection_closed(&self, reason: &'static str) {
        self.limits
            .grpc_closed
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Marks a bundle stream open until the guard drops.
    pub(crate) fn bundle_watch_open(&self, authenticated: bool) -> GaugeGuard {
        let auth = if authenticated {
            "authenticated"
        } else {
            "anonymous"
        };
        let g = self
            .limits
            .watch_streams
            .get_or_create(&AuthLabel { auth })
            .clone();
        g.inc();
        GaugeGuard(g)
    }

    /// Counts a bundle stream refused or closed.
    pub(crate) fn bundle_watch_refused(&self, reason: &'static str) {
        self.limits
            .watch_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a request refused by the rate limit.
    pub(crate) fn rate_limited(&self, scope: &'static str) {
        self.limits
            .rate_limited
            .get_or_create(&ScopeLabel { scope })
            .inc();
    }
}
