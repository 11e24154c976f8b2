//! Test support: an in-process CA on ephemeral ports, token minting with the
//! data directory's development signer (and with deliberately wrong keys),
//! CSR builders, and independent chain validation with `openssl verify`.
#![allow(dead_code)]
// Test helpers: a failed unwrap is a failed test (clippy.toml allows unwrap
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use meshca::ca::store::DataDir;
use meshca::config::ServeConfig;
use meshca::server::{self, Running};
use serde_json::{json, Value};
use tempfile::TempDir;
use tonic::transport::Channel;

pub mod interop;
pub mod kubeapi;

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running CA and its data directory.
pub struct Ca {
    pub running: Running,
    pub dir: TempDir,
}

impl Ca {
    pub async fn start() -> Ca {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ServeConfig)) -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServeConfig::for_tests(dir.path().join("data"));
        f(&mut cfg);
        let running = server::start(cfg).await.expect("server starts");
        Ca { running, dir }
    }

    /// `POST /rotation/STEP` with `body` and the admin token.
    pub async fn rotation(&self, step: &str, body: &str) -> (u16, String) {
        rotation_step(
            &self.running.admin_addr.to_string(),
            &self.dir.path().join("data"),
            step,
            body,
        )
        .await
        .unwrap()
    }

    /// The fingerprints of the roots in the current bundle.
    pub fn root_ids(&self) -> Vec<String> {
        self.running
            .ca
            .bundle()
            .roots
            .iter()
            .map(|r| meshca::ca::fingerprint(r))
            .collect()
    }

    /// `GET /rotation/status` as JSON.
    pub async fn rotation_status(&self) -> Value {
        let token = self.admin_token();
        let (_, text) = meshca::client::admin::request(
            "GET",
            &format!("http://{}/rotation/status", self.running.admin_addr),
            Some(&token),
            None,
        )
        .await
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The admin token (admin.token in the data directory).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data").join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn data(&self) -> DataDir {
        DataDir::new(self.dir.path().join("data"))
    }

    pub fn bundle_pem(&self) -> String {
        self.data().bundle_pem().unwrap()
    }

    pub fn addr(&self) -> String {
        self.running.grpc_addr.to_string()
    }

    pub async fn channel(&self) -> Channel {
        meshca::client::connect(
            &self.addr(),
            &self.bundle_pem(),
            &self.running.server_name,
            None,
        )
        .await
        .expect("connects over TLS")
    }

    /// The dev signer's private key PEM and kid.
    pub fn signer(&self) -> (Vec<u8>, String) {
        let pem = self.data().read_key("token-signer.key").unwrap();
        let signer = meshca::authn::devtoken::DevSigner::from_pem(&pem).unwrap();
        let jwks: Value = serde_json::from_str(signer.jwks()).unwrap();
        (
            pem.expose().to_vec(),
            jwks["keys"][0]["kid"].as_str().unwrap().to_string(),
        )
    }

    /// Starts `meshca agent` for shop/web with a token and this CA's bundle
    /// written under `dir`, asking for leaves of `ttl`.
    pub fn start_agent(&self, dir: &Path, ttl: Duration) -> meshca::agent::Agent {
        let token = dir.join("token");
        std::fs::write(&token, self.token("shop", "web", "meshca")).unwrap();
        let bundle = dir.join("bundle.pem");
        std::fs::write(&bundle, self.bundle_pem()).unwrap();
        meshca::agent::start(
            meshca::agent::AgentConfig {
                ca_address: self.addr(),
                server_name: self.running.server_name.clone(),
                bootstrap_bundle: bundle,
                token_file: token,
                requested_ttl: Some(ttl),
            },
            std::sync::Arc::default(),
        )
        .unwrap()
    }

    /// One sample of this server's own registry (0 when absent).
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.running.metrics.render(), name_and_labels).unwrap_or(0.0)
    }

    /// `GET /metrics` from this server's admin endpoint (what Prometheus scrapes).
    pub async fn scrape(&self) -> String {
        let (status, text) = meshca::client::admin::request(
            "GET",
            &format!("http://{}/metrics", self.running.admin_addr),
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{text}");
        text
    }

    /// A valid token for ns/sa with `aud`.
    pub fn token(&self, ns: &str, sa: &str, aud: &str) -> String {
        self.token_with(ns, sa, |c| c["aud"] = json!([aud]))
    }

    /// A token whose claims `edit` may change before signing with the dev key.
    pub fn token_with(&self, ns: &str, sa: &str, edit: impl FnOnce(&mut Value)) -> String {
        let (pem, kid) = self.signer();
        let mut c = claims(ns, sa);
        edit(&mut c);
        sign_es256(&pem, &kid, &c)
    }
}

/// The value of the sample `name_and_labels` (exactly as exposed, e.g.
/// `meshca_issuance_total{api="native",result="granted",reason="ok"}`) in a
/// Prometheus text exposition; None when there is no such sample.
pub fn metric_value(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|v| v.trim().parse::<f64>().unwrap())
    })
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after
/// `limit`. For conditions reached by background tasks (a watch event, a
/// renewal), instead of a fixed sleep that is either too short on a loaded
/// machine or wastes time on an idle one.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims shaped like a Kubernetes projected token.
pub fn claims(ns: &str, sa: &str) -> Value {
    let now = now_s();
    json!({
        "iss": ISSUER,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": ["meshca"],
        "exp": now + 3600, "iat": now, "nbf": now,
        "kubernetes.io": {
            "namespace": ns,
            "serviceaccount": {"name": sa, "uid": "0f6f8e5e-0000-4000-8000-000000000001"},
            "pod": {"name": format!("{sa}-5d8f7"), "uid": "0f6f8e5e-0000-4000-8000-000000000002"}
        }
    })
}

pub fn sign_es256(pem: &[u8], kid: &str, claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.to_string());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(pem).unwrap();
    jsonwebtoken::encode(&h, claims, &key).unwrap()
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A P-256 CSR with the given DNS and URI SANs (and no subject).
pub fn csr_with(
    dns: &[&str],
    uris: &[&str],
    edit: impl FnOnce(&mut rcgen::CertificateParams),
) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    for d in dns {
        p.subject_alt_names
            .push(rcgen::SanType::DnsName((*d).try_into().unwrap()));
    }
    for u in uris {
        p.subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    edit(&mut p);
    p.serialize_request(&key).unwrap().der().to_vec()
}

pub fn csr() -> Vec<u8> {
    csr_with(&[], &[], |_| {})
}

/// A CSR made by the openssl CLI (an implementation we did not write).
pub fn openssl_csr(dir: &Path, newkey: &[&str]) -> Vec<u8> {
    let out = dir.join(format!("csr-{}.der", rand_suffix()));
    let key = dir.join(format!("key-{}.pem", rand_suffix()));
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["req", "-new", "-nodes", "-subj", "/", "-outform", "DER"])
        .args(newkey)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&out);
    let st = cmd.output().expect("openssl is installed");
    assert!(
        st.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(out).unwrap()
}

fn rand_suffix() -> u64 {
    rand::random()
}

/// Runs `openssl ARGS…` and fails the test, with its stderr, if it fails.
pub fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Verifies a chain with `openssl verify` for both TLS client and server use.
pub fn openssl_verify(dir: &Path, leaf: &[u8], intermediates: &[Vec<u8>], roots: &[Vec<u8>]) {
    let pem = |ders: &[Vec<u8>]| {
        ders.iter()
            .map(|d| meshca::ca::der_to_pem(d))
            .collect::<String>()
    };
    let n = rand_suffix();
    let (l, i, r) = (
        dir.join(format!("leaf-{n}.pem")),
        dir.join(format!("inter-{n}.pem")),
        dir.join(format!("roots-{n}.pem")),
    );
    std::fs::write(&l, meshca::ca::der_to_pem(leaf)).unwrap();
    std::fs::write(&i, pem(intermediates)).unwrap();
    std::fs::write(&r, pem(roots)).unwrap();
    for purpose in ["sslclient", "sslserver"] {
        let out = std::process::Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(&r)
            .arg("-untrusted")
            .arg(&i)
            .arg(&l)
            .output()
            .expect("openssl is installed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": OK"),
            "openssl verify ({purpose}) failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

pub fn within(a: SystemTime, b: SystemTime, tolerance: Duration) -> bool {
    let d = if a > b {
        a.duration_since(b)
    } else {
        b.duration_since(a)
    }
    .unwrap();
    d <= tolerance
}

/// What a fake HTTPS endpoint answers: (status, JSON body).
pub type Handler = std::sync::Arc<dyn Fn(&str, &str, &[u8]) -> (u16, Value) + Send + Sync>;

/// A TLS acceptor for 127.0.0.1/localhost with a fresh CA (returned as PEM).
pub fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let mut sc = rustls::ServerConfig::builder_with_provider(meshca::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(sc));
    (acceptor, ca_cert.pem())
}

/// A response body: whole, or streamed.
pub type Body = http_body_util::combinators::BoxBody<hyper::body::Bytes, std::convert::Infallible>;

/// Answers one request.
pub type Respond = std::sync::Arc<
    dyn Fn(
            hyper::Request<hyper::body::Incoming>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// A local HTTPS endpoint (HTTP/1.1, rustls) answering through `respond`.
/// Returns its address and the PEM CA that signed its certificate (for
/// 127.0.0.1 and localhost).
pub async fn https_server(respond: Respond) -> (std::net::SocketAddr, String) {
    let (acceptor, ca_pem) = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let respond = respond.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let fut = respond(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_pem)
}

/// A whole JSON response.
pub fn json_response(status: u16, out: &Value) -> hyper::Response<Body> {
    use http_body_util::BodyExt;
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(out.to_string())).boxed())
        .unwrap()
}

/// A local HTTPS endpoint answering JSON through `handler` (method, path,
/// body). Returns its address and the PEM CA that signed its certificate.
pub async fn https_json_server(handler: Handler) -> (std::net::SocketAddr, String) {
    use http_body_util::BodyExt;
    https_server(std::sync::Arc::new(
        move |req: hyper::Request<hyper::body::Incoming>| {
            let handler = handler.clone();
            Box::pin(async move {
                let path = req.uri().path().to_string();
                let method = req.method().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let (status, out) = handler(&method, &path, &body);
                json_response(status, &out)
            })
        },
    ))
    .await
}

/// `POST /rotation/STEP` with `body` to the admin endpoint `admin`, with the
/// admin token of the server whose data directory is `data_dir`.
pub async fn rotation_step(
    admin: &str,
    data_dir: &Path,
    step: &str,
    body: &str,
) -> Result<(u16, String), meshca::client::ClientError> {
    let token = std::fs::read_to_string(data_dir.join("admin.token")).unwrap();
    meshca::client::admin::request(
        "POST",
        &format!("http://{admin}/rotation/{step}"),
        Some(token.trim()),
        Some(body.to_string()),
    )
    .await
}

/// A port nothing listens on.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The `meshca` binary under test.
pub fn meshca_bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_meshca"));
    // Even when the tests themselves run in a pod, the CA under test must
    // not take the pod's credentials (in-cluster mode is detected).
    c.env("MESHCA_KUBERNETES", "false");
    c
}

/// A `meshca serve` child process on ephemeral ports with JSON logs.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// The gRPC address it logged.
    pub grpc_addr: String,
    /// The admin address it logged.
    pub admin_addr: String,
    /// Log lines seen before it was serving.
    pub startup_log: Vec<String>,
    /// Collects the rest of its log (joins when the process ends).
    pub log: std::thread::JoinHandle<Vec<String>>,
}

/// Starts `meshca serve --data-dir DATA EXTRA…` and waits until it serves.
pub fn spawn_serve(data: &Path, extra: &[&str]) -> ServeProcess {
    spawn_serve_env(data, extra, &[])
}

/// Like [`spawn_serve`], with extra environment variables.
pub fn spawn_serve_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
    use std::io::{BufRead, BufReader};
    let mut child = meshca_bin()
        .envs(env.iter().copied())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut startup_log = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let v: Value = serde_json::from_str(&line).expect("JSON log lines");
        startup_log.push(line);
        if v["fields"]["message"] == "meshca serving" {
            let grpc_addr = v["fields"]["grpc_addr"].as_str().unwrap().to_string();
            let admin_addr = v["fields"]["admin_addr"].as_str().unwrap().to_string();
            // Keep draining stderr so the server never blocks on a full pipe.
            let log = std::thread::spawn(move || lines.map_while(Result::ok).collect());
            return ServeProcess {
                child,
                grpc_addr,
                admin_addr,
                startup_log,
                log,
            };
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("serve did not start: {startup_log:?}");
}

/// Sends a signal (`TERM`, `KILL`) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// A native-audience token for ns/sa from the development signer in `data_dir`.
pub fn dev_token(data_dir: &Path, ns: &str, sa: &str) -> String {
    let pem = DataDir::new(data_dir).read_key("token-signer.key").unwrap();
    meshca::authn::devtoken::DevSigner::from_pem(&pem)
        .unwrap()
        .mint(
            &meshca::authn::devtoken::TokenSpec {
                workload: meshca::identity::Workload::new(ns, sa).unwrap(),
                audiences: vec!["meshca".into()],
                ttl: Duration::from_secs(600),
                issuer: meshca::authn::devtoken::DEV_ISSUER.into(),
                pod: None,
            },
            SystemTime::now(),
        )
        .unwrap()
}

/// A native `Certify` over `ch` with `token`, a fresh P-256 CSR and the default TTL.
pub async fn certify_native(
    ch: &Channel,
    token: impl Into<String>,
) -> Result<meshca::proto::meshca::CertifyResponse, tonic::Status> {
    use meshca::proto::meshca as pb;
    pb::identity_client::IdentityClient::new(ch.clone())
        .certify(pb::CertifyRequest {
            token: token.into(),
            csr: csr(),
            requested_ttl: None,
        })
        .await
        .map(|r| r.into_inner())
}
