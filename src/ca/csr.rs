//! Certificate signing requests: parsing, proof of possession and what a CSR
//! may ask for.
//!
//! Owns: turning untrusted CSR bytes into a [`ValidatedCsr`] — the signature
//! verified with the CSR's own key, the key type and size allowed, and every
//! requested name and constraint inspected. Must not: decide which names a
//! caller is entitled to beyond comparing against the [`AllowedNames`] it is
//! handed (those come from authentication).

use x509_parser::der_parser::oid;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

use super::CaError;

/// The largest CSR accepted, in bytes (DER or PEM).
pub(crate) const MAX_CSR_BYTES: usize = 16 * 1024;

/// The kind of public key in a CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with this modulus size in bits (2048–4096).
    Rsa(usize),
}

/// The names the authenticated caller may appear under in its certificate.
#[derive(Debug, Clone)]
pub struct AllowedNames<'a> {
    /// The mesh DNS identity.
    pub dns: &'a str,
    /// The SPIFFE ID.
    pub uri: &'a str,
}

/// A CSR that passed every check.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    /// The requester's DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// The requester's key type.
    pub key: KeyKind,
}

/// Decodes a PEM CSR (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`) to DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, CaError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CaError::CsrTooLarge(pem.len()));
    }
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| CaError::MalformedCsr(format!("not a PEM block: {e}")))?;
    if p.label != "CERTIFICATE REQUEST" && p.label != "NEW CERTIFICATE REQUEST" {
        return Err(CaError::MalformedCsr(format!(
            "PEM block is {:?}, expected CERTIFICATE REQUEST",
            p.label
        )));
    }
    Ok(p.contents)
}

/// Parses and checks a DER CSR against the names the caller may use.
pub fn validate(der: &[u8], allowed: &AllowedNames<'_>) -> Result<ValidatedCsr, CaError> {
    if der.is_empty() {
        return Err(CaError::MalformedCsr("the CSR is empty".into()));
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(CaError::CsrTooLarge(der.len()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CaError::MalformedCsr(format!("not a DER PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::MalformedCsr(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let key = key_kind(&info.subject_pki)?;
    // Proof of possession: the requester holds the private key.
    csr.verify_signature().map_err(|e| {
        CaError::BadCsrSignature(format!(
            "the CSR signature does not verify with its key: {e}"
        ))
    })?;

    // Subject: a common name, if any, must be one of the caller's names.
    for cn in info.subject.iter_common_name() {
        let cn = cn
            .as_str()
            .map_err(|_| CaError::MalformedCsr("subject CN is not a string".into()))?;
        if cn != allowed.dns && cn != allowed.uri {
            return Err(CaError::NameNotAllowed(format!("subject CN {cn:?}")));
        }
    }

    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        check_name(name, allowed)?;
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CaError::CaRequested("basicConstraints CA:true".into()));
                }
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(CaError::CaRequested("keyUsage keyCertSign/cRLSign".into()));
                }
                ParsedExtension::NameConstraints(_) => {
                    return Err(CaError::CaRequested("nameConstraints".into()));
                }
                ParsedExtension::ParseError { error } => {
                    return Err(CaError::MalformedCsr(format!(
                        "a requested extension does not parse: {error}"
                    )));
                }
                // Other requested extensions (EKU, key usage for signing…) are
                // ignored: the leaf profile is the CA's, not the requester's.
                _ => {}
            }
        }
    }

    Ok(ValidatedCsr {
        spki_der: canonical_spki(info.subject_pki.raw)?,
        key,
    })
}

/// The key goes into the certificate and its SHA-256 into the audit log, so
/// accept it only in its DER form: x509-parser also reads some non-DER
/// encodings (e.g. the algorithm OID under another tag class), which the
/// signature then covers, and the audit record would name a key hash that
/// is not the certificate's. Found by the re-signed CSR property tests.
fn canonical_spki(raw: &[u8]) -> Result<Vec<u8>, CaError> {
    use rcgen::PublicKeyData;
    let canonical = rcgen::SubjectPublicKeyInfo::from_der(raw)
        .map_err(|e| CaError::UnsupportedKey(format!("public key: {e}")))?
        .subject_public_key_info();
    if canonical != raw {
        return Err(CaError::MalformedCsr(
            "the public key is not DER-encoded; encode the request in DER".into(),
        ));
    }
    Ok(canonical)
}

fn check_name(name: &GeneralName<'_>, allowed: &AllowedNames<'_>) -> Result<(), CaError> {
    match name {
        GeneralName::DNSName(d) if *d == allowed.dns => Ok(()),
        GeneralName::URI(u) if *u == allowed.uri => Ok(()),
        GeneralName::DNSName(d) => Err(CaError::NameNotAllowed(format!("DNS SAN {d:?}"))),
        GeneralName::URI(u) => Err(CaError::NameNotAllowed(format!("URI SAN {u:?}"))),
        GeneralName::IPAddress(ip) => Err(CaError::NameNotAllowed(format!(
            "IP SAN {}",
            hex::encode(ip)
        ))),
        GeneralName::RFC822Name(e) => Err(CaError::NameNotAllowed(format!("email SAN {e:?}"))),
        other => Err(CaError::NameNotAllowed(format!("SAN {other}"))),
    }
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CaError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == oid!(1.2.840 .10045 .2 .1) {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CaError::UnsupportedKey("EC key without a named curve".into()))?;
        if curve == oid!(1.2.840 .10045 .3 .1 .7) {
            Ok(KeyKind::EcdsaP256)
        } else if curve == oid!(1.3.132 .0 .34) {
            Ok(KeyKind::EcdsaP384)
        } else {
            Err(CaError::UnsupportedKey(format!(
                "EC curve {curve} (use P-256 or P-384)"
            )))
        }
    } else if *alg == oid!(1.3.101 .112) {
        Ok(KeyKind::Ed25519)
    } else if *alg == oid!(1.2.840 .113549 .1 .1 .1) {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => {
                return Err(CaError::MalformedCsr(
                    "RSA public key does not parse".into(),
                ))
            }
        };
        if !(2048..=4096).contains(&bits) {
            return Err(CaError::UnsupportedKey(format!(
                "RSA {bits}-bit key (use 2048 to 4096 bits)"
            )));
        }
        Ok(KeyKind::Rsa(bits))
    } else {
        Err(CaError::UnsupportedKey(format!(
            "key algorithm {alg} (use ECDSA P-256/P-384, Ed25519 or RSA 2048-4096)"
        )))
    }
}
