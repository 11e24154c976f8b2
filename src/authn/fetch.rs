//! HTTPS fetching of OIDC discovery and JWKS documents.
//!
//! Owns: the one HTTP client meshca uses outside kube — HTTPS only, rustls
//! with ring, trusting either a given CA bundle or the system roots, with a
//! timeout and a size cap on every answer. Must not: interpret documents.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The largest document accepted.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// How long one fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches JSON documents over HTTPS.
#[derive(Clone)]
pub struct Fetcher {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Fetcher {
    /// A fetcher trusting the PEM roots in `ca_pem`, or the system roots when `None`.
    pub fn new(ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                for c in crate::ca::pem_to_certs(pem)? {
                    roots.add(c).map_err(|e| format!("CA bundle: {e}"))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// GETs `url` and returns the body as text (2xx only).
    pub async fn get(&self, url: &str) -> Result<String, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url}: only https URLs are fetched"));
        }
        let fut = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| format!("GET {url}: reading the body: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("GET {url}: HTTP {status}"));
            }
            String::from_utf8(body.to_vec()).map_err(|_| format!("GET {url}: body is not UTF-8"))
        };
        tokio::time::timeout(FETCH_TIMEOUT, fut)
            .await
            .map_err(|_| format!("GET {url}: no answer within {}s", FETCH_TIMEOUT.as_secs()))?
    }

    /// Resolves an issuer's `jwks_uri` through OIDC discovery.
    pub async fn discover_jwks_uri(&self, issuer_url: &str) -> Result<String, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer_url.trim_end_matches('/')
        );
        let doc: serde_json::Value = serde_json::from_str(&self.get(&url).await?)
            .map_err(|e| format!("{url}: not JSON: {e}"))?;
        doc["jwks_uri"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("{url}: no jwks_uri"))
    }
}
