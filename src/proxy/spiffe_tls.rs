//! rustls configurations that authenticate peers by SPIFFE ID.
//!
//! Owns: building the inbound (server, client certificate required) and
//! outbound (client, server must present the expected SPIFFE ID) rustls
//! configurations from the agent's current certificate, bundle and
//! federated bundles; the verifiers on both sides, which take the peer's
//! SPIFFE ID from its one URI SAN and check its chain with rustls-webpki
//! against the bundle of THAT ID's trust domain only (ours or a federated
//! one; none held: refused), as the X509-SVID and Workload API
//! specifications prescribe, DNS names playing no part; and naming why a
//! handshake failed. Must not: move bytes or decide allow-lists.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use x509_parser::prelude::*;

use crate::agent::State;
use crate::identity::SpiffeId;

fn key_of(state: &State) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let svid = state.svid.as_ref().ok_or("no certificate yet")?;
    Ok((
        svid.chain.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.expose().to_vec())),
    ))
}

fn anchors(roots: &[CertificateDer<'_>]) -> Vec<TrustAnchor<'static>> {
    roots
        .iter()
        .filter_map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect()
}

/// The trust anchors of each trust domain we can authenticate peers of:
/// our own (named by our SVID's SPIFFE ID, anchored by our CA's bundle) and
/// each federated one. A peer is verified against the anchors of the trust
/// domain its SPIFFE ID names, and no other (SPIFFE Workload API 4.6: few
/// X.509 libraries enforce URI name constraints, so a root must not vouch
/// for IDs outside its domain).
#[derive(Debug)]
pub(crate) struct TrustDomains {
    by_domain: HashMap<String, Vec<TrustAnchor<'static>>>,
}

impl TrustDomains {
    /// From the agent's state. A federated entry that names our own trust
    /// domain is ignored: only our CA anchors our own domain.
    pub(crate) fn of(state: &State) -> Result<Self, String> {
        let svid = state.svid.as_ref().ok_or("no certificate yet")?;
        let own = svid
            .spiffe_id
            .parse::<SpiffeId>()
            .map_err(|e| format!("our own {e}"))?;
        let own = own.trust_domain();
        let mut by_domain: HashMap<String, Vec<TrustAnchor<'static>>> = state
            .bundle
            .federated
            .iter()
            .filter(|(td, _)| td.as_str() != own)
            .map(|(td, b)| (td.clone(), anchors(&b.x509_authorities)))
            .collect();
        by_domain.insert(own.to_string(), anchors(&state.bundle.roots));
        Ok(Self { by_domain })
    }

    /// Verifies `end_entity` for `usage` against the anchors of the trust
    /// domain of the SPIFFE ID it carries; returns that ID.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        algs: &rustls::crypto::WebPkiSupportedAlgorithms,
    ) -> Result<SpiffeId, Error> {
        let id = peer_id(end_entity)?;
        let anchors = self
            .by_domain
            .get(id.trust_domain())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| PeerError::UnknownTrustDomain(id.trust_domain().to_string()))?;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(algs.all, anchors, intermediates, now, usage, None, None)
            .map_err(webpki_error)?;
        Ok(id)
    }
}

/// Why a peer certificate names no trust domain we can check it against.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    /// Not exactly one URI SAN, or not a valid SPIFFE ID (X509-SVID 2, 5.2).
    #[error("the peer certificate carries no valid SPIFFE ID: {0}")]
    NoSpiffeId(String),
    /// A trust domain we hold no bundle for: untrusted (Workload API 4.6).
    #[error("no trust bundle for the peer's trust domain {0:?}")]
    UnknownTrustDomain(String),
}

impl From<PeerError> for Error {
    fn from(e: PeerError) -> Self {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// The SPIFFE ID of a leaf: its one URI SAN, parsed.
fn peer_id(der: &[u8]) -> Result<SpiffeId, PeerError> {
    let bad = |m: &str| PeerError::NoSpiffeId(m.to_string());
    let (_, x) = X509Certificate::from_der(der).map_err(|e| bad(&e.to_string()))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| bad(&e.to_string()))?
        .ok_or_else(|| bad("no subject alternative name"))?;
    let mut uris = san.value.general_names.iter().filter_map(|g| match g {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) => u.parse::<SpiffeId>().map_err(|e| bad(&e.to_string())),
        (None, _) => Err(bad("no URI SAN")),
        (Some(_), Some(_)) => Err(bad("more than one URI SAN")),
    }
}

/// The inbound configuration: our certificate; clients must present one
/// that chains to the bundle of the trust domain their SPIFFE ID names.
pub(crate) fn server_config(state: &State) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = crate::tls::crypto_provider();
    let verifier = Arc::new(SpiffeClientVerifier {
        domains: TrustDomains::of(state)?,
        algs: provider.signature_verification_algorithms,
    });
    let (chain, key) = key_of(state)?;
    let c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("our certificate: {e}"))?;
    Ok(Arc::new(c))
}

/// The outbound configuration: our certificate as the client's; the server
/// must carry `expected` as its SPIFFE ID and chain to the bundle of that
/// ID's trust domain.
pub(crate) fn client_config(
    state: &State,
    expected: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = crate::tls::crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        domains: TrustDomains::of(state)?,
        expected: expected.to_string(),
        algs: provider.signature_verification_algorithms,
    });
    let (chain, key) = key_of(state)?;
    let c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("our certificate: {e}"))?;
    Ok(Arc::new(c))
}

/// Requires a client certificate and checks its chain against the bundle
/// of its SPIFFE ID's trust domain (the allow-list is checked afterwards).
#[derive(Debug)]
struct SpiffeClientVerifier {
    domains: TrustDomains,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Several trust domains' roots: hint none (clients send their SVID).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.domains.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            &self.algs,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Checks a server's SPIFFE ID against the expected one and its chain
/// against the bundle of its trust domain; the DNS name plays no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    domains: TrustDomains,
    expected: String,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

/// Why a server failed the SPIFFE ID check (carried in `Error::General`).
pub(crate) const IDENTITY_MISMATCH: &str = "peer SPIFFE ID is not the expected one";

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = self.domains.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            &self.algs,
        )?;
        if id.as_str() == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::General(format!(
                "{IDENTITY_MISMATCH}: {id}, expected {}",
                self.expected
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A short, stable reason for a failed handshake (a metric label).
pub(crate) fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "peer_closed"
            }
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io_error",
        };
    };
    match tls {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::Other(o)) => {
            match o.0.downcast_ref::<PeerError>() {
                Some(PeerError::UnknownTrustDomain(_)) => "unknown_trust_domain",
                Some(PeerError::NoSpiffeId(_)) => "no_spiffe_id",
                None => "bad_certificate",
            }
        }
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::General(m) if m.starts_with(IDENTITY_MISMATCH) => "identity_mismatch",
        Error::AlertReceived(_) => "peer_rejected",
        _ => "tls_error",
    }
}

#[cfg(test)]
#[path = "spiffe_tls_tests.rs"]
mod tests;
