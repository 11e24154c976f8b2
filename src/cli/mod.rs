//! The command line: argument definitions and the operator/developer
//! commands (`init`, `serve`, `bundle`, `inspect`, `token`, `certify`).
//!
//! Owns: turning flags into calls on the library and printing results
//! (tables by default, `--output json` where offered). Must not: hold policy.

// The CLI's job is to print to the terminal: stdout for results, stderr for
// progress and warnings. Everywhere else printing is denied (Cargo.toml
// [lints]) so that the server only ever speaks through `tracing`.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod audit;
pub mod bench;
mod error;
pub mod revoke;
pub mod rotation;
pub mod sidecar;

pub use error::{Error, EXIT_FAILURE, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_USAGE};

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};
use x509_parser::prelude::*;

use crate::ca::store::{DataDir, InitOptions};
use crate::ca::{der_to_pem, fingerprint, pem_to_certs, to_system_time};
use crate::client;
use crate::config::{HumanDuration, LogFormat, ServeArgs};
use crate::identity::{Mesh, Workload};
use crate::proto;
use crate::util::clock::rfc3339;

/// meshca: a service-mesh certificate authority.
#[derive(Debug, Parser)]
#[command(name = "meshca", version, about)]
pub struct Cli {
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format for commands that print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// A readable table.
    #[default]
    Table,
    /// JSON.
    Json,
}

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

/// Commands.
// Parsed once per process; boxing the large `serve` variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a CA (root + issuer) in a data directory; refuses to overwrite one.
    Init {
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Import this root certificate (PEM) instead of generating one.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The imported root's private key (PEM).
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        /// Lifetime of a generated root.
        #[arg(long, default_value = "365d")]
        root_ttl: HumanDuration,
        /// Lifetime of the issuer (clamped to the root's expiry).
        #[arg(long, default_value = "30d")]
        issuer_ttl: HumanDuration,
    },
    /// Run the CA (gRPC over TLS + admin HTTP). Creates a CA on first start.
    Serve(ServeArgs),
    /// Print the trust bundle (PEM roots).
    Bundle {
        /// Data directory.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
    },
    /// Print a PEM certificate chain readably.
    Inspect {
        /// A PEM file with one or more certificates.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Mint a development token shaped like a Kubernetes projected service-account token.
    Token {
        /// Namespace.
        #[arg(long)]
        namespace: String,
        /// Service account.
        #[arg(long)]
        service_account: String,
        /// Audience (repeatable) [default: meshca, identity.l5d.io, istio-ca].
        #[arg(long)]
        audience: Vec<String>,
        /// Lifetime.
        #[arg(long, default_value = "1h")]
        ttl: HumanDuration,
        /// Name of the pod the token is bound to [default: <service-account>-dev].
        #[arg(long)]
        pod: Option<String>,
        /// Data directory holding token-signer.key.
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
    },
    /// Reference client: get a certificate from a running CA and write it out.
    Certify {
        /// CA address (host:port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        server: String,
        /// File holding the service-account token.
        #[arg(long)]
        token_file: PathBuf,
        /// Directory to write key.pem, chain.pem and bundle.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Wire API to use.
        #[arg(long, value_enum, default_value_t)]
        api: ApiChoice,
        /// PEM bundle that authenticates the CA's server certificate
        /// [default: <data-dir>/bundle.pem].
        #[arg(long)]
        ca_bundle: Option<PathBuf>,
        /// Data directory (only to find the default --ca-bundle).
        #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
        data_dir: PathBuf,
        /// Name expected in the CA's server certificate
        /// [default: meshca.<ns>.serviceaccount.identity.<ns>.<trust-domain>].
        #[arg(long)]
        server_name: Option<String>,
        /// Trust domain (to derive names).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// CA control-plane namespace (to derive names).
        #[arg(long, default_value = "meshca")]
        control_plane_namespace: String,
        /// Requested lifetime.
        #[arg(long)]
        ttl: Option<HumanDuration>,
    },
    /// Benchmark issuance against an in-process server.
    Bench(crate::cli::bench::BenchArgs),
    /// Query and verify the tamper-evident issuance log.
    #[command(subcommand)]
    Audit(crate::cli::audit::AuditCommand),
    /// Trust-anchor and issuer lifecycle.
    #[command(subcommand)]
    Rotation(crate::cli::rotation::RotationCommand),
    /// The kill switch: revoke a certificate serial (it can no longer renew)
    /// or deny an identity (refused on every API), lift either, or list them.
    Revoke(crate::cli::revoke::RevokeArgs),
    /// Run beside a workload: obtain and renew its certificate, follow the
    /// trust bundle, and serve them as files and/or the SPIFFE Workload API.
    Agent(crate::cli::sidecar::AgentArgs),
    /// A small L4 mTLS sidecar using the workload's identity (inbound with a
    /// SPIFFE ID allow-list, outbound with upstream identity checks).
    Proxy(crate::cli::sidecar::ProxyArgs),
}

/// Sets up logging to stderr through a background writer thread, so a slow
/// log consumer never blocks a request. Keep the guard alive: dropping it
/// flushes what is buffered.
pub fn init_logging(format: LogFormat) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHCA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Never drop a decision log line: back-pressure instead when the
        // buffer of 128k lines is full.
        .lossy(false)
        .buffered_lines_limit(128 * 1024)
        .finish(std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    let ok = match format {
        LogFormat::Json => b.json().try_init(),
        LogFormat::Text => b.try_init(),
    };
    ok.ok().map(|_| guard)
}

/// Runs a command; the error carries its exit code (`Error::exit_code`).
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Init {
            data_dir,
            root_cert,
            root_key,
            root_ttl,
            issuer_ttl,
        } => init(data_dir, root_cert.zip(root_key), root_ttl.0, issuer_ttl.0),
        Command::Serve(args) => Ok(serve(args).await?),
        Command::Agent(args) => Ok(crate::cli::sidecar::run_agent(args).await?),
        Command::Proxy(args) => Ok(crate::cli::sidecar::run_proxy(args).await?),
        Command::Bundle { data_dir } => {
            print!("{}", DataDir::new(data_dir).bundle_pem()?);
            Ok(())
        }
        Command::Inspect { file, output } => Ok(inspect(&file, output)?),
        Command::Token {
            namespace,
            service_account,
            audience,
            ttl,
            pod,
            data_dir,
        } => Ok(token(
            &namespace,
            &service_account,
            audience,
            ttl.0,
            pod,
            &data_dir,
        )?),
        Command::Certify {
            server,
            token_file,
            out,
            api,
            ca_bundle,
            data_dir,
            server_name,
            trust_domain,
            control_plane_namespace,
            ttl,
        } => {
            let mesh = Mesh {
                trust_domain: trust_domain
                    .parse()
                    .map_err(|e| Error::Usage(format!("--trust-domain: {e}")))?,
                control_plane_ns: control_plane_namespace
                    .parse()
                    .map_err(|e| Error::Usage(format!("--control-plane-namespace: {e}")))?,
            };
            let bundle = ca_bundle.unwrap_or_else(|| data_dir.join("bundle.pem"));
            let server_name = server_name.unwrap_or_else(|| {
                crate::identity::ca_server_name(
                    mesh.control_plane_ns.as_str(),
                    mesh.trust_domain.as_str(),
                )
            });
            Ok(certify(CertifyArgs {
                server,
                token_file,
                out,
                api,
                bundle,
                server_name,
                mesh,
                ttl: ttl.map(|t| t.0),
            })
            .await?)
        }
        Command::Bench(args) => Ok(crate::cli::bench::run(args).await?),
        Command::Audit(cmd) => Ok(crate::cli::audit::run(cmd)?),
        Command::Rotation(cmd) => crate::cli::rotation::run(cmd).await,
        Command::Revoke(args) => crate::cli::revoke::run(args).await,
    }
}

fn init(
    data_dir: PathBuf,
    import: Option<(PathBuf, PathBuf)>,
    root_ttl: Duration,
    issuer_ttl: Duration,
) -> Result<(), Error> {
    let opts = InitOptions {
        root_lifetime: root_ttl,
        issuer_lifetime: issuer_ttl,
        import_root: import,
    };
    let r = DataDir::new(&data_dir).init(&opts, SystemTime::now())?;
    println!("created CA in {}", data_dir.display());
    println!(
        "  root    {} ({})",
        r.root_fingerprint,
        if r.imported { "imported" } else { "generated" }
    );
    println!(
        "  issuer  {} (expires {})",
        r.issuer_fingerprint,
        rfc3339(r.issuer_not_after)
    );
    if r.issuer_clamped {
        eprintln!(
            "WARNING: the issuer lifetime was cut short to the root's expiry; rotate the root soon"
        );
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let cfg = args.with_file()?.resolve()?;
    let _log = init_logging(cfg.log_format);
    let mut running = crate::server::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining in-flight requests"),
        _ = term.recv() => tracing::info!("SIGTERM: draining in-flight requests"),
    }
    running.trigger_shutdown();
    running.wait().await;
    tracing::info!("stopped");
    Ok(())
}

fn token(
    ns: &str,
    sa: &str,
    audiences: Vec<String>,
    ttl: Duration,
    pod: Option<String>,
    data_dir: &Path,
) -> Result<(), String> {
    let workload = Workload::new(ns, sa).map_err(|e| e.to_string())?;
    let data = DataDir::new(data_dir);
    let key = data.read_key("token-signer.key").map_err(|e| {
        format!("{e} (run `meshca serve` or `meshca init` once to create the data directory)")
    })?;
    let signer = crate::authn::devtoken::DevSigner::from_pem(&key)?;
    let audiences = if audiences.is_empty() {
        let d = crate::api::Audiences::default();
        vec![d.native, d.linkerd, d.istio]
    } else {
        audiences
    };
    let t = signer.mint(
        &crate::authn::devtoken::TokenSpec {
            workload,
            audiences,
            ttl,
            issuer: crate::authn::devtoken::DEV_ISSUER.into(),
            pod: Some(pod.unwrap_or_else(|| format!("{sa}-dev"))),
        },
        SystemTime::now(),
    )?;
    println!("{t}");
    Ok(())
}

struct CertifyArgs {
    server: String,
    token_file: PathBuf,
    out: PathBuf,
    api: ApiChoice,
    bundle: PathBuf,
    server_name: String,
    mesh: Mesh,
    ttl: Option<Duration>,
}

/// Reads the token's `sub` without verifying it (the CA verifies); used only
/// to fill Linkerd's `identity` field.
fn unverified_workload(token: &str) -> Result<Workload, String> {
    let claims = crate::authn::unverified_claims(token).ok_or("the token is not a JWT")?;
    let sub = claims["sub"].as_str().ok_or("the token has no sub")?;
    Workload::from_username(sub).map_err(|e| e.to_string())
}

async fn certify(a: CertifyArgs) -> Result<(), String> {
    let token = std::fs::read_to_string(&a.token_file)
        .map_err(|e| format!("{}: {e}", a.token_file.display()))?
        .trim()
        .to_string();
    let bundle_pem = std::fs::read_to_string(&a.bundle)
        .map_err(|e| format!("CA bundle {}: {e}", a.bundle.display()))?;
    let channel = client::connect(&a.server, &bundle_pem, &a.server_name, None).await?;
    let (key, csr_der) = client::new_key_and_csr(None)?;
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    let (leaf, intermediates, roots) = match a.api {
        ApiChoice::Native => {
            let mut c = proto::meshca::identity_client::IdentityClient::new(channel);
            let r = c
                .certify(proto::meshca::CertifyRequest {
                    token,
                    csr: csr_der,
                    requested_ttl: a.ttl.map(|d| prost_types::Duration {
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
            (
                leaf,
                chain.collect::<Vec<_>>(),
                r.trust_bundle.map(|b| b.roots).unwrap_or_default(),
            )
        }
        ApiChoice::Linkerd => {
            let identity = unverified_workload(&token)?
                .dns_identity(&a.mesh)
                .map_err(|e| e.to_string())?;
            let (key2, csr2) = client::new_key_and_csr(Some(identity.as_str()))?;
            let mut c = proto::linkerd::identity_client::IdentityClient::new(channel);
            let r = c
                .certify(proto::linkerd::CertifyRequest {
                    identity: identity.to_string(),
                    token: token.into_bytes(),
                    certificate_signing_request: csr2,
                })
                .await
                .map_err(status)?
                .into_inner();
            let roots = pem_to_certs(bundle_pem.as_bytes())?
                .into_iter()
                .map(|c| c.to_vec())
                .collect();
            return finish(
                &a.out,
                key2,
                r.leaf_certificate,
                r.intermediate_certificates,
                roots,
            );
        }
        ApiChoice::Istio => {
            let csr_pem = crate::util::pem::encode("CERTIFICATE REQUEST", &csr_der);
            let mut c =
                proto::istio::istio_certificate_service_client::IstioCertificateServiceClient::new(
                    channel,
                );
            let mut req = tonic::Request::new(proto::istio::IstioCertificateRequest {
                csr: csr_pem,
                validity_duration: a.ttl.map_or(0, |d| d.as_secs() as i64),
                metadata: None,
            });
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| "the token has characters not allowed in gRPC metadata")?,
            );
            let r = c
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
            let (roots, inter): (Vec<_>, Vec<_>) =
                ders.into_iter().partition(|d| is_self_signed(d));
            (leaf, inter, roots)
        }
    };
    finish(&a.out, key, leaf, intermediates, roots)
}

fn is_self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject() == c.issuer())
        .unwrap_or(false)
}

fn finish(
    out: &Path,
    key: rcgen::KeyPair,
    leaf: Vec<u8>,
    intermediates: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
) -> Result<(), String> {
    client::verify_chain(&leaf, &intermediates, &roots, SystemTime::now())?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    crate::util::secret::write_private(&out.join("key.pem"), key_pem.as_bytes())
        .map_err(|e| format!("key.pem: {e}"))?;
    let mut chain = der_to_pem(&leaf);
    for c in &intermediates {
        chain.push_str(&der_to_pem(c));
    }
    crate::util::secret::write_public(&out.join("chain.pem"), chain.as_bytes())
        .map_err(|e| format!("chain.pem: {e}"))?;
    let bundle: String = roots.iter().map(|r| der_to_pem(r)).collect();
    crate::util::secret::write_public(&out.join("bundle.pem"), bundle.as_bytes())
        .map_err(|e| format!("bundle.pem: {e}"))?;
    let (_, x) = X509Certificate::from_der(&leaf).map_err(|e| e.to_string())?;
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

fn sans(x: &X509Certificate<'_>) -> Vec<String> {
    x.subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|g| match g {
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    GeneralName::URI(u) => format!("URI:{u}"),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn inspect(file: &Path, output: Output) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let certs = pem_to_certs(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut rows = Vec::new();
    for der in &certs {
        let (_, x) = X509Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
        let key = match x.public_key().parsed() {
            Ok(x509_parser::public_key::PublicKey::EC(p)) => {
                format!("ECDSA ({} bits)", p.key_size())
            }
            Ok(x509_parser::public_key::PublicKey::RSA(r)) => {
                format!("RSA ({} bits)", r.key_size())
            }
            _ => x.public_key().algorithm.algorithm.to_id_string(),
        };
        let ca = x
            .basic_constraints()
            .ok()
            .flatten()
            .map(|b| b.value.ca)
            .unwrap_or(false);
        rows.push(serde_json::json!({
            "subject": x.subject().to_string(),
            "issuer": x.issuer().to_string(),
            "serial": x.raw_serial_as_string().replace(':', ""),
            "sans": sans(&x),
            "not_before": rfc3339(to_system_time(x.validity().not_before)),
            "not_after": rfc3339(to_system_time(x.validity().not_after)),
            "key": key,
            "is_ca": ca,
            "sha256_fingerprint": fingerprint(der),
            "spki_sha256": fingerprint(x.public_key().raw),
        }));
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?
        ),
        Output::Table => {
            for (i, r) in rows.iter().enumerate() {
                println!(
                    "[{i}] {}",
                    if r["is_ca"] == true {
                        "CA certificate"
                    } else {
                        "end-entity certificate"
                    }
                );
                for k in [
                    "subject",
                    "issuer",
                    "serial",
                    "not_before",
                    "not_after",
                    "key",
                    "sha256_fingerprint",
                    "spki_sha256",
                ] {
                    println!("    {:<20} {}", k, r[k].as_str().unwrap_or(""));
                }
                for s in r["sans"].as_array().into_iter().flatten() {
                    println!("    {:<20} {}", "san", s.as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}
