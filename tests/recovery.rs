//! Recovery from expiry: a CA whose root (and so its issuer) has expired
//! starts anyway, says what expired, is not ready, and comes back with
//! `meshca rotation prepare` + `meshca rotation activate --force` run against
//! the running server with the CLI.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime};

use meshca::ca::store::{DataDir, InitOptions};
use support::*;

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = meshca_bin().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_root_is_recovered_without_a_crash_loop() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    DataDir::new(&data)
        .init(
            &InitOptions {
                root_lifetime: Duration::from_secs(2),
                ..Default::default()
            },
            SystemTime::now(),
        )
        .unwrap();
    // Real time: the certificates made above must expire (TLS checks the OS clock).
    std::thread::sleep(Duration::from_millis(2500));

    let mut srv = spawn_serve(&data, &[]);
    let log = srv.startup_log.join("\n");
    assert!(
        log.contains("expired"),
        "the start-up log says what expired: {log}"
    );
    let admin = format!("http://{}", srv.admin_addr);
    let (code, body) = meshca::client::admin::request("GET", &format!("{admin}/ready"), None, None)
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("expired"), "{body}");

    let d = data.to_str().unwrap();
    let (ok, out, err) = cli(&["rotation", "status", "--server", &admin, "--data-dir", d]);
    assert!(ok, "{err}");
    assert!(out.contains("EXPIRED"), "{out}");
    assert!(
        out.contains("activate --force"),
        "the table names the way out: {out}"
    );

    // A server holds the directory: offline commands refuse and say why.
    let (ok, _, err) = cli(&["rotation", "prepare", "--data-dir", d]);
    assert!(!ok);
    assert!(err.contains("--server"), "{err}");

    let (ok, out, err) = cli(&["rotation", "prepare", "--server", &admin, "--data-dir", d]);
    assert!(ok, "{err}");
    assert!(out.contains("done: prepared"), "{out}");
    // Without --force the gate holds (the wait is max_ttl, 24 h by default).
    let (ok, _, err) = cli(&["rotation", "activate", "--server", &admin, "--data-dir", d]);
    assert!(!ok);
    assert!(
        err.contains("not propagated") && err.contains("--force"),
        "{err}"
    );
    let (ok, out, err) = cli(&[
        "rotation",
        "activate",
        "--force",
        "--server",
        &admin,
        "--data-dir",
        d,
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["events"][0].as_str().unwrap().contains("FORCED"), "{v}");

    // Ready again, and issuing under the new root.
    let (code, _) = meshca::client::admin::request("GET", &format!("{admin}/ready"), None, None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    let bundle = DataDir::new(&data).bundle_pem().unwrap();
    let mut resp = None;
    // The server swaps its own certificate right after the new issuer.
    for _ in 0..50 {
        if let Ok(ch) = meshca::client::connect(
            &srv.grpc_addr,
            &bundle,
            "meshca.meshca.serviceaccount.identity.meshca.cluster.local",
            None,
        )
        .await
        {
            if let Ok(r) = certify_native(&ch, dev_token(&data, "shop", "web")).await {
                resp = Some(r);
                break;
            }
        }
        // Poll interval: a child process recovers on its own.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = resp.expect("issuance is back");
    let tb = r.trust_bundle.unwrap();
    meshca::client::verify_chain(
        &r.cert_chain[0],
        &r.cert_chain[1..],
        &tb.roots,
        SystemTime::now(),
    )
    .unwrap();
    signal(&srv.child, "TERM");
    assert!(srv.child.wait().unwrap().success());
}

#[test]
fn an_offline_root_is_imported_with_checks_and_the_bundle_file_follows() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    DataDir::new(&data)
        .init(&InitOptions::default(), SystemTime::now())
        .unwrap();
    let d = data.to_str().unwrap();
    // An externally made root (as an offline root CA would hand over).
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "offline root 2027");
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let root = p.self_signed(&key).unwrap();
    let crt = dir.path().join("root.pem");
    let k = dir.path().join("root.key");
    std::fs::write(&crt, root.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let other = dir.path().join("other.key");
    std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();

    let (ok, _, err) = cli(&[
        "rotation",
        "prepare",
        "--data-dir",
        d,
        "--root-cert",
        crt.to_str().unwrap(),
        "--root-key",
        other.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("does not belong"),
        "a mismatched key is refused: {err}"
    );
    let (ok, out, err) = cli(&[
        "rotation",
        "prepare",
        "--data-dir",
        d,
        "--root-cert",
        crt.to_str().unwrap(),
        "--root-key",
        k.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fp = meshca::ca::fingerprint(root.der());
    assert_eq!(v["status"]["certificates"][1]["fingerprint"], fp.as_str());
    assert_eq!(v["status"]["certificates"][1]["state"], "prepared");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("roots").join(format!("{fp}.key")))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A server started on it publishes both roots to the bundle file.
    let bundle_file = dir.path().join("published/ca.crt");
    std::fs::create_dir_all(bundle_file.parent().unwrap()).unwrap();
    let mut srv = spawn_serve(&data, &["--bundle-file", bundle_file.to_str().unwrap()]);
    let mut n = 0;
    for _ in 0..50 {
        n = std::fs::read(&bundle_file)
            .map(|b| meshca::ca::pem_to_certs(&b).unwrap().len())
            .unwrap_or(0);
        if n == 2 {
            break;
        }
        // Poll interval: a child process rewrites bundle.pem on its own.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(n, 2, "the bundle file holds the old and the imported root");
    signal(&srv.child, "TERM");
    assert!(srv.child.wait().unwrap().success());
}

#[test]
fn serve_imports_a_mounted_root_into_an_empty_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let root = p.self_signed(&key).unwrap();
    // As a kubernetes.io/tls Secret mounts it.
    std::fs::write(dir.path().join("tls.crt"), root.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    let data = dir.path().join("data");
    let crt = dir.path().join("tls.crt");
    let k = dir.path().join("tls.key");
    let mut srv = spawn_serve(
        &data,
        &[
            "--init-root-cert",
            crt.to_str().unwrap(),
            "--init-root-key",
            k.to_str().unwrap(),
        ],
    );
    let bundle =
        meshca::ca::pem_to_certs(DataDir::new(&data).bundle_pem().unwrap().as_bytes()).unwrap();
    assert_eq!(bundle.len(), 1);
    assert_eq!(
        meshca::ca::fingerprint(&bundle[0]),
        meshca::ca::fingerprint(root.der())
    );
    signal(&srv.child, "TERM");
    assert!(srv.child.wait().unwrap().success());
    // A second start finds the directory initialized and ignores the flags.
    let mut srv = spawn_serve(
        &data,
        &[
            "--init-root-cert",
            crt.to_str().unwrap(),
            "--init-root-key",
            k.to_str().unwrap(),
        ],
    );
    signal(&srv.child, "TERM");
    assert!(srv.child.wait().unwrap().success());
}

/// Offline roots come with keys in their traditional PEM forms: PKCS#1
/// (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`, also cert-manager's
/// ECDSA default). Both import, and leaves under them verify with OpenSSL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_with_pkcs1_and_sec1_keys_import_and_issue() {
    for (newkey, to_traditional) in [
        ("rsa:2048", vec!["rsa", "-traditional"]),
        ("ec", vec!["ec"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (crt, k8, key) = (
            dir.path().join("root.crt"),
            dir.path().join("root.pkcs8"),
            dir.path().join("root.key"),
        );
        let mut req = vec!["req", "-x509", "-newkey", newkey];
        if newkey == "ec" {
            req.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        req.extend([
            "-nodes",
            "-days",
            "365",
            "-subj",
            "/CN=offline root",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            k8.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ]);
        openssl(&req);
        let mut conv = to_traditional.clone();
        conv.extend(["-in", k8.to_str().unwrap(), "-out", key.to_str().unwrap()]);
        openssl(&conv);
        let pem = std::fs::read_to_string(&key).unwrap();
        assert!(
            pem.starts_with("-----BEGIN RSA PRIVATE KEY-----")
                || pem.starts_with("-----BEGIN EC PRIVATE KEY-----"),
            "{pem}"
        );
        let (c2, k2) = (crt.clone(), key.clone());
        let ca = Ca::start_with(move |c| c.init_root = Some((c2, k2))).await;
        let root = meshca::ca::pem_to_certs(&std::fs::read(&crt).unwrap()).unwrap();
        assert_eq!(
            meshca::ca::fingerprint(&ca.running.ca.bundle().roots[0]),
            meshca::ca::fingerprint(&root[0])
        );
        let r = certify_native(&ca.channel().await, ca.token("shop", "web", "meshca"))
            .await
            .unwrap();
        openssl_verify(
            dir.path(),
            &r.cert_chain[0],
            &r.cert_chain[1..],
            &[root[0].to_vec()],
        );
    }
}
