//! Audit intake as an attacker meets it (issue 11, part 4): a flood of
//! refusals echoing a 9 KB `iss` cannot fill the log; a full disk withholds
//! certificates (UNAVAILABLE), takes the replica out of `/ready` with the
//! reason, loses nothing acknowledged, and heals by itself; the WAL stays
//! bounded; and the entry size is measured for sizing the volume.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshca::audit::store::{AuditStore, Filter, SqliteStore};
use meshca::audit::{query, DB_FILE};
use support::*;

fn refused_entries(data: &Path) -> Vec<query::Listed> {
    let store = SqliteStore::open_read_only(&data.join(DB_FILE)).unwrap();
    query::list(
        &store,
        &Filter {
            result: Some("refused".into()),
            ..Default::default()
        },
    )
    .unwrap()
}

async fn get(ca: &Ca, path: &str) -> (u16, String) {
    meshca::client::admin::request(
        "GET",
        &format!("http://{}{path}", ca.running.admin_addr),
        None,
        None,
    )
    .await
    .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in metrics"))
}

#[tokio::test]
async fn a_flood_of_refusals_with_a_9kb_iss_cannot_fill_the_log() {
    let ca = Ca::start_with(|c| {
        c.audit.audit_refusal = meshca::audit::intake::Limits {
            rate: 1.0,
            burst: 10,
            window: Duration::from_secs(2),
        };
    })
    .await;
    let ch = ca.channel().await;
    let data = ca.dir.path().join("data");
    let (distinct, identical) = (150usize, 150usize);
    let started = Instant::now();
    // Each with its own 9 KB issuer, as the reproduction did.
    for i in 0..distinct {
        let t = ca.token_with("shop", "web", |c| {
            c["iss"] = format!("https://{i}.{}", "x".repeat(9 * 1024)).into()
        });
        let e = certify_native(&ch, t).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    let same = ca.token_with("shop", "web", |c| {
        c["iss"] = format!("https://same.{}", "y".repeat(9 * 1024)).into()
    });
    for _ in 0..identical {
        certify_native(&ch, same.clone()).await.unwrap_err();
    }
    // Grants are never held back by the refusal budget.
    let granted = certify_native(&ch, ca.token("shop", "web", "meshca"))
        .await
        .unwrap();
    assert!(!granted.cert_chain.is_empty());

    // Entries one by one: the burst plus the refill (1/s) while it lasted.
    let secs = started.elapsed().as_secs_f64().ceil() as usize;
    let log = ca.running.audit.clone().unwrap();
    log.checkpoint().await.unwrap();
    let early: Vec<_> = refused_entries(&data)
        .into_iter()
        .filter(|r| r.entry.count.is_none())
        .collect();
    assert!(
        early.len() <= 10 + secs,
        "{} refusal entries from one peer in {secs}s (burst 10, 1/s)",
        early.len()
    );
    for r in &early {
        let d = r.entry.detail.as_deref().unwrap();
        assert!(d.len() <= 1200, "detail of {} bytes", d.len());
        assert!(d.contains("…[truncated"), "the cut is marked: {d}");
    }
    // After the window, summaries account for every refusal: none is lost
    // from the record, but the log grew by a handful of short entries.
    // (Polled, not slept: the drain runs every window/4, later on a busy box.)
    let sent = (distinct + identical) as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (all, represented) = loop {
        log.checkpoint().await.unwrap();
        let all = refused_entries(&data);
        let represented: u64 = all.iter().map(|r| r.entry.count.unwrap_or(1)).sum();
        if represented >= sent || Instant::now() > deadline {
            break (all, represented);
        }
        // Poll interval (deadline above): the drain runs on the server's own timer.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(represented, sent, "every refusal counted");
    // Windows may have closed while this test waited.
    let secs = started.elapsed().as_secs_f64().ceil() as usize;
    // Summaries: at most one per 2 s window per kind (over-limit, repeats).
    let bound = 10 + secs + 2 * (secs / 2 + 2);
    assert!(
        all.len() <= bound,
        "{} entries for 300 refusals in {secs}s",
        all.len()
    );
    assert!(all
        .iter()
        .any(|r| r.entry.reason == "refusals_over_audit_limit" && r.entry.count > Some(100)));
    let bytes: usize = all.iter().map(|r| r.entry.canonical().len()).sum();
    assert!(
        bytes < 30_000,
        "{bytes} bytes of refusals (the flood sent ~2.7 MB)"
    );
    // The counter is this server's own: it equals the refusals the
    // summaries stand for (each folded refusal is counted once, in one).
    let summarized: u64 = all.iter().filter_map(|r| r.entry.count).sum();
    let (_, m) = get(&ca, "/metrics").await;
    assert_eq!(
        metric(&m, "meshca_audit_refusals_folded_total"),
        summarized as f64
    );
    assert!(summarized >= 285, "{summarized}");
    ca.running.shutdown().await;

    // The log with summaries (the new `count` field) still verifies.
    let out = meshca_bin()
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("the `mount` command");
        assert!(
            out.status.success(),
            "this test needs to mount a small tmpfs (root, or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(at.to_path_buf())
    }

    /// Fills the file system; returns the filler's path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        // Byte by byte for the last partial block.
        while f.write_all(&[0]).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_withholds_certificates_says_why_and_heals_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&tmp.path().join("vol"), "8m");
    let data = fs.0.join("data");
    let running = meshca::server::start({
        let mut c = meshca::config::ServeConfig::for_tests(data.clone());
        c.api.rate_limit = 100_000.0;
        c.api.rate_burst = 100_000;
        c
    })
    .await
    .unwrap();
    let ca = Ca {
        running,
        dir: tempfile::tempdir().unwrap(),
    };
    // `Ca` helpers read the data directory under `dir`: link it there.
    std::os::unix::fs::symlink(&data, ca.dir.path().join("data")).unwrap();
    let ch = ca.channel().await;
    let mut acknowledged = Vec::new();
    for _ in 0..5 {
        let r = certify_native(&ch, ca.token("shop", "web", "meshca"))
            .await
            .unwrap();
        acknowledged.push(serial_of(&r.cert_chain[0]));
    }
    let (_, m) = get(&ca, "/metrics").await;
    assert_eq!(metric(&m, "meshca_audit_write_failures_total"), 0.0);
    assert_eq!(metric(&m, "meshca_audit_storage_ok"), 1.0);

    let filler = fs.fill();
    // Issue until the log can no longer grow: then it must fail closed.
    let mut refused = None;
    for _ in 0..5000 {
        match certify_native(&ch, ca.token("shop", "web", "meshca")).await {
            Ok(r) => acknowledged.push(serial_of(&r.cert_chain[0])),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a full disk stops issuance");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit log"), "{}", e.message());
    let (code, body) = get(&ca, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("audit log cannot write") && body.contains("full"),
        "{body}"
    );
    let (_, m) = get(&ca, "/metrics").await;
    assert_eq!(metric(&m, "meshca_audit_storage_ok"), 0.0);
    assert!(metric(&m, "meshca_audit_write_failures_total") >= 1.0);
    // Still refused while full, never granted unrecorded.
    let again = certify_native(&ch, ca.token("shop", "web", "meshca")).await;
    assert_eq!(again.unwrap_err().code(), tonic::Code::Unavailable);

    // Space returns; with no request at all, the server becomes ready.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    loop {
        let (code, _) = get(&ca, "/ready").await;
        if code == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "not ready again");
        // Poll interval (deadline above): the writer probes the disk every 500 ms.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, m) = get(&ca, "/metrics").await;
    assert_eq!(metric(&m, "meshca_audit_storage_ok"), 1.0);
    let r = certify_native(&ch, ca.token("shop", "web", "meshca"))
        .await
        .unwrap();
    acknowledged.push(serial_of(&r.cert_chain[0]));
    ca.running.shutdown().await;

    // Everything a client received is in the log, and the log verifies.
    let store = SqliteStore::open_read_only(&data.join(DB_FILE)).unwrap();
    for s in &acknowledged {
        assert!(
            store.by_serial(s).unwrap().is_some(),
            "serial {s} was handed out but is not in the log"
        );
    }
    let out = meshca_bin()
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "disk full after {} grants on an 8 MiB volume",
        acknowledged.len() - 1
    );
    drop(store);
    drop(fs);
}

fn serial_of(der: &[u8]) -> String {
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    hex::encode(x.raw_serial())
}

fn wal_bytes(data: &Path) -> u64 {
    std::fs::metadata(data.join(format!("{DB_FILE}-wal")))
        .map(|m| m.len())
        .unwrap_or(0)
}

fn grant_like(i: u64) -> meshca::audit::Entry {
    meshca::audit::Entry {
        time: "2026-11-28T07:00:00Z".into(),
        time_unix_ms: 1_795_000_000_000 + i,
        kind: "issuance".into(),
        api: Some("native".into()),
        auth_method: Some("jwks".into()),
        namespace: Some("shop".into()),
        service_account: Some("web".into()),
        pod_name: Some(format!("web-7d9f8c6b5-{i:05}")),
        pod_uid: Some(format!("3f2a9c1e-0b7d-4e8a-9c6f-{i:012}")),
        peer: Some("10.244.1.17:53422".into()),
        csr_sha256: Some("ab".repeat(32)),
        result: "granted".into(),
        reason: "ok".into(),
        serial: Some(format!("{i:032x}")),
        sans: vec![
            "spiffe://cluster.local/ns/shop/sa/web".into(),
            "web.shop.serviceaccount.identity.meshca.cluster.local".into(),
        ],
        not_before: Some("2026-11-28T06:59:00Z".into()),
        not_after: Some("2026-11-29T07:00:00Z".into()),
        leaf_sha256: Some("cd".repeat(32)),
        spki_sha256: Some("ef".repeat(32)),
        issuer_fingerprint: Some("01".repeat(32)),
        root_fingerprint: Some("23".repeat(32)),
        bundle_version: Some(3),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_wal_is_folded_regularly_and_stays_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let clock: std::sync::Arc<dyn meshca::util::clock::Clock> =
        std::sync::Arc::new(meshca::util::clock::SystemClock);
    let (log, guard) =
        meshca::audit::AuditLog::open(tmp.path(), "cluster.local", clock, Default::default())
            .unwrap();
    // One commit per entry (the worst case for WAL growth), and no
    // checkpoint tick at all: only the writer's own folding bounds the WAL.
    let mut max_wal = 0;
    let n = 3000u64;
    for i in 0..n {
        log.append(grant_like(i)).await.unwrap();
        if i % 100 == 0 {
            max_wal = max_wal.max(wal_bytes(tmp.path()));
        }
    }
    max_wal = max_wal.max(wal_bytes(tmp.path()));
    log.checkpoint().await.unwrap();
    tokio::task::spawn_blocking(move || guard.stop())
        .await
        .unwrap();
    let db = std::fs::metadata(tmp.path().join(DB_FILE)).unwrap().len();
    eprintln!(
        "{n} grant entries: database {db} bytes ({} bytes per entry), largest WAL {max_wal} bytes",
        db / n
    );
    assert!(
        max_wal <= 4 * 1024 * 1024,
        "the WAL reached {max_wal} bytes for {n} single-entry commits"
    );
}

#[tokio::test]
async fn audit_max_bytes_fails_closed_before_the_volume_limit() {
    let ca = Ca::start_with(|c| {
        c.api.rate_limit = 100_000.0;
        c.api.rate_burst = 100_000;
        c.audit.audit_max_bytes = Some(256 * 1024);
    })
    .await;
    let ch = ca.channel().await;
    let data = ca.dir.path().join("data");
    let mut granted = Vec::new();
    let mut refused = None;
    for _ in 0..2000 {
        match certify_native(&ch, ca.token("shop", "web", "meshca")).await {
            Ok(r) => granted.push(serial_of(&r.cert_chain[0])),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the size limit stops issuance");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("audit_max_bytes"), "{}", e.message());
    let (code, body) = get(&ca, "/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("audit_max_bytes"), "{body}");
    let used: u64 = ["", "-wal"]
        .iter()
        .map(|s| std::fs::metadata(data.join(format!("{DB_FILE}{s}"))).map_or(0, |m| m.len()))
        .sum();
    assert!(used <= 256 * 1024 + 64 * 1024, "{used} bytes on disk");
    assert!(!granted.is_empty());
    ca.running.shutdown().await;
    let store = SqliteStore::open_read_only(&data.join(DB_FILE)).unwrap();
    for s in &granted {
        assert!(store.by_serial(s).unwrap().is_some(), "{s}");
    }
}
