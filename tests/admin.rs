//! The admin surface as an attacker meets it (issue 11, part 5): probes
//! and Prometheus stay open; rotation and audit routes need the admin token
//! for every method; a `Host` that names something else (DNS rebinding) is
//! refused; `/audit/entries` pages with a default and a maximum; and the
//! operator CLI sends the token and explains a refusal.
// Test helpers: a failed unwrap is a failed test (clippy.toml allows it
// only inside #[test] functions, not in the helpers they call).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use support::*;

/// One raw HTTP/1.1 exchange, so the test controls `Host` exactly.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}

#[tokio::test]
async fn operator_routes_need_the_token_for_every_method_and_probes_do_not() {
    let ca = Ca::start().await;
    let addr = ca.running.admin_addr;
    let host = addr.to_string();
    let token = ca.admin_token();
    // Something to list and prove.
    certify_native(&ca.channel().await, ca.token("shop", "web", "meshca"))
        .await
        .unwrap();
    ca.running
        .audit
        .as_ref()
        .unwrap()
        .checkpoint()
        .await
        .unwrap();

    for open in ["/metrics", "/live", "/ready"] {
        let (code, _, body) = raw(addr, "GET", open, &host, None).await;
        assert_eq!(code, 200, "{open} stays open to probes: {body}");
    }
    let protected = [
        ("GET", "/rotation/status"),
        ("GET", "/audit/entries"),
        ("GET", "/audit/entries/00ff"),
        ("GET", "/audit/checkpoint"),
        ("GET", "/audit/consistency?from=1&to=1"),
        ("GET", "/audit/key"),
        ("POST", "/rotation/retire"),
    ];
    for (method, path) in protected {
        let (code, head, body) = raw(addr, method, path, &host, None).await;
        assert_eq!(code, 401, "{method} {path} without a token: {body}");
        assert!(
            body.contains("admin.token"),
            "the refusal says where the token is: {body}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        let (code, _, body) = raw(addr, method, path, &host, Some("0123abcd")).await;
        assert_eq!(code, 401, "{method} {path} with a wrong token: {body}");
        assert!(body.contains("wrong admin token"), "{body}");
    }
    // With the token, the reads answer.
    for path in [
        "/rotation/status",
        "/audit/entries",
        "/audit/checkpoint",
        "/audit/key",
    ] {
        let (code, _, body) = raw(addr, "GET", path, &host, Some(&token)).await;
        assert_eq!(code, 200, "{path} with the token: {body}");
    }
    let (_, _, entries) = raw(addr, "GET", "/audit/entries", &host, Some(&token)).await;
    assert!(entries.contains("\"result\":\"granted\""), "{entries}");
    ca.running.shutdown().await;
}

#[tokio::test]
async fn a_rebound_host_name_is_refused_and_configured_names_are_served() {
    let ca =
        Ca::start_with(|c| c.admin.admin_allowed_hosts = vec!["meshca-admin.meshca.svc".into()])
            .await;
    let addr = ca.running.admin_addr;
    let port = addr.port();
    let token = ca.admin_token();
    // A page on attacker.example whose name now resolves to 127.0.0.1: the
    // browser sends the attacker's name. Even with a token (a browser could
    // have one cached by an operator tool) and on the open routes.
    for path in ["/audit/entries", "/rotation/status", "/metrics", "/ready"] {
        let (code, _, body) = raw(
            addr,
            "GET",
            path,
            &format!("attacker.example:{port}"),
            Some(&token),
        )
        .await;
        assert_eq!(code, 421, "{path}: {body}");
        assert!(body.contains("admin_allowed_hosts"), "{body}");
    }
    // A name that merely starts like ours.
    let (code, _, _) = raw(
        addr,
        "GET",
        "/live",
        "meshca-admin.meshca.svc.attacker.example",
        None,
    )
    .await;
    assert_eq!(code, 421);
    for ok in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("meshca-admin.meshca.svc:{port}"),
        "MESHCA-ADMIN.meshca.svc.".to_string(),
    ] {
        let (code, _, body) = raw(addr, "GET", "/audit/key", &ok, Some(&token)).await;
        assert_eq!(code, 200, "Host {ok}: {body}");
    }
    ca.running.shutdown().await;
}

/// Review finding: an unknown serial answered 400 (the caller's fault) and
/// echoed the path word whole, control characters included.
#[tokio::test]
async fn an_unknown_serial_is_404_with_a_short_escaped_json_error() {
    let ca = Ca::start().await;
    let (addr, token) = (ca.running.admin_addr, ca.admin_token());
    let host = addr.to_string();
    let (code, _, body) = raw(addr, "GET", "/audit/entries/abcdef", &host, Some(&token)).await;
    assert_eq!(code, 404, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("abcdef"), "{body}");
    let long = format!("x%0d%0aforged{}", "a".repeat(600));
    let (code, _, body) = raw(
        addr,
        "GET",
        &format!("/audit/entries/{long}"),
        &host,
        Some(&token),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    let msg = serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!msg.contains('\n') && !msg.contains('\r'), "{msg:?}");
    assert!(msg.contains("\\r\\nforged"), "escaped: {msg:?}");
    assert!(msg.len() < 250 && msg.contains("truncated"), "{msg:?}");
    ca.running.shutdown().await;
}

#[tokio::test]
async fn audit_entries_page_with_a_default_a_maximum_and_a_cursor() {
    let ca = Ca::start_with(|c| {
        c.api.rate_limit = 10_000.0;
        c.api.rate_burst = 10_000;
    })
    .await;
    let ch = ca.channel().await;
    let token = ca.admin_token();
    for _ in 0..230 {
        certify_native(&ch, ca.token("shop", "web", "meshca"))
            .await
            .unwrap();
    }
    let total = ca
        .running
        .audit
        .as_ref()
        .unwrap()
        .checkpoint()
        .await
        .unwrap();
    assert!(total >= 230);
    let addr = ca.running.admin_addr;
    let host = addr.to_string();
    let next = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("meshca-next-cursor: "))
            .map(|v| v.trim().parse::<u64>().unwrap())
    };
    let indices = |body: &str| -> Vec<u64> {
        body.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    // No limit: the newest 100, not the whole log.
    let (code, head, body) = raw(addr, "GET", "/audit/entries", &host, Some(&token)).await;
    assert_eq!(code, 200);
    let page = indices(&body);
    assert_eq!(page.len(), 100);
    assert_eq!(*page.last().unwrap(), total - 1, "newest last");
    // Walk back with the cursor: every entry exactly once.
    let mut seen: BTreeSet<u64> = page.iter().copied().collect();
    let mut cursor = next(&head);
    let mut pages = 1;
    while let Some(c) = cursor {
        let (code, head, body) = raw(
            addr,
            "GET",
            &format!("/audit/entries?limit=100&before={c}"),
            &host,
            Some(&token),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        for i in indices(&body) {
            assert!(i < c, "page below the cursor");
            assert!(seen.insert(i), "entry {i} served twice");
        }
        cursor = next(&head);
        pages += 1;
        assert!(pages < 10);
    }
    assert_eq!(seen, (0..total).collect::<BTreeSet<_>>());
    // Over the maximum: a clear 400, not a whole-log dump.
    let (code, _, body) = raw(
        addr,
        "GET",
        "/audit/entries?limit=1001",
        &host,
        Some(&token),
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("maximum of 1000"), "{body}");
    let (code, _, body) = raw(
        addr,
        "GET",
        "/audit/entries?limit=1000",
        &host,
        Some(&token),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(indices(&body).len() as u64, total.min(1000));
    ca.running.shutdown().await;
}

#[tokio::test]
async fn rotation_status_over_the_server_sends_the_token_and_explains_a_refusal() {
    let ca = Ca::start().await;
    let admin = format!("http://{}", ca.running.admin_addr);
    let data = ca.dir.path().join("data");
    let ok = tokio::task::spawn_blocking({
        let (admin, data) = (admin.clone(), data.clone());
        move || {
            meshca_bin()
                .args([
                    "rotation",
                    "status",
                    "--output",
                    "json",
                    "--server",
                    &admin,
                    "--data-dir",
                ])
                .arg(&data)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(
        v["certificates"].is_array() || v["status"].is_object(),
        "{v}"
    );

    let wrong = ca.dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let bad = tokio::task::spawn_blocking(move || {
        meshca_bin()
            .args([
                "rotation",
                "status",
                "--server",
                &admin,
                "--admin-token-file",
            ])
            .arg(&wrong)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("refused the admin token"), "{err}");
    assert!(err.contains("--admin-token-file"), "a hint: {err}");
    assert!(
        !err.contains("hyper") && !err.contains("Error {"),
        "no transport dump: {err}"
    );
    ca.running.shutdown().await;
}

/// Delegates to the SQLite store, counting what a proof reads.
struct Counting {
    inner: meshca::audit::store::SqliteStore,
    all_leaves: std::cell::Cell<u64>,
    leaves_read: std::cell::Cell<u64>,
}

use meshca::audit::AuditError;

impl meshca::audit::store::AuditStore for Counting {
    fn append(
        &mut self,
        _: u64,
        _: &[(
            Vec<u8>,
            meshca::audit::merkle::Hash,
            meshca::audit::store::Indexed,
        )],
    ) -> Result<(), AuditError> {
        Err(AuditError::Storage("read-only".into()))
    }
    fn leaf_hashes(&self) -> Result<Vec<meshca::audit::merkle::Hash>, AuditError> {
        let v = self.inner.leaf_hashes()?;
        self.all_leaves.set(self.all_leaves.get() + 1);
        self.leaves_read
            .set(self.leaves_read.get() + v.len() as u64);
        Ok(v)
    }
    fn entries(
        &self,
        from: u64,
        limit: u64,
    ) -> Result<Vec<meshca::audit::store::StoredEntry>, AuditError> {
        self.inner.entries(from, limit)
    }
    fn query(
        &self,
        f: &meshca::audit::store::Filter,
    ) -> Result<Vec<meshca::audit::store::StoredEntry>, AuditError> {
        self.inner.query(f)
    }
    fn by_serial(&self, s: &str) -> Result<Option<meshca::audit::store::StoredEntry>, AuditError> {
        self.inner.by_serial(s)
    }
    fn count(&self) -> Result<u64, AuditError> {
        self.inner.count()
    }
    fn serial_index_fault(&self) -> Result<Option<String>, AuditError> {
        self.inner.serial_index_fault()
    }
    fn add_checkpoint(
        &mut self,
        _: &meshca::audit::store::StoredCheckpoint,
    ) -> Result<(), AuditError> {
        Err(AuditError::Storage("read-only".into()))
    }
    fn checkpoints(&self) -> Result<Vec<meshca::audit::store::StoredCheckpoint>, AuditError> {
        self.inner.checkpoints()
    }
    fn leaf_range(&self, a: u64, b: u64) -> Result<Vec<meshca::audit::merkle::Hash>, AuditError> {
        let v = self.inner.leaf_range(a, b)?;
        self.leaves_read
            .set(self.leaves_read.get() + v.len() as u64);
        Ok(v)
    }
    fn checkpoint_between(
        &self,
        a: u64,
        b: u64,
    ) -> Result<Option<meshca::audit::store::StoredCheckpoint>, AuditError> {
        self.inner.checkpoint_between(a, b)
    }
    fn checkpoint_of_size(
        &self,
        s: u64,
    ) -> Result<Option<meshca::audit::store::StoredCheckpoint>, AuditError> {
        self.inner.checkpoint_of_size(s)
    }
    fn latest_checkpoint(
        &self,
    ) -> Result<Option<meshca::audit::store::StoredCheckpoint>, AuditError> {
        self.inner.latest_checkpoint()
    }
}

/// Proofs on a running server read a tile or two of leaves, not the log;
/// they equal the full-recompute proofs. `MESHCA_PROOF_BENCH_ENTRIES=100000`
/// measures on a larger log (the figures in docs/audit.md).
#[tokio::test]
async fn proofs_are_served_from_subtree_hashes_not_the_whole_log() {
    use meshca::audit::{query, store::SqliteStore, AuditLog, Entry};
    let n: u64 = std::env::var("MESHCA_PROOF_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let tmp = tempfile::tempdir().unwrap();
    let clock: std::sync::Arc<dyn meshca::util::clock::Clock> =
        std::sync::Arc::new(meshca::util::clock::SystemClock);
    let (log, guard) =
        AuditLog::open(tmp.path(), "cluster.local", clock, Default::default()).unwrap();
    let entry = |i: u64| Entry {
        time: "2026-11-28T07:00:00Z".into(),
        time_unix_ms: 1_795_000_000_000 + i,
        kind: "issuance".into(),
        namespace: Some("shop".into()),
        service_account: Some("web".into()),
        result: "granted".into(),
        reason: "ok".into(),
        serial: Some(format!("{i:032x}")),
        ..Default::default()
    };
    // Many appends in flight at once: group commit makes this quick.
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 2000).min(n))
            .map(|j| log.append(entry(j)))
            .collect();
        for r in futures_util::future::join_all(batch).await {
            r.unwrap();
        }
        i += 2000;
        if i % 10_000 == 0 || i >= n {
            log.checkpoint().await.unwrap();
        }
    }
    let store = SqliteStore::open_read_only(&tmp.path().join(meshca::audit::DB_FILE)).unwrap();
    let counting = Counting {
        inner: store,
        all_leaves: 0.into(),
        leaves_read: 0.into(),
    };
    let tiles = log.tiles().read().unwrap().clone();
    let probes = [0, 1, n / 3, n / 2 + 7, n - 300, n - 1];
    let t = std::time::Instant::now();
    let mut tiled = Vec::new();
    for &p in &probes {
        tiled.push(query::show_tiled(&counting, &tiles, &format!("{p:032x}")).unwrap());
    }
    let tiled_proofs = t.elapsed();
    let proved_tiled = query::prove_tiled(&counting, &tiles, n / 3, n).unwrap();
    assert_eq!(counting.all_leaves.get(), 0, "no request loads every leaf");
    assert!(
        counting.leaves_read.get() <= 4 * 256 * (probes.len() as u64 + 1),
        "{} leaf hashes read for {} proofs",
        counting.leaves_read.get(),
        probes.len() + 1
    );
    // The same answers as recomputing from every leaf.
    let t = std::time::Instant::now();
    for (&p, shown) in probes.iter().zip(&tiled) {
        let full = query::show(&counting.inner, &format!("{p:032x}")).unwrap();
        assert!(shown.proof_verified, "{p}");
        assert_eq!(shown.inclusion_proof, full.inclusion_proof, "{p}");
        assert_eq!(shown.tree_size, full.tree_size);
    }
    let full_proofs = t.elapsed();
    let proved_full = query::prove(&counting.inner, n / 3, n).unwrap();
    assert!(proved_tiled.proof_verified);
    assert_eq!(proved_tiled.proof, proved_full.proof);
    assert_eq!(proved_tiled.to_root, proved_full.to_root);
    eprintln!(
        "{n} entries: {} inclusion proofs took {:?} from subtree hashes ({} leaf hashes read) and {:?} from every leaf",
        probes.len(),
        tiled_proofs,
        counting.leaves_read.get(),
        full_proofs
    );
    drop(log);
    tokio::task::spawn_blocking(move || guard.stop())
        .await
        .unwrap();
}
