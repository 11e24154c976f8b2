//! Validation of the rotation settings ([`super::service::Settings`]):
//! lifetimes that let a new root outlive its own activation and roots
//! overlap under automatic rotation. Must not: read flags (see `config`).

use std::time::Duration;

use crate::util::settings::InvalidSetting;

use super::service::Settings;

impl Settings {
    /// Issuers outlive leaves; roots outlive their propagation and leaves.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let max_ttl = self.max_leaf_ttl;
        if self.issuer_lifetime < max_ttl.max(Duration::from_secs(60)) {
            return Err(InvalidSetting::new(
                "issuer_lifetime",
                format!(
                    "must be at least max_ttl ({}s), or leaves would be cut short",
                    max_ttl.as_secs()
                ),
            ));
        }
        if self.root_lifetime <= self.propagation_wait + max_ttl {
            return Err(InvalidSetting::new(
                "root_lifetime",
                "must exceed propagation_wait + max_ttl (a new root must outlive its own activation)",
            ));
        }
        // Overlap: the next root is prepared `every` after activation and
        // needs propagation_wait before it can sign; the old one must still
        // be valid then, plus one leaf lifetime.
        if let Some(every) = self.auto_rotate_every {
            if every + self.propagation_wait + max_ttl >= self.root_lifetime {
                return Err(InvalidSetting::new(
                    "auto_rotate_root_every",
                    format!(
                        "must be shorter than root_lifetime ({}s) minus propagation_wait and max_ttl, so roots overlap",
                        self.root_lifetime.as_secs()
                    ),
                ));
            }
        }
        if self.check_interval < Duration::from_millis(100) {
            return Err(InvalidSetting::new(
                "rotation_check_interval",
                "must be at least 100ms",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes one setting invalid.
    type Breaks = fn(&mut Settings);

    const DAY: u64 = 86400;

    fn ok() -> Settings {
        Settings {
            issuer_lifetime: Duration::from_secs(30 * DAY),
            root_lifetime: Duration::from_secs(365 * DAY),
            propagation_wait: Duration::from_secs(DAY),
            max_leaf_ttl: Duration::from_secs(DAY),
            expiry_warning: Duration::from_secs(7 * DAY),
            auto_rotate_every: None,
            check_interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn each_rule_names_its_setting() {
        assert!(ok().validate().is_ok());
        let cases: [(&str, Breaks); 5] = [
            ("issuer_lifetime", |s| {
                s.issuer_lifetime = Duration::from_secs(DAY - 1)
            }),
            ("root_lifetime", |s| {
                s.root_lifetime = Duration::from_secs(2 * DAY)
            }),
            ("auto_rotate_root_every", |s| {
                s.auto_rotate_every = Some(Duration::from_secs(363 * DAY))
            }),
            ("rotation_check_interval", |s| {
                s.check_interval = Duration::from_millis(99)
            }),
            // Even with short leaves, an issuer lives at least a minute.
            ("issuer_lifetime", |s| {
                s.max_leaf_ttl = Duration::from_secs(1);
                s.issuer_lifetime = Duration::from_secs(59);
            }),
        ];
        for (setting, break_it) in cases {
            let mut s = ok();
            break_it(&mut s);
            assert_eq!(s.validate().unwrap_err().setting, setting);
        }
        let mut s = ok();
        s.auto_rotate_every = Some(Duration::from_secs(362 * DAY) - Duration::from_secs(1));
        assert!(s.validate().is_ok(), "just enough overlap");
    }
}
