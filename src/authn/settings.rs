//! The token-source settings: which sources, in which order, where their
//! keys come from, and the renewal window. Owns their validation.
//!
//! Must not: read flags or files other than checking that named files
//! exist (see `config`), or need the Kubernetes credentials (whether
//! `jwks_kubernetes` has a kubeconfig is checked where both are known).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::util::settings::{positive, InvalidSetting};

/// Token sources, in the order they are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthnSource {
    /// Local JWT verification against a JWKS.
    Jwks,
    /// Kubernetes TokenReview.
    Tokenreview,
}

/// How tokens are checked (the settings of the same names).
#[derive(Debug, Clone)]
pub struct Settings {
    /// JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL.
    pub jwks_url: Option<String>,
    /// OIDC issuer for discovery.
    pub oidc_issuer_url: Option<String>,
    /// CA bundle for JWKS fetches.
    pub jwks_ca_file: Option<PathBuf>,
    /// Periodic JWKS refresh.
    pub jwks_refresh_interval: Duration,
    /// JWKS from the API server through the Kubernetes client.
    pub jwks_kubernetes: bool,
    /// Accepted JWT issuers.
    pub jwt_issuers: Vec<String>,
    /// TokenReview QPS.
    pub tokenreview_qps: f64,
    /// TokenReview burst.
    pub tokenreview_burst: u32,
    /// Source order.
    pub authn_order: Vec<AuthnSource>,
    /// The former `allow_legacy_tokens`: accepted so that configurations
    /// naming it still start, and ignored with a warning (legacy
    /// secret-based tokens are always refused; see `authn::legacy_refusal`).
    pub allow_legacy_tokens: bool,
    /// Renewal by certificate is refused this long after the token
    /// authentication a chain descends from (zero: off).
    pub renewal_max_age: Duration,
}

impl Settings {
    /// At most one JWKS source, HTTPS only, named files present, sane rates.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if let Some(p) = &self.jwks_file {
            if !p.exists() {
                let why = format!("{} does not exist", p.display());
                return Err(InvalidSetting::new("jwks_file", why));
            }
        }
        let sources = [
            self.jwks_file.is_some(),
            self.jwks_url.is_some(),
            self.oidc_issuer_url.is_some(),
        ];
        let set = sources.iter().filter(|x| **x).count();
        if set > 1 {
            return Err(InvalidSetting::new(
                "jwks_file",
                "set only one of jwks_file, jwks_url and oidc_issuer_url",
            ));
        }
        for (k, v) in [
            ("jwks_url", &self.jwks_url),
            ("oidc_issuer_url", &self.oidc_issuer_url),
        ] {
            if let Some(u) = v.as_ref().filter(|u| !u.starts_with("https://")) {
                return Err(InvalidSetting::new(
                    k,
                    format!("{u:?} must be an https:// URL"),
                ));
            }
        }
        if let Some(p) = self.jwks_ca_file.as_ref().filter(|p| !p.exists()) {
            let why = format!("{} does not exist", p.display());
            return Err(InvalidSetting::new("jwks_ca_file", why));
        }
        if self.jwks_refresh_interval < Duration::from_secs(10) {
            return Err(InvalidSetting::new(
                "jwks_refresh_interval",
                "must be at least 10s",
            ));
        }
        positive("tokenreview_qps", self.tokenreview_qps)?;
        if self.jwks_kubernetes && set > 0 {
            return Err(InvalidSetting::new(
                "jwks_kubernetes",
                "set only one of jwks_file, jwks_url, oidc_issuer_url and jwks_kubernetes",
            ));
        }
        Ok(())
    }

    /// No token source configured except (maybe) TokenReview's credentials:
    /// without `kubeconfig` either, the development signer is trusted.
    pub fn has_jwks_source(&self) -> bool {
        self.jwks_file.is_some()
            || self.jwks_kubernetes
            || self.jwks_url.is_some()
            || self.oidc_issuer_url.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes one setting invalid.
    type Breaks = fn(&mut Settings);

    fn ok() -> Settings {
        Settings {
            jwks_file: None,
            jwks_url: None,
            oidc_issuer_url: None,
            jwks_ca_file: None,
            jwks_refresh_interval: Duration::from_secs(300),
            jwks_kubernetes: false,
            jwt_issuers: vec![],
            tokenreview_qps: 50.0,
            tokenreview_burst: 100,
            authn_order: vec![AuthnSource::Jwks, AuthnSource::Tokenreview],
            allow_legacy_tokens: false,
            renewal_max_age: Duration::from_secs(86400),
        }
    }

    #[test]
    fn each_rule_names_its_setting() {
        assert!(ok().validate().is_ok());
        let cases: Vec<(&str, Breaks)> = vec![
            (
                "jwks_file",
                (|s| s.jwks_file = Some("/nonexistent/jwks".into())),
            ),
            (
                "jwks_file",
                (|s| {
                    s.jwks_url = Some("https://a".into());
                    s.oidc_issuer_url = Some("https://b".into());
                }),
            ),
            ("jwks_url", (|s| s.jwks_url = Some("http://a".into()))),
            (
                "oidc_issuer_url",
                (|s| s.oidc_issuer_url = Some("a".into())),
            ),
            (
                "jwks_ca_file",
                (|s| s.jwks_ca_file = Some("/nonexistent/ca".into())),
            ),
            (
                "jwks_refresh_interval",
                (|s| s.jwks_refresh_interval = Duration::from_secs(9)),
            ),
            ("tokenreview_qps", (|s| s.tokenreview_qps = f64::NAN)),
            ("tokenreview_qps", (|s| s.tokenreview_qps = 0.0)),
            (
                "jwks_kubernetes",
                (|s| {
                    s.jwks_kubernetes = true;
                    s.jwks_url = Some("https://a".into());
                }),
            ),
        ];
        for (setting, break_it) in cases {
            let mut s = ok();
            break_it(&mut s);
            assert_eq!(s.validate().unwrap_err().setting, setting);
        }
    }
}
