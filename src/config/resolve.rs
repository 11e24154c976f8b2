//! From merged flags/environment/file to a validated [`ServeConfig`]: the
//! defaults of every setting, each domain's `Settings` built and validated
//! by the domain's own `validate()`, and the few rules that span domains.
//!
//! Must not: open sockets or read files other than checking that named
//! files exist (the domains' validation does).

use std::path::PathBuf;
use std::time::Duration;

use crate::api::watchers::WatchSettings;
use crate::api::{Audiences, IDENTITY_BURST, IDENTITY_RATE};
use crate::authn::settings::AuthnSource;
use crate::identity::{Mesh, NameError};
use crate::util::duration::{parse_bytes, HumanDuration};
use crate::util::settings::InvalidSetting;

use super::args::ServeArgs;
use super::{ConfigError, ServeConfig};

/// A duration setting with its default in seconds.
fn secs(v: Option<HumanDuration>, default: u64) -> Duration {
    v.map_or(Duration::from_secs(default), |d| d.0)
}

impl ServeArgs {
    /// Applies defaults and validates.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let this = self.with_kubernetes(crate::kubernetes::detect::pod())?;
        this.resolve_detected()
    }

    /// [`ServeArgs::resolve`] after in-cluster detection.
    pub fn resolve_detected(self) -> Result<ServeConfig, ConfigError> {
        let issuance = self.issuance()?;
        issuance.validate()?;
        let api = self.api();
        api.validate()?;
        let authn = self.authn();
        authn.validate()?;
        let server_dns_names = self.server_dns_names.clone().unwrap_or_default();
        for n in &server_dns_names {
            n.parse::<crate::identity::DnsIdentity>()
                .map_err(|e| InvalidSetting::new("server_dns_names", e.to_string()))?;
        }
        let audit = self.audit()?;
        audit.validate()?;
        let admin = crate::admin::settings::Settings {
            admin_listen: self
                .admin_listen
                .unwrap_or_else(|| ([127, 0, 0, 1], 9990).into()),
            admin_allowed_hosts: self.admin_allowed_hosts.clone().unwrap_or_default(),
        };
        admin.validate()?;
        let kubernetes = self.kubernetes_settings()?;
        kubernetes.validate()?;
        if authn.jwks_kubernetes && kubernetes.kubeconfig.is_none() {
            let why = crate::kubernetes::settings::NEEDS_KUBECONFIG;
            return Err(InvalidSetting::new("jwks_kubernetes", why).into());
        }
        let mut jwt = self.jwt()?;
        if self.jwt_svid_max_ttl.is_none() {
            // Unset: a JWT-SVID lives no longer than a certificate may, so
            // the rotation gates (below) need not wait for it separately.
            let p = &mut jwt.policy;
            p.max_ttl = p.max_ttl.min(issuance.max_ttl);
            if self.jwt_svid_default_ttl.is_none() {
                p.default_ttl = p.default_ttl.min(p.max_ttl);
            }
        }
        jwt.validate()?;
        let mut trust = self.trust(issuance.max_ttl);
        // A root's JWT key is deleted with the root: the rotation gates must
        // wait out its longest-lived JWT-SVID as well as its longest leaf, or
        // a retire could delete a key whose tokens still verify elsewhere.
        trust.max_leaf_ttl = trust.max_leaf_ttl.max(jwt.policy.max_ttl);
        trust.validate()?;
        let federation = self.federation()?;
        federation.validate(&issuance.mesh.trust_domain)?;
        Ok(ServeConfig {
            init_root: self.init_root()?,
            replica: self.replica(),
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from("meshca-data")),
            listen: self.listen.unwrap_or_else(|| ([127, 0, 0, 1], 8080).into()),
            server_dns_names,
            bundle_file: self.bundle_file,
            log_format: self.log_format.unwrap_or_default(),
            issuance,
            authn,
            audit,
            api,
            kubernetes,
            admin,
            trust,
            jwt,
            federation,
        })
    }

    /// JWT-SVID key type and lifetimes.
    fn jwt(&self) -> Result<crate::ca::jwt::Settings, ConfigError> {
        let key_type = match &self.jwt_svid_key_type {
            None => crate::ca::jwt::JwtKeyType::default(),
            Some(s) => s
                .parse()
                .map_err(|e: String| InvalidSetting::new("jwt_svid_key_type", e))?,
        };
        Ok(crate::ca::jwt::Settings {
            key_type,
            policy: crate::ca::jwt::JwtPolicy {
                default_ttl: secs(self.jwt_svid_default_ttl, 300),
                max_ttl: secs(self.jwt_svid_max_ttl, 3600),
            },
        })
    }

    /// The bundle endpoint and the trust domains followed.
    fn federation(&self) -> Result<crate::federation::settings::Settings, ConfigError> {
        use crate::federation::settings::{ServeProfile, Settings};
        let profile = match (
            self.federation_profile.as_deref(),
            &self.federation_cert_file,
            &self.federation_key_file,
        ) {
            (None | Some("https_spiffe"), None, None) => ServeProfile::HttpsSpiffe,
            (None | Some("https_web"), Some(c), Some(k)) => ServeProfile::HttpsWeb {
                cert_file: c.clone(),
                key_file: k.clone(),
            },
            (Some("https_web"), _, _) => {
                let why = "https_web needs federation_cert_file and federation_key_file";
                return Err(InvalidSetting::new("federation_profile", why).into());
            }
            (Some("https_spiffe"), _, _) => {
                let why = "https_spiffe presents the CA's own SVID: federation_cert_file/key_file belong to https_web";
                return Err(InvalidSetting::new("federation_profile", why).into());
            }
            (Some(other), _, _) => {
                let why = format!("{other:?}: use https_web or https_spiffe");
                return Err(InvalidSetting::new("federation_profile", why).into());
            }
            (None, _, _) => {
                let why =
                    "set both federation_cert_file and federation_key_file (profile https_web)";
                return Err(InvalidSetting::new("federation_cert_file", why).into());
            }
        };
        let d = Settings::default();
        Ok(Settings {
            listen: self.federation_listen,
            profile,
            path: self.federation_path.clone().unwrap_or(d.path),
            refresh_hint: self.federation_refresh_hint.map_or(d.refresh_hint, |h| h.0),
            follow: self
                .federate_with
                .iter()
                .flatten()
                .map(|f| f.0.clone())
                .collect(),
        })
    }

    /// The issuance policy: mesh names and leaf lifetimes.
    fn issuance(&self) -> Result<crate::ca::Policy, ConfigError> {
        let bad = |setting, e: NameError| InvalidSetting::new(setting, e.to_string());
        let trust_domain = self.trust_domain.as_deref().unwrap_or("cluster.local");
        let namespace = self.control_plane_namespace.as_deref().unwrap_or("meshca");
        Ok(crate::ca::Policy {
            mesh: Mesh {
                trust_domain: trust_domain.parse().map_err(|e| bad("trust_domain", e))?,
                control_plane_ns: namespace
                    .parse()
                    .map_err(|e| bad("control_plane_namespace", e))?,
            },
            default_ttl: secs(self.default_ttl, 86400),
            max_ttl: secs(self.max_ttl, 86400),
            min_ttl: secs(self.min_ttl, 300),
        })
    }

    /// Audiences, rate limits and the listener's limits.
    fn api(&self) -> crate::api::settings::Settings {
        let limits = crate::api::settings::Limits {
            identity_rate_limit: self.identity_rate_limit.unwrap_or(IDENTITY_RATE),
            identity_rate_burst: self.identity_rate_burst.unwrap_or(IDENTITY_BURST),
            watch: WatchSettings {
                stall_timeout: secs(self.watch_stall_timeout, 30),
                anonymous_per_ip: self.watch_anonymous_per_ip.unwrap_or(16),
                anonymous_max: self.watch_anonymous_max.unwrap_or(4096),
            },
            max_connections: self.grpc_max_connections.unwrap_or(10_000),
            max_concurrent_streams: self.grpc_max_concurrent_streams.unwrap_or(100),
            handshake_timeout: secs(self.grpc_handshake_timeout, 10),
            keepalive_interval: Some(secs(self.grpc_keepalive_interval, 30))
                .filter(|d| !d.is_zero()),
            keepalive_timeout: secs(self.grpc_keepalive_timeout, 10),
            idle_timeout: Some(secs(self.grpc_idle_timeout, 300)).filter(|d| !d.is_zero()),
            max_header_bytes: self.grpc_max_header_bytes.unwrap_or(16 * 1024),
        };
        crate::api::settings::Settings {
            audiences: Audiences {
                native: self
                    .native_audience
                    .clone()
                    .unwrap_or_else(|| "meshca".into()),
                linkerd: (self.linkerd_audience.clone())
                    .unwrap_or_else(|| "identity.l5d.io".into()),
                istio: self
                    .istio_audience
                    .clone()
                    .unwrap_or_else(|| "istio-ca".into()),
            },
            rate_limit: self.rate_limit.unwrap_or(5.0),
            rate_burst: self.rate_burst.unwrap_or(20),
            limits,
        }
    }

    /// Token sources and renewal.
    fn authn(&self) -> crate::authn::settings::Settings {
        crate::authn::settings::Settings {
            jwks_file: self.jwks_file.clone(),
            jwks_url: self.jwks_url.clone(),
            oidc_issuer_url: self.oidc_issuer_url.clone(),
            jwks_ca_file: self.jwks_ca_file.clone(),
            jwks_refresh_interval: secs(self.jwks_refresh_interval, 300),
            jwks_kubernetes: self.jwks_kubernetes.unwrap_or(false),
            jwt_issuers: self.jwt_issuers.clone().unwrap_or_else(|| {
                vec![self
                    .oidc_issuer_url
                    .clone()
                    .unwrap_or_else(|| crate::authn::devtoken::DEV_ISSUER.to_string())]
            }),
            tokenreview_qps: self.tokenreview_qps.unwrap_or(50.0),
            tokenreview_burst: self.tokenreview_burst.unwrap_or(100),
            authn_order: (self.authn_order.clone())
                .unwrap_or_else(|| vec![AuthnSource::Jwks, AuthnSource::Tokenreview]),
            allow_legacy_tokens: self.allow_legacy_tokens.unwrap_or(false),
            renewal_max_age: secs(self.renewal_max_age, 86400),
        }
    }

    /// The audit log; `audit_max_bytes` is parsed here (a size, not a number).
    fn audit(&self) -> Result<crate::audit::settings::Settings, ConfigError> {
        let audit_max_bytes = match self.audit_max_bytes.as_deref() {
            None => None,
            Some(v) => Some(parse_bytes(v).ok_or_else(|| {
                InvalidSetting::new(
                    "audit_max_bytes",
                    format!("{v:?} is not a size (write bytes, or 500Mi, 2Gi, 1G)"),
                )
            })?),
        };
        Ok(crate::audit::settings::Settings {
            audit_log: self.audit_log.unwrap_or(true),
            audit_checkpoint_interval: secs(self.audit_checkpoint_interval, 10),
            audit_refusal: crate::audit::intake::Limits {
                rate: self.audit_refusal_rate.unwrap_or(2.0),
                burst: self.audit_refusal_burst.unwrap_or(20).max(1),
                window: secs(self.audit_refusal_window, 60),
            },
            audit_max_bytes,
        })
    }

    /// Root and issuer rotation; leaves live at most `max_ttl`.
    fn trust(&self, max_ttl: Duration) -> crate::trust::service::Settings {
        crate::trust::service::Settings {
            issuer_lifetime: secs(self.issuer_lifetime, 30 * 86400),
            root_lifetime: secs(self.root_lifetime, 365 * 86400),
            propagation_wait: self.propagation_wait.map_or(max_ttl, |d| d.0),
            max_leaf_ttl: max_ttl,
            expiry_warning: secs(self.expiry_warning, 7 * 86400),
            auto_rotate_every: self.auto_rotate_root_every.map(|d| d.0),
            check_interval: secs(self.rotation_check_interval, 30),
        }
    }

    /// `init_root_cert` and `init_root_key` go together.
    fn init_root(&self) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
        match (&self.init_root_cert, &self.init_root_key) {
            (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
            (None, None) => Ok(None),
            _ => Err(InvalidSetting::new(
                "init_root_cert",
                "init_root_cert and init_root_key go together",
            )
            .into()),
        }
    }

    /// This replica's name: `replica_name` ($POD_NAME), else the host name
    /// with a random suffix.
    fn replica(&self) -> String {
        self.replica_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            format!(
                "{}-{:08x}",
                if host.is_empty() { "meshca" } else { &host },
                rand::random::<u32>()
            )
        })
    }
}
