//! Time as a seam: everything that decides by the clock takes a [`Clock`], so
//! tests run state machines under a fixed or stepped clock instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (for tests).
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `t`.
    pub fn new(t: SystemTime) -> Self {
        Self(AtomicU64::new(unix_millis(t)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.0.load(Ordering::SeqCst))
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The latest instant meshca represents: 9999-12-31T23:59:59Z, the end of
/// both RFC 5280 GeneralizedTime and RFC 3339.
pub const MAX_UNIX_SECS: u64 = 253_402_300_799;

/// `secs` after the Unix epoch, clamped to [`MAX_UNIX_SECS`]. For numbers
/// that come from outside (a token's `exp`, another replica's report):
/// `UNIX_EPOCH + Duration::from_secs(u64::MAX)` panics, and a time past the
/// year 9999 cannot be printed, so the clamp keeps both total.
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.min(MAX_UNIX_SECS))
}

/// `t + d`, ending at the latest representable instant instead of
/// panicking: for lifetimes an operator (or an admin request) chose, such as
/// a root lifetime of 10^17 days. 9999-12-31T23:59:59Z is what RFC 5280
/// (4.1.2.5) prescribes for a certificate with no well-defined expiry.
pub(crate) fn add_clamped(t: SystemTime, d: Duration) -> SystemTime {
    let max = from_unix_secs(MAX_UNIX_SECS);
    t.checked_add(d).map_or(max, |end| end.min(max))
}

/// RFC 3339 rendering in UTC, for humans and JSON. Total: a time the
/// format cannot express (before year 0, after 9999) prints as Unix seconds
/// instead of panicking, as `OffsetDateTime::from(SystemTime)` would.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let nanos = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|odt| {
            odt.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{}s", unix_secs(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times from outside (token `exp`, replica reports) are clamped, and
    /// printing never panics, even for a time the format cannot express.
    #[test]
    fn untrusted_times_are_clamped_and_always_print() {
        assert_eq!(rfc3339(from_unix_secs(u64::MAX)), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(from_unix_secs(0)), "1970-01-01T00:00:00Z");
        let far = UNIX_EPOCH + Duration::from_secs(10u64.pow(13));
        assert_eq!(rfc3339(far), "10000000000000s");
    }

    /// Found by `admin::rotation_bodies_get_client_errors`: a root lifetime
    /// of 18446744073709552d panicked `prepare` (HTTP 500).
    #[test]
    fn lifetimes_end_at_the_last_representable_instant() {
        let now = SystemTime::now();
        let max = from_unix_secs(MAX_UNIX_SECS);
        assert_eq!(add_clamped(now, Duration::from_secs(u64::MAX)), max);
        assert_eq!(add_clamped(now, Duration::from_secs(1 << 40)), max);
        assert_eq!(
            add_clamped(now, Duration::from_secs(60)),
            now + Duration::from_secs(60)
        );
    }
}
