//! The audit log end to end: decisions recorded (granted and refused), proofs,
//! offline verification of an export, tampering caught by `meshca audit
//! verify`, and a SIGKILL mid-load losing nothing a client received.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use meshca::audit::store::{AuditStore, Filter, SqliteStore};
use meshca::audit::{query, DB_FILE};
use meshca::proto::meshca as pb;
use support::*;

fn meshca() -> Command {
    meshca_bin()
}

const LOAD_FLAGS: &[&str] = &["--rate-limit", "100000", "--rate-burst", "100000"];

async fn certify(ca: &Ca, sa: &str) -> Result<pb::CertifyResponse, tonic::Status> {
    certify_native(&ca.channel().await, ca.token("shop", sa, "meshca")).await
}

fn serial_of(der: &[u8]) -> String {
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    hex::encode(x.raw_serial())
}

/// Copies a stopped server's data directory (the db and any WAL).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn verify_cli(data: &Path) -> (bool, String) {
    let out = meshca()
        .args(["audit", "verify", "--data-dir"])
        .arg(data)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn decisions_are_recorded_proved_and_tampering_is_caught() {
    let ca = Ca::start().await;
    let mut serials = Vec::new();
    for sa in ["web", "db", "cache", "web"] {
        let r = certify(&ca, sa).await.unwrap();
        serials.push(serial_of(&r.cert_chain[0]));
    }
    // Refusals are recorded with their reasons.
    let mut c = pb::identity_client::IdentityClient::new(ca.channel().await);
    let e = c
        .certify(pb::CertifyRequest {
            token: "not-a-jwt".into(),
            csr: csr(),
            requested_ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let wrong_name = csr_with(
        &["db.shop.serviceaccount.identity.meshca.cluster.local"],
        &[],
        |_| {},
    );
    let _ = c
        .certify(pb::CertifyRequest {
            token: ca.token("shop", "web", "meshca"),
            csr: wrong_name,
            requested_ttl: None,
        })
        .await
        .unwrap_err();
    let log = ca.running.audit.clone().expect("audit on by default");
    assert_eq!(log.checkpoint().await.unwrap(), 6);
    for sa in ["web", "db"] {
        certify(&ca, sa).await.unwrap();
    }
    assert_eq!(log.checkpoint().await.unwrap(), 8);

    let data = ca.data().path().to_path_buf();
    // Rotation status counts live leaves per issuer from the log.
    let now = std::time::SystemTime::now();
    let state = meshca::trust::manager::TrustManager::open(ca.data(), now)
        .unwrap()
        .state();
    let obs = meshca::trust::rotation::Observations::no_clients(
        now,
        Duration::from_secs(86400),
        Duration::from_secs(86400),
    );
    let st = meshca::trust::status::status(&ca.data(), &state, &obs, None, Duration::ZERO).unwrap();
    assert_eq!(st.certificates[1].kind, "issuer");
    assert_eq!(
        st.certificates[1].live_leaves,
        Some(6),
        "6 granted, none expired"
    );
    assert_eq!(
        st.certificates[0].live_leaves,
        Some(6),
        "all under the one root"
    );
    {
        let store = SqliteStore::open_read_only(&data.join(DB_FILE)).unwrap();
        let refused = query::list(
            &store,
            &Filter {
                result: Some("refused".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(refused.len(), 2);
        assert_eq!(refused[0].entry.reason, "bad_token");
        assert_eq!(refused[1].entry.reason, "name_not_allowed");
        assert_eq!(refused[1].entry.identity(), "shop/web");
        assert!(refused[1]
            .entry
            .detail
            .as_deref()
            .unwrap()
            .contains("db.shop"));
        let web = query::list(
            &store,
            &Filter {
                identity: Some("shop/web".into()),
                result: Some("granted".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(web.len(), 3);
        // No token ever reaches the log.
        let all = query::list(&store, &Filter::default()).unwrap();
        let text =
            serde_json::to_string(&all.iter().map(|l| &l.entry).collect::<Vec<_>>()).unwrap();
        assert!(!text.contains(&ca.token("shop", "web", "meshca")[..40]));
        assert!(!text.contains("not-a-jwt"));

        for s in &serials {
            let shown = query::show(&store, s).unwrap();
            assert!(shown.proof_verified, "inclusion proof for {s}");
            assert_eq!(shown.entry.serial.as_deref(), Some(s.as_str()));
            assert_eq!(shown.entry.sans.len(), 2);
        }
        let p = query::prove(&store, 6, 8).unwrap();
        assert!(p.proof_verified && p.from_checkpoint.is_some() && p.to_checkpoint.is_some());
    }

    // The admin endpoint answers the same queries.
    let body = http_get(&ca, &format!("/audit/entries/{}", serials[0])).await;
    assert!(body.contains("\"proof_verified\": true"), "{body}");
    let body = http_get(&ca, "/audit/entries?result=refused").await;
    assert_eq!(
        body.lines().filter(|l| l.starts_with('{')).count(),
        2,
        "{body}"
    );
    let body = http_get(&ca, "/audit/checkpoint").await;
    assert!(body.contains("meshca/cluster.local\n8\n"), "{body}");

    // CLI: list, show (by certificate file too), prove, verify, export + offline verify.
    let list = meshca()
        .args(["audit", "list", "--result", "refused", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("bad_token") && list.contains("2 entries"),
        "{list}"
    );
    let show = meshca()
        .args(["audit", "show", &serials[1], "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("verifies"));
    let (ok, out) = verify_cli(&data);
    assert!(ok, "{out}");
    assert!(out.contains("entries              8"), "{out}");
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("export.jsonl");
    let st = meshca()
        .args(["audit", "export", "--out"])
        .arg(&export)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(st.status.success());
    let key = std::fs::read_to_string(data.join("audit-signer.pub")).unwrap();
    let off = meshca()
        .args(["audit", "verify", "--export"])
        .arg(&export)
        .args(["--public-key", key.trim()])
        .output()
        .unwrap();
    assert!(
        off.status.success(),
        "{}",
        String::from_utf8_lossy(&off.stderr)
    );
    // An export with one entry edited fails offline.
    let text = std::fs::read_to_string(&export).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut v: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
    let body = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let raw = String::from_utf8(b64.decode(v["body"].as_str().unwrap()).unwrap()).unwrap();
        b64.encode(raw.replace("\"granted\"", "\"refused\""))
    };
    v["body"] = serde_json::json!(body);
    lines[3] = v.to_string();
    std::fs::write(&export, lines.join("\n")).unwrap();
    let off = meshca()
        .args(["audit", "verify", "--export"])
        .arg(&export)
        .args(["--public-key", key.trim()])
        .output()
        .unwrap();
    assert!(!off.status.success());

    ca.running.shutdown().await;
    tamper_cases(&data, tmp.path());
}

async fn http_get(ca: &Ca, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = ca.running.admin_addr;
    let token = ca.admin_token();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Each tampering on its own copy; `meshca audit verify` must name it.
fn tamper_cases(data: &Path, tmp: &Path) {
    type Tamper = Box<dyn Fn(&rusqlite::Connection)>;
    let cases: Vec<(&str, &str, Tamper)> = vec![
        (
            "modify",
            "entry 3 was modified",
            Box::new(|c: &rusqlite::Connection| {
                c.execute("UPDATE entries SET body = CAST(replace(body, 'granted', 'refused') AS BLOB) WHERE idx = 3", []).unwrap();
            }),
        ),
        (
            "modify with a recomputed leaf hash",
            "checkpoint at size 6 does not match",
            Box::new(|c: &rusqlite::Connection| {
                let body: Vec<u8> = c
                    .query_row("SELECT body FROM entries WHERE idx = 2", [], |r| r.get(0))
                    .unwrap();
                let forged = String::from_utf8(body)
                    .unwrap()
                    .replace("shop", "prod")
                    .into_bytes();
                let leaf = meshca::audit::merkle::leaf_hash(&forged);
                c.execute(
                    "UPDATE entries SET body = ?1, leaf_hash = ?2 WHERE idx = 2",
                    rusqlite::params![forged, &leaf[..]],
                )
                .unwrap();
            }),
        ),
        (
            "delete",
            "entry 4 is missing",
            Box::new(|c: &rusqlite::Connection| {
                c.execute("DELETE FROM entries WHERE idx = 4", []).unwrap();
            }),
        ),
        (
            "delete the tail",
            "covers more entries than the log holds",
            Box::new(|c: &rusqlite::Connection| {
                c.execute("DELETE FROM entries WHERE idx = 7", []).unwrap();
            }),
        ),
        (
            "insert",
            "checkpoint at size 6 does not match",
            Box::new(|c: &rusqlite::Connection| {
                // Shift entries 1.. up by one and slip a forged entry in at 1.
                c.execute("UPDATE entries SET idx = idx + 1000 WHERE idx >= 1", [])
                    .unwrap();
                c.execute("UPDATE entries SET idx = idx - 999 WHERE idx >= 1000", [])
                    .unwrap();
                let body: Vec<u8> = c
                    .query_row("SELECT body FROM entries WHERE idx = 0", [], |r| r.get(0))
                    .unwrap();
                let leaf = meshca::audit::merkle::leaf_hash(&body);
                c.execute(
                "INSERT INTO entries (idx, time_ms, result, body, leaf_hash) VALUES (1, 0, 'granted', ?1, ?2)",
                rusqlite::params![body, &leaf[..]],
            )
            .unwrap();
            }),
        ),
        (
            // Issue 11: the row's time moved a day back hides it from
            // `audit list --since`, and the tree alone cannot see that.
            "edit a query column",
            "entry 2: its time_ms column",
            Box::new(|c: &rusqlite::Connection| {
                c.execute(
                    "UPDATE entries SET time_ms = time_ms - 86400000 WHERE idx = 2",
                    [],
                )
                .unwrap();
            }),
        ),
        (
            "edit the serial column",
            "entry 3: its serial column",
            Box::new(|c: &rusqlite::Connection| {
                c.execute("UPDATE entries SET serial = 'ab' WHERE idx = 3", [])
                    .unwrap();
            }),
        ),
        (
            "forge a checkpoint",
            "signature does not verify",
            Box::new(|c: &rusqlite::Connection| {
                c.execute("UPDATE checkpoints SET note = replace(note, char(10) || '6' || char(10), char(10) || '5' || char(10)), size = 5 WHERE size = 6", []).unwrap();
            }),
        ),
        (
            "checkpoint signed by another key",
            "no signature by",
            Box::new(|c: &rusqlite::Connection| {
                let key = meshca::audit::note::NoteSigner::generate_pkcs8().unwrap();
                let s = meshca::audit::note::NoteSigner::from_pkcs8("meshca/cluster.local", &key)
                    .unwrap();
                let note = s.sign(&meshca::audit::note::Checkpoint {
                    origin: "meshca/cluster.local".into(),
                    size: 3,
                    root: [0; 32],
                });
                c.execute("INSERT INTO checkpoints (size, root, note, time_ms) VALUES (3, zeroblob(32), ?1, 0)", [note]).unwrap();
            }),
        ),
    ];
    let (ok, out) = verify_cli(data);
    assert!(ok, "the untouched log verifies: {out}");
    for (name, expect, tamper) in cases {
        let copy = tmp.join(name.replace(' ', "-"));
        copy_dir(data, &copy);
        {
            let c = rusqlite::Connection::open(copy.join(DB_FILE)).unwrap();
            tamper(&c);
        }
        let (ok, out) = verify_cli(&copy);
        assert!(!ok, "{name}: verify must fail");
        assert!(out.contains(expect), "{name}: expected {expect:?} in {out}");
    }
}

/// Review finding: a missing data directory printed a raw OS error.
#[test]
fn verify_without_a_log_says_where_it_looked_and_what_to_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let (ok, out) = verify_cli(&missing);
    assert!(!ok);
    assert!(out.contains("no audit log at"), "{out}");
    assert!(out.contains("--data-dir"), "a hint: {out}");
    assert!(!out.contains("os error"), "no raw OS error: {out}");
}

/// Review finding: the serial lookup index was trusted. Redirecting a serial
/// to another entry made `audit show` (and any renewal lookup) answer with
/// another certificate's entry; deleting an index row hid a certificate;
/// `verify` passed both.
#[tokio::test]
async fn a_tampered_serial_index_is_refused_by_lookups_and_caught_by_verify() {
    let ca = Ca::start().await;
    let mut serials = Vec::new();
    for sa in ["web", "db", "cache"] {
        let r = certify(&ca, sa).await.unwrap();
        serials.push(serial_of(&r.cert_chain[0]));
    }
    let log = ca.running.audit.clone().expect("audit on by default");
    log.checkpoint().await.unwrap();
    let data = ca.data().path().to_path_buf();
    ca.running.shutdown().await;
    {
        let c = rusqlite::Connection::open(data.join(DB_FILE)).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM serials", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3, "the checkpoint folded the serials into the index");
    }
    let (ok, out) = verify_cli(&data);
    assert!(ok, "the untouched log verifies: {out}");
    let (web, db) = (serials[0].clone(), serials[1].clone());
    let tmp = tempfile::tempdir().unwrap();
    type Tamper = Box<dyn Fn(&rusqlite::Connection)>;
    let redirect = format!(
        "UPDATE serials SET idx = (SELECT idx FROM serials WHERE serial = '{db}') WHERE serial = '{web}'"
    );
    let hide = format!("DELETE FROM serials WHERE serial = '{web}'");
    let cases: Vec<(&str, &str, Tamper)> = vec![
        (
            "redirect",
            "the serial index maps serial",
            Box::new(move |c| {
                c.execute(&redirect, []).unwrap();
            }),
        ),
        (
            "hide",
            "is missing from the serial index",
            Box::new(move |c| {
                c.execute(&hide, []).unwrap();
            }),
        ),
        (
            "overclaim",
            "claims to cover 1000 entries",
            Box::new(|c| {
                c.execute(
                    "UPDATE meta SET v = 1000 WHERE k = 'serials_indexed_upto'",
                    [],
                )
                .unwrap();
            }),
        ),
    ];
    for (name, expect, tamper) in cases {
        let copy = tmp.path().join(name);
        copy_dir(&data, &copy);
        tamper(&rusqlite::Connection::open(copy.join(DB_FILE)).unwrap());
        let (ok, out) = verify_cli(&copy);
        assert!(!ok, "{name}: verify must fail: {out}");
        assert!(out.contains(expect), "{name}: expected {expect:?} in {out}");
        if name == "redirect" {
            // The lookup itself refuses: renewal and `show` never get db's entry for web.
            let store = SqliteStore::open_read_only(&copy.join(DB_FILE)).unwrap();
            let err = store.by_serial(&web).unwrap_err();
            assert!(
                matches!(err, meshca::audit::AuditError::Integrity(_)),
                "a lying index is an integrity failure, not a miss: {err:?}"
            );
            assert!(err.to_string().contains("integrity failure"), "{err}");
            let show = meshca()
                .args(["audit", "show", &web, "--data-dir"])
                .arg(&copy)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&show.stdout),
                String::from_utf8_lossy(&show.stderr)
            );
            assert!(!show.status.success(), "{text}");
            assert!(text.contains("integrity failure"), "{text}");
            assert!(
                !text.contains("shop/db") && !text.contains("identity"),
                "db's entry is never shown for web: {text}"
            );
            // The untouched serial still resolves to its own entry.
            let shown = query::show(&store, &db).unwrap();
            assert_eq!(shown.entry.serial.as_deref(), Some(db.as_str()));
        }
    }
}

// Multi-threaded: the test blocks on child processes while client
// connections still need a runtime thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_a_client_received() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut serve = spawn_serve(&data, LOAD_FLAGS);
    let addr = serve.grpc_addr.clone();
    let bundle = std::fs::read_to_string(data.join("bundle.pem")).unwrap();
    let server_name = "meshca.meshca.serviceaccount.identity.meshca.cluster.local";

    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let ch = meshca::client::connect(&addr, &bundle, server_name, None)
            .await
            .unwrap();
        let token = dev_token(&data, "load", &format!("w{i}"));
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = pb::identity_client::IdentityClient::new(ch);
            // Stops at the first error or stall: the server has been killed.
            loop {
                let call = c.certify(pb::CertifyRequest {
                    token: token.clone(),
                    csr: csr(),
                    requested_ttl: None,
                });
                match tokio::time::timeout(Duration::from_secs(3), call).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        received.lock().unwrap().push(serial_of(&r.cert_chain[0]));
                    }
                    _ => break,
                }
            }
        }));
    }
    // Real time: a child process under load for 1.5 s before SIGKILL.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(&serve.child, "KILL");
    let _ = serve.child.wait();
    for t in tasks {
        t.await.unwrap();
    }
    let received = received.lock().unwrap().clone();
    assert!(
        received.len() > 50,
        "load ran: {} certificates",
        received.len()
    );

    // Every certificate a client received is in the log, and the log verifies.
    let store = SqliteStore::open_read_only(&data.join(DB_FILE)).unwrap();
    for s in &received {
        assert!(
            store.by_serial(s).unwrap().is_some(),
            "serial {s} missing from the log"
        );
    }
    let before = store.count().unwrap();
    drop(store);
    eprintln!(
        "all {} received serials are logged ({before} entries)",
        received.len()
    );
    let (ok, out) = verify_cli(&data);
    assert!(ok, "log verifies after SIGKILL: {out}");

    // Restart: new entries append cleanly after the old ones.
    let mut serve = spawn_serve(&data, LOAD_FLAGS);
    let addr = serve.grpc_addr.clone();
    let ch = meshca::client::connect(&addr, &bundle, server_name, None)
        .await
        .unwrap();
    let r = certify_native(&ch, dev_token(&data, "load", "after"))
        .await
        .unwrap();
    let serial = serial_of(&r.cert_chain[0]);
    signal(&serve.child, "TERM");
    assert!(serve.child.wait().unwrap().success());
    let store = SqliteStore::open_read_only(&data.join(DB_FILE)).unwrap();
    let e = store.by_serial(&serial).unwrap().expect("new entry");
    assert_eq!(e.index, before, "appended right after the old entries");
    let cps = store.checkpoints().unwrap();
    assert_eq!(
        cps.last().unwrap().size,
        before + 1,
        "final checkpoint on SIGTERM"
    );
    drop(store);
    let (ok, out) = verify_cli(&data);
    assert!(ok, "{out}");
}
