//! Step "TLS": the CA's own serving certificate, issued by itself and
//! renewed before it expires or when the trust bundle or issuer changes;
//! a throw-away self-signed one when the CA cannot issue (recovery mode).
//!
//! Must not: accept connections (see `listener`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::ca::Authority;
use crate::config::ServeConfig;
use crate::identity::Workload;
use crate::tls::crypto_provider;
use crate::trust::service::RotationService;

use super::BoxError;

/// The live server TLS configuration (swapped on renewal).
pub(super) struct Tls {
    /// What the accept loop hands each new connection.
    pub config: Arc<ArcSwap<ServerConfig>>,
    refresh_at: SystemTime,
}

impl Tls {
    /// The first server certificate: issued by the CA, or in recovery mode a
    /// self-signed one, retried in 30 s.
    pub fn initial(ca: &Authority, cfg: &ServeConfig) -> Result<Self, BoxError> {
        let (config, refresh_at) = match server_tls(ca, cfg) {
            Ok(x) => x,
            Err(e) => {
                // Recovery mode: nothing can be issued until an operator
                // rotates, but the server must run to accept that rotation.
                tracing::error!(error = %e, "the CA cannot issue its own server certificate; serving a temporary self-signed one until a rotation brings the CA back (see `meshca rotation status`)");
                (
                    fallback_tls(cfg)?,
                    ca.clock().now() + Duration::from_secs(30),
                )
            }
        };
        Ok(Self {
            config: Arc::new(ArcSwap::new(config)),
            refresh_at,
        })
    }

    /// Renews the server certificate before it expires, and rebuilds the
    /// TLS config when the trust bundle or the issuer changes.
    pub fn spawn_renewal(
        &self,
        ca: Arc<Authority>,
        cfg: ServeConfig,
        rotation: Arc<RotationService>,
        mut stop: watch::Receiver<bool>,
    ) {
        let tls = self.config.clone();
        let mut refresh_at = self.refresh_at;
        let mut bundle = ca.watch_bundle();
        tokio::spawn(async move {
            loop {
                let wait = refresh_at
                    .duration_since(ca.clock().now())
                    .unwrap_or_default()
                    .max(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    r = bundle.changed() => { if r.is_err() { return; } }
                    _ = rotation.issuer_changed() => {}
                    _ = stop.changed() => return,
                }
                match server_tls(&ca, &cfg) {
                    Ok((c, next)) => {
                        tls.store(c);
                        refresh_at = next;
                        tracing::info!(next_renewal = %crate::util::clock::rfc3339(next), "renewed the CA's server certificate");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "server certificate renewal failed; retrying in 30s");
                        refresh_at = ca.clock().now() + Duration::from_secs(30);
                    }
                }
            }
        });
    }
}

/// Issues the CA's own serving certificate and builds a rustls config.
fn server_tls(
    ca: &Authority,
    cfg: &ServeConfig,
) -> Result<(Arc<ServerConfig>, SystemTime), String> {
    let key = crate::ca::CaKey::generate_p256().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    let me = Workload {
        namespace: cfg.issuance.mesh.control_plane_ns.clone(),
        service_account: crate::identity::CA_SERVICE_ACCOUNT
            .parse()
            .expect("valid name"),
    };
    let issued = ca
        .issue_with_dns(
            &me,
            &cfg.server_dns_names,
            csr.der(),
            Some(cfg.issuance.max_ttl),
        )
        .map_err(|e| format!("cannot issue the server certificate: {e}"))?;
    let mut chain = vec![issued.leaf.clone()];
    chain.extend(issued.intermediates.iter().cloned());
    // rustls takes its own copy; ours (and `key`) are zeroized on drop.
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.to_pkcs8_der().expose().to_vec(),
    ));
    let provider = crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for r in &issued.bundle.roots {
        roots
            .add(r.clone())
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|e| format!("server certificate: {e}"))?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(sc), issued.refresh_at))
}

/// A throw-away self-signed server certificate, for when the CA cannot
/// issue (recovery mode): the server keeps running so an operator can
/// rotate, and clients see a certificate they do not trust rather than no
/// server at all.
fn fallback_tls(cfg: &ServeConfig) -> Result<Arc<ServerConfig>, String> {
    let key = crate::ca::CaKey::generate_p256().map_err(|e| e.to_string())?;
    let mut names = cfg.server_dns_names.clone();
    names.push(super::server_identity(cfg));
    let cert = rcgen::CertificateParams::new(names)
        .map_err(|e| e.to_string())?
        .self_signed(&key)
        .map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.to_pkcs8_der().expose().to_vec(),
    ));
    let mut sc = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| format!("server certificate: {e}"))?;
    sc.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(sc))
}
