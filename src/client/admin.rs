//! A minimal HTTP/1 client for the admin endpoint (plain HTTP, as served).
//!
//! Owns: one request/response exchange with a running server's admin port,
//! for the operator commands that talk to it. Must not: interpret replies.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::ClientError;

/// Sends one request; returns the status code and the body text.
pub async fn request(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<String>,
) -> Result<(u16, String), ClientError> {
    let unreachable = |why: String| ClientError::Unreachable(format!("{url}: {why}"));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::BadAddress {
            addr: url.to_string(),
            reason: e.to_string(),
        })?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(60), client.request(req))
        .await
        .map_err(|_| unreachable("no answer within 60s".into()))?
        .map_err(|e| {
            unreachable(format!(
                "{e} (is `meshca serve` running with this admin address?)"
            ))
        })?;
    let code = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
}
