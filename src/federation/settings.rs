//! Federation settings: the bundle endpoint this CA serves, and the other
//! trust domains it follows (`--federate-with`, TOML `federate_with`).
//!
//! Owns: the shapes, their text form and `validate()`. Must not: read the
//! files named here (the start-up step does) or open sockets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::identity::{SpiffeId, TrustDomain};
use crate::util::settings::InvalidSetting;

/// A bundle endpoint profile (SPIFFE Federation §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Web PKI: the server's certificate verifies to public (or configured) roots.
    HttpsWeb,
    /// SPIFFE authentication: the server presents an X509-SVID.
    HttpsSpiffe,
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "https_web" => Ok(Self::HttpsWeb),
            "https_spiffe" => Ok(Self::HttpsSpiffe),
            _ => Err(format!("profile {s:?}: use https_web or https_spiffe")),
        }
    }
}

impl Profile {
    /// The spec's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpsWeb => "https_web",
            Self::HttpsSpiffe => "https_spiffe",
        }
    }
}

/// One trust domain this CA follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    /// The foreign trust domain the endpoint's bundle is for.
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint URL (`https://`, no userinfo).
    pub url: String,
    /// How the endpoint is authenticated.
    pub profile: Profile,
    /// https_spiffe: the SPIFFE ID the endpoint's SVID must carry.
    pub endpoint_spiffe_id: Option<SpiffeId>,
    /// https_spiffe: the bootstrap bundle (SPIFFE bundle JSON or PEM) used
    /// until a bundle has been fetched.
    pub bundle_file: Option<PathBuf>,
    /// https_web: PEM roots to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
}

impl FromStr for Follow {
    type Err = String;
    /// `td=example.org,url=https://…,profile=https_spiffe,endpoint_spiffe_id=spiffe://…,bundle=FILE`
    /// (https_web: `ca=FILE` optional).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = RawFollow::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let v = Some(v.to_string());
            match k {
                "td" | "trust_domain" => f.trust_domain = v,
                "url" => f.url = v,
                "profile" => f.profile = v,
                "endpoint_spiffe_id" => f.endpoint_spiffe_id = v,
                "bundle" | "bundle_file" => f.bundle_file = v.map(PathBuf::from),
                "ca" | "ca_file" => f.ca_file = v.map(PathBuf::from),
                _ => {
                    return Err(format!(
                        "unknown key {k:?} (td, url, profile, endpoint_spiffe_id, bundle, ca)"
                    ))
                }
            }
        }
        f.build()
    }
}

/// The TOML form: a table with the same keys, or the flag's string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFollow {
    #[serde(alias = "td")]
    trust_domain: Option<String>,
    url: Option<String>,
    profile: Option<String>,
    endpoint_spiffe_id: Option<String>,
    #[serde(alias = "bundle")]
    bundle_file: Option<PathBuf>,
    #[serde(alias = "ca")]
    ca_file: Option<PathBuf>,
}

impl RawFollow {
    fn build(self) -> Result<Follow, String> {
        let td = self
            .trust_domain
            .ok_or("td (the trust domain) is required")?;
        let trust_domain: TrustDomain = td.parse().map_err(|e| format!("td: {e}"))?;
        let url = self.url.ok_or("url is required")?;
        let uri: hyper::Uri = url.parse().map_err(|e| format!("url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("url {url:?}: a bundle endpoint URL must be https"));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!("url {url:?}: must not contain userinfo"));
        }
        let profile: Profile = self.profile.as_deref().unwrap_or("https_web").parse()?;
        let endpoint_spiffe_id = match self.endpoint_spiffe_id {
            Some(s) => Some(
                s.parse::<SpiffeId>()
                    .map_err(|e| format!("endpoint_spiffe_id: {e}"))?,
            ),
            None => None,
        };
        if profile == Profile::HttpsSpiffe && endpoint_spiffe_id.is_none() {
            return Err("profile https_spiffe needs endpoint_spiffe_id".into());
        }
        if profile == Profile::HttpsWeb
            && (endpoint_spiffe_id.is_some() || self.bundle_file.is_some())
        {
            return Err("endpoint_spiffe_id and bundle belong to profile https_spiffe".into());
        }
        if profile == Profile::HttpsSpiffe && self.ca_file.is_some() {
            return Err("ca belongs to profile https_web".into());
        }
        Ok(Follow {
            trust_domain,
            url,
            profile,
            endpoint_spiffe_id,
            bundle_file: self.bundle_file,
            ca_file: self.ca_file,
        })
    }
}

/// What `federate_with` holds in flags, environment and TOML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowSpec(pub Follow);

impl FromStr for FollowSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(Self)
    }
}

impl<'de> Deserialize<'de> for FollowSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Table(RawFollow),
        }
        let f = match Either::deserialize(d)? {
            Either::Text(s) => s.parse(),
            Either::Table(t) => t.build(),
        };
        f.map(Self).map_err(serde::de::Error::custom)
    }
}

/// How this CA's own bundle endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeProfile {
    /// The operator's certificate and key (PEM files, re-read on change).
    HttpsWeb {
        /// Certificate chain, leaf first.
        cert_file: PathBuf,
        /// Its private key.
        key_file: PathBuf,
    },
    /// An X509-SVID of this trust domain issued by the CA itself (the CA's
    /// own identity), renewed automatically.
    HttpsSpiffe,
}

/// Everything federation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where to serve the bundle endpoint (off when `None`).
    pub listen: Option<SocketAddr>,
    /// Its profile.
    pub profile: ServeProfile,
    /// The path the bundle is served at.
    pub path: String,
    /// The `spiffe_refresh_hint` this CA publishes.
    pub refresh_hint: Duration,
    /// Trust domains followed.
    pub follow: Vec<Follow>,
}

/// The shortest wait between two fetches of one endpoint, whatever its hint.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// The longest, whatever its hint (keeps key removals propagating).
pub const MAX_REFRESH: Duration = Duration::from_secs(3600);
/// The wait when a bundle states no hint (Federation §4.1: five minutes).
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: None,
            profile: ServeProfile::HttpsSpiffe,
            path: "/".into(),
            refresh_hint: DEFAULT_REFRESH,
            follow: Vec::new(),
        }
    }
}

impl Settings {
    /// Refuses settings that cannot work.
    pub fn validate(&self, own: &TrustDomain) -> Result<(), InvalidSetting> {
        if !self.path.starts_with('/') {
            return Err(InvalidSetting::new(
                "federation_path",
                "must start with '/'",
            ));
        }
        if self.refresh_hint < Duration::from_secs(1) {
            return Err(InvalidSetting::new(
                "federation_refresh_hint",
                "must be at least 1s",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.follow {
            if &f.trust_domain == own {
                return Err(InvalidSetting::new(
                    "federate_with",
                    format!("{} is this CA's own trust domain", f.trust_domain),
                ));
            }
            if !seen.insert(f.trust_domain.clone()) {
                return Err(InvalidSetting::new(
                    "federate_with",
                    format!("{} is listed twice", f.trust_domain),
                ));
            }
            if let Some(id) = &f.endpoint_spiffe_id {
                let td = id.trust_domain();
                let known =
                    td == own.as_str() || self.follow.iter().any(|o| o.trust_domain.as_str() == td);
                if !known {
                    return Err(InvalidSetting::new(
                        "federate_with",
                        format!("the endpoint of {} is in trust domain {td}, which is neither this CA's nor followed: its SVID could not be verified", f.trust_domain),
                    ));
                }
                let self_serving = td == f.trust_domain.as_str();
                if self_serving && f.bundle_file.is_none() {
                    return Err(InvalidSetting::new(
                        "federate_with",
                        format!("{}: a self-serving https_spiffe endpoint needs bundle=FILE to bootstrap", f.trust_domain),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_and_the_toml_forms() {
        let f: Follow = "td=b.org,url=https://b:8443/,profile=https_spiffe,endpoint_spiffe_id=spiffe://b.org/ns/meshca/sa/meshca,bundle=/b.json"
            .parse()
            .unwrap();
        assert_eq!(f.trust_domain.as_str(), "b.org");
        assert_eq!(f.profile, Profile::HttpsSpiffe);
        #[derive(Deserialize)]
        struct T {
            federate_with: Vec<FollowSpec>,
        }
        let t: T = toml::from_str(
            "federate_with = [\"td=c.org,url=https://c/\", { td = \"d.org\", url = \"https://d/b\", profile = \"https_web\", ca = \"/ca.pem\" }]",
        )
        .unwrap();
        assert_eq!(t.federate_with[0].0.profile, Profile::HttpsWeb);
        assert_eq!(t.federate_with[1].0.ca_file, Some(PathBuf::from("/ca.pem")));
        for bad in [
            "url=https://x/",
            "td=b.org,url=http://x/",
            "td=b.org,url=https://u@x/",
            "td=b.org,url=https://x/,profile=https_spiffe",
            "td=b.org,url=https://x/,profile=ftp",
            "td=b.org,url=https://x/,colour=red",
        ] {
            assert!(bad.parse::<Follow>().is_err(), "{bad}");
        }
    }
}
