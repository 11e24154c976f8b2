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

use super::fixtures::{csr_seeds, GOOD_CSRS, WEB_DNS, WEB_URI};
use super::harness::{bytes, cases, measure, mutated};

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

#[test]
fn seeds_are_what_the_mutations_assume() {
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
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
