//! Crash-resume: for each rotation step, a real `meshca serve` process is
//! SIGKILLed right before and right after the journal write (the
//! `MESHCA_FAILPOINT` hook), then restarted. Before the write the step did
//! not happen and running it again works; after it the step happened, the
//! restart finishes the derived files, and running it again is refused (no
//! step twice). The rotation is then completed and the invariants checked:
//! `bundle.pem` is exactly the journal's roots, the issuer is signed by the
//! active root, and a fresh leaf verifies against the served bundle.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use meshca::ca::store::{DataDir, InitOptions};
use meshca::ca::{fingerprint, pem_to_certs};
use meshca::trust::journal::Journal;
use meshca::trust::rotation::{Phase, RotationState};
use support::*;
use x509_parser::prelude::*;

const SERVER_NAME: &str = "meshca.meshca.serviceaccount.identity.meshca.cluster.local";
/// Short leaves so `retire` becomes safe within the test.
const ARGS: &[&str] = &[
    "--max-ttl",
    "2s",
    "--default-ttl",
    "2s",
    "--min-ttl",
    "1s",
    "--propagation-wait",
    "0s",
];

fn journal(data: &Path) -> RotationState {
    Journal::new(data).load().unwrap().unwrap()
}

/// Runs an offline rotation command (no server holds the directory).
fn offline(data: &Path, args: &[&str]) {
    let out = meshca_bin()
        .args(["rotation"])
        .args(args)
        .args(["--max-ttl", "2s", "--propagation-wait", "0s", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The invariants that must hold whenever a server is up.
async fn check_invariants(data: &Path, srv: &ServeProcess) {
    let st = journal(data);
    let d = DataDir::new(data);
    let bundle = pem_to_certs(d.bundle_pem().unwrap().as_bytes()).unwrap();
    let ids: Vec<String> = bundle.iter().map(|c| fingerprint(c)).collect();
    let want: Vec<String> = st.in_bundle().map(|r| r.id.clone()).collect();
    assert_eq!(ids, want, "bundle.pem holds exactly the journal's roots");
    assert_eq!(
        st.roots.iter().filter(|r| r.phase == Phase::Active).count(),
        1
    );
    let active = st.active().unwrap();
    let root = d.read_root_cert(&active.id).unwrap();
    let issuer = d.issuer_chain().unwrap().swap_remove(0);
    let (_, i) = X509Certificate::from_der(&issuer).unwrap();
    let (_, r) = X509Certificate::from_der(&root).unwrap();
    i.verify_signature(Some(r.public_key()))
        .expect("the issuer is signed by the active root");
    // What the server hands out matches the disk.
    let ch = meshca::client::connect(&srv.grpc_addr, &d.bundle_pem().unwrap(), SERVER_NAME, None)
        .await
        .unwrap();
    let resp = certify_native(&ch, dev_token(data, "shop", "web"))
        .await
        .unwrap();
    let tb = resp.trust_bundle.unwrap();
    assert_eq!(tb.version, st.bundle_version);
    assert_eq!(
        tb.roots.iter().map(|r| fingerprint(r)).collect::<Vec<_>>(),
        want
    );
    assert_eq!(fingerprint(&resp.cert_chain[1]), fingerprint(&issuer));
    meshca::client::verify_chain(
        &resp.cert_chain[0],
        &resp.cert_chain[1..],
        &tb.roots,
        SystemTime::now(),
    )
    .unwrap();
}

fn stop(mut srv: ServeProcess) {
    signal(&srv.child, "TERM");
    srv.child.wait().unwrap();
}

/// Brings a fresh data directory to the state just before `step`.
fn setup(data: &Path, step: &str) {
    DataDir::new(data)
        .init(&InitOptions::default(), SystemTime::now())
        .unwrap();
    match step {
        "prepare" | "taint" => offline(data, &["status"]), // creates the journal
        "activate" => offline(data, &["prepare"]),
        "retire" => {
            offline(data, &["prepare"]);
            offline(data, &["activate"]);
        }
        _ => unreachable!(),
    }
}

async fn crash_case(step: &'static str, stage: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    setup(&data, step);
    if step == "retire" {
        // Leaves under the old root live at most max_ttl (2 s) after activation.
        // Real time: leaves under the old root (max_ttl 2 s) must expire in a child process.
        tokio::time::sleep(Duration::from_millis(2100)).await;
    }
    let body = match step {
        "taint" => {
            let id = journal(&data).active().unwrap().id.clone();
            format!("{{\"root\": \"{}\"}}", &id[..12])
        }
        _ => "{}".into(),
    };
    let before = journal(&data);

    let failpoint = format!("{stage}:{step}");
    let mut srv = spawn_serve_env(&data, ARGS, &[("MESHCA_FAILPOINT", &failpoint)]);
    let r = rotation_step(&srv.admin_addr, &data, step, &body).await;
    assert!(
        r.as_ref().is_err_and(|e| e.is_unreachable()),
        "{failpoint}: the server died mid-request: {r:?}"
    );
    let status = srv.child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{failpoint}: killed by SIGKILL");

    let after = journal(&data);
    if stage == "before-commit" {
        assert_eq!(after, before, "{failpoint}: the step did not happen");
    } else {
        assert_eq!(
            after.seq,
            before.seq + 1,
            "{failpoint}: the step happened once"
        );
    }

    // Restart: the server finishes what the journal says, and serves.
    let srv = spawn_serve(&data, ARGS);
    check_invariants(&data, &srv).await;
    let (code, text) = rotation_step(&srv.admin_addr, &data, step, &body)
        .await
        .unwrap();
    if stage == "before-commit" {
        assert_eq!(code, 200, "{failpoint}: retrying the step works: {text}");
    } else {
        assert_eq!(code, 409, "{failpoint}: the step is not done twice: {text}");
    }
    assert_eq!(journal(&data).seq, before.seq + 1);
    check_invariants(&data, &srv).await;

    // Complete the rotation from wherever this step left it.
    let s = journal(&data);
    if s.prepared().is_some() {
        let (code, text) = rotation_step(&srv.admin_addr, &data, "activate", "{}")
            .await
            .unwrap();
        assert_eq!(code, 200, "{text}");
        check_invariants(&data, &srv).await;
    }
    if journal(&data)
        .roots
        .iter()
        .any(|r| r.phase == Phase::Retired)
    {
        // Real time: leaves under the old root (max_ttl 2 s) must expire in a child process.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let (code, text) = rotation_step(&srv.admin_addr, &data, "retire", "{}")
            .await
            .unwrap();
        assert_eq!(code, 200, "{text}");
    }
    check_invariants(&data, &srv).await;
    let end = journal(&data);
    assert_eq!(end.in_bundle().count(), 1, "one root left in the bundle");
    if step == "taint" {
        assert!(
            end.active().unwrap().tainted,
            "the taint survived the crash"
        );
        let ch = meshca::client::connect(
            &srv.grpc_addr,
            &DataDir::new(&data).bundle_pem().unwrap(),
            SERVER_NAME,
            None,
        )
        .await
        .unwrap();
        let b = meshca::proto::meshca::identity_client::IdentityClient::new(ch)
            .get_trust_bundle(meshca::proto::meshca::GetTrustBundleRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.tainted_roots.len(), 1, "clients are told to re-certify");
    }
    stop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_around_prepare() {
    crash_case("prepare", "before-commit").await;
    crash_case("prepare", "after-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_around_activate() {
    crash_case("activate", "before-commit").await;
    crash_case("activate", "after-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_around_retire() {
    crash_case("retire", "before-commit").await;
    crash_case("retire", "after-commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_around_taint() {
    crash_case("taint", "before-commit").await;
    crash_case("taint", "after-commit").await;
}
