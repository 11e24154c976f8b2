//! Tokens: the JWS compact form, its header and its JSON claims, through the
//! real authenticator chain (JWKS verification as `serve` configures it),
//! and the unverified-claims peek used for routing. Arbitrary strings,
//! mutated valid tokens and validly *signed* odd claims (so that claim
//! handling is reached, not just the signature check) must end in a typed
//! refusal (UNAUTHENTICATED or INVALID_ARGUMENT, never UNAVAILABLE with a
//! static JWKS), never a panic; a token that still authenticates after a
//! mutation authenticates the same workload.

use meshca::api::ApiError;
use meshca::authn::{unverified_claims, AuthnError};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};
use tonic::Code;

use super::fixtures::{claims, header, now_s, sign_raw, token, world, NS, SA};
use super::harness::{block_on, bytes, cases, measure, mutated};

const FIXED: usize = 128 * 1024;

fn check_token(t: &str) -> Result<(), TestCaseError> {
    let w = world();
    let (r, cost) = measure(|| block_on(w.authn.authenticate(t, "meshca")));
    cost.check("authenticate", t.len(), FIXED)?;
    match r {
        Ok(a) => {
            prop_assert_eq!(a.workload.namespace.as_str(), NS);
            prop_assert_eq!(a.workload.service_account.as_str(), SA);
        }
        Err(e) => {
            prop_assert!(
                matches!(
                    e,
                    AuthnError::Invalid(_) | AuthnError::Missing | AuthnError::TooLarge(_)
                ),
                "{e:?}"
            );
            let code = ApiError::Authn(e.clone()).code();
            prop_assert!(
                matches!(code, Code::Unauthenticated | Code::InvalidArgument),
                "{code:?}"
            );
            // A refusal never echoes the token back.
            if t.trim().len() >= 16 {
                prop_assert!(
                    !e.to_string().contains(t.trim()),
                    "the error echoes the token"
                );
            }
        }
    }
    Ok(())
}

/// A JSON value of some arbitrary shape (for claims and headers).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec(("[a-z.]{0,12}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A time claim: sensible, at the edges of u64/i64, or not a number.
fn time_claim() -> impl Strategy<Value = Value> {
    let now = now_s();
    prop_oneof![
        (0..7200u64).prop_map(move |d| json!(now + d)),
        (0..7200u64).prop_map(move |d| json!(now.saturating_sub(d))),
        any::<u64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(u64::MAX - 30)),
        Just(json!(i64::MAX as u64)),
        Just(json!(253_402_300_800u64)),
        any::<i64>().prop_map(Value::from),
        json_value(),
    ]
}

/// Claims that are valid except where the strategy replaced a field.
fn odd_claims() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        Just("iss"),
        Just("sub"),
        Just("aud"),
        Just("exp"),
        Just("iat"),
        Just("nbf"),
        Just("kubernetes.io")
    ];
    (
        vec((field, prop_oneof![time_claim(), json_value()]), 0..4),
        time_claim(),
        prop::option::of(time_claim()),
    )
        .prop_map(|(edits, exp, nbf)| {
            let mut c = claims("meshca");
            c["exp"] = exp;
            if let Some(n) = nbf {
                c["nbf"] = n.clone();
                c["iat"] = n;
            }
            for (k, v) in edits {
                c[k] = v;
            }
            c
        })
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn token_arbitrary_text(t in prop_oneof![".{0,600}", "[A-Za-z0-9_=.-]{0,600}"]) {
        check_token(&t)?;
    }

    #[test]
    fn token_arbitrary_bytes(b in bytes(20_000)) {
        check_token(&String::from_utf8_lossy(&b))?;
    }

    #[test]
    fn token_mutated(seed_and_t in mutated(vec![token("meshca").into_bytes()])) {
        let t = String::from_utf8_lossy(&seed_and_t.1).into_owned();
        check_token(&t)?;
    }

    #[test]
    fn token_signed_odd_claims(c in odd_claims()) {
        let t = sign_raw(header().to_string().as_bytes(), c.to_string().as_bytes());
        check_token(&t)?;
    }

    #[test]
    fn token_signed_odd_header(edits in vec((
        prop_oneof![Just("alg"), Just("kid"), Just("typ"), Just("crit"), Just("jwk"), Just("x5c"), Just("b64")],
        json_value(),
    ), 1..3)) {
        let mut h = header();
        for (k, v) in edits {
            h[k] = v;
        }
        let t = sign_raw(h.to_string().as_bytes(), claims("meshca").to_string().as_bytes());
        check_token(&t)?;
    }

    #[test]
    fn token_signed_mutated_json(seed_and_c in mutated(vec![claims("meshca").to_string().into_bytes()])) {
        // Byte-level mutations of the claims JSON, validly signed: the
        // claims parser sees broken JSON, odd escapes and duplicate keys.
        let t = sign_raw(header().to_string().as_bytes(), &seed_and_c.1);
        check_token(&t)?;
    }

    #[test]
    fn unverified_claims_peek(t in prop_oneof![
        ".{0,300}",
        bytes(4096).prop_map(|b| {
            use base64::Engine;
            format!("e30.{}.e30", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
        }),
    ]) {
        let (_, cost) = measure(|| unverified_claims(&t));
        cost.check("unverified_claims", t.len(), FIXED)?;
    }
}

#[test]
fn the_valid_seed_authenticates() {
    let a = block_on(world().authn.authenticate(&token("meshca"), "meshca")).expect("valid");
    assert_eq!(a.workload.to_string(), format!("{NS}/{SA}"));
}

/// Found by `token_signed_odd_claims`: a validly signed token whose `exp`
/// is near u64::MAX overflowed `exp + leeway` (a panic in debug builds; in
/// release it wrapped to "expired in 1970" and then panicked building the
/// expiry time), and any `exp` past ~2^62 s panicked converting to
/// `SystemTime`. Now the arithmetic saturates and times are clamped to
/// 9999-12-31T23:59:59Z.
#[test]
fn regression_signed_tokens_with_absurd_times_are_decided_not_panicked() {
    let max = meshca::util::clock::from_unix_secs(meshca::util::clock::MAX_UNIX_SECS);
    for exp in [
        u64::MAX,
        u64::MAX - 30,
        1 << 63,
        253_402_300_800,
        10u64.pow(15),
    ] {
        let mut c = claims("meshca");
        c["exp"] = json!(exp);
        let t = sign_raw(header().to_string().as_bytes(), c.to_string().as_bytes());
        // A far expiry is the issuer's choice: the token is good, with its
        // expiry clamped.
        let a = block_on(world().authn.authenticate(&t, "meshca"))
            .unwrap_or_else(|e| panic!("exp {exp}: {e}"));
        assert_eq!(a.expires, Some(max), "exp {exp}");
    }
    for field in ["nbf", "iat"] {
        let mut c = claims("meshca");
        c[field] = json!(u64::MAX);
        let t = sign_raw(header().to_string().as_bytes(), c.to_string().as_bytes());
        let e = block_on(world().authn.authenticate(&t, "meshca")).unwrap_err();
        assert!(matches!(e, AuthnError::Invalid(_)), "{field}: {e:?}");
    }
}
