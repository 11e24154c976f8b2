//! `meshca certify`: the reference client. Gets a certificate from a
//! running CA over any of the three wire APIs, verifies the chain to the
//! trust bundle, and writes key.pem (0600), chain.pem and bundle.pem.
//!
//! Owns: those flags and the per-API request shapes. Must not: trust what
//! the server sent before `client::verify_chain` has checked it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use x509_parser::prelude::*;

use crate::ca::{der_to_pem, pem_to_certs, to_system_time};
use crate::cli::inspect::sans;
use crate::cli::Error;
use crate::client;
use crate::identity::{Mesh, Workload};
use crate::proto;
use crate::util::clock::rfc3339;
use crate::util::duration::HumanDuration;

/// The wire API `certify` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ApiChoice {
    /// meshca.v1.Identity/Certify.
    #[default]
    Native,
    /// io.linkerd.proxy.identity.Identity/Certify.
    Linkerd,
    /// istio.v1.auth.IstioCertificateService/CreateCertificate.
    Istio,
}

/// `meshca certify` flags.
#[derive(Debug, clap::Args)]
pub struct CertifyArgs {
    /// CA address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: String,
    /// File holding the service-account token.
    #[arg(long)]
    pub token_file: PathBuf,
    /// Directory to write key.pem, chain.pem and bundle.pem into.
    #[arg(long)]
    pub out: PathBuf,
    /// Wire API to use.
    #[arg(long, value_enum, default_value_t)]
    pub api: ApiChoice,
    /// PEM bundle that authenticates the CA's server certificate
    /// [default: <data-dir>/bundle.pem].
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Data directory (only to find the default --ca-bundle).
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    pub data_dir: PathBuf,
    /// Name expected in the CA's server certificate
    /// [default: meshca.<ns>.serviceaccount.identity.<ns>.<trust-domain>].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Trust domain (to derive names).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// CA control-plane namespace (to derive names).
    #[arg(long, default_value = "meshca")]
    pub control_plane_namespace: String,
    /// Requested lifetime.
    #[arg(long)]
    pub ttl: Option<HumanDuration>,
}

/// What the server returned, before verification.
struct Issued {
    key: rcgen::KeyPair,
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
}

/// A connected request: everything the per-API functions need.
struct Call {
    channel: tonic::transport::Channel,
    token: String,
    bundle_pem: String,
    mesh: Mesh,
    ttl: Option<Duration>,
}

/// Resolves the derived defaults, gets the certificate, verifies and writes it.
pub(crate) async fn run(a: CertifyArgs) -> Result<(), Error> {
    let mesh = Mesh {
        trust_domain: a
            .trust_domain
            .parse()
            .map_err(|e| Error::Usage(format!("--trust-domain: {e}")))?,
        control_plane_ns: a
            .control_plane_namespace
            .parse()
            .map_err(|e| Error::Usage(format!("--control-plane-namespace: {e}")))?,
    };
    let bundle = a.ca_bundle.unwrap_or_else(|| a.data_dir.join("bundle.pem"));
    let server_name = a.server_name.unwrap_or_else(|| {
        crate::identity::ca_server_name(mesh.control_plane_ns.as_str(), mesh.trust_domain.as_str())
    });
    let token = std::fs::read_to_string(&a.token_file)
        .map_err(|e| format!("{}: {e}", a.token_file.display()))?
        .trim()
        .to_string();
    let bundle_pem = std::fs::read_to_string(&bundle)
        .map_err(|e| format!("CA bundle {}: {e}", bundle.display()))?;
    let channel = client::connect(&a.server, &bundle_pem, &server_name, None).await?;
    let call = Call {
        channel,
        token,
        bundle_pem,
        mesh,
        ttl: a.ttl.map(|t| t.0),
    };
    let issued = match a.api {
        ApiChoice::Native => native(call).await?,
        ApiChoice::Linkerd => linkerd(call).await?,
        ApiChoice::Istio => istio(call).await?,
    };
    finish(&a.out, issued)
}

/// A gRPC status as the operator reads it.
fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// meshca.v1.Identity/Certify: the chain and the bundle come in the answer.
async fn native(c: Call) -> Result<Issued, Error> {
    let (key, csr) = client::new_key_and_csr(None)?;
    let mut grpc = proto::meshca::identity_client::IdentityClient::new(c.channel);
    let r = grpc
        .certify(proto::meshca::CertifyRequest {
            token: c.token,
            csr,
            requested_ttl: c.ttl.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: 0,
            }),
        })
        .await
        .map_err(status)?
        .into_inner();
    if r.ttl_clamped {
        eprintln!("note: the requested TTL exceeded the server maximum and was reduced");
    }
    let mut chain = r.cert_chain.into_iter();
    let leaf = chain.next().ok_or("empty chain")?;
    Ok(Issued {
        key,
        leaf,
        intermediates: chain.collect(),
        roots: r.trust_bundle.map(|b| b.roots).unwrap_or_default(),
    })
}

/// Reads the token's `sub` without verifying it (the CA verifies); used only
/// to fill Linkerd's `identity` field.
fn unverified_workload(token: &str) -> Result<Workload, String> {
    let claims = crate::authn::unverified_claims(token).ok_or("the token is not a JWT")?;
    let sub = claims["sub"].as_str().ok_or("the token has no sub")?;
    Workload::from_username(sub).map_err(|e| e.to_string())
}

/// io.linkerd.proxy.identity: the CSR names the DNS identity; the answer has
/// no roots, so the chain is verified against the bundle we connected with.
async fn linkerd(c: Call) -> Result<Issued, Error> {
    let identity = unverified_workload(&c.token)?
        .dns_identity(&c.mesh)
        .map_err(|e| e.to_string())?;
    let (key, csr) = client::new_key_and_csr(Some(identity.as_str()))?;
    let mut grpc = proto::linkerd::identity_client::IdentityClient::new(c.channel);
    let r = grpc
        .certify(proto::linkerd::CertifyRequest {
            identity: identity.to_string(),
            token: c.token.into_bytes(),
            certificate_signing_request: csr,
        })
        .await
        .map_err(status)?
        .into_inner();
    let roots = pem_to_certs(c.bundle_pem.as_bytes())?
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    Ok(Issued {
        key,
        leaf: r.leaf_certificate,
        intermediates: r.intermediate_certificates,
        roots,
    })
}

/// istio.v1.auth: the token rides in `authorization` metadata and the answer
/// is one PEM list (leaf first, self-signed roots last).
async fn istio(c: Call) -> Result<Issued, Error> {
    let (key, csr_der) = client::new_key_and_csr(None)?;
    let csr_pem = crate::util::pem::encode("CERTIFICATE REQUEST", &csr_der);
    let mut grpc =
        proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
            c.channel,
        );
    let mut req = tonic::Request::new(proto::istio::IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: c.ttl.map_or(0, |d| d.as_secs() as i64),
        metadata: None,
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", c.token)
            .parse()
            .map_err(|_| "the token has characters not allowed in gRPC metadata")?,
    );
    let r = grpc
        .create_certificate(req)
        .await
        .map_err(status)?
        .into_inner();
    let mut certs = Vec::new();
    for pem in &r.cert_chain {
        certs.extend(pem_to_certs(pem.as_bytes())?);
    }
    let mut ders: Vec<Vec<u8>> = certs.into_iter().map(|c| c.to_vec()).collect();
    if ders.is_empty() {
        return Err("empty chain".into());
    }
    let leaf = ders.remove(0);
    let (roots, intermediates) = ders.into_iter().partition(|d| is_self_signed(d));
    Ok(Issued {
        key,
        leaf,
        intermediates,
        roots,
    })
}

fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

/// Verifies the chain, writes the three files, and prints a summary.
fn finish(out: &Path, i: Issued) -> Result<(), Error> {
    client::verify_chain(&i.leaf, &i.intermediates, &i.roots, SystemTime::now())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let key_pem = zeroize::Zeroizing::new(i.key.serialize_pem());
    crate::util::secret::write_private(&out.join("key.pem"), key_pem.as_bytes())
        .map_err(|e| format!("key.pem: {e}"))?;
    let mut chain = der_to_pem(&i.leaf);
    for c in &i.intermediates {
        chain.push_str(&der_to_pem(c));
    }
    crate::util::secret::write_public(&out.join("chain.pem"), chain.as_bytes())
        .map_err(|e| format!("chain.pem: {e}"))?;
    let bundle: String = i.roots.iter().map(|r| der_to_pem(r)).collect();
    crate::util::secret::write_public(&out.join("bundle.pem"), bundle.as_bytes())
        .map_err(|e| format!("bundle.pem: {e}"))?;
    let (_, x) = X509Certificate::from_der(&i.leaf).map_err(|e| e.to_string())?;
    println!("certificate written to {}", out.display());
    println!("  serial     {}", x.raw_serial_as_string().replace(':', ""));
    for n in sans(&x) {
        println!("  SAN        {n}");
    }
    println!(
        "  not after  {}",
        rfc3339(to_system_time(x.validity().not_after))
    );
    println!("  chain verified to the trust bundle (rustls-webpki)");
    Ok(())
}
