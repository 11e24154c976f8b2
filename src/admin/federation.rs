//! `GET /federation` on the admin endpoint (admin token required, as for
//! every operator route): the followed trust domains and their state, as
//! `meshca federation status --output json` prints it.
//!
//! Must not: change anything (the followers own the state).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::admin::rotation::json;
use crate::federation::Hub;

/// The federation status route.
pub(crate) fn routes(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/federation", get(status))
        .with_state(hub)
}

async fn status(State(hub): State<Arc<Hub>>) -> Response {
    json(
        StatusCode::OK,
        &serde_json::json!({
            "federation_version": hub.current().version,
            "trust_domains": hub.status(),
        }),
    )
}
