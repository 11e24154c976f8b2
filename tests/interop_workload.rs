//! The agent's SPIFFE Workload API socket with clients we did not write
//! (issue 14, part 1): the Python `spiffe` library (grpcio / gRPC C-core),
//! raw grpcio from the public proto with each `:authority` form real clients
//! send, a Node client (`@grpc/grpc-js`), and the Rust `spiffe` crate. Each
//! fetches an SVID and a bundle and sees an update, and its values are
//! compared with the CA's own: the SPIFFE ID, that the key belongs to the
//! leaf, and the bundle roots' fingerprints.
//!
//! The clients are installed pinned by `tests/support/interop.rs`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use meshca::agent::{self, AgentConfig};
use meshca::util::hpack::{encode_literals, Field};
use serde_json::Value;
use support::interop;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TD: &str = "cluster.local";

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

/// A CA whose leaves live 3 s (renewals every ~2 s).
async fn short_lived_ca() -> Ca {
    Ca::start_with(|c| {
        c.set_max_ttl(Duration::from_secs(3));
        c.issuance.default_ttl = Duration::from_secs(3);
        c.issuance.min_ttl = Duration::from_secs(1);
        c.trust.propagation_wait = Duration::from_secs(3);
    })
    .await
}

/// An agent for shop/`sa` with its first certificate, serving the Workload
/// API on `dir/run/agent.sock`.
async fn agent_with_socket(ca: &Ca, dir: &Path, sa: &str) -> (agent::Agent, PathBuf) {
    let data = ca.dir.path().join("data");
    let token = dir.join(format!("{sa}.token"));
    std::fs::write(&token, dev_token(&data, "shop", sa)).unwrap();
    let a = agent::start(
        AgentConfig {
            ca_address: ca.addr(),
            server_name: ca.running.server_name.clone(),
            bootstrap_bundle: data.join("bundle.pem"),
            token_file: token,
            requested_ttl: None,
        },
        Arc::default(),
    )
    .unwrap();
    a.ready(Duration::from_secs(20)).await.unwrap();
    let sock = dir.join("run/agent.sock");
    // The server task lives as long as the test's runtime.
    drop(
        agent::workload_api::serve(sock.clone(), a.watch(), TD.into(), std::future::pending())
            .await
            .unwrap(),
    );
    (a, sock)
}

/// The CA's current roots, as SHA-256 fingerprints, sorted.
fn ca_roots(ca: &Ca) -> Vec<String> {
    let mut v = ca.root_ids();
    v.sort();
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// One SVID as a script described it: the right identity, a key that belongs
/// to the leaf, and a chain that ends below one of `roots`.
fn check_svid(what: &str, svid: &Value, want_id: &str) {
    assert_eq!(svid["spiffe_id"], want_id, "{what}: {svid}");
    assert_eq!(
        svid["key_matches_cert"], true,
        "{what}: the private key does not belong to the leaf"
    );
    assert!(!strings(&svid["chain"]).is_empty(), "{what}: {svid}");
    assert_eq!(strings(&svid["chain"])[0], svid["leaf"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_spiffe_library_fetches_svid_bundles_and_a_renewal() {
    interop::python();
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let out = interop::output(
        interop::python_script("spiffe_x509.py")
            .arg(&sock)
            .arg(TD)
            .arg("15"),
        Duration::from_secs(60),
    )
    .await;
    let v = interop::last_json(&out);
    check_svid("fetch_x509_svid", &v["fetch_x509_svid"], &id("web"));
    assert_eq!(strings(&v["fetch_x509_bundles"]), ca_roots(&ca));
    let src = &v["x509_source"];
    check_svid("X509Source", &src["first"], &id("web"));
    check_svid("X509Source after renewal", &src["renewed"], &id("web"));
    assert_ne!(src["first"]["leaf"], src["renewed"]["leaf"]);
    assert_ne!(
        src["first"]["key"], src["renewed"]["key"],
        "a new key per renewal"
    );
    assert_eq!(strings(&src["bundle"]), ca_roots(&ca));
}

/// What grpc_raw.py / grpc_js_x509.js report, checked against the CA.
fn check_raw_client(what: &str, v: &Value, ca_roots: &[String]) {
    for key in ["svid", "renewed"] {
        let svid = &v[key];
        check_svid(&format!("{what} {key}"), svid, &id("web"));
        assert_eq!(strings(&svid["uri_sans"]), vec![id("web")], "{what}");
        assert_eq!(strings(&svid["bundle"]), ca_roots, "{what} {key} bundle");
    }
    assert_ne!(v["svid"]["leaf"], v["renewed"]["leaf"], "{what}");
    assert_ne!(v["svid"]["key"], v["renewed"]["key"], "{what}: a new key");
    assert_eq!(
        v["bundles"].as_object().unwrap().len(),
        1,
        "{what}: {}",
        v["bundles"]
    );
    assert_eq!(strings(&v["bundles"][TD]), ca_roots, "{what} bundles");
}

/// gRPC C-core sends the socket path percent-encoded as `:authority`;
/// grpc-java sends the raw path; others `localhost`. All three get the same
/// service (before the socket adapter, the first two got RST_STREAM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_grpcio_works_with_each_authority_form_clients_send() {
    interop::python();
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    for authority in ["default", "raw-path", "localhost"] {
        let out = interop::output(
            interop::python_script("grpc_raw.py")
                .arg(&sock)
                .arg(TD)
                .arg(authority)
                .arg("15"),
            Duration::from_secs(60),
        )
        .await;
        let v = interop::last_json(&out);
        check_raw_client(&format!("grpcio ({authority})"), &v, &ca_roots(&ca));
        // The adapter does not bypass the Workload API's own checks.
        assert_eq!(v["without_header"], "INVALID_ARGUMENT", "{v}");
        assert!(
            v["without_header_message"]
                .as_str()
                .unwrap()
                .contains("workload.spiffe.io"),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_grpc_js_client_fetches_svid_bundles_and_a_renewal() {
    interop::node();
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let out = interop::output(
        interop::node_script("grpc_js_x509.js").arg(&sock).arg("15"),
        Duration::from_secs(60),
    )
    .await;
    check_raw_client("@grpc/grpc-js", &interop::last_json(&out), &ca_roots(&ca));
}

/// The Rust `spiffe` crate: SVID and bundle values against the CA's, and a
/// bundle change (a root rotation's prepare step) on its bundle stream.
/// (tests/workload.rs has its SVID renewal stream.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_spiffe_crate_sees_the_cas_roots_and_a_bundle_change() {
    let ca = Ca::start_with(|c| c.trust.propagation_wait = Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), id("web"));
    let td = spiffe::TrustDomain::new(TD).unwrap();
    let fingerprints = |set: &spiffe::X509BundleSet| {
        let mut v: Vec<String> = set
            .get(&td)
            .expect("a bundle for the trust domain")
            .authorities()
            .iter()
            .map(|c| meshca::ca::fingerprint(c.as_ref()))
            .collect();
        v.sort();
        v
    };
    let before = ca_roots(&ca);
    assert_eq!(
        fingerprints(&client.fetch_x509_bundles().await.unwrap()),
        before
    );
    let mut stream = client.stream_x509_bundles().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(fingerprints(&first), before);
    let (code, body) = ca.rotation("prepare", "{}").await;
    assert_eq!(code, 200, "{body}");
    let after = ca_roots(&ca);
    assert_eq!(after.len(), 2);
    let second = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a bundle update after prepare")
        .unwrap()
        .unwrap();
    assert_eq!(fingerprints(&second), after);
}

/// A raw HTTP/2 request on `sock` with `authority`; returns the first frame
/// the server sends on stream 1: (type, payload).
async fn raw_h2_request(sock: &Path, authority: Option<&[u8]>) -> (u8, Vec<u8>) {
    let field = |n: &str, v: &[u8]| Field {
        name: n.as_bytes().to_vec(),
        value: v.to_vec(),
        never_indexed: false,
    };
    let mut fields = vec![
        field(":method", b"POST"),
        field(":scheme", b"http"),
        field(":path", b"/SpiffeWorkloadAPI/FetchX509Bundles"),
    ];
    fields.extend(authority.map(|a| field(":authority", a)));
    fields.extend([
        field("content-type", b"application/grpc"),
        field("te", b"trailers"),
        field("workload.spiffe.io", b"true"),
    ]);
    let block = encode_literals(&fields);
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend(frame(0x4, 0, 0, &[]));
    wire.extend(frame(0x1, 0x4, 1, &block));
    wire.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    s.write_all(&wire).await.unwrap();
    loop {
        let mut h = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h))
            .await
            .expect("the server answers")
            .unwrap();
        let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let mut payload = vec![0; len];
        s.read_exact(&mut payload).await.unwrap();
        if u32::from_be_bytes([h[5], h[6], h[7], h[8]]) == 1 {
            return (h[3], payload);
        }
    }
}

/// Attack: an `:authority` that is no socket path (control bytes, a space)
/// must still be refused on the socket exactly as h2 refuses it anywhere:
/// the adapter widens only what socket clients really send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_still_refuses_authorities_that_are_no_socket_path() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const PROTOCOL_ERROR: [u8; 4] = [0, 0, 0, 1];
    // The controls: every form socket clients send is served.
    for good in [
        Some(&b"tmp%2Fdir%2Fagent.sock"[..]),
        Some(b"/tmp/dir/agent.sock"),
        Some(b""),
        Some(b"localhost"),
        None,
    ] {
        let (kind, _) = raw_h2_request(&sock, good).await;
        assert_eq!(kind, HEADERS, "{good:?} gets a response");
    }
    for bad in [&b"agent\x01.sock"[..], b"a b", b"\x7f"] {
        let (kind, payload) = raw_h2_request(&sock, Some(bad)).await;
        assert_eq!(
            (kind, payload.as_slice()),
            (RST_STREAM, &PROTOCOL_ERROR[..]),
            "{bad:?}"
        );
    }
}

/// The CA's TCP gRPC port keeps h2's full validation: the percent-encoded
/// authority that the Workload API socket accepts is refused there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cas_tcp_port_still_refuses_a_malformed_authority() {
    interop::python();
    let ca = Ca::start().await;
    let bundle = ca.dir.path().join("data/bundle.pem");
    let call = |authority: String| {
        let mut cmd = interop::python_script("grpc_tcp_authority.py");
        cmd.arg(format!("127.0.0.1:{}", ca.running.grpc_addr.port()))
            .arg(&ca.running.server_name)
            .arg(&bundle)
            .arg(authority);
        async move {
            let mut cmd = cmd;
            interop::last_json(&interop::output(&mut cmd, Duration::from_secs(30)).await)
        }
    };
    // The control: a well-formed authority gets the bundle.
    let ok = call(ca.running.server_name.clone()).await;
    assert_eq!(ok["code"], "OK", "{ok}");
    for bad in ["tmp%2Fdir%2Fagent.sock", "/tmp/dir/agent.sock"] {
        let v = call(bad.into()).await;
        assert_eq!(v["code"], "INTERNAL", "{bad}: {v}");
        assert!(
            v["details"].as_str().unwrap().contains("RST_STREAM"),
            "{bad}: {v}"
        );
    }
}

/// Attack: a header block that never ends (CONTINUATION flood). The socket
/// adapter buffers header blocks for h2, so without its bound the agent
/// would buffer forever; with it the connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_that_never_ends_closes_the_connection() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let frame = |kind: u8, flags: u8, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, 1]);
        f.extend(payload);
        f
    };
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend(
        frame(0x4, 0, &[])
            .iter()
            .take(3)
            .chain(&[0x4, 0, 0, 0, 0, 0]),
    );
    wire.extend(frame(0x1, 0, &[0x82])); // HEADERS without END_HEADERS
    s.write_all(&wire).await.unwrap();
    let (mut r, mut w) = s.into_split();
    // Read (and drop) whatever the server says until it closes.
    let closed = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let chunk = frame(0x9, 0, &[0x82; 4096]); // CONTINUATION, no END_HEADERS
    let mut sent = 0usize;
    while !closed.is_finished() && sent < (4 << 20) {
        if w.write_all(&chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the agent closes a connection whose header block never ends")
        .unwrap();
    assert!(sent < (1 << 20), "{sent} bytes accepted before the close");
}

/// The same Python library against the `meshca agent` binary (a real
/// process, its socket given as `SPIFFE_ENDPOINT_SOCKET` would be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_spiffe_library_works_with_the_agent_binary() {
    interop::python();
    let ca = short_lived_ca().await;
    let dir = tempfile::tempdir().unwrap();
    let data = ca.dir.path().join("data");
    let token = dir.path().join("token");
    std::fs::write(&token, dev_token(&data, "shop", "web")).unwrap();
    let sock = dir.path().join("spiffe/agent.sock");
    let mut agent = tokio::process::Command::from(meshca_bin());
    agent
        .args(["agent", "--ca-address", &ca.addr(), "--ca-server-name"])
        .arg(&ca.running.server_name)
        .arg("--bootstrap-bundle")
        .arg(data.join("bundle.pem"))
        .arg("--token-file")
        .arg(&token)
        .arg("--workload-api-socket")
        .arg(format!("unix://{}", sock.display()))
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let _agent = agent.spawn().unwrap();
    wait_until(
        "the agent binary opens its socket",
        Duration::from_secs(20),
        || async { sock.exists() },
    )
    .await;
    let out = interop::output(
        interop::python_script("spiffe_x509.py")
            .arg(&sock)
            .arg(TD)
            .arg("15"),
        Duration::from_secs(60),
    )
    .await;
    let v = interop::last_json(&out);
    check_svid("fetch_x509_svid", &v["fetch_x509_svid"], &id("web"));
    assert_eq!(strings(&v["fetch_x509_bundles"]), ca_roots(&ca));
    let src = &v["x509_source"];
    check_svid("X509Source after renewal", &src["renewed"], &id("web"));
    assert_ne!(src["first"]["leaf"], src["renewed"]["leaf"]);
}

// ---- The socket's HTTP/2 limits and connection errors (issue 14 review) ----

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A FetchX509Bundles request's header block (a stream that stays open).
fn bundles_request() -> Vec<u8> {
    let field = |n: &str, v: &str| Field {
        name: n.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
        never_indexed: false,
    };
    encode_literals(&[
        field(":method", "POST"),
        field(":scheme", "http"),
        field(":path", "/SpiffeWorkloadAPI/FetchX509Bundles"),
        field(":authority", "localhost"),
        field("content-type", "application/grpc"),
        field("te", "trailers"),
        field("workload.spiffe.io", "true"),
    ])
}

/// A client connection: preface, empty SETTINGS, and the ACK of the server's.
async fn h2_client(sock: &Path) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    wire.extend(h2_frame(0x4, 0, 0, &[]));
    wire.extend(h2_frame(0x4, 0x1, 0, &[]));
    s.write_all(&wire).await.unwrap();
    s
}

/// The next frame the server sends: (type, flags, stream, payload), or None
/// at the end of the connection.
async fn next_frame<R: AsyncReadExt + Unpin>(s: &mut R) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut h = [0u8; 9];
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h))
        .await
        .expect("the server answers or closes within 10 s")
    {
        Ok(_) => {}
        Err(_) => return None,
    }
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Some((h[3], h[4], stream, payload))
}

const GOAWAY: u8 = 0x7;

/// Reads until a GOAWAY (its error code and debug text) or the end.
async fn goaway<R: AsyncReadExt + Unpin>(s: &mut R) -> Option<(u32, String)> {
    while let Some((kind, _, _, p)) = next_frame(s).await {
        if kind == GOAWAY {
            let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
            return Some((code, String::from_utf8_lossy(&p[8..]).into_owned()));
        }
    }
    None
}

/// Attack (review finding 2): HEADERS without END_HEADERS, then zero-length
/// CONTINUATION frames without end. They add no bytes, so a byte bound never
/// trips; the frame count must. Answered as h2 answers on TCP:
/// GOAWAY(ENHANCE_YOUR_CALM), then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_continuation_flood_gets_goaway_enhance_your_calm() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let s = h2_client(&sock).await;
    let (mut r, mut w) = s.into_split();
    w.write_all(&h2_frame(0x1, 0, 1, &[0x82])).await.unwrap();
    let flood = tokio::spawn(async move {
        let batch = h2_frame(0x9, 0, 1, &[]).repeat(1000);
        let mut sent = 0usize;
        while sent < 200_000 && w.write_all(&batch).await.is_ok() {
            sent += 1000;
        }
        sent
    });
    let got = goaway(&mut r).await;
    assert_eq!(
        got.as_ref().map(|g| g.0),
        Some(0xb),
        "want GOAWAY(ENHANCE_YOUR_CALM), got {got:?}"
    );
    assert!(got.unwrap().1.contains("CONTINUATION"));
    assert!(
        next_frame(&mut r).await.is_none(),
        "closed after the GOAWAY"
    );
    let sent = tokio::time::timeout(Duration::from_secs(10), flood)
        .await
        .unwrap()
        .unwrap();
    assert!(sent < 200_000, "all {sent} frames accepted");
}

/// Attack (review finding 3): one connection opening streams without limit.
/// The server advertises SETTINGS_MAX_CONCURRENT_STREAMS = 100 and refuses
/// the 101st open stream (RST_STREAM(REFUSED_STREAM)); the 100th is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_refuses_the_101st_concurrent_stream() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let mut s = h2_client(&sock).await;
    let (kind, flags, _, settings) = next_frame(&mut s).await.unwrap();
    assert_eq!((kind, flags), (0x4, 0), "the server's SETTINGS first");
    let max_streams = settings
        .chunks(6)
        .find(|p| p[..2] == [0, 3])
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(max_streams, Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");
    let block = bundles_request();
    let mut wire = Vec::new();
    for i in 0..101u32 {
        wire.extend(h2_frame(0x1, 0x4, 2 * i + 1, &block));
        wire.extend(h2_frame(0x0, 0x1, 2 * i + 1, &[0, 0, 0, 0, 0]));
    }
    s.write_all(&wire).await.unwrap();
    let (mut hundredth, mut refused) = (None, None);
    while hundredth.is_none() || refused.is_none() {
        let (kind, _, stream, p) = next_frame(&mut s).await.expect("connection open");
        assert_ne!(kind, GOAWAY, "{:?}", String::from_utf8_lossy(&p));
        match stream {
            199 if hundredth.is_none() => hundredth = Some(kind),
            201 if refused.is_none() => refused = Some((kind, p)),
            _ => {}
        }
    }
    assert_eq!(hundredth, Some(0x1), "the 100th stream gets its response");
    assert_eq!(
        refused,
        Some((0x3, vec![0, 0, 0, 7])),
        "the 101st: RST_STREAM(REFUSED_STREAM)"
    );
}

/// Attack (review finding 4): 17,000 bytes of metadata (above the advertised
/// 16 KiB header list) must cost only that stream: it is refused (431 or a
/// reset), while the connection, an open stream on it and the HPACK state
/// carry on — the next request refers to a dynamic-table entry the
/// over-size block added, and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_size_header_list_refuses_only_its_stream() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let mut s = h2_client(&sock).await;
    let mut wire = h2_frame(0x1, 0x4, 1, &bundles_request());
    wire.extend(h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    // Stream 3: "x-meta: 17,000 bytes" plus "x-trace: abc" with incremental
    // indexing (dynamic table index 62).
    let mut big = bundles_request();
    big.extend(encode_literals(&[Field {
        name: b"x-meta".to_vec(),
        value: vec![b'a'; 17_000],
        never_indexed: false,
    }]));
    big.extend([0x40, 7]);
    big.extend(b"x-trace");
    big.extend([3]);
    big.extend(b"abc");
    let (a, b) = big.split_at(16_000);
    wire.extend(h2_frame(0x1, 0, 3, a));
    wire.extend(h2_frame(0x9, 0x4, 3, b));
    // Stream 5: a normal request that also sends x-trace by index (0xbe).
    let mut next = bundles_request();
    next.push(0xbe);
    wire.extend(h2_frame(0x1, 0x4, 5, &next));
    wire.extend(h2_frame(0x0, 0x1, 5, &[0, 0, 0, 0, 0]));
    s.write_all(&wire).await.unwrap();
    let (mut first, mut over, mut after) = (None, None, None);
    while first.is_none() || over.is_none() || after.is_none() {
        let Some((kind, _, stream, p)) = next_frame(&mut s).await else {
            panic!("connection closed: first {first:?}, over-size {over:?}, after {after:?}");
        };
        assert_ne!(kind, GOAWAY, "{:?}", String::from_utf8_lossy(&p));
        let slot = match stream {
            1 => &mut first,
            3 => &mut over,
            5 => &mut after,
            _ => continue,
        };
        slot.get_or_insert(kind);
    }
    assert_eq!(first, Some(0x1), "the open stream is answered");
    assert!(
        matches!(over, Some(0x1 | 0x3)),
        "the over-size stream: 431 HEADERS or RST_STREAM, got {over:?}"
    );
    assert_eq!(after, Some(0x1), "the next request is answered");
}

/// Review finding 4: a dynamic table size update above the advertised 4096
/// (here 8192) is an HPACK error: GOAWAY(COMPRESSION_ERROR) with a debug
/// text, not a silent EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_error_gets_goaway_compression_error() {
    let ca = Ca::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_a, sock) = agent_with_socket(&ca, dir.path(), "web").await;
    let mut s = h2_client(&sock).await;
    let mut block = vec![0x3f, 0xe1, 0x3f]; // size update: 8192
    block.extend(bundles_request());
    s.write_all(&h2_frame(0x1, 0x5, 1, &block)).await.unwrap();
    let got = goaway(&mut s).await;
    assert_eq!(got.as_ref().map(|g| g.0), Some(0x9), "{got:?}");
    assert!(got.unwrap().1.contains("8192"));
    assert!(
        next_frame(&mut s).await.is_none(),
        "closed after the GOAWAY"
    );
}
