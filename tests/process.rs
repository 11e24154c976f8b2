//! The `meshca` binary as an operator runs it: `serve` initializes an empty
//! data directory, the walkthrough commands work against it, bad config fails
//! naming the setting, and SIGTERM exits 0. Also the CA's own server
//! certificate renewing itself.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn meshca() -> Command {
    meshca_bin()
}

#[test]
fn serve_walkthrough_and_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = spawn_serve(&data, &[]);
    assert!(
        serve
            .startup_log
            .iter()
            .any(|l| l.contains("data directory was empty")),
        "serve says it initialized the data directory"
    );
    let grpc = serve.grpc_addr.clone();

    let token = meshca()
        .args([
            "token",
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let tok_file = tmp.path().join("web.token");
    std::fs::write(&tok_file, &token.stdout).unwrap();
    for api in ["native", "linkerd", "istio"] {
        let out = tmp.path().join(api);
        let r = meshca()
            .args(["certify", "--server", &grpc, "--api", api, "--token-file"])
            .arg(&tok_file)
            .arg("--out")
            .arg(&out)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "certify --api {api}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let inspect = meshca()
            .args(["inspect", "--output", "json"])
            .arg(out.join("chain.pem"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(v[0]["sans"][0], "URI:spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(v[1]["is_ca"], true);
    }
    let bundle = meshca()
        .arg("bundle")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bundle.stdout).starts_with("-----BEGIN CERTIFICATE-----"));

    // init refuses to overwrite the CA serve created.
    let again = meshca()
        .arg("init")
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    signal(&serve.child, "TERM");
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let log = serve.log.join().unwrap();
    assert!(log.iter().any(|l| l.contains("SIGTERM")), "{log:?}");
    assert!(log
        .iter()
        .any(|l| l.contains("certificate issued") && l.contains("\"api\":\"linkerd\"")));
}

#[test]
fn invalid_configuration_fails_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, setting) in [
        (vec!["--trust-domain", "Bad_Domain"], "trust_domain"),
        (vec!["--max-ttl", "1m"], "max_ttl"),
        (
            vec!["--jwks-url", "http://insecure.example/jwks"],
            "jwks_url",
        ),
        (vec!["--rate-limit", "0"], "rate_limit"),
    ] {
        let r = meshca()
            .arg("serve")
            .args(&args)
            .arg("--data-dir")
            .arg(tmp.path().join("d"))
            .output()
            .unwrap();
        assert!(!r.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(setting), "{args:?}: {err}");
    }
    let cfg = tmp.path().join("meshca.toml");
    std::fs::write(&cfg, "trust_domian = \"typo.example\"\n").unwrap();
    let r = meshca()
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("trust_domian"));
}

#[test]
fn a_second_serve_on_a_held_data_dir_exits_unavailable_with_a_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    let mut first = spawn_serve(&data, &[]);
    let r = meshca()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let _ = first.child.kill();
    let _ = first.child.wait();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("in use by another meshca process"), "{err}");
    // 4: unavailable (retry once the other server stopped), as `revoke`
    // and `rotation` exit on the same lock (docs/configuration.md).
    assert_eq!(r.status.code(), Some(4), "{err}");
}

/// Reads the serial of the certificate the server presents.
async fn server_serial(ca: &Ca) -> Vec<u8> {
    let roots =
        meshca::tls::root_store(&meshca::ca::pem_to_certs(ca.bundle_pem().as_bytes()).unwrap());
    let cfg = rustls::ClientConfig::builder_with_provider(meshca::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(ca.running.grpc_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(ca.running.server_name.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("server cert verifies");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, x) = x509_parser::parse_x509_certificate(&cert).unwrap();
    x.raw_serial().to_vec()
}

#[tokio::test]
async fn server_certificate_renews_itself() {
    // A 10 s lifetime renews at 60 %, i.e. after about 6 s.
    let ca = Ca::start_with(|c| {
        c.issuance.min_ttl = Duration::from_secs(1);
        c.set_max_ttl(Duration::from_secs(10));
        c.issuance.default_ttl = Duration::from_secs(10);
    })
    .await;
    let first = server_serial(&ca).await;
    let mut renewed = false;
    for _ in 0..40 {
        // Poll interval: a child process renews on the system clock.
        tokio::time::sleep(Duration::from_millis(250)).await;
        if server_serial(&ca).await != first {
            renewed = true;
            break;
        }
    }
    assert!(renewed, "a new server certificate within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_serves_files_and_the_workload_api_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut srv = spawn_serve(&data, &[]);
    let token = dir.path().join("token");
    std::fs::write(&token, dev_token(&data, "shop", "web")).unwrap();
    let out = dir.path().join("out");
    let sock = dir.path().join("spiffe/agent.sock");
    let admin = format!("127.0.0.1:{}", closed_port());
    let mut agent = meshca_bin()
        .args([
            "agent",
            "--ca-address",
            &srv.grpc_addr,
            "--admin-listen",
            &admin,
        ])
        .arg("--bootstrap-bundle")
        .arg(data.join("bundle.pem"))
        .arg("--token-file")
        .arg(&token)
        .arg("--out-dir")
        .arg(&out)
        .arg("--workload-api-socket")
        .arg(format!("unix://{}", sock.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = false;
    for _ in 0..100 {
        if out.join("chain.pem").exists() && sock.exists() {
            if let Ok((200, _)) =
                meshca::client::admin::request("GET", &format!("http://{admin}/ready"), None, None)
                    .await
            {
                ready = true;
                break;
            }
        }
        // Poll interval: a child process becomes ready on its own.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "agent wrote its files, opened the socket and is ready"
    );
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    signal(&agent, "TERM");
    assert!(agent.wait().unwrap().success(), "SIGTERM: exit 0");
    assert!(!sock.exists(), "the socket is removed on exit");
    signal(&srv.child, "TERM");
    srv.child.wait().unwrap();
}
