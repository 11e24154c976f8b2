//! The admin endpoint's settings (`admin_listen`, `admin_allowed_hosts`)
//! and their validation. Must not: bind (the server does).

use std::net::SocketAddr;

use crate::util::settings::InvalidSetting;

/// Where the admin endpoint listens and which `Host` names it answers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Extra `Host` names the admin endpoint answers to.
    pub admin_allowed_hosts: Vec<String>,
}

impl Settings {
    /// Every allowed host is a bare name or address (no path, user or space).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for h in &self.admin_allowed_hosts {
            if h.trim().is_empty() || h.contains(['/', ' ', '@']) {
                return Err(InvalidSetting::new(
                    "admin_allowed_hosts",
                    format!("{h:?} is not a host name or address"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_must_be_bare_names() {
        let with = |h: &str| Settings {
            admin_listen: "127.0.0.1:9990".parse().unwrap(),
            admin_allowed_hosts: vec![h.to_string()],
        };
        assert!(with("meshca.example").validate().is_ok());
        assert!(with("10.0.0.1").validate().is_ok());
        for bad in ["", " ", "evil.example/x", "user@host", "a b"] {
            let e = with(bad).validate().unwrap_err();
            assert_eq!(e.setting, "admin_allowed_hosts", "{bad:?}");
        }
    }
}
