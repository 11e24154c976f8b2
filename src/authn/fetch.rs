//! HTTPS fetching of OIDC discovery and JWKS documents.
//!
//! Owns: the one HTTP client meshca uses outside kube — HTTPS only, rustls
//! with ring, trusting either a given CA bundle or the system roots, with a
//! timeout and a size cap on every answer — and the routing of a URL that
//! points at the Kubernetes API server through the kube client instead, so
//! that it carries the pod's service-account token (re-read as it rotates)
//! and trusts the cluster CA, as the API server's discovery endpoints
//! require. Must not: interpret documents beyond finding `jwks_uri`, or send
//! the service-account token anywhere but the API server (only a URL whose
//! origin is the API server's, checked against the cluster CA, gets it).

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The largest document accepted.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// How long one fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The path at which the API server serves its service-account JWKS.
pub(crate) const API_SERVER_JWKS_PATH: &str = "/openid/v1/jwks";

/// Where the API server is, to tell which URLs point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    host: String,
    port: u16,
    in_cluster: bool,
}

impl Origin {
    fn of(cluster_url: &hyper::Uri, in_cluster: bool) -> Self {
        Self {
            host: cluster_url.host().unwrap_or_default().to_ascii_lowercase(),
            port: cluster_url.port_u16().unwrap_or(443),
            in_cluster,
        }
    }

    /// Whether `uri` (https) names the API server: its address, or in a pod
    /// the names of the `kubernetes` Service (`kubernetes.default.svc`,
    /// `kubernetes.default.svc.<cluster domain>`) on port 443. Only the
    /// path is used: the request goes to the configured address (never to
    /// the host the URL names) and must pass the cluster CA.
    fn covers(&self, uri: &hyper::Uri) -> bool {
        if uri.scheme_str() != Some("https") {
            return false;
        }
        let host = uri.host().unwrap_or_default().to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let port = uri.port_u16().unwrap_or(443);
        if host == self.host && port == self.port {
            return true;
        }
        let service_name = ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
            .contains(&host)
            || host.starts_with("kubernetes.default.svc.");
        self.in_cluster && port == 443 && service_name
    }
}

/// The Kubernetes API server, for URLs that point at it.
#[derive(Clone)]
pub struct ApiServer {
    origin: Origin,
    client: kube::Client,
}

impl ApiServer {
    /// The API server at `cluster_url` (from the kubeconfig, or the pod's
    /// environment when `in_cluster`), reached through `client`.
    pub fn new(cluster_url: &hyper::Uri, in_cluster: bool, client: kube::Client) -> Self {
        Self {
            origin: Origin::of(cluster_url, in_cluster),
            client,
        }
    }

    /// Whether `uri` points at this API server (see `Origin::covers`).
    pub fn serves(&self, uri: &hyper::Uri) -> bool {
        self.origin.covers(uri)
    }

    /// GETs `path` (with its query) through the kube client: 2xx only, at
    /// most [`MAX_DOCUMENT_BYTES`], within [`FETCH_TIMEOUT`].
    pub async fn get(&self, path: &str) -> Result<String, String> {
        api_get(&self.client, path).await
    }
}

/// GETs a path from the API server through `client`: the client's
/// credentials and CA, 2xx only, at most [`MAX_DOCUMENT_BYTES`], within
/// [`FETCH_TIMEOUT`]. A refusal names the HTTP code and the API's message.
pub(crate) async fn api_get(client: &kube::Client, path: &str) -> Result<String, String> {
    let what = format!("GET {path} from the Kubernetes API server");
    let req = http::Request::get(path)
        .body(kube::client::Body::from(Vec::new()))
        .map_err(|e| format!("{what}: {e}"))?;
    let fut = async {
        let resp = client.send(req).await.map_err(|e| format!("{what}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{what}: reading the body: {e}"))?
            .to_bytes();
        let text =
            String::from_utf8(body.to_vec()).map_err(|_| format!("{what}: body is not UTF-8"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(super::clip))
                .unwrap_or_default();
            return Err(format!("{what}: HTTP {status}: {message}"));
        }
        Ok(text)
    };
    tokio::time::timeout(FETCH_TIMEOUT, fut)
        .await
        .map_err(|_| format!("{what}: no answer within {}s", FETCH_TIMEOUT.as_secs()))?
}

/// Fetches JSON documents over HTTPS.
#[derive(Clone)]
pub struct Fetcher {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    api_server: Option<ApiServer>,
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
            api_server: None,
        })
    }

    /// Routes URLs on `api_server` through its kube client (token, cluster
    /// CA); every other URL is fetched as before, with no credentials.
    pub fn with_api_server(mut self, api_server: ApiServer) -> Self {
        self.api_server = Some(api_server);
        self
    }

    /// The API server, when `uri` points at it.
    fn api_server_for(&self, uri: &hyper::Uri) -> Option<&ApiServer> {
        self.api_server.as_ref().filter(|a| a.serves(uri))
    }

    /// GETs `url` and returns the body as text (2xx only).
    pub async fn get(&self, url: &str) -> Result<String, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("{url}: only https URLs are fetched"));
        }
        if let Some(api) = self.api_server_for(&uri) {
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            return api.get(path).await;
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

    /// Resolves an issuer's `jwks_uri` through OIDC discovery. When the
    /// issuer is the API server, its `jwks_uri` names the API server's
    /// advertised address (`https://<advertise-address>:6443/openid/v1/jwks`),
    /// which a pod may not reach or verify: the JWKS is then read at
    /// `/openid/v1/jwks` of the API server the discovery came from (the same
    /// document, with the same token and CA). A `jwks_uri` elsewhere (an
    /// external `--service-account-jwks-uri`) is fetched as given.
    pub async fn discover_jwks_uri(&self, issuer_url: &str) -> Result<String, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer_url.trim_end_matches('/')
        );
        let doc: serde_json::Value = serde_json::from_str(&self.get(&url).await?)
            .map_err(|e| format!("{url}: not JSON: {e}"))?;
        let jwks_uri = doc["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{url}: no jwks_uri"))?;
        let api_origin = url
            .parse::<hyper::Uri>()
            .ok()
            .filter(|u| self.api_server_for(u).is_some())
            .and_then(|u| u.authority().cloned());
        let names_api_jwks = jwks_uri
            .parse::<hyper::Uri>()
            .is_ok_and(|u| u.path() == API_SERVER_JWKS_PATH);
        match api_origin {
            Some(origin) if names_api_jwks => Ok(format!("https://{origin}{API_SERVER_JWKS_PATH}")),
            _ => Ok(jwks_uri.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(origin: &Origin, url: &str) -> bool {
        origin.covers(&url.parse().unwrap())
    }

    /// Only the API server's own origin (and, in a pod, the `kubernetes`
    /// Service names on 443) is routed through the kube client with the
    /// pod's token; look-alikes are fetched with no credentials.
    #[test]
    fn only_the_api_servers_origin_gets_the_token() {
        let kubeconfig = Origin::of(&"https://10.0.0.1:6443".parse().unwrap(), false);
        assert!(covers(&kubeconfig, "https://10.0.0.1:6443/openid/v1/jwks"));
        assert!(covers(
            &kubeconfig,
            "https://10.0.0.1:6443/.well-known/openid-configuration"
        ));
        for other in [
            "https://10.0.0.1/openid/v1/jwks",
            "https://10.0.0.1:6444/openid/v1/jwks",
            "https://10.0.0.10:6443/openid/v1/jwks",
            "http://10.0.0.1:6443/openid/v1/jwks",
            "https://kubernetes.default.svc/openid/v1/jwks",
            "https://oidc.eks.eu-west-1.amazonaws.com/id/X/keys",
        ] {
            assert!(!covers(&kubeconfig, other), "{other}");
        }
        let pod = Origin::of(&"https://10.96.0.1".parse().unwrap(), true);
        for own in [
            "https://10.96.0.1/openid/v1/jwks",
            "https://10.96.0.1:443/openid/v1/jwks",
            "https://kubernetes.default.svc/openid/v1/jwks",
            "https://KUBERNETES.default.svc.cluster.local./openid/v1/jwks",
            "https://kubernetes/openid/v1/jwks",
        ] {
            assert!(covers(&pod, own), "{own}");
        }
        for other in [
            "https://kubernetes.default.svc:8443/openid/v1/jwks",
            "https://kubernetes.default.svcx.evil/openid/v1/jwks",
            "https://kubernetes-default.svc/openid/v1/jwks",
            "https://storage.googleapis.com/issuer/keys",
        ] {
            assert!(!covers(&pod, other), "{other}");
        }
    }
}
