//! The SPIFFE bundle document a federated trust domain's endpoint serves
//! (`trust::spiffe_bundle::SpiffeBundle::parse`): arbitrary bytes and
//! mutations of valid bundles never panic, stay within the memory budget,
//! and whatever parses writes back to a document that parses to the same
//! bundle (no half-understood key survives).

use std::time::Duration;

use meshca::ca::JwtPublicKey;
use meshca::identity::TrustDomain;
use meshca::trust::spiffe_bundle::{BundleError, SpiffeBundle, MAX_DOCUMENT_BYTES};
use proptest::prelude::*;
use rcgen::PublicKeyData as _;

use super::harness::{bytes, cases, measure, mutated};

const FIXED: usize = 64 * 1024;

fn td() -> TrustDomain {
    "b.example".parse().expect("trust domain")
}

fn seeds() -> Vec<Vec<u8>> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://b.example".try_into().expect("uri"),
    )];
    let root = p.self_signed(&key).expect("root").der().clone();
    let jwt = rcgen::KeyPair::generate().expect("key");
    let b = SpiffeBundle {
        x509_authorities: vec![root],
        jwt_keys: vec![JwtPublicKey {
            key_id: "kid-1".into(),
            spki_der: jwt.subject_public_key_info(),
            expires_at: None,
        }],
        sequence: Some(3),
        refresh_hint: Some(Duration::from_secs(300)),
    };
    let full = b.to_json().expect("json").into_bytes();
    let empty = br#"{"keys": [], "spiffe_sequence": 1}"#.to_vec();
    vec![full, empty]
}

fn check(input: &[u8]) -> Result<(), TestCaseError> {
    let (out, cost) = measure(|| SpiffeBundle::parse(input, &td()));
    cost.check("SPIFFE bundle", input.len(), FIXED)?;
    match out {
        Ok(b) => {
            // What we adopted, we can publish again, and it means the same.
            let again = b.to_json().expect("an adopted bundle re-encodes");
            let back = SpiffeBundle::parse(again.as_bytes(), &td());
            prop_assert_eq!(back.as_ref(), Ok(&b));
        }
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            if input.len() > MAX_DOCUMENT_BYTES {
                let too_large = matches!(e, BundleError::TooLarge { .. });
                prop_assert!(too_large);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn spiffe_bundle_arbitrary_bytes(input in bytes(4096)) {
        check(&input)?;
    }

    #[test]
    fn spiffe_bundle_mutated(seed_and_text in mutated(seeds())) {
        check(&seed_and_text.1)?;
    }
}
