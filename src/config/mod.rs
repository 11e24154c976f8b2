//! Typed, validated configuration for `meshca serve`.
//!
//! Owns: precedence — command-line flags over `MESHCA_*` environment
//! variables (both through clap, `args`) over the TOML file named by
//! `--config` (`file`); the in-cluster defaults (`kubernetes`); and the
//! composition of each domain's `Settings` into one [`ServeConfig`]
//! (`resolve`). Each domain owns its settings struct and its `validate()`;
//! an invalid value fails at start-up with a [`ConfigError`] naming the
//! setting. Must not: open sockets or files other than the TOML file.

mod args;
mod file;
mod kubernetes;
mod resolve;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::api::settings::Limits;
pub use crate::authn::settings::AuthnSource;
pub use crate::kubernetes::settings::PublishConfig;
pub use crate::util::duration::{parse_bytes, parse_duration, HumanDuration};
pub use args::{LogFormat, ServeArgs};

use crate::util::settings::InvalidSetting;

/// Why `serve`'s configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting has a value that cannot work ("invalid setting NAME: why").
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
    /// The TOML file cannot be read or parsed (an unknown key is named).
    #[error("config file {}: {reason}", path.display())]
    File {
        /// The file named by `--config`.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// The setting at fault, when one is.
    pub fn setting(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid(e) => Some(e.setting),
            ConfigError::File { .. } => None,
        }
    }
}

/// The resolved, validated `serve` configuration, composed of each
/// domain's settings. Immutable once built.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Extra server DNS names.
    pub server_dns_names: Vec<String>,
    /// Extra bundle output file.
    pub bundle_file: Option<PathBuf>,
    /// Root (certificate, key) to import when the data directory is empty.
    pub init_root: Option<(PathBuf, PathBuf)>,
    /// This replica's name.
    pub replica: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Mesh names and leaf lifetimes (the CA's issuance policy).
    pub issuance: crate::ca::Policy,
    /// Token sources and renewal.
    pub authn: crate::authn::settings::Settings,
    /// The audit log.
    pub audit: crate::audit::settings::Settings,
    /// Audiences, rate limits, watcher and listener limits.
    pub api: crate::api::settings::Settings,
    /// What meshca does with the Kubernetes API server.
    pub kubernetes: crate::kubernetes::settings::Settings,
    /// The admin endpoint.
    pub admin: crate::admin::settings::Settings,
    /// Root and issuer rotation (`max_leaf_ttl` is the issuance `max_ttl`).
    pub trust: crate::trust::service::Settings,
    /// JWT-SVIDs: key type and lifetimes.
    pub jwt: crate::ca::jwt::Settings,
    /// SPIFFE federation: the bundle endpoint and the domains followed.
    pub federation: crate::federation::settings::Settings,
}

impl ServeConfig {
    /// Defaults with a given data directory and ephemeral ports (tests, bench).
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let mut c = ServeArgs {
            kubernetes: Some(false),
            ..Default::default()
        }
        .resolve()
        .expect("defaults are valid");
        c.data_dir = data_dir;
        c.listen = ([127, 0, 0, 1], 0).into();
        c.admin.admin_listen = ([127, 0, 0, 1], 0).into();
        c
    }

    /// Sets the longest leaf lifetime everywhere it counts: issuance, and
    /// the rotation gates that must wait out the leaves of a retired root.
    pub fn set_max_ttl(&mut self, max_ttl: std::time::Duration) {
        self.issuance.max_ttl = max_ttl;
        self.trust.max_leaf_ttl = max_ttl;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(clap::Parser)]
    struct Cmd {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn pod(ns: &str) -> Option<crate::kubernetes::detect::Pod> {
        Some(crate::kubernetes::detect::Pod {
            namespace: Some(ns.into()),
        })
    }

    #[test]
    fn in_cluster_mode_fills_defaults_and_explicit_settings_win() {
        use clap::Parser;
        let detected = ServeArgs::default()
            .with_kubernetes(pod("mesh-system"))
            .unwrap()
            .resolve_detected()
            .unwrap();
        assert!(detected.kubernetes.kubernetes);
        assert_eq!(
            detected.kubernetes.kubeconfig.as_deref(),
            Some(std::path::Path::new("in-cluster"))
        );
        assert_eq!(
            detected.issuance.mesh.control_plane_ns.as_str(),
            "mesh-system"
        );
        assert_eq!(
            detected.kubernetes.state_secret.as_deref(),
            Some("meshca-ca")
        );
        assert_eq!(
            detected.kubernetes.audit_key_secret.as_deref(),
            Some("meshca-audit-key")
        );
        assert_eq!(
            detected.kubernetes.issuer_secret.as_deref(),
            Some("meshca-issuer")
        );
        assert!(detected.kubernetes.publish.is_some());
        assert!(detected.authn.jwks_kubernetes);
        assert!(
            detected.kubernetes.watch_token_bindings,
            "in-cluster: tokens die with their pod"
        );
        assert_eq!(
            detected.authn.authn_order,
            vec![AuthnSource::Jwks, AuthnSource::Tokenreview]
        );

        let explicit = Cmd::try_parse_from([
            "x",
            "--kubernetes",
            "--state-secret",
            "ca-state",
            "--publish-bundle",
            "false",
            "--control-plane-namespace",
            "ops",
            "--watch-token-bindings",
            "false",
        ])
        .unwrap()
        .serve
        .with_kubernetes(pod("mesh-system"))
        .unwrap()
        .resolve_detected()
        .unwrap();
        assert_eq!(
            explicit.kubernetes.state_secret.as_deref(),
            Some("ca-state")
        );
        assert!(explicit.kubernetes.publish.is_none());
        assert_eq!(explicit.issuance.mesh.control_plane_ns.as_str(), "ops");
        assert!(!explicit.kubernetes.watch_token_bindings);
        // Outside a cluster it is off, and asking for it needs credentials.
        assert!(
            !ServeConfig::for_tests("d".into())
                .kubernetes
                .watch_token_bindings
        );
        let e = ServeArgs {
            kubernetes: Some(false),
            watch_token_bindings: Some(true),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.setting(), Some("watch_token_bindings"));
        let e = e.to_string();
        assert!(
            e.contains("invalid setting watch_token_bindings: needs kubeconfig"),
            "{e}"
        );

        let off = Cmd::try_parse_from(["x", "--kubernetes=false"])
            .unwrap()
            .serve
            .with_kubernetes(pod("mesh-system"))
            .unwrap()
            .resolve_detected()
            .unwrap();
        assert!(!off.kubernetes.kubernetes);
        assert!(off.kubernetes.kubeconfig.is_none() && off.kubernetes.state_secret.is_none());

        // Outside a pod, --kubernetes needs a kubeconfig.
        let e = Cmd::try_parse_from(["x", "--kubernetes"])
            .unwrap()
            .serve
            .with_kubernetes(None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a pod") && e.contains("kubeconfig"), "{e}");
        // Not detected and not asked: nothing changes.
        let plain = ServeArgs::default()
            .with_kubernetes(None)
            .unwrap()
            .resolve_detected()
            .unwrap();
        assert!(!plain.kubernetes.kubernetes && plain.kubernetes.state_secret.is_none());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(
            "90s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(90)
        );
        assert_eq!(
            "24h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(86400)
        );
        assert_eq!("7d".parse::<HumanDuration>().unwrap().to_string(), "7d");
        assert_eq!(
            "300".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(300)
        );
        assert!("3w".parse::<HumanDuration>().is_err());
        assert!("h".parse::<HumanDuration>().is_err());
    }

    /// `allow_legacy_tokens` is retired (the API server never confirms a
    /// legacy token for our audiences) but stays accepted, from the flag,
    /// the environment's spelling and the file, so that a configuration
    /// naming it still starts; it is no longer advertised in `--help`.
    /// Review finding: with `max_ttl` 60s and `jwt_svid_max_ttl` 1h, a
    /// retire one minute after activation deleted a JWT key whose tokens had
    /// 58 minutes left. The gates now wait for the longer of the two.
    #[test]
    fn rotation_gates_wait_out_the_longest_jwt_svid_too() {
        use clap::Parser;
        let c = Cmd::try_parse_from([
            "x",
            "--max-ttl",
            "60s",
            "--min-ttl",
            "10s",
            "--default-ttl",
            "60s",
            "--jwt-svid-max-ttl",
            "1h",
        ])
        .unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!(s.issuance.max_ttl, Duration::from_secs(60));
        assert_eq!(s.trust.max_leaf_ttl, Duration::from_secs(3600));
        // Unset, the JWT-SVID maximum follows a shorter max_ttl, so the
        // gates wait for nothing longer than a certificate.
        let c = Cmd::try_parse_from([
            "x",
            "--max-ttl",
            "2s",
            "--min-ttl",
            "1s",
            "--default-ttl",
            "2s",
        ])
        .unwrap();
        let s = c.serve.resolve().unwrap();
        assert_eq!(s.jwt.policy.max_ttl, Duration::from_secs(2));
        assert_eq!(s.jwt.policy.default_ttl, Duration::from_secs(2));
        assert_eq!(s.trust.max_leaf_ttl, Duration::from_secs(2));
    }

    #[test]
    fn the_retired_allow_legacy_tokens_is_still_accepted_but_hidden() {
        use clap::{CommandFactory, Parser};
        let c = Cmd::try_parse_from(["x", "--allow-legacy-tokens", "true"]).unwrap();
        assert_eq!(c.serve.allow_legacy_tokens, Some(true));
        assert!(c.serve.resolve().unwrap().authn.allow_legacy_tokens);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("meshca.toml");
        std::fs::write(&f, "allow_legacy_tokens = true\n").unwrap();
        let from_file = ServeArgs {
            config: Some(f),
            ..Default::default()
        }
        .with_file()
        .unwrap();
        assert_eq!(from_file.allow_legacy_tokens, Some(true));
        let help = Cmd::command().render_long_help().to_string();
        assert!(!help.contains("allow-legacy-tokens"), "{help}");
    }

    #[test]
    fn file_is_lowest_precedence_and_errors_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("meshca.toml");
        std::fs::write(
            &f,
            "trust_domain = \"example.org\"\nmax_ttl = \"2h\"\ndefault_ttl = \"1h\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f.clone()),
            max_ttl: Some("3h".parse().unwrap()),
            ..Default::default()
        };
        let c = args.with_file().unwrap().resolve().unwrap();
        assert_eq!(c.issuance.mesh.trust_domain.as_str(), "example.org");
        assert_eq!(
            c.issuance.max_ttl,
            Duration::from_secs(3 * 3600),
            "flag beats file"
        );
        assert_eq!(c.issuance.default_ttl, Duration::from_secs(3600));

        std::fs::write(&f, "trust_domain = \"Bad_Domain\"\n").unwrap();
        let e = ServeArgs {
            config: Some(f.clone()),
            ..Default::default()
        }
        .with_file()
        .unwrap()
        .resolve()
        .unwrap_err();
        assert_eq!(e.setting(), Some("trust_domain"));
        let e = e.to_string();
        assert!(e.starts_with("invalid setting trust_domain: "), "{e}");

        std::fs::write(&f, "no_such_setting = 1\n").unwrap();
        let e = ServeArgs {
            config: Some(f),
            ..Default::default()
        }
        .with_file()
        .unwrap_err()
        .to_string();
        assert!(e.contains("no_such_setting"), "{e}");

        let e = ServeArgs {
            min_ttl: Some("2d".parse().unwrap()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert_eq!(e.setting(), Some("max_ttl"));
        assert_eq!(
            e.to_string(),
            "invalid setting max_ttl: must not be shorter than min_ttl"
        );
    }
}
