//! The issuance settings (`trust_domain`, `control_plane_namespace`,
//! `default_ttl`, `max_ttl`, `min_ttl`) are the CA's [`Policy`]; this file
//! owns their validation. Must not: read flags or files (see `config`).

use crate::util::settings::InvalidSetting;

use super::Policy;

impl Policy {
    /// The leaf lifetimes must be ordered `min_ttl <= default_ttl <= max_ttl`.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_ttl < self.min_ttl {
            return Err(InvalidSetting::new(
                "max_ttl",
                "must not be shorter than min_ttl",
            ));
        }
        if self.default_ttl > self.max_ttl || self.default_ttl < self.min_ttl {
            return Err(InvalidSetting::new(
                "default_ttl",
                "must lie between min_ttl and max_ttl",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(min: u64, default: u64, max: u64) -> Policy {
        Policy {
            mesh: crate::identity::Mesh {
                trust_domain: "cluster.local".parse().unwrap(),
                control_plane_ns: "meshca".parse().unwrap(),
            },
            default_ttl: Duration::from_secs(default),
            max_ttl: Duration::from_secs(max),
            min_ttl: Duration::from_secs(min),
        }
    }

    #[test]
    fn lifetimes_must_be_ordered() {
        assert!(policy(300, 3600, 86400).validate().is_ok());
        assert!(policy(300, 300, 300).validate().is_ok());
        assert_eq!(
            policy(600, 600, 300).validate().unwrap_err().setting,
            "max_ttl"
        );
        assert_eq!(
            policy(300, 100, 3600).validate().unwrap_err().setting,
            "default_ttl"
        );
        assert_eq!(
            policy(300, 7200, 3600).validate().unwrap_err().setting,
            "default_ttl"
        );
    }
}
