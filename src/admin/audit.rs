//! The audit queries over the admin endpoint of a running server.
//!
//! Routes (all GET, read-only, each on its own read-only SQLite connection so
//! queries never hold up the writer):
//! - `/audit/entries?identity=NS/SA&namespace=&result=&since=&until=&limit=&before=` —
//!   JSON lines, the newest `limit` matches (default [`DEFAULT_LIMIT`], at
//!   most [`MAX_LIMIT`]) below index `before`; when more may match, the
//!   `meshca-next-cursor` header holds the `before` value of the next page
//! - `/audit/entries/{serial}` — the entry and its inclusion proof
//! - `/audit/checkpoint` — the newest signed checkpoint (note text)
//! - `/audit/consistency?from=A&to=B` — a consistency proof
//! - `/audit/key` — the log's verifier key
//!
//! Every route needs the admin token (see `admin_guard`).

use axum::extract::{Path, Query};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::admin::AdminError;
use crate::audit::store::{AuditStore, Filter, SqliteStore};
use crate::audit::{query, AuditError, AuditLog};

/// Entries per page of `/audit/entries` when the request names no `limit`.
pub(crate) const DEFAULT_LIMIT: u64 = 100;
/// The largest page `/audit/entries` serves.
pub(crate) const MAX_LIMIT: u64 = 1000;
/// The response header naming the next page's `before` cursor.
pub(crate) const NEXT_CURSOR: &str = "meshca-next-cursor";

/// Query parameters of `/audit/entries`.
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    identity: Option<String>,
    namespace: Option<String>,
    result: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u64>,
    before: Option<u64>,
}

/// Query parameters of `/audit/consistency`.
#[derive(Debug, Deserialize)]
pub(crate) struct ProveParams {
    from: u64,
    to: u64,
}

fn json(v: &impl serde::Serialize) -> Response {
    match serde_json::to_string_pretty(v) {
        Ok(s) => ([("content-type", "application/json")], s + "\n").into_response(),
        Err(e) => AdminError::Internal(e.to_string()).into_response(),
    }
}

/// An untrusted path word as it may appear in an error: at most 128 bytes,
/// control characters escaped (so it can forge no log or terminal line).
fn shown(word: &str) -> String {
    let mut out: String = word.chars().flat_map(char::escape_default).collect();
    if out.len() > 128 {
        let mut cut = 128;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("…[truncated]");
    }
    out
}

/// A lookup by serial failed: not found (404, naming the caller's word
/// escaped, not echoed), else as any audit failure (an inconsistent log 500,
/// an unreadable store 503); never the caller's fault.
fn serial_error(serial: &str, e: AuditError) -> AdminError {
    match e {
        AuditError::NotFound { .. } => {
            AdminError::NotFound(format!("no entry for serial {}", shown(serial)))
        }
        other => other.into(),
    }
}

/// Runs `f` on a read-only connection, off the reactor.
async fn with_store<T: Send + 'static>(
    log: &AuditLog,
    f: impl FnOnce(&dyn AuditStore) -> Result<T, AuditError> + Send + 'static,
) -> Result<T, AdminError> {
    let path = log.db_path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let store = SqliteStore::open_read_only(&path)?;
        f(&store)
    })
    .await
    .map_err(|e| AdminError::Internal(e.to_string()))?
    .map_err(AdminError::from)
}

/// Builds the filter from parameters.
pub fn filter(p: ListParams, now: std::time::SystemTime) -> Result<Filter, AuditError> {
    Ok(Filter {
        identity: p.identity,
        namespace: p.namespace,
        result: p.result,
        since_ms: p
            .since
            .as_deref()
            .map(|s| query::parse_time(s, now))
            .transpose()?,
        until_ms: p
            .until
            .as_deref()
            .map(|s| query::parse_time(s, now))
            .transpose()?,
        limit: Some(match p.limit {
            None => DEFAULT_LIMIT,
            Some(0) => return Err(AuditError::BadRequest("limit must be at least 1".into())),
            Some(n) if n > MAX_LIMIT => {
                return Err(AuditError::BadRequest(format!(
                    "limit {n} is over the maximum of {MAX_LIMIT}; page with the {NEXT_CURSOR} header's value as `before`"
                )))
            }
            Some(n) => n,
        }),
        before_index: p.before,
    })
}

/// The audit routes.
pub fn routes(log: AuditLog) -> Router {
    let l1 = log.clone();
    let l2 = log.clone();
    let l3 = log.clone();
    let l4 = log.clone();
    Router::new()
        .route(
            "/audit/entries",
            get(move |Query(p): Query<ListParams>| {
                let log = l1.clone();
                async move {
                    let f = match filter(p, std::time::SystemTime::now()) {
                        Ok(f) => f,
                        Err(e) => return AdminError::from(e).into_response(),
                    };
                    let limit = f.limit.unwrap_or(DEFAULT_LIMIT);
                    match with_store(&log, move |s| query::list(s, &f)).await {
                        Ok(rows) => {
                            let body: String = rows
                                .iter()
                                .map(|r| serde_json::to_string(r).unwrap_or_default() + "\n")
                                .collect();
                            let mut resp =
                                ([("content-type", "application/x-ndjson")], body).into_response();
                            // A full page may have more behind it (oldest first).
                            if rows.len() as u64 == limit {
                                if let Some(first) = rows.first().filter(|r| r.index > 0) {
                                    resp.headers_mut().insert(
                                        NEXT_CURSOR,
                                        axum::http::HeaderValue::from(first.index),
                                    );
                                }
                            }
                            resp
                        }
                        Err(r) => r.into_response(),
                    }
                }
            }),
        )
        .route(
            "/audit/entries/{serial}",
            get(move |Path(serial): Path<String>| {
                let log = l2.clone();
                async move {
                    let tiles = log.tiles().clone();
                    let asked = serial.clone();
                    let show = move |s: &dyn AuditStore| {
                        let t = tiles.read().unwrap_or_else(|p| p.into_inner());
                        Ok(query::show_tiled(s, &t, &serial))
                    };
                    match with_store(&log, show).await {
                        Ok(Ok(shown)) => json(&shown),
                        Ok(Err(e)) => serial_error(&asked, e).into_response(),
                        Err(r) => r.into_response(),
                    }
                }
            }),
        )
        .route(
            "/audit/checkpoint",
            get(move || {
                let log = l3.clone();
                async move {
                    match with_store(&log, |s| s.latest_checkpoint()).await {
                        Ok(cp) => match cp {
                            Some(c) => c.note.clone().into_response(),
                            None => {
                                AdminError::NotFound("no checkpoint yet".into()).into_response()
                            }
                        },
                        Err(r) => r.into_response(),
                    }
                }
            }),
        )
        .route(
            "/audit/consistency",
            get(move |Query(p): Query<ProveParams>| {
                let log = l4.clone();
                async move {
                    let tiles = log.tiles().clone();
                    let prove = move |s: &dyn AuditStore| {
                        let t = tiles.read().unwrap_or_else(|p| p.into_inner());
                        query::prove_tiled(s, &t, p.from, p.to)
                    };
                    match with_store(&log, prove).await {
                        Ok(proved) => json(&proved),
                        Err(r) => r.into_response(),
                    }
                }
            }),
        )
        .route(
            "/audit/key",
            get(move || {
                let k = log.verifier_key().to_string();
                async move { format!("{k}\n") }
            }),
        )
}
