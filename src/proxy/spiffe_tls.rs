//! rustls configurations that authenticate peers by SPIFFE ID.
//!
//! Owns: building the inbound (server, client certificate required and
//! chained to the bundle) and outbound (client, server must present the
//! expected SPIFFE ID) rustls configurations from the agent's current
//! certificate and bundle, the outbound verifier that checks the chain with
//! rustls-webpki and the URI SAN instead of a DNS name (as the X509-SVID
//! specification prescribes), and naming why a handshake failed. Must not:
//! move bytes or decide allow-lists.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

use crate::agent::State;

fn key_of(state: &State) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let svid = state.svid.as_ref().ok_or("no certificate yet")?;
    Ok((
        svid.chain.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.expose().to_vec())),
    ))
}

/// The inbound configuration: our certificate; clients must present one
/// that chains to the bundle.
pub(crate) fn server_config(state: &State) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = crate::tls::crypto_provider();
    let roots = crate::tls::root_store(&state.bundle.roots);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("client verifier: {e}"))?;
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
/// must chain to the bundle and carry `expected` as its SPIFFE ID.
pub(crate) fn client_config(
    state: &State,
    expected: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = crate::tls::crypto_provider();
    let anchors: Vec<_> = state
        .bundle
        .roots
        .iter()
        .filter_map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    let verifier = Arc::new(SpiffeServerVerifier {
        anchors,
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

/// Checks a server's chain against the bundle and its SPIFFE ID against the
/// expected one; the DNS name plays no part.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
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
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        match crate::ca::uri_san(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(Error::General(format!(
                "{IDENTITY_MISMATCH}: {id}, expected {}",
                self.expected
            ))),
            None => Err(Error::General(format!("{IDENTITY_MISMATCH}: none"))),
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
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::General(m) if m.starts_with(IDENTITY_MISMATCH) => "identity_mismatch",
        Error::AlertReceived(_) => "peer_rejected",
        _ => "tls_error",
    }
}
