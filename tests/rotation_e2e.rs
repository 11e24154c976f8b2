//! End-to-end rotation under mTLS traffic.
//!
//! Several workloads hold meshca leaves, watch the trust bundle over mTLS,
//! renew at the server-suggested time (and at once when their root is
//! tainted), and keep making new mTLS handshakes to each other with
//! peer-identity checks on both sides (rustls clients and servers built from
//! what the CA hands out; each handshake uses the current certificate and
//! bundle). Each also keeps one long-lived connection open and pings over
//! it. Meanwhile an operator, through the admin endpoint, runs prepare →
//! activate → retire, and then an emergency rotation with a taint. Zero
//! handshakes may fail and no long-lived connection may drop.
//!
//! A second test runs a workload that does not watch the bundle: the gate
//! refuses `activate` until that workload has the new bundle.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use meshca::ca::der_to_pem;
use meshca::proto::meshca as pb;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// What a workload holds right now.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    key_pem: String,
    bundle_version: u64,
    roots: Vec<CertificateDer<'static>>,
    tainted: Vec<Vec<u8>>,
    refresh_at: SystemTime,
}

struct Workload {
    sa: String,
    spiffe: String,
    dns: String,
    m: ArcSwap<Material>,
    addr: Mutex<Option<std::net::SocketAddr>>,
    renewals: AtomicU64,
}

struct Mesh {
    ca_addr: String,
    server_name: String,
    data: std::path::PathBuf,
    allowed: HashSet<String>,
    ok: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(roots: &[CertificateDer<'static>]) -> Arc<rustls::RootCertStore> {
    let mut s = rustls::RootCertStore::empty();
    for r in roots {
        s.add(r.clone()).unwrap();
    }
    Arc::new(s)
}

use meshca::ca::{signed_by, uri_san};

impl Workload {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let m = self.m.load();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            root_store(&m.roots),
            provider(),
        )
        .build()
        .unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(m.key_der.clone()));
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(m.chain.clone(), key)
                .unwrap(),
        )
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let m = self.m.load();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(m.key_der.clone()));
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(root_store(&m.roots))
                .with_client_auth_cert(m.chain.clone(), key)
                .unwrap(),
        )
    }

    /// True when the held leaf chains to a tainted root.
    fn under_tainted_root(&self) -> bool {
        let m = self.m.load();
        m.tainted.iter().any(|t| signed_by(&m.chain[1], t))
    }
}

async fn certify(mesh: &Mesh, sa: &str, bundle_pem: &str) -> Result<Material, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let ch = meshca::client::connect(&mesh.ca_addr, bundle_pem, &mesh.server_name, None)
        .await
        .map_err(|e| e.to_string())?;
    let r = pb::identity_client::IdentityClient::new(ch)
        .certify(pb::CertifyRequest {
            token: dev_token(&mesh.data, "shop", sa),
            csr: csr.der().to_vec(),
            requested_ttl: None,
        })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let tb = r.trust_bundle.unwrap();
    let ra = r.refresh_at.unwrap();
    Ok(Material {
        chain: r.cert_chain.into_iter().map(CertificateDer::from).collect(),
        key_der: key.serialize_der(),
        key_pem: key.serialize_pem(),
        bundle_version: tb.version,
        roots: tb.roots.into_iter().map(CertificateDer::from).collect(),
        tainted: tb.tainted_roots,
        refresh_at: SystemTime::UNIX_EPOCH + Duration::new(ra.seconds as u64, ra.nanos as u32),
    })
}

fn bundle_pem(m: &Material) -> String {
    m.roots.iter().map(|r| der_to_pem(r)).collect()
}

/// Keeps a workload's certificate fresh and its bundle current.
async fn agent(mesh: Arc<Mesh>, w: Arc<Workload>, watch: bool) {
    let mut stream = None;
    loop {
        if mesh.stop.load(Ordering::Relaxed) {
            return;
        }
        if watch && stream.is_none() {
            let m = w.m.load();
            let chain_pem: String = m.chain.iter().map(|c| der_to_pem(c)).collect();
            if let Ok(ch) = meshca::client::connect(
                &mesh.ca_addr,
                &bundle_pem(&m),
                &mesh.server_name,
                Some((chain_pem, m.key_pem.clone())),
            )
            .await
            {
                if let Ok(s) = pb::identity_client::IdentityClient::new(ch)
                    .watch_trust_bundle(pb::WatchTrustBundleRequest {})
                    .await
                {
                    stream = Some(s.into_inner());
                }
            }
        }
        let wait =
            w.m.load()
                .refresh_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
        let mut renew = false;
        tokio::select! {
            // Real time: a workload renews at its certificate's refresh time (TLS checks real time).
            _ = tokio::time::sleep(wait.min(Duration::from_millis(200))) => {
                renew = SystemTime::now() >= w.m.load().refresh_at;
            }
            msg = async { stream.as_mut().unwrap().message().await }, if stream.is_some() => {
                match msg {
                    Ok(Some(b)) => {
                        let cur = w.m.load();
                        if b.version > cur.bundle_version {
                            w.m.store(Arc::new(Material {
                                chain: cur.chain.clone(),
                                key_der: cur.key_der.clone(),
                                key_pem: cur.key_pem.clone(),
                                bundle_version: b.version,
                                roots: b.roots.into_iter().map(CertificateDer::from).collect(),
                                tainted: b.tainted_roots,
                                refresh_at: cur.refresh_at,
                            }));
                            // Told that our root is compromised: re-certify now.
                            renew = w.under_tainted_root();
                        }
                    }
                    _ => stream = None,
                }
            }
        }
        if renew {
            let cur = w.m.load_full();
            match certify(&mesh, &w.sa, &bundle_pem(&cur)).await {
                Ok(mut m) => {
                    if m.bundle_version < cur.bundle_version {
                        // A watch message overtook the response: keep the newer bundle.
                        m.bundle_version = cur.bundle_version;
                        m.roots = cur.roots.clone();
                        m.tainted = cur.tainted.clone();
                    }
                    w.m.store(Arc::new(m));
                    w.renewals.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    mesh.failures
                        .lock()
                        .unwrap()
                        .push(format!("{} renewal: {e}", w.sa));
                }
            }
        }
    }
}

/// Accepts mTLS, checks the client's SPIFFE ID, answers ping with pong.
async fn serve(mesh: Arc<Mesh>, w: Arc<Workload>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    *w.addr.lock().unwrap() = Some(l.local_addr().unwrap());
    loop {
        let (tcp, _) = l.accept().await.unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(w.server_config());
        let mesh = mesh.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return; // the client side records the failure
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| uri_san(&c[0]));
            if !peer.as_ref().is_some_and(|p| mesh.allowed.contains(p)) {
                return; // not allowed: close without answering
            }
            let mut buf = [0u8; 4];
            while tls.read_exact(&mut buf).await.is_ok() {
                if tls.write_all(b"pong").await.is_err() {
                    return;
                }
            }
        });
    }
}

type Conn = tokio_rustls::client::TlsStream<TcpStream>;

/// One mTLS connection from `from` to `to`, with the server's identity checked.
async fn connect(from: &Workload, to: &Workload) -> Result<Conn, String> {
    let addr = to.addr.lock().unwrap().unwrap();
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(to.dns.clone()).map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(from.client_config())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| uri_san(&c[0]));
    if peer.as_deref() != Some(to.spiffe.as_str()) {
        return Err(format!("server identity {peer:?}, expected {}", to.spiffe));
    }
    Ok(tls)
}

async fn ping(c: &mut Conn) -> Result<(), String> {
    c.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .map_err(|_| "no pong within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    (&buf == b"pong").then_some(()).ok_or("bad reply".into())
}

/// New handshakes to every peer in turn, continuously.
async fn traffic(mesh: Arc<Mesh>, me: Arc<Workload>, peers: Vec<Arc<Workload>>) {
    let mut i = 0;
    while !mesh.stop.load(Ordering::Relaxed) {
        let to = &peers[i % peers.len()];
        i += 1;
        let r = match connect(&me, to).await {
            Ok(mut c) => ping(&mut c).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => mesh.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                mesh.failures
                    .lock()
                    .unwrap()
                    .push(format!("{} -> {}: {e}", me.sa, to.sa));
                mesh.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        // Pacing: one new handshake per 15 ms of simulated traffic.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

/// One connection held open for the whole test, pinged every 100 ms.
async fn long_lived(mesh: Arc<Mesh>, me: Arc<Workload>, to: Arc<Workload>) -> Result<u64, String> {
    let mut c = connect(&me, &to).await?;
    let mut n = 0;
    while !mesh.stop.load(Ordering::Relaxed) {
        ping(&mut c)
            .await
            .map_err(|e| format!("long-lived {} -> {}: {e}", me.sa, to.sa))?;
        n += 1;
        // Pacing: one ping per 100 ms on the long-lived connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(n)
}

struct Scenario {
    ca: Ca,
    mesh: Arc<Mesh>,
    workloads: Vec<Arc<Workload>>,
}

async fn scenario(
    names: &[&str],
    watchers: &[bool],
    max_ttl: Duration,
    wait: Duration,
) -> Scenario {
    let ca = Ca::start_with(|c| {
        c.set_max_ttl(max_ttl);
        c.issuance.default_ttl = max_ttl;
        c.issuance.min_ttl = Duration::from_secs(1);
        c.trust.propagation_wait = wait;
        c.trust.check_interval = Duration::from_millis(200);
    })
    .await;
    let data = ca.dir.path().join("data");
    let mesh = Arc::new(Mesh {
        ca_addr: ca.addr(),
        server_name: ca.running.server_name.clone(),
        data: data.clone(),
        allowed: names
            .iter()
            .map(|n| format!("spiffe://cluster.local/ns/shop/sa/{n}"))
            .collect(),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let mut workloads = Vec::new();
    for n in names {
        let m = certify(&mesh, n, &ca.bundle_pem()).await.unwrap();
        workloads.push(Arc::new(Workload {
            sa: n.to_string(),
            spiffe: format!("spiffe://cluster.local/ns/shop/sa/{n}"),
            dns: format!("{n}.shop.serviceaccount.identity.meshca.cluster.local"),
            m: ArcSwap::from_pointee(m),
            addr: Mutex::new(None),
            renewals: AtomicU64::new(0),
        }));
    }
    for (w, watch) in workloads.iter().zip(watchers) {
        tokio::spawn(serve(mesh.clone(), w.clone()));
        tokio::spawn(agent(mesh.clone(), w.clone(), *watch));
    }
    while workloads.iter().any(|w| w.addr.lock().unwrap().is_none()) {
        // Poll interval: until every workload has bound its listener.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Scenario {
        ca,
        mesh,
        workloads,
    }
}

impl Scenario {
    async fn admin(&self, step: &str, body: &str) -> (u16, serde_json::Value) {
        let (code, text) = self.ca.rotation(step, body).await;
        (code, serde_json::from_str(&text).unwrap())
    }

    async fn status(&self) -> serde_json::Value {
        self.ca.rotation_status().await
    }

    /// Retries a gated step until it is allowed; returns how often it was refused.
    async fn until_allowed(&self, step: &str, body: &str, limit: Duration) -> u32 {
        let start = Instant::now();
        let mut refused = 0;
        loop {
            let (code, v) = self.admin(step, body).await;
            match code {
                200 => return refused,
                409 if start.elapsed() < limit => {
                    refused += 1;
                    // Poll interval (deadline above): the gate opens on the server's clock.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => panic!("{step}: HTTP {code}: {v}"),
            }
        }
    }

    fn bundle_ids(&self) -> Vec<String> {
        self.ca.root_ids()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_taint_under_mtls_traffic_with_zero_failed_handshakes() {
    let names = ["web", "api", "db"];
    let max_ttl = Duration::from_secs(4);
    let s = scenario(&names, &[true, true, true], max_ttl, Duration::from_secs(2)).await;
    let w = &s.workloads;
    let mut tasks = Vec::new();
    for me in w {
        let peers: Vec<_> = w.iter().filter(|p| p.sa != me.sa).cloned().collect();
        tasks.push(tokio::spawn(traffic(s.mesh.clone(), me.clone(), peers)));
    }
    let held = tokio::spawn(long_lived(s.mesh.clone(), w[0].clone(), w[1].clone()));
    wait_until("traffic flows", Duration::from_secs(5), || async {
        s.mesh.ok.load(Ordering::Relaxed) > 0
    })
    .await;
    let root_a = s.bundle_ids()[0].clone();

    // Routine: prepare → (gate) → activate → (leaves expire) → retire.
    let (code, v) = s.admin("prepare", "{}").await;
    assert_eq!(code, 200, "{v}");
    let root_b = s.bundle_ids()[1].clone();
    let refused = s
        .until_allowed("activate", "{}", Duration::from_secs(20))
        .await;
    assert!(
        refused >= 1,
        "activate is gated by the 2 s propagation wait"
    );
    assert_eq!(
        s.ca.running.ca.issuer().root_fingerprint.as_deref(),
        Some(root_b.as_str())
    );
    let (code, v) = s.admin("retire", "{}").await;
    assert_eq!(code, 409, "leaves under the old root still live: {v}");
    assert!(v["error"].as_str().unwrap().contains("live leaves"), "{v}");
    s.until_allowed("retire", "{}", Duration::from_secs(20))
        .await;
    assert_eq!(s.bundle_ids(), vec![root_b.clone()]);
    assert!(!s.bundle_ids().contains(&root_a));
    // Every workload now holds a leaf under the new root (they renew on
    // their own schedule: polled).
    wait_until(
        "every leaf is under the new root",
        Duration::from_secs(5),
        || async {
            w.iter().all(|x| {
                let m = x.m.load();
                signed_by(&m.chain[1], &m.roots[0])
            })
        },
    )
    .await;
    for x in w {
        let m = x.m.load();
        assert!(
            signed_by(&m.chain[1], &m.roots[0]),
            "{} renewed under the new root",
            x.sa
        );
    }

    // Emergency: a new root, activated at once (forced), the old one tainted.
    let (code, v) = s.admin("prepare", "{}").await;
    assert_eq!(code, 200, "{v}");
    let root_c = s.bundle_ids()[1].clone();
    // Even in an emergency, wait until every watcher has the new bundle.
    let t = Instant::now();
    loop {
        let st = s.status().await;
        let p = &st["propagation"];
        if p["clients"].as_u64().unwrap() > 0 && p["acked"] == p["clients"] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "watchers never acknowledged: {st}"
        );
        // Poll interval (deadline above).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, v) = s.admin("activate", "{\"force\": true}").await;
    assert_eq!(code, 200, "{v}");
    let renewals_before: Vec<u64> = w
        .iter()
        .map(|x| x.renewals.load(Ordering::Relaxed))
        .collect();
    let tainted_at = Instant::now();
    let (code, v) = s
        .admin("taint", &format!("{{\"root\": \"{}\"}}", &root_b[..12]))
        .await;
    assert_eq!(code, 200, "{v}");
    // Told via the bundle stream, every workload re-certifies under the new root at once.
    loop {
        let done = w.iter().all(|x| {
            let m = x.m.load();
            m.roots
                .iter()
                .any(|r| meshca::ca::fingerprint(r) == root_c && signed_by(&m.chain[1], r))
        });
        if done {
            break;
        }
        assert!(
            tainted_at.elapsed() < Duration::from_secs(2),
            "workloads did not re-certify promptly"
        );
        // Poll interval (deadline above).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recertified_in = tainted_at.elapsed();
    for (x, before) in w.iter().zip(renewals_before) {
        assert!(
            x.renewals.load(Ordering::Relaxed) > before,
            "{} re-certified",
            x.sa
        );
    }
    // The tainted root leaves the bundle by itself once no leaf needs it.
    let t = Instant::now();
    while s.bundle_ids().contains(&root_b) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "tainted root never removed"
        );
        // Poll interval (deadline above).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.bundle_ids(), vec![root_c]);
    // Real time: keep traffic running after the last step to catch late failures.
    tokio::time::sleep(Duration::from_millis(500)).await;

    s.mesh.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let pings = held
        .await
        .unwrap()
        .expect("the long-lived connection survived every change");
    let ok = s.mesh.ok.load(Ordering::Relaxed);
    let failed = s.mesh.failed.load(Ordering::Relaxed);
    let failures = s.mesh.failures.lock().unwrap().clone();
    println!(
        "handshakes: {ok} succeeded, {failed} failed; long-lived connection: {pings} pings; re-certified after taint in {recertified_in:?}; renewals: {:?}",
        w.iter().map(|x| x.renewals.load(Ordering::Relaxed)).collect::<Vec<_>>()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(failed, 0);
    assert!(ok > 200, "enough traffic to mean something: {ok}");

    // The transitions are in the audit log.
    let log = s.ca.running.audit.clone().unwrap();
    log.checkpoint().await.unwrap();
    let store = meshca::audit::store::SqliteStore::open_read_only(log.db_path()).unwrap();
    let kinds: Vec<String> = meshca::audit::query::list(&store, &Default::default())
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.kind == "rotation")
        .map(|r| r.entry.result)
        .collect();
    for k in [
        "prepared",
        "activated",
        "removed",
        "tainted",
        "issuer_renewed",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} recorded: {kinds:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_does_not_watch_blocks_activation() {
    let names = ["web", "api", "batch"];
    // batch certifies once and neither watches nor renews within the test.
    let s = scenario(
        &names,
        &[true, true, false],
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    let (code, v) = s.admin("prepare", "{}").await;
    assert_eq!(code, 200, "{v}");
    // Real time: past the 1 s propagation wait, so only the client gate refuses.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, v) = s.admin("activate", "{}").await;
    assert_eq!(code, 409, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(err.contains("2/3") && err.contains("--force"), "{err}");
    let st = s.status().await;
    let lagging = st["propagation"]["lagging"].to_string();
    assert!(
        lagging.contains("sa/batch"),
        "status names the lagging client: {st}"
    );
    let root = st["certificates"][1].clone();
    assert_eq!(root["state"], "prepared");
    assert_eq!(root["propagation"], "2/3");

    // Once batch fetches the bundle (a renewal carries it), activation is safe.
    let w = &s.workloads[2];
    let m = certify(&s.mesh, "batch", &bundle_pem(&w.m.load()))
        .await
        .unwrap();
    assert_eq!(m.roots.len(), 2);
    let (code, v) = s.admin("activate", "{}").await;
    assert_eq!(code, 200, "{v}");
    s.mesh.stop.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_automatic_policy_walks_the_same_gated_steps() {
    let ca = Ca::start_with(|c| {
        c.set_max_ttl(Duration::from_secs(2));
        c.issuance.default_ttl = Duration::from_secs(2);
        c.issuance.min_ttl = Duration::from_secs(1);
        c.trust.propagation_wait = Duration::from_secs(1);
        c.trust.root_lifetime = Duration::from_secs(3600);
        c.trust.auto_rotate_every = Some(Duration::from_secs(2));
        c.trust.check_interval = Duration::from_millis(200);
    })
    .await;
    let first = meshca::ca::fingerprint(&ca.running.ca.bundle().roots[0]);
    // prepare at ~2 s, activate ≥ 1 s later, retire ≥ 2 s after that.
    let t = Instant::now();
    let mut saw_two = false;
    loop {
        let b = ca.running.ca.bundle();
        saw_two |= b.roots.len() == 2;
        let active = ca.running.ca.issuer().root_fingerprint.clone().unwrap();
        if saw_two && b.roots.len() == 1 && active != first {
            assert_eq!(meshca::ca::fingerprint(&b.roots[0]), active);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no automatic rotation"
        );
        // Poll interval (deadline above): the policy acts every 200 ms.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "the gates were waited for: {took:?}"
    );
    let log = ca.running.audit.clone().unwrap();
    log.checkpoint().await.unwrap();
    let store = meshca::audit::store::SqliteStore::open_read_only(log.db_path()).unwrap();
    let auto: Vec<String> = meshca::audit::query::list(&store, &Default::default())
        .unwrap()
        .into_iter()
        .filter(|r| r.entry.kind == "rotation" && r.entry.reason == "auto-rotate")
        .map(|r| r.entry.result)
        .collect();
    assert_eq!(&auto[..3], ["prepared", "activated", "removed"], "{auto:?}");
    // The metrics show the rotation, with the values of the CA's state. The
    // policy keeps rotating (every 2 s), so take a scrape during which the
    // bundle did not change.
    let (bundle, m) = loop {
        let before = ca.running.ca.bundle();
        let m = ca.scrape().await;
        if ca.running.ca.bundle().version == before.version {
            break (before, m);
        }
    };
    let value = |sample: &str| metric_value(&m, sample).unwrap_or(0.0);
    assert_eq!(value("meshca_trust_bundle_version"), bundle.version as f64);
    // One expiry gauge per root in the bundle, the active one labelled so,
    // at its certificate's expiry.
    let root_samples = m
        .lines()
        .filter(|l| l.starts_with("meshca_trust_root_expiry_timestamp_seconds{"))
        .count();
    assert_eq!(root_samples, bundle.roots.len(), "{m}");
    let active = ca.running.ca.issuer().root_fingerprint.clone().unwrap();
    let active_der = bundle
        .roots
        .iter()
        .find(|r| meshca::ca::fingerprint(r) == active)
        .unwrap();
    let (_, active_cert) = x509_parser::parse_x509_certificate(active_der).unwrap();
    assert_eq!(
        value(&format!(
            "meshca_trust_root_expiry_timestamp_seconds{{root=\"{}\",state=\"active\"}}",
            &active[..16]
        )),
        active_cert.validity().not_after.timestamp() as f64,
        "{m}"
    );
    // Every root but the first was prepared, and the removed ones left: the
    // counters account for the bundle exactly.
    let transitions = |kind: &str| {
        value(&format!(
            "meshca_rotation_transitions_total{{step=\"{kind}\"}}"
        ))
    };
    let (prepared, activated, removed) = (
        transitions("prepared"),
        transitions("activated"),
        transitions("removed"),
    );
    assert!(
        removed >= 1.0 && activated >= removed && prepared >= activated,
        "{m}"
    );
    assert_eq!(1.0 + prepared - removed, bundle.roots.len() as f64, "{m}");
    // Each activation step was timed once.
    assert_eq!(
        value("meshca_rotation_step_duration_seconds_count{step=\"activate\"}"),
        activated
    );
    // Roots of one hour (and their issuers) are within the 7-day warning.
    assert!(value("meshca_expiry_warnings") >= 1.0, "{m}");
}
