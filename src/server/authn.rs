//! Step "authenticator": the ordered token-source chain (`authn_order`:
//! JWKS from a file, a URL, OIDC discovery or the API server; TokenReview),
//! the development signer when nothing else is configured, the
//! pod/service-account bindings table when `watch_token_bindings` is on,
//! and the API server's issuer discovery (retried in the background until
//! it succeeds).
//!
//! Must not: start the bindings watch (the controllers step does, once
//! there is a stop signal) or decide on tokens (see `authn`).

use std::sync::Arc;

use crate::authn::issuers::Issuers;
use crate::authn::{self, jwt, Authenticator, Method, Source};
use crate::ca::store::DataDir;
use crate::config::{AuthnSource, ServeConfig};
use crate::kubernetes::bindings::BoundObjects;
use crate::kubernetes::client::Factory;
use crate::metrics::Metrics;
use crate::util::clock::Clock;

use super::BoxError;

/// The authenticator, and the bindings table the controllers keep current.
pub(super) struct Authn {
    /// The token-source chain.
    pub authenticator: Arc<Authenticator>,
    /// Pods and service accounts that exist (with `watch_token_bindings`).
    pub bindings: Option<Arc<BoundObjects>>,
}

/// Builds the authenticator and starts the periodic JWKS refreshes.
pub(super) async fn build(
    cfg: &ServeConfig,
    data: &DataDir,
    kube: &Factory,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<Authn, BoxError> {
    if cfg.authn.allow_legacy_tokens {
        tracing::warn!("allow_legacy_tokens is ignored: the API server authenticates legacy secret-based tokens only for its own audiences, so TokenReview never confirms one for meshca's; they are refused. Mount projected service-account tokens (docs/security.md) and remove the setting");
    }
    let mut authenticator = build_authenticator(cfg, data, kube, clock, metrics).await?;
    // A token whose pod or service account is gone must stop working
    // within seconds, even when verified locally: keep a metadata-only
    // watch of both (started with the controllers).
    let mut bindings = None;
    if cfg.kubernetes.watch_token_bindings && kube.configured() {
        kube_client(kube).await?;
        let objects = Arc::new(BoundObjects::new(metrics.clone()));
        authenticator = authenticator.with_bindings(objects.clone());
        bindings = Some(objects);
    }
    let authenticator = Arc::new(authenticator);
    tracing::info!(sources = ?authenticator.describe(), "token sources");
    for j in authenticator.remote_jwks() {
        let every = cfg.authn.jwks_refresh_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                j.refresh_now().await;
            }
        });
    }
    Ok(Authn {
        authenticator,
        bindings,
    })
}

/// The shared Kubernetes client, for a step that cannot work without one.
async fn kube_client(kube: &Factory) -> Result<kube::Client, String> {
    kube.client()
        .await
        .map_err(|e| format!("invalid setting kubeconfig: {e}"))?
        .ok_or_else(|| "invalid setting kubeconfig: not set".to_string())
}

/// Builds the token chain from configuration.
pub(super) async fn build_authenticator(
    cfg: &ServeConfig,
    data: &DataDir,
    kube: &Factory,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<Authenticator, BoxError> {
    let mut sources = Vec::new();
    let dev_mode = cfg.authn.jwks_file.is_none()
        && !cfg.authn.jwks_kubernetes
        && cfg.authn.jwks_url.is_none()
        && cfg.authn.oidc_issuer_url.is_none()
        && cfg.kubernetes.kubeconfig.is_none();
    let discovered = discovered_issuers(cfg, kube).await?;
    for s in &cfg.authn.authn_order {
        match s {
            AuthnSource::Jwks => {
                if let Some(v) = jwks_verifier(cfg, kube, clock.clone(), &discovered).await? {
                    sources.push(Source::Jwks(Arc::new(v)));
                }
            }
            AuthnSource::Tokenreview => {
                if let Some(issuers) = &discovered {
                    let client = kube_client(kube).await?;
                    sources.push(token_review(cfg, client, issuers, clock.clone(), metrics));
                }
            }
        }
    }
    if dev_mode {
        sources.push(dev_signer(data, clock).await?);
    }
    if sources.is_empty() {
        return Err(
            "no token source is usable: check authn_order against jwks_file/kubeconfig".into(),
        );
    }
    Ok(Authenticator::new(sources))
}

/// The issuers the API server's token sources accept (JWKS from the API
/// server, TokenReview): `jwt_issuers` plus the issuer the API server
/// announces. A first discovery is tried now (bounded); if it fails, it is
/// retried with backoff in the background until it succeeds, and meanwhile
/// a token from an issuer not accepted yet gets UNAVAILABLE (retry), not a
/// rejection and not a TokenReview. None without a kubeconfig.
async fn discovered_issuers(
    cfg: &ServeConfig,
    kube: &Factory,
) -> Result<Option<Arc<Issuers>>, BoxError> {
    let asks_api =
        cfg.authn.jwks_kubernetes || cfg.authn.authn_order.contains(&AuthnSource::Tokenreview);
    if !kube.configured() || !asks_api {
        return Ok(None);
    }
    let client = kube_client(kube).await?;
    let issuers = Issuers::discovering(cfg.authn.jwt_issuers.clone());
    let fetch = move || {
        let client = client.clone();
        async move { jwt::kube_issuer(&client).await }
    };
    match issuers.discover_once(&fetch).await {
        Ok(iss) => {
            tracing::info!(issuer = %iss, "Kubernetes service-account issuer (OIDC discovery)")
        }
        Err(e) => {
            tracing::warn!(error = %e, accepted = ?issuers.all(), "Kubernetes service-account issuer discovery failed; retrying with backoff (tokens from an issuer not accepted yet get UNAVAILABLE until it succeeds)");
            authn::issuers::retry_in_background(&issuers, fetch);
        }
    }
    Ok(Some(issuers))
}

/// The configured JWKS verifier, if any JWKS source is set.
async fn jwks_verifier(
    cfg: &ServeConfig,
    kube: &Factory,
    clock: Arc<dyn Clock>,
    discovered: &Option<Arc<Issuers>>,
) -> Result<Option<jwt::JwksVerifier>, BoxError> {
    let mut issuers = Issuers::fixed(cfg.authn.jwt_issuers.clone());
    let (source, setting) = if cfg.authn.jwks_kubernetes {
        let (Some(shared), true) = (discovered, kube.configured()) else {
            return Err("invalid setting jwks_kubernetes: needs kubeconfig".into());
        };
        // The API server names its service-account issuer; tokens carry it
        // as `iss`. Discovered now or later (see `discovered_issuers`).
        issuers = shared.clone();
        let client = kube_client(kube).await?;
        (jwt::JwksSource::Kubernetes(client), "jwks_kubernetes")
    } else if let Some(f) = &cfg.authn.jwks_file {
        (jwt::JwksSource::File(f.clone()), "jwks_file")
    } else if cfg.authn.jwks_url.is_some() || cfg.authn.oidc_issuer_url.is_some() {
        remote_jwks(cfg, kube).await?
    } else {
        return Ok(None);
    };
    let v = jwt::JwksVerifier::with_issuers(source, issuers, clock, Method::Jwks)
        .await
        .map_err(|e| format!("invalid setting {setting}: {e}"))?;
    Ok(Some(v))
}

/// A JWKS fetched over HTTPS: from `jwks_url`, or the one the OIDC
/// discovery document of `oidc_issuer_url` names. A URL on the Kubernetes
/// API server (with a kubeconfig) is fetched through the kube client: the
/// pod's token and the cluster CA, as the API server requires.
async fn remote_jwks(
    cfg: &ServeConfig,
    kube: &Factory,
) -> Result<(jwt::JwksSource, &'static str), BoxError> {
    let ca = match &cfg.authn.jwks_ca_file {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| format!("invalid setting jwks_ca_file: {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let mut fetcher = authn::fetch::Fetcher::new(ca.as_deref())
        .map_err(|e| format!("invalid setting jwks_ca_file: {e}"))?;
    if let Some(api) = api_server(cfg, kube).await? {
        fetcher = fetcher.with_api_server(api);
    }
    let (url, setting) = match (&cfg.authn.jwks_url, &cfg.authn.oidc_issuer_url) {
        (Some(url), _) => (url.clone(), "jwks_url"),
        (None, Some(issuer)) => {
            let url = fetcher
                .discover_jwks_uri(issuer)
                .await
                .map_err(|e| format!("invalid setting oidc_issuer_url: discovery failed: {e}"))?;
            tracing::info!(%issuer, jwks_uri = %url, "OIDC discovery");
            (url, "oidc_issuer_url")
        }
        (None, None) => return Err("invalid setting jwks_url: not set".into()),
    };
    let fetcher = Box::new(fetcher);
    Ok((jwt::JwksSource::Url { url, fetcher }, setting))
}

/// The Kubernetes API server of `kubeconfig` (its address and the shared
/// client), so that fetches of its discovery documents carry credentials.
async fn api_server(
    cfg: &ServeConfig,
    kube: &Factory,
) -> Result<Option<authn::fetch::ApiServer>, BoxError> {
    let Some(path) = &cfg.kubernetes.kubeconfig else {
        return Ok(None);
    };
    let client = kube_client(kube).await?;
    let in_cluster = path.as_os_str() == authn::tokenreview::IN_CLUSTER;
    let config = if in_cluster {
        kube::Config::incluster().map_err(|e| format!("invalid setting kubeconfig: {e}"))?
    } else {
        let kc = kube::config::Kubeconfig::read_from(path)
            .map_err(|e| format!("invalid setting kubeconfig: {e}"))?;
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| format!("invalid setting kubeconfig: {e}"))?
    };
    Ok(Some(authn::fetch::ApiServer::new(
        &config.cluster_url,
        in_cluster,
        client,
    )))
}

/// TokenReview against the API server of `kubeconfig`, for tokens of
/// `issuers` (see `discovered_issuers`).
fn token_review(
    cfg: &ServeConfig,
    client: kube::Client,
    issuers: &Arc<Issuers>,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Source {
    tracing::info!(
        issuers = ?issuers.all(),
        "TokenReview: tokens from other issuers are refused without a review"
    );
    Source::TokenReview(Box::new(authn::tokenreview::TokenReviewer::new(
        client,
        clock,
        cfg.authn.tokenreview_qps,
        cfg.authn.tokenreview_burst,
        issuers.clone(),
        metrics.clone(),
    )))
}

/// The development signer of the data directory (tokens from `meshca
/// token`), trusted only when no other token source is configured.
async fn dev_signer(data: &DataDir, clock: Arc<dyn Clock>) -> Result<Source, BoxError> {
    let signer = authn::devtoken::DevSigner::from_pem(
        &data
            .read_key("token-signer.key")
            .map_err(|e| e.to_string())?,
    )?;
    let v = jwt::JwksVerifier::new(
        jwt::JwksSource::Static(signer.jwks().to_string()),
        vec![authn::devtoken::DEV_ISSUER.to_string()],
        clock,
        Method::DevKey,
    )
    .await?;
    tracing::warn!(
        "no token source configured (--jwks-file / --kubeconfig): trusting the development token signer in {} (tokens from `meshca token`); do not use this in production",
        data.path().display()
    );
    Ok(Source::Jwks(Arc::new(v)))
}
