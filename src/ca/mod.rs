//! The certificate authority: issuance policy and signing.
//!
//! Owns: the active issuer (certificate + key), the trust bundle, and the
//! decision of what a workload leaf contains. Knows nothing of gRPC,
//! Kubernetes, tokens or storage: callers hand it an already-authenticated
//! [`Workload`] and CSR bytes; keys come in from `ca::store`.

pub mod csr;
pub mod jwt;
pub(crate) mod keys;
pub(crate) mod profile;
mod settings;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use x509_parser::prelude::*;

use crate::identity::{DnsIdentity, Mesh, SpiffeId, Workload};
use crate::util::clock::Clock;
pub use keys::CaKey;

/// Backdating applied to every leaf, to tolerate clock skew between peers.
pub(crate) const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA refused or failed to issue. Mapped to gRPC codes in `api::status`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CSR does not parse.
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    /// The CSR is larger than [`csr::MAX_CSR_BYTES`].
    #[error("CSR is {0} bytes, more than the 16384-byte limit")]
    CsrTooLarge(usize),
    /// Proof of possession failed.
    #[error("{0}")]
    BadCsrSignature(String),
    /// The CSR's key type or size is not allowed.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// The CSR asks for a name the caller is not entitled to.
    #[error("the CSR requests {0}, which the authenticated identity may not use; request only the caller's own DNS identity and SPIFFE ID, or no SAN at all")]
    NameNotAllowed(String),
    /// The CSR asks for CA powers.
    #[error("the CSR requests CA powers ({0}); workload certificates are never CAs")]
    CaRequested(String),
    /// The requested lifetime is not acceptable.
    #[error("invalid TTL: {0}")]
    InvalidTtl(String),
    /// The issuer cannot sign (expired or not yet valid).
    #[error("the CA cannot issue right now: {0}")]
    IssuerUnusable(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The requested JWT-SVID audiences are unusable.
    #[error("invalid audience: {0}")]
    BadAudience(String),
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        CaError::Signing(e.to_string())
    }
}

/// Issuance policy knobs.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Names of the mesh.
    pub mesh: Mesh,
    /// Leaf lifetime when the request names none.
    pub default_ttl: Duration,
    /// Longest leaf lifetime; longer requests are clamped.
    pub max_ttl: Duration,
    /// Shortest leaf lifetime accepted.
    pub min_ttl: Duration,
}

/// The issuing intermediate in use, with the chain from it up to (excluding) the root.
pub struct ActiveIssuer {
    signer: rcgen::Issuer<'static, CaKey>,
    /// The issuer certificate followed by any further intermediates, root excluded.
    pub chain: Vec<CertificateDer<'static>>,
    /// The issuer's validity.
    pub not_before: SystemTime,
    /// The issuer's expiry.
    pub not_after: SystemTime,
    /// SHA-256 fingerprint of the issuer certificate (hex).
    pub fingerprint: String,
    /// Fingerprint of the root it chains to, when known (set by the trust
    /// manager, recorded with each leaf for rotation bookkeeping).
    pub root_fingerprint: Option<String>,
}

impl std::fmt::Debug for ActiveIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveIssuer")
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ActiveIssuer {
    /// Pairs an issuer certificate chain (issuer first) with its key, checking that they match.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: CaKey) -> Result<Self, CaError> {
        let first = chain
            .first()
            .ok_or_else(|| CaError::IssuerUnusable("empty issuer chain".into()))?;
        let (_, cert) = X509Certificate::from_der(first)
            .map_err(|e| CaError::IssuerUnusable(format!("issuer certificate: {e}")))?;
        if cert.public_key().raw != key.spki_der().as_slice() {
            return Err(CaError::IssuerUnusable(
                "issuer key does not match issuer certificate".into(),
            ));
        }
        let not_before = to_system_time(cert.validity().not_before);
        let not_after = to_system_time(cert.validity().not_after);
        let fingerprint = fingerprint(first);
        let signer = rcgen::Issuer::from_ca_cert_der(first, key)?;
        Ok(Self {
            signer,
            chain,
            not_before,
            not_after,
            fingerprint,
            root_fingerprint: None,
        })
    }

    /// Names the root this issuer chains to.
    pub(crate) fn with_root(mut self, root_fingerprint: String) -> Self {
        self.root_fingerprint = Some(root_fingerprint);
        self
    }
}

/// A versioned set of trust anchors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrustBundle {
    /// Increases on every change.
    pub version: u64,
    /// DER root certificates.
    pub roots: Vec<CertificateDer<'static>>,
    /// The roots (also in `roots`) that are tainted: a client whose chain
    /// ends at one of them must re-certify now.
    pub tainted: Vec<CertificateDer<'static>>,
    /// The keys a valid JWT-SVID of this trust domain may be signed with.
    pub jwt_keys: Vec<JwtPublicKey>,
}

/// A JWT-SVID verification key as the bundle publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtPublicKey {
    /// The JWS `kid`.
    pub key_id: String,
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// When it stops being valid, if stated.
    pub expires_at: Option<std::time::SystemTime>,
}

impl TrustBundle {
    /// The roots as concatenated PEM.
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|r| der_to_pem(r)).collect()
    }
}

/// What [`Authority::issue`] returns.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, DER.
    pub leaf: CertificateDer<'static>,
    /// Intermediates, issuer first, root excluded.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// The bundle the chain verifies against.
    pub bundle: Arc<TrustBundle>,
    /// Leaf serial, lowercase hex.
    pub serial: String,
    /// Leaf notBefore.
    pub not_before: SystemTime,
    /// Leaf notAfter.
    pub not_after: SystemTime,
    /// When the holder should renew.
    pub refresh_at: SystemTime,
    /// The SPIFFE ID in the leaf.
    pub spiffe_id: SpiffeId,
    /// The DNS identity in the leaf.
    pub dns_identity: DnsIdentity,
    /// True if the requested TTL was reduced to the maximum.
    pub ttl_clamped: bool,
    /// True if notAfter was cut short by the issuer's own expiry.
    pub clamped_to_issuer: bool,
    /// Fingerprint of the issuer that signed it.
    pub issuer_fingerprint: String,
    /// Fingerprint of the root the issuer chains to, when known.
    pub root_fingerprint: Option<String>,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo (hex).
    pub spki_sha256: String,
    /// Every SAN in the leaf, as `URI:…` / `DNS:…`.
    pub sans: Vec<String>,
}

/// The certificate authority.
pub struct Authority {
    policy: Policy,
    clock: Arc<dyn Clock>,
    issuer: ArcSwap<ActiveIssuer>,
    bundle: watch::Sender<Arc<TrustBundle>>,
    /// The JWT-SVID signing key of the active root (see `jwt`).
    jwt: arc_swap::ArcSwapOption<jwt::ActiveJwtKey>,
    jwt_policy: jwt::JwtPolicy,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Authority {
    /// Builds an authority around an issuer and the roots it chains to.
    pub fn new(
        policy: Policy,
        clock: Arc<dyn Clock>,
        issuer: ActiveIssuer,
        roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        let (bundle, _) = watch::channel(Arc::new(TrustBundle {
            version: 1,
            roots,
            ..Default::default()
        }));
        Self {
            policy,
            clock,
            issuer: ArcSwap::from_pointee(issuer),
            bundle,
            jwt: arc_swap::ArcSwapOption::empty(),
            jwt_policy: jwt::JwtPolicy::default(),
        }
    }

    /// The issuance policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The mesh names.
    pub fn mesh(&self) -> &Mesh {
        &self.policy.mesh
    }

    /// The clock the CA decides by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.borrow().clone()
    }

    /// A receiver that sees every new bundle.
    pub(crate) fn watch_bundle(&self) -> watch::Receiver<Arc<TrustBundle>> {
        self.bundle.subscribe()
    }

    /// The issuer in use.
    pub fn issuer(&self) -> Arc<ActiveIssuer> {
        self.issuer.load_full()
    }

    /// Replaces the issuer (new leaves are signed by it at once).
    pub(crate) fn set_issuer(&self, issuer: ActiveIssuer) {
        self.issuer.store(Arc::new(issuer));
    }

    /// Publishes a new trust bundle to every watcher. A bundle equal to the
    /// current one is not re-sent; the version comes from the rotation
    /// journal, which is the only place that decides it.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        self.bundle.send_if_modified(|b| {
            if **b == bundle {
                return false;
            }
            *b = Arc::new(bundle);
            true
        });
    }

    /// Resolves the lifetime to grant: `(ttl, clamped)`.
    pub(crate) fn resolve_ttl(
        &self,
        requested: Option<Duration>,
    ) -> Result<(Duration, bool), CaError> {
        let p = &self.policy;
        match requested {
            None => Ok((p.default_ttl.min(p.max_ttl), false)),
            Some(d) if d.is_zero() => Ok((p.default_ttl.min(p.max_ttl), false)),
            Some(d) if d < p.min_ttl => Err(CaError::InvalidTtl(format!(
                "requested {}s is shorter than the minimum {}s",
                d.as_secs(),
                p.min_ttl.as_secs()
            ))),
            Some(d) if d > p.max_ttl => Ok((p.max_ttl, true)),
            Some(d) => Ok((d, false)),
        }
    }

    /// Issues a leaf for `workload` from a DER CSR.
    pub fn issue(
        &self,
        workload: &Workload,
        csr_der: &[u8],
        requested_ttl: Option<Duration>,
    ) -> Result<Issued, CaError> {
        self.issue_with_dns(workload, &[], csr_der, requested_ttl)
    }

    /// Like [`Authority::issue`], with extra DNS SANs (for the CA's own server certificate).
    pub(crate) fn issue_with_dns(
        &self,
        workload: &Workload,
        extra_dns: &[String],
        csr_der: &[u8],
        requested_ttl: Option<Duration>,
    ) -> Result<Issued, CaError> {
        let mesh = &self.policy.mesh;
        let spiffe_id = workload.spiffe_id(mesh);
        let dns_identity = workload
            .dns_identity(mesh)
            .map_err(|e| CaError::MalformedCsr(format!("identity too long for DNS: {e}")))?;
        let csr = csr::validate(
            csr_der,
            &csr::AllowedNames {
                dns: dns_identity.as_str(),
                uri: spiffe_id.as_str(),
            },
        )?;
        let (ttl, ttl_clamped) = self.resolve_ttl(requested_ttl)?;

        let issuer = self.issuer.load();
        let now = self.clock.now();
        if now >= issuer.not_after {
            return Err(CaError::IssuerUnusable(format!(
                "issuer {} expired at {}; a running server renews it at 2/3 of its lifetime, so this one was down or its renewal failed (see the log); check `meshca rotation status`",
                &issuer.fingerprint[..16],
                crate::util::clock::rfc3339(issuer.not_after)
            )));
        }
        if now < issuer.not_before {
            return Err(CaError::IssuerUnusable(format!(
                "issuer {} is not valid before {}; check the system clock",
                &issuer.fingerprint[..16],
                crate::util::clock::rfc3339(issuer.not_before)
            )));
        }
        let not_before = now - BACKDATE;
        let wanted = now + ttl;
        let (not_after, clamped_to_issuer) = if wanted > issuer.not_after {
            (issuer.not_after, true)
        } else {
            (wanted, false)
        };
        let mut dns: Vec<&str> = vec![dns_identity.as_str()];
        dns.extend(extra_dns.iter().map(String::as_str));
        let params = profile::leaf(
            spiffe_id.as_str(),
            &dns,
            matches!(csr.key, csr::KeyKind::Rsa(_)),
            not_before,
            not_after,
        )?;
        let serial = hex::encode(
            params
                .serial_number
                .as_ref()
                .map(|s| s.to_bytes())
                .unwrap_or_default(),
        );
        let public = rcgen::SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| CaError::UnsupportedKey(format!("public key: {e}")))?;
        let cert = params.signed_by(&public, &issuer.signer)?;
        let life = not_after.duration_since(now).unwrap_or_default();
        let mut sans = vec![format!("URI:{spiffe_id}")];
        sans.extend(dns.iter().map(|d| format!("DNS:{d}")));
        Ok(Issued {
            leaf: cert.der().clone(),
            intermediates: issuer.chain.clone(),
            bundle: self.bundle(),
            serial,
            not_before,
            not_after,
            refresh_at: now + life.mul_f64(0.6),
            spiffe_id,
            dns_identity,
            ttl_clamped,
            clamped_to_issuer,
            issuer_fingerprint: issuer.fingerprint.clone(),
            root_fingerprint: issuer.root_fingerprint.clone(),
            spki_sha256: fingerprint(&csr.spki_der),
            sans,
        })
    }
}

/// The first URI SAN (for meshca leaves: the SPIFFE ID) of a DER
/// certificate, if it parses and has one.
pub fn uri_san(der: &[u8]) -> Option<String> {
    let (_, x) = X509Certificate::from_der(der).ok()?;
    x.subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
}

/// True when `cert` (DER) carries a valid signature by `issuer`'s key.
pub fn signed_by(cert: &[u8], issuer: &[u8]) -> bool {
    let (Ok((_, c)), Ok((_, i))) = (
        X509Certificate::from_der(cert),
        X509Certificate::from_der(issuer),
    ) else {
        return false;
    };
    c.verify_signature(Some(i.public_key())).is_ok()
}

/// SHA-256 of DER bytes, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// PEM-encodes one certificate (the one encoder: [`crate::util::pem`]).
pub fn der_to_pem(der: &[u8]) -> String {
    crate::util::pem::certificate(der)
}

/// Parses every `CERTIFICATE` block in a PEM text.
pub fn pem_to_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = crate::util::pem::certificates(pem).map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// Converts an ASN.1 time to `SystemTime`.
pub fn to_system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::clock::ManualClock;
    use store::{DataDir, InitOptions};

    fn authority(clock: Arc<ManualClock>) -> (Authority, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::new(dir.path());
        d.init(&InitOptions::default(), clock.now()).unwrap();
        let loaded = d.load().unwrap();
        let policy = Policy {
            mesh: Mesh {
                trust_domain: "cluster.local".parse().unwrap(),
                control_plane_ns: "meshca".parse().unwrap(),
            },
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86400),
            min_ttl: Duration::from_secs(300),
        };
        (
            Authority::new(policy, clock, loaded.issuer, loaded.roots),
            dir,
        )
    }

    fn csr() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn ttl_resolution() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock);
        assert_eq!(
            ca.resolve_ttl(None).unwrap(),
            (Duration::from_secs(3600), false)
        );
        assert_eq!(
            ca.resolve_ttl(Some(Duration::ZERO)).unwrap(),
            (Duration::from_secs(3600), false)
        );
        assert_eq!(
            ca.resolve_ttl(Some(Duration::from_secs(999_999))).unwrap(),
            (Duration::from_secs(86400), true)
        );
        assert!(matches!(
            ca.resolve_ttl(Some(Duration::from_secs(10))),
            Err(CaError::InvalidTtl(_))
        ));
    }

    #[test]
    fn leaves_never_outlive_the_issuer_and_expired_issuers_refuse() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock.clone());
        let w = Workload::new("shop", "web").unwrap();
        let issuer_end = ca.issuer().not_after;
        // 29.5 days later the 24h leaf would outlive the 30-day issuer.
        clock.advance(Duration::from_secs(29 * 86400 + 43200));
        let issued = ca
            .issue(&w, &csr(), Some(Duration::from_secs(86400)))
            .unwrap();
        assert!(issued.clamped_to_issuer);
        assert_eq!(
            crate::util::clock::unix_secs(issued.not_after),
            crate::util::clock::unix_secs(issuer_end)
        );
        clock.advance(Duration::from_secs(86400));
        let e = ca.issue(&w, &csr(), None).unwrap_err();
        assert!(matches!(e, CaError::IssuerUnusable(_)), "{e}");
        assert!(e.to_string().contains("expired"));
    }

    #[test]
    fn bundle_version_moves_only_on_change() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let (ca, _d) = authority(clock);
        let mut rx = ca.watch_bundle();
        rx.mark_unchanged();
        let b = ca.bundle();
        ca.set_bundle((*b).clone());
        assert!(
            !rx.has_changed().unwrap(),
            "an identical bundle is not re-sent"
        );
        let mut next = (*b).clone();
        next.version = 2;
        ca.set_bundle(next);
        assert!(rx.has_changed().unwrap());
        assert_eq!(ca.bundle().version, 2);
    }
}
