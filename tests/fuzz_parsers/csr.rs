//! CSR DER and PEM (`ca::csr`): arbitrary bytes and mutated valid requests
//! give a typed `CaError` that maps to INVALID_ARGUMENT or
//! PERMISSION_DENIED, in bounded time and memory; a mutated request is
//! accepted only with the key of the request it came from (proof of
//! possession cannot be bypassed by re-encoding).

use meshca::api::ApiError;
use meshca::ca::csr::{self, AllowedNames};
use meshca::ca::CaError;
use proptest::prelude::*;
use tonic::Code;
use x509_parser::prelude::FromDer;

use super::fixtures::{
    csr_parts, csr_seeds, csr_seeds_with_keys, resign, GOOD_CSRS, WEB_DNS, WEB_URI,
};
use super::harness::{bytes, cases, measure, mutated, mutations};

const ALLOWED: AllowedNames<'static> = AllowedNames {
    dns: WEB_DNS,
    uri: WEB_URI,
};

/// What validating one CSR may need whatever its size (an RSA verify).
const FIXED: usize = 256 * 1024;

fn spki_of(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .expect("seed parses");
    c.certification_request_info.subject_pki.raw.to_vec()
}

/// The outcome must be a CSR error with a client-error code.
fn check_refusal(e: CaError) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(
            e,
            CaError::MalformedCsr(_)
                | CaError::CsrTooLarge(_)
                | CaError::BadCsrSignature(_)
                | CaError::UnsupportedKey(_)
                | CaError::NameNotAllowed(_)
                | CaError::CaRequested(_)
        ),
        "not a CSR error: {e:?}"
    );
    let code = ApiError::Ca(e).code();
    prop_assert!(
        matches!(code, Code::InvalidArgument | Code::PermissionDenied),
        "{code:?}"
    );
    Ok(())
}

fn check_der(der: &[u8], seed: Option<usize>) -> Result<(), TestCaseError> {
    let (r, cost) = measure(|| csr::validate(der, &ALLOWED));
    cost.check("csr::validate", der.len(), FIXED)?;
    match r {
        Err(e) => check_refusal(e)?,
        Ok(v) => {
            if let Some(i) = seed {
                // Anything accepted after a mutation still carries, and was
                // signed by, the seed's own key.
                prop_assert!(i < GOOD_CSRS, "seed {i} is refused by policy");
                prop_assert_eq!(v.spki_der, spki_of(&csr_seeds()[i]));
            }
        }
    }
    Ok(())
}

/// A re-signed mutation may be accepted whatever its seed (a mutation can
/// remove the foreign name), but then, checked independently of
/// `validate`: the key is the one that signed, every requested name is the
/// caller's own, and no CA powers are asked for.
fn check_resigned(der: &[u8], seed: usize) -> Result<(), TestCaseError> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let (r, cost) = measure(|| csr::validate(der, &ALLOWED));
    cost.check("csr::validate", der.len(), FIXED)?;
    let v = match r {
        Err(e) => return check_refusal(e),
        Ok(v) => v,
    };
    prop_assert_eq!(&v.spki_der, &spki_of(&csr_seeds()[seed]));
    let (_, c) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| TestCaseError::fail(format!("accepted but does not parse: {e}")))?;
    for ext in c.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    let ok = matches!(n, GeneralName::DNSName(d) if *d == WEB_DNS)
                        || matches!(n, GeneralName::URI(u) if *u == WEB_URI);
                    prop_assert!(ok, "accepted a request for {n:?}");
                }
            }
            ParsedExtension::BasicConstraints(bc) => prop_assert!(!bc.ca, "accepted CA:true"),
            _ => {}
        }
    }
    Ok(())
}

#[test]
fn seeds_are_what_the_mutations_assume() {
    // Re-signing an unmutated request gives a request the CA treats alike.
    for (i, (info, alg)) in csr_parts().iter().enumerate() {
        let again = resign(info, alg, &csr_seeds_with_keys()[i].1);
        assert_eq!(
            csr::validate(&again, &ALLOWED).is_ok(),
            i < GOOD_CSRS,
            "seed {i} re-signed"
        );
    }
    for (i, s) in csr_seeds().iter().enumerate() {
        let r = csr::validate(s, &ALLOWED);
        if i < GOOD_CSRS {
            r.unwrap_or_else(|e| panic!("seed {i}: {e}"));
        } else {
            let e = r.expect_err("a policy seed is refused");
            assert!(
                matches!(e, CaError::NameNotAllowed(_) | CaError::CaRequested(_)),
                "seed {i}: {e:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn csr_der_arbitrary_bytes(der in bytes(20_000)) {
        check_der(&der, None)?;
    }

    #[test]
    fn csr_der_mutated(seed_and_der in mutated(csr_seeds().to_vec())) {
        let (seed, der) = seed_and_der;
        check_der(&der, Some(seed))?;
    }

    #[test]
    fn csr_signed_part_mutated_and_resigned(seed in 0..6usize, m in mutations()) {
        // Mutations of what the signature covers (subject, key, requested
        // extensions), re-signed with the seed's key: these get past proof
        // of possession to the key, name and CA-power checks.
        let (info, alg) = &csr_parts()[seed];
        let der = resign(&super::harness::apply(info.clone(), &m), alg, &csr_seeds_with_keys()[seed].1);
        check_resigned(&der, seed)?;
    }

    #[test]
    fn csr_pem_mutated(seed_and_pem in mutated(
        csr_seeds().iter().map(|d| pem("CERTIFICATE REQUEST", d).into_bytes()).collect()
    )) {
        let (seed, pem) = seed_and_pem;
        let text = String::from_utf8_lossy(&pem);
        let (r, cost) = measure(|| csr::pem_to_der(&text));
        cost.check("csr::pem_to_der", pem.len(), FIXED)?;
        match r {
            Ok(der) => check_der(&der, Some(seed))?,
            Err(e) => {
                prop_assert!(matches!(e, CaError::MalformedCsr(_) | CaError::CsrTooLarge(_)), "{e:?}");
                check_refusal(e)?;
            }
        }
    }
}

/// PEM-encodes `der` under `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    meshca::util::pem::encode(label, der)
}

/// The mutation strategy is not vacuous: mutated CSRs reach every stage of
/// `validate` (parsing, key rules, the signature, the name and CA checks),
/// and some survive (mutations of the unsigned outer encoding).
#[test]
fn mutated_csrs_reach_every_check() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    use std::collections::BTreeMap;
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = mutated(csr_seeds().to_vec());
    let resigned = (0..6usize, mutations());
    let mut seen: BTreeMap<&str, u32> = BTreeMap::new();
    for i in 0..3000 {
        let der = if i % 2 == 0 {
            strategy.new_tree(&mut runner).expect("tree").current().1
        } else {
            let (seed, m) = resigned.new_tree(&mut runner).expect("tree").current();
            let (info, alg) = &csr_parts()[seed];
            resign(
                &super::harness::apply(info.clone(), &m),
                alg,
                &csr_seeds_with_keys()[seed].1,
            )
        };
        let label = match csr::validate(&der, &ALLOWED) {
            Ok(_) => "accepted",
            Err(CaError::MalformedCsr(_)) => "malformed",
            Err(CaError::BadCsrSignature(_)) => "bad signature",
            Err(CaError::UnsupportedKey(_)) => "unsupported key",
            Err(CaError::NameNotAllowed(_)) => "name not allowed",
            Err(CaError::CaRequested(_)) => "CA requested",
            Err(_) => "other",
        };
        *seen.entry(label).or_default() += 1;
    }
    for stage in [
        "accepted",
        "malformed",
        "bad signature",
        "unsupported key",
        "name not allowed",
        "CA requested",
    ] {
        assert!(
            seen.contains_key(stage),
            "no mutated CSR reached {stage:?}: {seen:?}"
        );
    }
}

/// Found by `csr_signed_part_mutated_and_resigned`: an Ed25519 request
/// whose key algorithm OID carries the wrong tag class (0x46 for 0x06) is
/// not DER, yet parsed and, once signed, was accepted; the audit log then
/// recorded the SHA-256 of those bytes, not of the key in the certificate.
#[test]
fn regression_a_non_der_public_key_is_refused() {
    let (info, alg) = &csr_parts()[2];
    let oid = [0x06, 0x03, 0x2b, 0x65, 0x70];
    let at = info
        .windows(oid.len())
        .position(|w| w == oid)
        .expect("the Ed25519 OID");
    let mut bad = info.clone();
    bad[at] = 0x46;
    let der = resign(&bad, alg, &csr_seeds_with_keys()[2].1);
    let e = csr::validate(&der, &ALLOWED).unwrap_err();
    assert!(matches!(e, CaError::MalformedCsr(_)), "{e:?}");
    assert!(e.to_string().contains("DER"), "{e}");
    // The same request, re-signed unmutated, is fine.
    assert!(csr::validate(&resign(info, alg, &csr_seeds_with_keys()[2].1), &ALLOWED).is_ok());
}
