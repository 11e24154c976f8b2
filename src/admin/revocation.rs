//! Revocation over the admin endpoint of a running server.
//!
//! Routes (every method needs `Authorization: Bearer <admin token>`, GET
//! included: the list names compromised workloads):
//! - `GET /revocations` — the list (JSON, as `meshca revoke --list --output json`)
//! - `POST /revocations/revoke` — body `{"serial": S}` or `{"identity": "NS/SA"}`, optional `"reason"`
//! - `POST /revocations/lift` — body `{"serial": S}` or `{"identity": "NS/SA"}`
//!
//! Replies: 200 with `{"done": TEXT, "list": {...}}`; 400 for unusable
//! input, 401 without the token, 404 when there is nothing to lift, 409 when
//! it is already revoked or denied, 500 when storage fails. Must not: decide
//! anything itself (see [`crate::revocation::RevocationService`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::admin::rotation::{bearer_refusal, json, sha256};
use crate::admin::AdminError;
use crate::revocation::{
    list_json, parse_identity, parse_serial, Change, RevocationError, RevocationService,
};

#[derive(Clone)]
struct Ctx {
    svc: RevocationService,
    token_sha256: [u8; 32],
}

/// The admin routes for revocation.
pub(crate) fn routes(svc: RevocationService, admin_token: &str) -> Router {
    Router::new()
        .route("/revocations", get(list))
        .route("/revocations/revoke", post(revoke))
        .route("/revocations/lift", post(lift))
        .with_state(Ctx {
            svc,
            token_sha256: sha256(admin_token.as_bytes()),
        })
}

async fn list(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    if let Some(why) = bearer_refusal(&ctx.token_sha256, &headers) {
        return AdminError::Unauthorized(why).into_response();
    }
    json(StatusCode::OK, &list_json(&ctx.svc.revocations().list()))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    serial: Option<String>,
    identity: Option<String>,
    #[serde(default)]
    reason: String,
}

fn target(b: &Bytes, lift: bool) -> Result<Change, RevocationError> {
    let body: Body = serde_json::from_slice(b)
        .map_err(|e| RevocationError::BadInput(format!("request body: {e}")))?;
    match (body.serial, body.identity) {
        (Some(s), None) => {
            let serial = parse_serial(&s)?;
            Ok(if lift {
                Change::LiftSerial(serial)
            } else {
                Change::RevokeSerial {
                    serial,
                    reason: body.reason,
                }
            })
        }
        (None, Some(i)) => {
            let identity = parse_identity(&i)?;
            Ok(if lift {
                Change::LiftIdentity(identity)
            } else {
                Change::Deny {
                    identity,
                    reason: body.reason,
                }
            })
        }
        _ => Err(RevocationError::BadInput(
            "give exactly one of \"serial\" or \"identity\"".into(),
        )),
    }
}

async fn run(ctx: &Ctx, headers: &HeaderMap, b: &Bytes, lift: bool) -> Response {
    if let Some(why) = bearer_refusal(&ctx.token_sha256, headers) {
        return AdminError::Unauthorized(why).into_response();
    }
    let r = match target(b, lift) {
        Ok(change) => ctx
            .svc
            .change(change.clone(), "operator (admin endpoint)")
            .await
            .map(|_| change),
        Err(e) => Err(e),
    };
    match r {
        Ok(change) => json(
            StatusCode::OK,
            &serde_json::json!({
                "done": change.describe(),
                "list": list_json(&ctx.svc.revocations().list()),
            }),
        ),
        Err(e) => AdminError::from(e).into_response(),
    }
}

async fn revoke(State(ctx): State<Ctx>, headers: HeaderMap, b: Bytes) -> Response {
    run(&ctx, &headers, &b, false).await
}

async fn lift(State(ctx): State<Ctx>, headers: HeaderMap, b: Bytes) -> Response {
    run(&ctx, &headers, &b, true).await
}
