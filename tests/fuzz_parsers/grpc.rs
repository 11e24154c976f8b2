//! Every gRPC request message meshca decodes: prost decoding of arbitrary
//! and mutated valid encodings, and then what the handlers do with the
//! decoded fields — the decoded message is run through the real service
//! (`NativeService`, `LinkerdService`, `IstioService`: authentication, CSR
//! checks, TTL handling, signing). A refusal is a client-error status
//! (never INTERNAL, UNKNOWN or UNAVAILABLE with a healthy CA and a static
//! JWKS), never a panic; a grant is for the token's own identity.

use meshca::api::istio::IstioService;
use meshca::api::linkerd::LinkerdService;
use meshca::api::native::NativeService;
use meshca::proto::istio::istio_certificate_service_server::IstioCertificateService;
use meshca::proto::linkerd::identity_server::Identity as LinkerdIdentity;
use meshca::proto::meshca::identity_server::Identity as NativeIdentity;
use meshca::proto::{istio, linkerd, meshca as pb, spiffe};
use proptest::prelude::*;
use prost::Message;
use tonic::{Code, Request, Status};

use super::csr::pem;
use super::fixtures::{csr_seeds, token, world, WEB_DNS, WEB_URI};
use super::harness::{block_on, bytes, cases, measure, mutated, Cost};

/// A certificate costs a signature and a chain copy whatever the input.
const FIXED: usize = 512 * 1024;

fn check_status(s: &Status, token: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(
            s.code(),
            Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
        ),
        "{:?}: {}",
        s.code(),
        s.message()
    );
    prop_assert!(!s.message().is_empty(), "a refusal says why");
    if token.trim().len() >= 16 {
        prop_assert!(
            !s.message().contains(token.trim()),
            "the status echoes the token"
        );
    }
    Ok(())
}

fn native_seeds() -> Vec<Vec<u8>> {
    let t = token("meshca");
    let mut out = Vec::new();
    for (i, csr) in csr_seeds().iter().enumerate() {
        out.push(
            pb::CertifyRequest {
                token: t.clone(),
                csr: csr.clone(),
                requested_ttl: (i % 2 == 0).then_some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 5,
                }),
            }
            .encode_to_vec(),
        );
    }
    out
}

fn run_native(wire: &[u8]) -> Result<(), TestCaseError> {
    let svc = NativeService(world().core.clone());
    let ((decoded, outcome), cost): ((_, Option<Result<_, Status>>), Cost) = measure(|| {
        let Ok(req) = pb::CertifyRequest::decode(wire) else {
            return (None, None);
        };
        let out = block_on(svc.certify(Request::new(req.clone())));
        (Some(req), Some(out.map(|r| r.into_inner())))
    });
    cost.check("native Certify", wire.len(), FIXED)?;
    let (Some(req), Some(outcome)) = (decoded, outcome) else {
        return Ok(());
    };
    match outcome {
        Ok(resp) => {
            prop_assert_eq!(resp.spiffe_id, WEB_URI);
            prop_assert_eq!(resp.dns_identity, WEB_DNS);
            prop_assert!(!resp.cert_chain.is_empty());
        }
        Err(s) => check_status(&s, &req.token)?,
    }
    Ok(())
}

fn linkerd_seeds() -> Vec<Vec<u8>> {
    let t = token("identity.l5d.io");
    csr_seeds()
        .iter()
        .map(|csr| {
            linkerd::CertifyRequest {
                identity: WEB_DNS.into(),
                token: t.clone().into_bytes(),
                certificate_signing_request: csr.clone(),
            }
            .encode_to_vec()
        })
        .collect()
}

fn run_linkerd(wire: &[u8]) -> Result<(), TestCaseError> {
    let svc = LinkerdService(world().core.clone());
    let ((decoded, outcome), cost): ((_, Option<Result<_, Status>>), Cost) = measure(|| {
        let Ok(req) = linkerd::CertifyRequest::decode(wire) else {
            return (None, None);
        };
        let out = block_on(LinkerdIdentity::certify(&svc, Request::new(req.clone())));
        (Some(req), Some(out.map(|r| r.into_inner())))
    });
    cost.check("Linkerd Certify", wire.len(), FIXED)?;
    let (Some(req), Some(outcome)) = (decoded, outcome) else {
        return Ok(());
    };
    match outcome {
        Ok(resp) => {
            prop_assert_eq!(req.identity.as_str(), WEB_DNS);
            prop_assert!(!resp.leaf_certificate.is_empty());
        }
        Err(s) => check_status(&s, &String::from_utf8_lossy(&req.token))?,
    }
    Ok(())
}

fn istio_seeds() -> Vec<Vec<u8>> {
    csr_seeds()
        .iter()
        .enumerate()
        .map(|(i, csr)| {
            istio::IstioCertificateRequest {
                csr: pem("CERTIFICATE REQUEST", csr),
                validity_duration: 3600 * i as i64,
                metadata: (i % 2 == 1).then(|| prost_types::Struct {
                    fields: [(
                        "ClusterID".to_string(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue("c1".into())),
                        },
                    )]
                    .into_iter()
                    .collect(),
                }),
            }
            .encode_to_vec()
        })
        .collect()
}

fn run_istio(wire: &[u8], authorization: Option<&str>) -> Result<(), TestCaseError> {
    let svc = IstioService(world().core.clone());
    let ((decoded, outcome), cost): ((_, Option<Result<_, Status>>), Cost) = measure(|| {
        let Ok(req) = istio::IstioCertificateRequest::decode(wire) else {
            return (None, None);
        };
        let mut r = Request::new(req.clone());
        if let Some(a) = authorization {
            match tonic::metadata::MetadataValue::try_from(a) {
                Ok(v) => {
                    r.metadata_mut().insert("authorization", v);
                }
                Err(_) => return (None, None),
            }
        }
        let out = block_on(svc.create_certificate(r));
        (Some(req), Some(out.map(|r| r.into_inner())))
    });
    cost.check("Istio CreateCertificate", wire.len(), FIXED)?;
    let (Some(_), Some(outcome)) = (decoded, outcome) else {
        return Ok(());
    };
    match outcome {
        Ok(resp) => prop_assert!(resp.cert_chain.len() >= 3, "leaf, issuer, root"),
        Err(s) => check_status(&s, authorization.unwrap_or(""))?,
    }
    Ok(())
}

/// `Bearer <valid token>`, mutated or not, or arbitrary text.
fn authorization() -> impl Strategy<Value = Option<String>> {
    let good = format!("Bearer {}", token("istio-ca"));
    prop_oneof![
        2 => Just(Some(good.clone())),
        2 => mutated(vec![good.into_bytes()])
            .prop_map(|(_, b)| Some(String::from_utf8_lossy(&b).into_owned())),
        1 => ".{0,80}".prop_map(Some),
        1 => Just(None),
    ]
}

/// A Struct nested `depth` deep (prost refuses past its recursion limit).
fn nested_struct(depth: usize) -> prost_types::Struct {
    let mut s = prost_types::Struct::default();
    for _ in 0..depth {
        s = prost_types::Struct {
            fields: [(
                "k".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(s)),
                },
            )]
            .into_iter()
            .collect(),
        };
    }
    s
}

#[test]
fn valid_seeds_are_granted_on_every_api() {
    // The mutation strategies start from requests that really succeed.
    let w = native_seeds();
    for s in &w[..2] {
        let r = pb::CertifyRequest::decode(&s[..]).unwrap();
        block_on(NativeService(world().core.clone()).certify(Request::new(r))).unwrap();
    }
    let r = linkerd::CertifyRequest::decode(&linkerd_seeds()[0][..]).unwrap();
    block_on(LinkerdIdentity::certify(
        &LinkerdService(world().core.clone()),
        Request::new(r),
    ))
    .unwrap();
    let mut r =
        Request::new(istio::IstioCertificateRequest::decode(&istio_seeds()[1][..]).unwrap());
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token("istio-ca")).try_into().unwrap(),
    );
    block_on(IstioService(world().core.clone()).create_certificate(r)).unwrap();
}

/// The same request encoded by hand, iteratively (building and encoding
/// a 5,000-deep Struct with prost would overflow the test's own stack).
fn nested_wire(depth: usize) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, body: &[u8]) {
        let mut v = Vec::with_capacity(body.len() + 6);
        v.push(number << 3 | 2);
        prost::encoding::encode_varint(body.len() as u64, &mut v);
        v.extend_from_slice(body);
        out.extend_from_slice(&v);
    }
    let mut s: Vec<u8> = Vec::new(); // an empty Struct
    for _ in 0..depth {
        let mut value = Vec::new();
        field(&mut value, 5, &s); // Value.struct_value
        let mut entry = Vec::new();
        field(&mut entry, 1, b"k"); // map entry key
        field(&mut entry, 2, &value); // map entry value
        s.clear();
        field(&mut s, 1, &entry); // Struct.fields
    }
    let mut req = Vec::new();
    field(&mut req, 4, &s); // IstioCertificateRequest.metadata
    req
}

#[test]
fn deeply_nested_istio_metadata_is_refused_by_the_decoder_not_the_stack() {
    for depth in [1, 10, 30] {
        let by_prost = istio::IstioCertificateRequest {
            csr: String::new(),
            validity_duration: 0,
            metadata: Some(nested_struct(depth)),
        }
        .encode_to_vec();
        assert_eq!(nested_wire(depth), by_prost, "the hand encoding is prost's");
    }
    for depth in [1, 10, 30, 40, 50, 500, 5_000] {
        let wire = nested_wire(depth);
        let (r, cost) = measure(|| istio::IstioCertificateRequest::decode(&wire[..]).map(drop));
        // prost stops at 100 nested messages (a Struct level is three: the
        // Struct, its map entry and the Value), with an error rather than a
        // stack overflow.
        assert_eq!(r.is_ok(), depth <= 30, "depth {depth}: {r:?}");
        assert!(cost.elapsed < super::harness::TIME_BUDGET);
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn native_certify_arbitrary(wire in bytes(20_000)) {
        run_native(&wire)?;
    }

    #[test]
    fn native_certify_mutated(seed_and_wire in mutated(native_seeds())) {
        run_native(&seed_and_wire.1)?;
    }

    #[test]
    fn native_certify_fields(
        t in prop_oneof![Just(token("meshca")), ".{0,64}"],
        csr_i in 0..6usize,
        ttl in prop::option::of((any::<i64>(), any::<i32>())),
    ) {
        // Field values no mutation of a valid seed is likely to reach:
        // extreme and negative durations, nanos out of range.
        let wire = pb::CertifyRequest {
            token: t,
            csr: csr_seeds()[csr_i].clone(),
            requested_ttl: ttl.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        }
        .encode_to_vec();
        run_native(&wire)?;
    }

    #[test]
    fn linkerd_certify_arbitrary(wire in bytes(20_000)) {
        run_linkerd(&wire)?;
    }

    #[test]
    fn linkerd_certify_mutated(seed_and_wire in mutated(linkerd_seeds())) {
        run_linkerd(&seed_and_wire.1)?;
    }

    #[test]
    fn istio_create_certificate_arbitrary(wire in bytes(20_000), auth in authorization()) {
        run_istio(&wire, auth.as_deref())?;
    }

    #[test]
    fn istio_create_certificate_mutated(
        seed_and_wire in mutated(istio_seeds()),
        auth in authorization(),
    ) {
        run_istio(&seed_and_wire.1, auth.as_deref())?;
    }

    #[test]
    fn istio_validity_duration(secs in any::<i64>(), csr_i in 0..6usize) {
        let wire = istio::IstioCertificateRequest {
            csr: pem("CERTIFICATE REQUEST", &csr_seeds()[csr_i]),
            validity_duration: secs,
            metadata: None,
        }
        .encode_to_vec();
        run_istio(&wire, Some(&format!("Bearer {}", token("istio-ca"))))?;
    }

    #[test]
    fn workload_api_requests_decode_in_bounded_memory(wire in bytes(20_000)) {
        // The SPIFFE Workload API requests the agent decodes (their handlers
        // read only the security header, which is tested in tests/workload.rs).
        let (_, cost) = measure(|| {
            let _ = spiffe::X509svidRequest::decode(&wire[..]);
            let _ = spiffe::X509BundlesRequest::decode(&wire[..]);
            let _ = spiffe::JwtsvidRequest::decode(&wire[..]);
            let _ = spiffe::JwtBundlesRequest::decode(&wire[..]);
            let _ = spiffe::ValidateJwtsvidRequest::decode(&wire[..]);
            let _ = pb::GetTrustBundleRequest::decode(&wire[..]);
            let _ = pb::WatchTrustBundleRequest::decode(&wire[..]);
        });
        cost.check("Workload API decode", wire.len(), 64 * 1024)?;
    }
}
