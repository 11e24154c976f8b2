//! The https_spiffe check of a bundle endpoint (Federation §5.2.2.4): the
//! server's certificate is a valid X509-SVID (a leaf, one URI SAN) whose
//! SPIFFE ID is exactly the configured `endpoint_spiffe_id`, and its chain
//! verifies to the bundle held for that ID's trust domain. The host name
//! is not checked: in this profile the SPIFFE ID is the server's identity.
//!
//! Must not: pick which bundle authenticates the endpoint (the follower does).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::SpiffeId;

/// Why an https_spiffe endpoint was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EndpointError {
    /// The certificate carries no single valid SPIFFE ID, or is a CA.
    #[error("the endpoint's certificate is not an X509-SVID: {0}")]
    NotSvid(String),
    /// The SVID names another SPIFFE ID.
    #[error("the endpoint presented {found}, not the configured endpoint_spiffe_id {expected}")]
    WrongId {
        /// Configured.
        expected: String,
        /// Presented.
        found: String,
    },
}

impl From<EndpointError> for Error {
    fn from(e: EndpointError) -> Self {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    }
}

/// Verifies the endpoint's SVID against `anchors` and `expected`.
#[derive(Debug)]
pub(crate) struct SpiffeEndpointVerifier {
    pub(crate) expected: SpiffeId,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
    pub(crate) algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl SpiffeEndpointVerifier {
    /// From the roots of the endpoint's trust domain.
    pub(crate) fn new(expected: SpiffeId, roots: &[CertificateDer<'static>]) -> Self {
        let anchors = roots
            .iter()
            .filter_map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect();
        Self {
            expected,
            anchors,
            algs: crate::tls::crypto_provider().signature_verification_algorithms,
        }
    }
}

/// The one SPIFFE ID of a leaf X509-SVID (X509-SVID §5.2).
fn svid_id(der: &[u8]) -> Result<String, EndpointError> {
    let bad = |m: &str| EndpointError::NotSvid(m.to_string());
    let (_, x) = X509Certificate::from_der(der).map_err(|e| bad(&e.to_string()))?;
    if x.is_ca() {
        return Err(bad("it is a CA certificate"));
    }
    let san = x
        .subject_alternative_name()
        .map_err(|e| bad(&e.to_string()))?
        .ok_or_else(|| bad("no subject alternative name"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [u] => u
            .parse::<SpiffeId>()
            .map(|id| id.to_string())
            .map_err(|e| bad(&e.to_string())),
        [] => Err(bad("no URI SAN")),
        _ => Err(bad("more than one URI SAN")),
    }
}

impl ServerCertVerifier for SpiffeEndpointVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let found = svid_id(end_entity)?;
        if found != self.expected.as_str() {
            return Err(EndpointError::WrongId {
                expected: self.expected.to_string(),
                found,
            }
            .into());
        }
        if self.anchors.is_empty() {
            return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        ee.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::UnknownIssuer => {
                Error::InvalidCertificate(CertificateError::UnknownIssuer)
            }
            webpki::Error::CertExpired { .. } => {
                Error::InvalidCertificate(CertificateError::Expired)
            }
            other => Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(other),
            ))),
        })?;
        Ok(ServerCertVerified::assertion())
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

/// The last certificate refusal of one fetch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refusal(Arc<std::sync::Mutex<Option<String>>>);

impl Refusal {
    fn set(&self, e: &Error) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// The refusal, if there was one.
    pub(crate) fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// A verifier that records what it refuses (see [`Refusal`]).
#[derive(Debug)]
pub(crate) struct Recording {
    pub(crate) inner: Arc<dyn ServerCertVerifier>,
    pub(crate) refusal: Refusal,
}

impl Recording {
    fn note<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            self.refusal.set(e);
        }
        r
    }
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.note(
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.note(self.inner.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.note(self.inner.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
