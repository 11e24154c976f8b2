//! PEM (RFC 7468) text: the one encoder, and the decoders for the blocks
//! meshca reads (certificates, private keys).
//!
//! Owns: turning DER into PEM text and back. Decoding is rustls-pki-types'
//! `PemObject` (the maintained successor of the archived `rustls-pemfile`,
//! RUSTSEC-2025-0134); this module only gives its errors the wording
//! operators saw before. Must not: interpret what is inside a block (that is
//! `ca`), or touch files.

use base64::Engine;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use zeroize::Zeroizing;

/// Why PEM text could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// A `-----BEGIN X-----` without its `-----END X-----`.
    #[error("section end {0:?} missing")]
    MissingEnd(String),
    /// A line starting with `-----BEGIN ` that is not a well-formed start.
    #[error("illegal section start: {0:?}")]
    IllegalStart(String),
    /// The body of a block is not base64.
    #[error("{0}")]
    Base64(String),
    /// Anything else the decoder reports (a block over its size limit…).
    #[error("{0}")]
    Other(String),
}

impl From<pem::Error> for PemError {
    fn from(e: pem::Error) -> Self {
        // The wording of rustls-pemfile 2, which these messages replaced.
        match e {
            pem::Error::MissingSectionEnd { end_marker } => {
                Self::MissingEnd(String::from_utf8_lossy(&end_marker).into_owned())
            }
            pem::Error::IllegalSectionStart { line } => {
                Self::IllegalStart(String::from_utf8_lossy(&line).into_owned())
            }
            pem::Error::Base64Decode(s) => Self::Base64(s),
            other => Self::Other(format!("{other:?}")),
        }
    }
}

/// PEM-encodes `der` under `label` (`CERTIFICATE`, `CERTIFICATE REQUEST`,
/// `PRIVATE KEY`, …), 64 base64 characters a line.
///
/// The returned text is zeroized when dropped only if the caller wraps it;
/// use [`encode_secret`] for key material.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    write_block(label, &b64, &mut out);
    out
}

/// [`encode`] for key material: the intermediate base64 and the result are
/// zeroized when dropped.
pub(crate) fn encode_secret(label: &str, der: &[u8]) -> Zeroizing<String> {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    // Sized up front so the string never reallocates (a reallocation would
    // leave a copy of the key in freed memory).
    let mut out = Zeroizing::new(String::with_capacity(
        b64.len() + b64.len() / 64 + 2 * label.len() + 40,
    ));
    write_block(label, &b64, &mut out);
    out
}

fn write_block(label: &str, b64: &str, out: &mut String) {
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 is ASCII, so every 64-byte chunk is a char boundary.
    let mut rest = b64;
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// PEM-encodes one certificate.
pub fn certificate(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

/// Every `CERTIFICATE` block in `text`, in order (other blocks are skipped;
/// no block at all is an empty list, for the caller to judge).
pub fn certificates(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    // The reader iterator (not the slice one) keeps the line endings in
    // error messages exactly as rustls-pemfile reported them.
    CertificateDer::pem_reader_iter(text)
        .map(|r| r.map_err(PemError::from))
        .collect()
}

/// The first private key block (`PRIVATE KEY`, `EC PRIVATE KEY` or
/// `RSA PRIVATE KEY`) in `text`, or `None` when there is none.
pub fn private_key(text: &[u8]) -> Result<Option<PrivateKeyDer<'static>>, PemError> {
    match PrivateKeyDer::pem_reader_iter(text).next() {
        None => Ok(None),
        Some(r) => r.map(Some).map_err(PemError::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_rfc7468_and_round_trips() {
        // 100 bytes: 136 base64 characters.
        let der: Vec<u8> = (0..100u8).collect();
        let text = certificate(&der);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        // 136 base64 characters: two full lines and one of 8.
        assert_eq!(lines[2].len(), 64);
        assert_eq!(lines[3].len(), 8);
        assert_eq!(lines[4], "-----END CERTIFICATE-----");
        assert_eq!(lines.len(), 5);
        assert!(text.ends_with("-----\n"));
        assert_eq!(
            certificates(text.as_bytes()).unwrap(),
            vec![der.clone().into()]
        );
        // Exactly 48 bytes: one full line, no empty line after it.
        assert_eq!(encode("X", &[0; 48]).lines().count(), 3);
        assert_eq!(encode("X", &[]), "-----BEGIN X-----\n-----END X-----\n");
        assert_eq!(
            encode_secret("PRIVATE KEY", &der).as_str(),
            encode("PRIVATE KEY", &der)
        );
    }

    #[test]
    fn the_independent_parser_reads_what_we_write() {
        let der: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        for label in ["CERTIFICATE", "CERTIFICATE REQUEST", "PRIVATE KEY"] {
            let (_, p) = x509_parser::pem::parse_x509_pem(encode(label, &der).as_bytes()).unwrap();
            assert_eq!(p.label, label);
            assert_eq!(p.contents, der);
        }
    }

    #[test]
    fn decoding_skips_other_blocks_and_keeps_order() {
        let text = [
            encode("PRIVATE KEY", b"k"),
            certificate(b"one"),
            encode("X509 CRL", b"c"),
            certificate(b"two"),
        ]
        .concat();
        let certs = certificates(text.as_bytes()).unwrap();
        assert_eq!(certs, vec![b"one".to_vec().into(), b"two".to_vec().into()]);
        assert!(certificates(b"no pem here").unwrap().is_empty());
        match private_key(text.as_bytes()).unwrap() {
            Some(PrivateKeyDer::Pkcs8(k)) => assert_eq!(k.secret_pkcs8_der(), b"k"),
            other => panic!("{other:?}"),
        }
        assert!(private_key(certificate(b"c").as_bytes()).unwrap().is_none());
        let sec1 = encode("EC PRIVATE KEY", b"e");
        assert!(matches!(
            private_key(sec1.as_bytes()).unwrap(),
            Some(PrivateKeyDer::Sec1(_))
        ));
    }

    #[test]
    fn bad_pem_gets_the_specific_errors_operators_saw_before() {
        let truncated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert_eq!(
            certificates(truncated.as_bytes()).unwrap_err().to_string(),
            r#"section end "CERTIFICATE" missing"#
        );
        let bad_start = "-----BEGIN CERTIFICATE----\nAAAA\n";
        assert_eq!(
            certificates(bad_start.as_bytes()).unwrap_err().to_string(),
            r#"illegal section start: "-----BEGIN CERTIFICATE----\n""#
        );
        let bad_body = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            certificates(bad_body.as_bytes()),
            Err(PemError::Base64(_))
        ));
        assert!(matches!(
            private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n"),
            Err(PemError::MissingEnd(_))
        ));
    }
}
