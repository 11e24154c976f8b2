//! Step "authenticator": the ordered token-source chain (`authn_order`:
//! JWKS from a file, a URL, OIDC discovery or the API server; TokenReview),
//! the development signer when nothing else is configured, and the
//! pod/service-account bindings table when `watch_token_bindings` is on.
//!
//! Must not: start the bindings watch (the controllers step does, once
//! there is a stop signal) or decide on tokens (see `authn`).

use std::sync::Arc;
use std::time::Duration;

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
    for s in &cfg.authn.authn_order {
        match s {
            AuthnSource::Jwks => {
                if let Some(v) = jwks_verifier(cfg, kube, clock.clone()).await? {
                    sources.push(Source::Jwks(Arc::new(v)));
                }
            }
            AuthnSource::Tokenreview => {
                if kube.configured() {
                    sources.push(token_review(cfg, kube, clock.clone(), metrics).await?);
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

/// The configured JWKS verifier, if any JWKS source is set.
async fn jwks_verifier(
    cfg: &ServeConfig,
    kube: &Factory,
    clock: Arc<dyn Clock>,
) -> Result<Option<jwt::JwksVerifier>, BoxError> {
    let mut issuers = cfg.authn.jwt_issuers.clone();
    let (source, setting) = if cfg.authn.jwks_kubernetes {
        if !kube.configured() {
            return Err("invalid setting jwks_kubernetes: needs kubeconfig".into());
        }
        let client = kube_client(kube).await?;
        // The API server names its service-account issuer; tokens carry it
        // as `iss`. Unreachable now: keep the configured issuers and let
        // the JWKS refresh catch up.
        match jwt::kube_issuer(&client).await {
            Ok(iss) => {
                tracing::info!(issuer = %iss, "Kubernetes service-account issuer (OIDC discovery)");
                if !issuers.contains(&iss) {
                    issuers.push(iss);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kubernetes OIDC discovery failed; accepting the configured jwt_issuers")
            }
        }
        (jwt::JwksSource::Kubernetes(client), "jwks_kubernetes")
    } else if let Some(f) = &cfg.authn.jwks_file {
        (jwt::JwksSource::File(f.clone()), "jwks_file")
    } else if cfg.authn.jwks_url.is_some() || cfg.authn.oidc_issuer_url.is_some() {
        remote_jwks(cfg).await?
    } else {
        return Ok(None);
    };
    let v = jwt::JwksVerifier::new(
        source,
        issuers,
        clock,
        cfg.authn.allow_legacy_tokens,
        Method::Jwks,
    )
    .await
    .map_err(|e| format!("invalid setting {setting}: {e}"))?;
    Ok(Some(v))
}

/// A JWKS fetched over HTTPS: from `jwks_url`, or the one the OIDC
/// discovery document of `oidc_issuer_url` names.
async fn remote_jwks(cfg: &ServeConfig) -> Result<(jwt::JwksSource, &'static str), BoxError> {
    let ca = match &cfg.authn.jwks_ca_file {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| format!("invalid setting jwks_ca_file: {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let fetcher = authn::fetch::Fetcher::new(ca.as_deref())
        .map_err(|e| format!("invalid setting jwks_ca_file: {e}"))?;
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

/// TokenReview against the API server of `kubeconfig`.
async fn token_review(
    cfg: &ServeConfig,
    kube: &Factory,
    clock: Arc<dyn Clock>,
    metrics: &Arc<Metrics>,
) -> Result<Source, BoxError> {
    let client = kube_client(kube).await?;
    let issuers = review_issuers(cfg, &client).await;
    tracing::info!(
        ?issuers,
        "TokenReview: tokens from other issuers are refused without a review"
    );
    Ok(Source::TokenReview(Box::new(
        authn::tokenreview::TokenReviewer::new(
            client,
            clock,
            cfg.authn.tokenreview_qps,
            cfg.authn.tokenreview_burst,
            issuers,
            cfg.authn.allow_legacy_tokens,
            metrics.clone(),
        ),
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
        false,
        Method::DevKey,
    )
    .await?;
    tracing::warn!(
        "no token source configured (--jwks-file / --kubeconfig): trusting the development token signer in {} (tokens from `meshca token`); do not use this in production",
        data.path().display()
    );
    Ok(Source::Jwks(Arc::new(v)))
}

/// The issuers whose tokens TokenReview may be asked about: `jwt_issuers`
/// (default: the OIDC issuer URL, else the Kubernetes default
/// `https://kubernetes.default.svc.cluster.local`) plus the issuer the API
/// server announces (`/.well-known/openid-configuration`) when it answers
/// within 5 s at start-up.
async fn review_issuers(cfg: &ServeConfig, client: &kube::Client) -> Vec<String> {
    let mut issuers = cfg.authn.jwt_issuers.clone();
    match tokio::time::timeout(Duration::from_secs(5), jwt::kube_issuer(client)).await {
        Ok(Ok(iss)) if !issuers.contains(&iss) => issuers.push(iss),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::info!(error = %e, "the API server does not announce its service-account issuer; TokenReview accepts the jwt_issuers only"),
        Err(_) => tracing::warn!("the API server did not announce its service-account issuer within 5s; TokenReview accepts the jwt_issuers only"),
    }
    issuers
}
