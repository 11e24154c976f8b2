//! The error every domain's `Settings::validate` returns: which setting
//! (by its TOML key / flag name) is invalid, and a sentence saying why.
//!
//! Must not: know any particular setting (each domain owns its own).

/// One invalid setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct InvalidSetting {
    /// The setting's name, as in the TOML file (flags spell it with `-`).
    pub setting: &'static str,
    /// Why, and what would be accepted.
    pub reason: String,
}

impl InvalidSetting {
    /// `setting` is invalid because of `reason`.
    pub fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        Self {
            setting,
            reason: reason.into(),
        }
    }
}

/// Checks that a rate is a positive number (not NaN, not zero or less).
pub fn positive(setting: &'static str, v: f64) -> Result<(), InvalidSetting> {
    if v.is_nan() || v <= 0.0 {
        return Err(InvalidSetting::new(setting, "must be a positive number"));
    }
    Ok(())
}
