//! Client-side helpers shared by `meshca certify`, `meshca bench` and tests:
//! connecting to the CA over TLS, making keys and CSRs locally, and verifying
//! a returned chain with rustls-webpki (an independent validator).
//!
//! Must not: reach into the server's state; everything here goes over the wire.

pub mod admin;

use std::time::SystemTime;

/// Why talking to a CA (or checking what it returned) failed.
///
/// `Unreachable` is the one to retry (or to point elsewhere); `BadAddress`
/// is the caller's input; `Chain` means the answer must not be trusted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server address does not parse.
    #[error("bad server address {addr:?}: {reason}")]
    BadAddress {
        /// What was given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TLS settings (bundle, client identity) are unusable.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// No connection, or no answer in time.
    #[error("{0}")]
    Unreachable(String),
    /// Making the local key or CSR failed.
    #[error("{0}")]
    Key(String),
    /// The returned chain does not verify to the trusted roots.
    #[error("{0}")]
    Chain(String),
}

impl ClientError {
    /// True when the server could not be reached (worth retrying later or
    /// elsewhere), as opposed to a refusal or unusable input.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable(_))
    }
}

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, UnixTime};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Connects to `addr` (`host:port`) over TLS, trusting the PEM `bundle` and
/// expecting the server certificate to carry `server_name`. With `identity`
/// (cert chain PEM, key PEM) the connection is mTLS.
pub async fn connect(
    addr: &str,
    bundle_pem: &str,
    server_name: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, ClientError> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle_pem))
        .domain_name(server_name);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let url = if addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("https://{addr}")
    };
    Endpoint::from_shared(url)
        .map_err(|e| ClientError::BadAddress {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?
        .tls_config(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable(format!("cannot connect to {addr}: {e:?}")))
}

/// A fresh P-256 key and a DER CSR for it, naming `dns` (CN and DNS SAN) when given.
pub fn new_key_and_csr(dns: Option<&str>) -> Result<(KeyPair, Vec<u8>), ClientError> {
    let key_err = |e: rcgen::Error| ClientError::Key(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(key_err)?;
    let mut params = match dns {
        Some(d) => CertificateParams::new(vec![d.to_string()]).map_err(key_err)?,
        None => CertificateParams::default(),
    };
    params.distinguished_name = DistinguishedName::new();
    if let Some(d) = dns {
        params.distinguished_name.push(rcgen::DnType::CommonName, d);
    }
    let csr = params.serialize_request(&key).map_err(key_err)?;
    Ok((key, csr.der().to_vec()))
}

/// Verifies `leaf` through `intermediates` to one of `roots` at `now` for
/// both client and server use, with rustls-webpki.
pub fn verify_chain(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: SystemTime,
) -> Result<(), ClientError> {
    let bad = |e: String| ClientError::Chain(e);
    let leaf = CertificateDer::from(leaf.to_vec());
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| bad(format!("leaf: {e}")))?;
    let root_ders: Vec<CertificateDer<'static>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.clone()))
        .collect();
    let anchors: Result<Vec<_>, _> = root_ders
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect();
    let anchors = anchors.map_err(|e| bad(format!("trust anchor: {e}")))?;
    let inter: Vec<CertificateDer<'static>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let t = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|e| bad(e.to_string()))?,
    );
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inter,
            t,
            usage,
            None,
            None,
        )
        .map_err(|e| bad(format!("chain does not verify: {e}")))?;
    }
    Ok(())
}
