//! Certificate profiles: what a root, an issuer and a workload leaf contain.
//!
//! Owns: the X.509 content of every certificate meshca makes (RFC 5280 and
//! the SPIFFE X509-SVID profile). Plain data builders; signing happens in the
//! caller. Must not: validate requests or read the clock (times come in).

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
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

/// The attribute type x500UniqueIdentifier (X.520, OID 2.5.4.45).
const X500_UNIQUE_IDENTIFIER: [u64; 4] = [2, 5, 4, 45];

/// RFC 5280 Appendix A: `ub-organization-name INTEGER ::= 64`.
const UB_ORGANIZATION_NAME: usize = 64;

/// The subject of every leaf: `O=<trust domain>, x500UniqueIdentifier=<id>`
/// where `<id>` is the hex of the first 16 bytes of SHA-256(SPIFFE ID).
///
/// Why not empty (as the X509-SVID spec allows): parsers that cannot
/// decode an empty SEQUENCE reject such certificates — linkerd2-proxy's
/// SPIRE mode (the `simple_asn1` crate) fails on every SVID with "empty
/// buffer decoding ASN1 block". Why these attributes: the subject must say
/// nothing the SANs do not (authorizers use the URI SAN only, X509-SVID §2),
/// and RFC 5280 §4.1.2.6 wants a non-empty DN unique per subject entity of
/// one CA, so a constant like SPIRE's default `C=US, O=SPIRE` would not do.
/// The unique identifier is the one go-spiffe's
/// `x509svid.UniqueIDAttribute` defines (SPIRE set it on workload SVIDs in
/// 1.4.2–1.8): a function of the SPIFFE ID, so it is the same across
/// renewals of one identity and different between identities, and it
/// leaks nothing. X.520 types the attribute as a BIT STRING; SPIFFE tooling
/// writes the hex as a PrintableString and we match what it writes.
/// The trust domain is dropped from `O` when longer than RFC 5280's upper
/// bound (trust domains may be 255 characters), never truncated.
fn leaf_subject(spiffe_id: &str) -> Result<DistinguishedName, rcgen::Error> {
    let mut dn = DistinguishedName::new();
    if let Some(td) = trust_domain_of(spiffe_id).filter(|td| td.len() <= UB_ORGANIZATION_NAME) {
        dn.push(DnType::OrganizationName, td);
    }
    dn.push(
        DnType::CustomDnType(X500_UNIQUE_IDENTIFIER.to_vec()),
        DnValue::PrintableString(unique_id(spiffe_id).try_into()?),
    );
    Ok(dn)
}

/// hex(SHA-256(SPIFFE ID)[..16]): 32 lowercase hex digits.
fn unique_id(spiffe_id: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, spiffe_id.as_bytes());
    hex::encode(&d.as_ref()[..16])
}

/// `td` of `spiffe://td/path`, if `spiffe_id` has that form.
fn trust_domain_of(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    (!td.is_empty()).then_some(td)
}

/// A workload leaf (an X509-SVID): the subject of [`leaf_subject`] (never
/// empty), so the SAN extension is NOT critical (RFC 5280 §4.2.1.6: critical
/// only with an empty subject; rcgen decides this from the subject);
/// exactly one URI SAN (the SPIFFE ID) plus the DNS identity and any extra
/// DNS names; CA:false; digitalSignature (+ keyEncipherment for RSA keys);
/// serverAuth + clientAuth; SKI and AKI.
pub(crate) fn leaf(
    spiffe_id: &str,
    dns_names: &[&str],
    rsa_key: bool,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = leaf_subject(spiffe_id)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn leaf_der(spiffe_id: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let now = SystemTime::now();
        leaf(
            spiffe_id,
            &["web.example"],
            false,
            now,
            now + Duration::from_secs(60),
        )
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .der()
        .to_vec()
    }

    /// (attribute OID, value as a string) of every subject attribute.
    fn subject(der: &[u8]) -> Vec<(String, String)> {
        let (_, x) = X509Certificate::from_der(der).unwrap();
        x.subject()
            .iter_attributes()
            .map(|a| {
                (
                    a.attr_type().to_id_string(),
                    a.as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn san_critical(der: &[u8]) -> bool {
        let (_, x) = X509Certificate::from_der(der).unwrap();
        x.subject_alternative_name().unwrap().unwrap().critical
    }

    #[test]
    fn leaf_subject_is_trust_domain_and_hash_of_the_spiffe_id() {
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let der = leaf_der(id);
        let want =
            hex::encode(&ring::digest::digest(&ring::digest::SHA256, id.as_bytes()).as_ref()[..16]);
        assert_eq!(
            subject(&der),
            vec![
                ("2.5.4.10".to_string(), "cluster.local".to_string()),
                ("2.5.4.45".to_string(), want),
            ]
        );
        // RFC 5280 §4.2.1.6: non-empty subject -> SAN not critical.
        assert!(!san_critical(&der));
        // Stable per identity, distinct between identities (RFC 5280 §4.1.2.6).
        assert_eq!(subject(&leaf_der(id)), subject(&der));
        assert_ne!(
            subject(&leaf_der("spiffe://cluster.local/ns/shop/sa/api")),
            subject(&der)
        );
    }

    #[test]
    fn overlong_trust_domain_is_left_out_not_truncated() {
        let td = format!("{}.example", "a".repeat(60));
        let der = leaf_der(&format!("spiffe://{td}/ns/a/sa/b"));
        let s = subject(&der);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].0, "2.5.4.45");
        assert!(!san_critical(&der));
    }

    #[test]
    fn trust_domain_parsing() {
        assert_eq!(trust_domain_of("spiffe://td/x"), Some("td"));
        assert_eq!(trust_domain_of("spiffe://td"), Some("td"));
        assert_eq!(trust_domain_of("spiffe:///x"), None);
        assert_eq!(trust_domain_of("https://td/x"), None);
    }
}
