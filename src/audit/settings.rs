//! The audit-log settings (`audit_log`, `audit_checkpoint_interval`,
//! `audit_refusal_*`, `audit_max_bytes`) and their validation.
//!
//! Must not: open the log (the server does) or read flags (see `config`).

use std::time::Duration;

use crate::util::settings::InvalidSetting;

/// The smallest `audit_max_bytes` accepted.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;

/// How the audit log is kept.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Audit log on.
    pub audit_log: bool,
    /// Checkpoint signing interval.
    pub audit_checkpoint_interval: Duration,
    /// How many refusals per peer reach the audit log, and the window in
    /// which identical ones are folded into one entry.
    pub audit_refusal: super::intake::Limits,
    /// Size limit of the audit log's files (None: the volume's).
    pub audit_max_bytes: Option<u64>,
}

impl Settings {
    /// Intervals long enough not to spin, a positive refusal rate, and a
    /// size limit the log can live in.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.audit_checkpoint_interval < Duration::from_millis(100) {
            return Err(InvalidSetting::new(
                "audit_checkpoint_interval",
                "must be at least 100ms",
            ));
        }
        let rate = self.audit_refusal.rate;
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(InvalidSetting::new(
                "audit_refusal_rate",
                "must be a positive number",
            ));
        }
        if self.audit_refusal.window < Duration::from_millis(10) {
            return Err(InvalidSetting::new(
                "audit_refusal_window",
                "must be at least 10ms",
            ));
        }
        if self.audit_max_bytes.is_some_and(|n| n < MIN_MAX_BYTES) {
            return Err(InvalidSetting::new(
                "audit_max_bytes",
                "must be at least 64Ki",
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

    fn ok() -> Settings {
        Settings {
            audit_log: true,
            audit_checkpoint_interval: Duration::from_secs(10),
            audit_refusal: Default::default(),
            audit_max_bytes: None,
        }
    }

    #[test]
    fn each_rule_names_its_setting() {
        assert!(ok().validate().is_ok());
        let mut s = ok();
        s.audit_max_bytes = Some(MIN_MAX_BYTES);
        assert!(s.validate().is_ok(), "the minimum itself is accepted");
        let cases: [(&str, Breaks); 5] = [
            ("audit_checkpoint_interval", |s| {
                s.audit_checkpoint_interval = Duration::from_millis(99)
            }),
            ("audit_refusal_rate", |s| s.audit_refusal.rate = 0.0),
            ("audit_refusal_rate", |s| {
                s.audit_refusal.rate = f64::INFINITY
            }),
            ("audit_refusal_window", |s| {
                s.audit_refusal.window = Duration::from_millis(9)
            }),
            ("audit_max_bytes", |s| {
                s.audit_max_bytes = Some(MIN_MAX_BYTES - 1)
            }),
        ];
        for (setting, break_it) in cases {
            let mut s = ok();
            break_it(&mut s);
            assert_eq!(s.validate().unwrap_err().setting, setting);
        }
    }
}
