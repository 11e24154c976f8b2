//! Certificate profiles: what a root, an issuer and a workload leaf contain.
//!
//! Owns: the X.509 content of every certificate meshca makes (RFC 5280 and
//! the SPIFFE X509-SVID profile). Plain data builders; signing happens in the
//! caller. Must not: validate requests or read the clock (times come in).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType, SerialNumber,
};

/// A fresh random positive serial of 128 bits (RFC 5280 §4.1.2.2 allows up to 20 octets).
pub(crate) fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    // Positive and always 16 octets long, so serials sort and print uniformly.
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshca");
    dn.push(DnType::CommonName, cn);
    dn
}

/// A self-signed root: CA, any path length below it, keyCertSign + cRLSign.
pub(crate) fn root(cn: &str, not_before: SystemTime, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.serial_number = Some(random_serial());
    p.not_before = not_before.into();
    p.not_after = crate::util::clock::add_clamped(not_before, lifetime).into();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// An issuing intermediate: CA with pathlen 0 (it signs only leaves).
pub(crate) fn issuer(cn: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.serial_number = Some(random_serial());
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A workload leaf (an X509-SVID): empty subject, so the SAN extension is
/// critical; exactly one URI SAN (the SPIFFE ID) plus the DNS identity and any
/// extra DNS names; CA:false; digitalSignature (+ keyEncipherment for RSA
/// keys); serverAuth + clientAuth; SKI and AKI.
pub(crate) fn leaf(
    spiffe_id: &str,
    dns_names: &[&str],
    rsa_key: bool,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.serial_number = Some(random_serial());
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if rsa_key {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    for d in dns_names {
        p.subject_alt_names.push(SanType::DnsName((*d).try_into()?));
    }
    Ok(p)
}
