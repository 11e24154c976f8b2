//! Admin query strings: the `/audit/*` and `/rotation/status` routes of a
//! running server, over HTTP, with arbitrary and adversarial query strings
//! and path segments (each request carries the admin token, so the parsers
//! behind any authentication are reached). Every answer is a client error
//! or a success — never a 5xx, never a dropped connection — and the
//! parsers themselves (`audit::http::filter`, `audit::query::parse_time`,
//! `config::parse_duration`) give typed errors and sensible values.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use axum::extract::Query;
use meshca::admin::audit::{filter, ListParams};
use meshca::audit::query::parse_time;
use proptest::prelude::*;

use super::harness::{cases, measure};
use super::support::Ca;

const KEYS: &[&str] = &[
    "identity",
    "namespace",
    "result",
    "since",
    "until",
    "limit",
    "from",
    "to",
    "warn_within",
    "cursor",
    "serial",
    "x",
];

/// A value as an attacker would send it.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "[0-9]{1,40}",
        (
            "[0-9]{1,25}",
            prop_oneof![
                Just("ms"),
                Just("s"),
                Just("m"),
                Just("h"),
                Just("d"),
                Just("y"),
                Just("")
            ]
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        Just("2026-01-01T00:00:00Z".to_string()),
        Just("9999-12-31T23:59:59.999999999+23:59".to_string()),
        Just("-9999-01-01T00:00:00Z".to_string()),
        Just("shop/web".to_string()),
        ".{0,40}",
        "[%&=+;#?/\\\\.:\\[\\]]{0,12}",
    ]
}

fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string: encoded pairs, sometimes left raw, sometimes repeated keys.
fn query() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(KEYS), value(), any::<bool>()), 0..6).prop_map(
        |pairs| {
            pairs
                .iter()
                .map(|(k, v, raw)| {
                    if *raw {
                        format!("{k}={v}")
                    } else {
                        format!("{k}={}", pct(v))
                    }
                })
                .collect::<Vec<_>>()
                .join("&")
        },
    )
}

/// Any u64, or one just past a multiple of 2^64 / 1000 (where a count of
/// seconds, in milliseconds, wraps around u64 to a small number).
fn magnitude() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0..100_000u64,
        (1u64..1000, 0u64..1_000_000_000)
            .prop_map(|(k, j)| { ((u128::from(k) << 64).div_ceil(1000) as u64).saturating_add(j) }),
    ]
}

struct Server {
    rt: tokio::runtime::Runtime,
    ca: Ca,
    token: String,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ca = rt.block_on(Ca::start());
        let token = std::fs::read_to_string(ca.dir.path().join("data/admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        // Something to list and prove.
        rt.block_on(async {
            let t = ca.token("shop", "web", "meshca");
            let ch = ca.channel().await;
            for _ in 0..3 {
                super::support::certify_native(&ch, t.clone())
                    .await
                    .expect("certified");
            }
        });
        Server { rt, ca, token }
    })
}

fn get(path_and_query: &str) -> Option<(u16, String)> {
    let s = server();
    let url = format!("http://{}{}", s.ca.running.admin_addr, path_and_query);
    // Some generated strings are not URIs at all; the client refuses those
    // before sending, which is not what is under test.
    url.parse::<hyper::Uri>().ok()?;
    let r = s.rt.block_on(meshca::client::admin::request(
        "GET",
        &url,
        Some(&s.token),
        None,
    ));
    Some(r.expect("the admin endpoint answers (no dropped connection)"))
}

proptest! {
    // Each case is an HTTP round trip to the running server.
    #![proptest_config(cases(600))]

    #[test]
    fn admin_routes_answer_query_strings_with_client_errors(
        route in prop::sample::select(&["/audit/entries", "/audit/consistency", "/rotation/status", "/audit/checkpoint"][..]),
        q in query(),
    ) {
        let started = std::time::Instant::now();
        if let Some((code, body)) = get(&format!("{route}?{q}")) {
            prop_assert!(code < 500, "{route}?{q}: HTTP {code}: {body}");
            if code >= 400 {
                prop_assert!(!body.trim().is_empty(), "an error says why");
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn admin_entry_paths(seg in prop_oneof![value(), "[0-9a-fA-F:]{0,80}"]) {
        if let Some((code, body)) = get(&format!("/audit/entries/{}", pct(&seg))) {
            prop_assert!(code < 500, "/audit/entries/{seg}: HTTP {code}: {body}");
        }
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn audit_list_parameters(q in query()) {
        let Ok(uri) = format!("http://x/audit/entries?{q}").parse::<axum::http::Uri>() else {
            return Ok(());
        };
        let now = SystemTime::now();
        let (_, cost) = measure(|| {
            Query::<ListParams>::try_from_uri(&uri).map(|Query(p)| filter(p, now))
        });
        cost.check("audit list parameters", q.len(), 64 * 1024)?;
    }

    #[test]
    fn parse_time_of_a_duration_ago_is_monotonic(
        a in magnitude(),
        b in magnitude(),
        unit in prop::sample::select(&["ms", "s", "m", "h", "d"][..]),
    ) {
        // A longer "ago" is never a later time, at every magnitude.
        let now = SystemTime::now();
        let (lo, hi) = (a.min(b), a.max(b));
        let t_lo = parse_time(&format!("{lo}{unit}"), now).expect("duration");
        let t_hi = parse_time(&format!("{hi}{unit}"), now).expect("duration");
        prop_assert!(t_hi <= t_lo, "{hi}{unit} ago = {t_hi} is after {lo}{unit} ago = {t_lo}");
        prop_assert!(t_lo <= meshca::util::clock::unix_millis(now));
    }

    #[test]
    fn parse_time_and_duration_are_total(s in value()) {
        let (_, cost) = measure(|| {
            let _ = parse_time(&s, SystemTime::now());
            let _ = meshca::util::duration::parse_duration(&s);
        });
        cost.check("parse_time", s.len(), 64 * 1024)?;
    }
}

/// Found by the property above: 18446744073709552 s is 384 ms more than
/// 2^64 ms, and `as u64` wrapped it to "384 ms ago", so a bound meant as
/// "since forever" listed almost nothing.
#[test]
fn regression_a_huge_duration_ago_is_the_epoch_not_a_moment_ago() {
    let now = SystemTime::now();
    assert_eq!(parse_time("18446744073709552s", now).unwrap(), 0);
    assert_eq!(parse_time("18446744073709551615d", now).unwrap(), 0);
    let hour_ago = parse_time("1h", now).unwrap();
    assert_eq!(meshca::util::clock::unix_millis(now) - hour_ago, 3_600_000);
}

// ---- rotation request bodies ----------------------------------------------

/// A server of its own: these requests carry the admin token and may really
/// prepare, activate or taint roots.
fn rotation_server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ca = rt.block_on(Ca::start());
        let token = std::fs::read_to_string(ca.dir.path().join("data/admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        Server { rt, ca, token }
    })
}

/// A JSON body built from the fields the rotation routes know, with odd
/// values, plus unknown fields and non-JSON.
fn rotation_body() -> impl Strategy<Value = String> {
    let lifetime = prop_oneof![
        Just("3650d".to_string()),
        magnitude().prop_map(|n| format!("{n}d")),
        magnitude().prop_map(|n| format!("{n}s")),
        value(),
    ];
    prop_oneof![
        3 => lifetime.prop_map(|l| serde_json::json!({ "root_lifetime": l }).to_string()),
        1 => (value(), value()).prop_map(|(c, k)| serde_json::json!({ "root_cert": c, "root_key": k }).to_string()),
        1 => any::<bool>().prop_map(|f| serde_json::json!({ "force": f }).to_string()),
        1 => value().prop_map(|r| serde_json::json!({ "root": r }).to_string()),
        1 => value(),
        1 => Just(String::new()),
    ]
}

proptest! {
    #![proptest_config(cases(300))]

    #[test]
    fn rotation_bodies_get_client_errors(
        step in prop::sample::select(&["prepare", "activate", "retire", "taint"][..]),
        body in rotation_body(),
    ) {
        let s = rotation_server();
        let url = format!("http://{}/rotation/{step}", s.ca.running.admin_addr);
        let (code, text) = s
            .rt
            .block_on(meshca::client::admin::request("POST", &url, Some(&s.token), Some(body.clone())))
            .expect("the admin endpoint answers");
        prop_assert!(code < 500, "POST /rotation/{step} {body}: HTTP {code}: {text}");
    }
}

/// Found by `rotation_bodies_get_client_errors`: `root_lifetime` of
/// 18446744073709552d overflowed `now + lifetime` inside `prepare` (HTTP
/// 500, "rotation step panicked"). A lifetime past the last date a
/// certificate can carry now ends the root at 9999-12-31T23:59:59Z.
#[test]
fn regression_an_endless_root_lifetime_is_clamped_not_a_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ca = Ca::start().await;
        let (code, text) = ca
            .rotation("prepare", r#"{"root_lifetime":"18446744073709552d"}"#)
            .await;
        assert_eq!(code, 200, "{text}");
        let status = ca.rotation_status().await.to_string();
        assert!(status.contains("9999-12-31T23:59:59Z"), "{status}");
    });
}
