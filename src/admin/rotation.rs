//! Rotation over the admin endpoint of a running server.
//!
//! Routes:
//! - `GET /rotation/status[?warn_within=7d]` — the status report (JSON), read-only
//! - `POST /rotation/prepare` — body `{}` (generate) or
//!   `{"root_cert": PATH, "root_key": PATH}` (import files the server can read)
//! - `POST /rotation/activate` — body `{"force": false}`
//! - `POST /rotation/retire`
//! - `POST /rotation/taint` — body `{"root": FINGERPRINT-OR-PREFIX}`
//!
//! Every route (GET too) sits behind `admin::guard::protect`, which requires
//! `Authorization: Bearer <admin token>`; the POST routes also check it
//! here, as a second lock on the routes that change the CA. The token is the
//! content of `admin.token` in the data directory (0600, made at first
//! start), and only its SHA-256 is kept in memory. Replies: 200 with
//! `{"events": [...], "status": {...}}`; 409 when a safety gate or the state
//! machine refuses (`{"error": ...}`), 400 for unusable input, 401 without
//! the token, 500 when storage fails. Must not: decide anything itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::admin::AdminError;
use crate::trust::manager::RootSource;
use crate::trust::rotation::Event;
use crate::trust::service::{RotationService, Step};

/// The admin token file in the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Reads the admin token of a data directory, creating it on first use.
pub fn ensure_token(data_dir: &std::path::Path) -> Result<String, String> {
    let p = data_dir.join(TOKEN_FILE);
    match crate::util::secret::read_private(&p) {
        Ok(t) => Ok(String::from_utf8_lossy(t.expose()).trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut b);
            let t = hex::encode(b);
            crate::util::secret::write_private(&p, t.as_bytes())
                .map_err(|e| format!("{}: {e}", p.display()))?;
            Ok(t)
        }
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

#[derive(Clone)]
struct Ctx {
    svc: Arc<RotationService>,
    token_sha256: [u8; 32],
}

/// SHA-256 of `b` (the admin token is kept only as this digest).
pub(crate) fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A JSON reply.
pub(crate) fn json(code: StatusCode, v: &serde_json::Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()),
    )
        .into_response()
}

/// The admin routes for rotation.
pub fn routes(svc: Arc<RotationService>, admin_token: &str) -> Router {
    let ctx = Ctx {
        svc,
        token_sha256: sha256(admin_token.as_bytes()),
    };
    Router::new()
        .route("/rotation/status", get(status))
        .route("/rotation/prepare", post(prepare))
        .route("/rotation/activate", post(activate))
        .route("/rotation/retire", post(retire))
        .route("/rotation/taint", post(taint))
        .with_state(ctx)
}

#[derive(Debug, Default, Deserialize)]
struct StatusParams {
    warn_within: Option<String>,
}

/// Builds the status of a running server.
pub async fn status_json(
    svc: &Arc<RotationService>,
    warn_within: Duration,
) -> Result<serde_json::Value, String> {
    let svc = svc.clone();
    tokio::task::spawn_blocking(move || {
        let now = svc.clock().now();
        let obs = svc.observations(now);
        let p = svc.propagation(now);
        let s = crate::trust::status::status(
            svc.manager().data(),
            &svc.manager().state(),
            &obs,
            Some(p),
            warn_within,
        )?;
        serde_json::to_value(s).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn status(State(ctx): State<Ctx>, Query(q): Query<StatusParams>) -> Response {
    let warn = match q
        .warn_within
        .as_deref()
        .map(crate::util::duration::parse_duration)
    {
        None => Duration::from_secs(7 * 86400),
        Some(Ok(d)) => d,
        Some(Err(e)) => return AdminError::BadRequest(format!("warn_within: {e}")).into_response(),
    };
    match status_json(&ctx.svc, warn).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => AdminError::Internal(e).into_response(),
    }
}

/// Why a request is not authorized (None: it is).
fn unauthorized(ctx: &Ctx, headers: &HeaderMap) -> Option<&'static str> {
    bearer_refusal(&ctx.token_sha256, headers)
}

/// Why a request does not carry the admin token whose SHA-256 is
/// `expected` (None: it does). Shared by every token-protected admin route.
pub(crate) fn bearer_refusal(expected: &[u8; 32], headers: &HeaderMap) -> Option<&'static str> {
    // One token check for every protected route: the guard's (any case of
    // the `Bearer` scheme, a comparison whose timing says nothing).
    crate::admin::guard::TokenCheck::from_digest(*expected).refuse(headers)
}

#[cfg(test)]
mod token_tests {
    use super::*;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", v.parse().unwrap());
        h
    }

    #[test]
    fn the_rotation_and_revocation_routes_check_the_token_like_the_guard() {
        let d = sha256(b"s3cret");
        assert_eq!(bearer_refusal(&d, &with("Bearer s3cret")), None);
        assert_eq!(bearer_refusal(&d, &with("bearer s3cret")), None);
        assert_eq!(bearer_refusal(&d, &with("BEARER s3cret")), None);
        assert!(bearer_refusal(&d, &with("Bearer s3cre")).is_some());
        assert!(bearer_refusal(&d, &with("Basic s3cret")).is_some());
        assert!(bearer_refusal(&d, &HeaderMap::new()).is_some());
    }
}

/// One line per event, as replies and the CLI show them.
pub fn event_text(e: &Event) -> String {
    match e {
        Event::Prepared(id) => format!("prepared {id}"),
        Event::Activated { new, old, forced } => format!(
            "activated {new} (retired {old}){}",
            if *forced { " FORCED" } else { "" }
        ),
        Event::Removed(id) => format!("removed {id}"),
        Event::Tainted(id) => format!("tainted {id}"),
    }
}

async fn run(ctx: &Ctx, headers: &HeaderMap, step: Step) -> Response {
    if let Some(why) = unauthorized(ctx, headers) {
        return AdminError::Unauthorized(why).into_response();
    }
    match ctx.svc.step(step, "operator (admin endpoint)").await {
        Ok(events) => {
            let status = status_json(&ctx.svc, Duration::from_secs(7 * 86400))
                .await
                .unwrap_or_else(|e| serde_json::json!({ "error": e }));
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "events": events.iter().map(event_text).collect::<Vec<_>>(),
                    "status": status,
                }),
            )
        }
        Err(e) => AdminError::from(e).into_response(),
    }
}

fn body<T: for<'de> Deserialize<'de> + Default>(b: &Bytes) -> Result<T, AdminError> {
    if b.iter().all(|c| c.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| AdminError::BadRequest(format!("request body: {e}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareBody {
    root_cert: Option<PathBuf>,
    root_key: Option<PathBuf>,
    root_lifetime: Option<String>,
}

async fn prepare(State(ctx): State<Ctx>, headers: HeaderMap, b: Bytes) -> Response {
    let p: PrepareBody = match body(&b) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let source = match (p.root_cert, p.root_key) {
        (Some(c), Some(k)) => RootSource::Import(c, k),
        (None, None) => {
            let life = match p
                .root_lifetime
                .as_deref()
                .map(crate::util::duration::parse_duration)
            {
                None => ctx.svc.settings().root_lifetime,
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    return AdminError::BadRequest(format!("root_lifetime: {e}")).into_response()
                }
            };
            RootSource::Generate(life)
        }
        _ => {
            return AdminError::BadRequest(
                "give both root_cert and root_key to import a root, or neither to generate one"
                    .into(),
            )
            .into_response()
        }
    };
    run(&ctx, &headers, Step::Prepare(source)).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    #[serde(default)]
    force: bool,
}

async fn activate(State(ctx): State<Ctx>, headers: HeaderMap, b: Bytes) -> Response {
    match body::<ActivateBody>(&b) {
        Ok(a) => run(&ctx, &headers, Step::Activate { force: a.force }).await,
        Err(e) => e.into_response(),
    }
}

async fn retire(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    run(&ctx, &headers, Step::Retire).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaintBody {
    root: String,
}

async fn taint(State(ctx): State<Ctx>, headers: HeaderMap, b: Bytes) -> Response {
    match body::<TaintBody>(&b) {
        Ok(t) if !t.root.is_empty() => run(&ctx, &headers, Step::Taint(t.root)).await,
        Ok(_) => AdminError::BadRequest("body must name the root: {\"root\": FINGERPRINT}".into())
            .into_response(),
        Err(e) => e.into_response(),
    }
}
