//! PEM and DER imports: private keys (`CaKey::from_pem`: PKCS#8, SEC1,
//! PKCS#1, re-wrapped for ring), certificate PEM (`pem_to_certs`, as for
//! bundles, roots and the issuer Secret's `tls.crt`), an issuer certificate
//! paired with its key (`ActiveIssuer::new`), the root import of `init` and
//! `rotation prepare` (`store::import_root`), and the certificate helpers
//! run on peer certificates (`uri_san`, `signed_by`).

use std::time::SystemTime;

use meshca::ca::store::{import_root, StoreError};
use meshca::ca::{pem_to_certs, signed_by, uri_san, ActiveIssuer, CaError, CaKey};
use meshca::util::secret::SecretBytes;
use proptest::prelude::*;
use rustls::pki_types::CertificateDer;

use super::csr::pem;
use super::fixtures::world;
use super::harness::{bytes, cases, measure, mutated};

const FIXED: usize = 128 * 1024;

/// (label, DER) of valid keys in every accepted form.
fn key_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |text: &str| {
        let p = x509_parser::pem::parse_x509_pem(text.as_bytes())
            .expect("seed PEM")
            .1;
        out.push((p.label, p.contents));
    };
    add(std::str::from_utf8(CaKey::generate_p256().expect("key").to_pem().expose()).expect("utf8"));
    add(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .expect("key")
            .serialize_pem(),
    );
    add(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .expect("key")
        .serialize_pem());
    add(include_str!("../../src/ca/testdata/rsa2048-pkcs1.pem"));
    add(include_str!("../../src/ca/testdata/rsa2048-pkcs8.pem"));
    add(include_str!("../testdata/ec-p256-sec1.pem"));
    add(include_str!("../testdata/ec-p384-sec1.pem"));
    out
}

fn check_key(text: &[u8]) -> Result<(), TestCaseError> {
    let (r, cost) = measure(|| CaKey::from_pem(&SecretBytes::new(text.to_vec())));
    cost.check("CaKey::from_pem", text.len(), FIXED)?;
    if let Ok(k) = r {
        // What loads is a usable key, not a half-parsed one.
        prop_assert!(!k.spki_der().is_empty());
        prop_assert!(rcgen::SigningKey::sign(&k, b"probe").is_ok());
    }
    // The error type is rcgen::Error by signature; its text names the problem.
    Ok(())
}

fn cert_seeds() -> Vec<Vec<u8>> {
    let w = world();
    let mut v: Vec<Vec<u8>> = w.ca.issuer().chain.iter().map(|c| c.to_vec()).collect();
    v.extend(w.ca.bundle().roots.iter().map(|c| c.to_vec()));
    v
}

fn check_cert_der(der: &[u8]) -> Result<(), TestCaseError> {
    let w = world();
    let root = w.ca.bundle().roots[0].to_vec();
    let (r, cost) = measure(|| {
        let _ = uri_san(der);
        let signed = signed_by(der, &root);
        let key = CaKey::from_pem(&w.issuer_key).expect("issuer key");
        let issuer = ActiveIssuer::new(vec![CertificateDer::from(der.to_vec())], key);
        (signed, issuer)
    });
    cost.check("certificate checks", der.len(), FIXED)?;
    let (_signed, issuer) = r;
    match issuer {
        Ok(i) => {
            // Accepted only when the certificate really carries the key.
            use x509_parser::prelude::FromDer;
            let (_, c) = x509_parser::certificate::X509Certificate::from_der(der)
                .map_err(|e| TestCaseError::fail(format!("accepted but does not parse: {e}")))?;
            let spki = CaKey::from_pem(&w.issuer_key)
                .expect("issuer key")
                .spki_der();
            prop_assert_eq!(c.public_key().raw, spki.as_slice());
            prop_assert_eq!(i.fingerprint.len(), 64);
        }
        Err(e) => prop_assert!(
            matches!(e, CaError::IssuerUnusable(_) | CaError::Signing(_)),
            "{e:?}"
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn key_pem_arbitrary(b in bytes(20_000)) {
        check_key(&b)?;
    }

    #[test]
    fn key_pem_text_mutated(seed_and_text in mutated(
        key_seeds().iter().map(|(l, d)| pem(l, d).into_bytes()).collect()
    )) {
        check_key(&seed_and_text.1)?;
    }

    #[test]
    fn key_der_mutated_under_its_label(
        seed_and_der in mutated(key_seeds().into_iter().map(|(_, d)| d).collect()),
    ) {
        // Mutate the DER, not the base64, so the SEC1/PKCS#1 re-wrapping
        // and ring's parsers see broken structures, not broken PEM.
        let (i, der) = seed_and_der;
        let label = key_seeds()[i].0.clone();
        check_key(pem(&label, &der).as_bytes())?;
    }

    #[test]
    fn certificate_pem_arbitrary(b in bytes(20_000)) {
        let (r, cost) = measure(|| pem_to_certs(&b));
        cost.check("pem_to_certs", b.len(), FIXED)?;
        if let Ok(certs) = r {
            prop_assert!(!certs.is_empty());
        }
    }

    #[test]
    fn certificate_der_mutated(seed_and_der in mutated(cert_seeds())) {
        check_cert_der(&seed_and_der.1)?;
    }

    #[test]
    fn certificate_pem_mutated(seed_and_text in mutated(
        cert_seeds().iter().map(|d| pem("CERTIFICATE", d).into_bytes()).collect()
    )) {
        let (r, cost) = measure(|| pem_to_certs(&seed_and_text.1));
        cost.check("pem_to_certs", seed_and_text.1.len(), FIXED)?;
        if let Ok(certs) = r {
            for c in certs {
                check_cert_der(&c)?;
            }
        }
    }
}

proptest! {
    // Each case writes two files.
    #![proptest_config(cases(500))]

    #[test]
    fn root_import_mutated(
        cert in mutated(vec![pem("CERTIFICATE", &cert_seeds()[1]).into_bytes()]),
        key_i in 0..7usize,
        key_muts in super::harness::mutations(),
        mutate_key in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = (dir.path().join("root.crt"), dir.path().join("root.key"));
        std::fs::write(&c, &cert.1).expect("write");
        let (label, der) = key_seeds()[key_i].clone();
        let der = if mutate_key { super::harness::apply(der, &key_muts) } else { der };
        std::fs::write(&k, pem(&label, &der)).expect("write");
        let (r, cost) = measure(|| import_root(&c, &k, SystemTime::now()));
        cost.check("import_root", cert.1.len() + der.len(), FIXED)?;
        match r {
            // The CA's own root with a random key never imports.
            Ok(_) => prop_assert!(false, "a root was imported with a key that is not its own"),
            Err(e) => prop_assert!(matches!(e, StoreError::Invalid { .. }), "{e:?}"),
        }
    }
}

/// Found by `key_der_mutated_under_its_label`: ring loads an RSA key whose
/// CRT values were damaged and then fails every signature; the public half
/// still matches the certificate, so such an issuer key (from a file or the
/// issuer Secret) was accepted and would have stopped all issuance. Every
/// single-bit flip across the key must now be refused at load or sign.
#[test]
fn regression_a_damaged_rsa_key_is_refused_at_load() {
    let text = include_str!("../../src/ca/testdata/rsa2048-pkcs1.pem");
    let der = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .unwrap()
        .1
        .contents;
    let mut refused = 0;
    for i in (300..der.len()).step_by(3) {
        let mut d = der.clone();
        d[i] ^= 0x10;
        match CaKey::from_pem(&SecretBytes::new(pem("RSA PRIVATE KEY", &d).into_bytes())) {
            Ok(k) => assert!(
                rcgen::SigningKey::sign(&k, b"probe").is_ok(),
                "byte {i}: a key that loads must sign"
            ),
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    assert!(refused > 0);
}
