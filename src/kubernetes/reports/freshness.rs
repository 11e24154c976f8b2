//! When this replica last saw each report change, on its own clock.
//!
//! Owns: the observed-time rule for reports (client-go's `observedTime`
//! for Leases): a report is fresh while its resourceVersion changed less
//! than `stale_after` ago *as observed here*. The writer's own timestamp is
//! never compared with the local clock, so a writer whose clock is 15 s
//! off is neither ignored while it writes nor kept alive once it stops.
//! Must not: read the API server or decide the gate.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

/// Per report (ConfigMap name): the last resourceVersion seen and when
/// this replica first saw it.
#[derive(Debug, Default)]
pub struct Observed {
    seen: HashMap<String, (String, SystemTime)>,
}

impl Observed {
    /// Notes that report `name` is at `rv` at local time `now`; returns how
    /// long it has been unchanged as far as this replica knows (zero when
    /// it changed or was first seen now). A local clock that went back
    /// counts as no time passed.
    pub fn observe(&mut self, name: &str, rv: &str, now: SystemTime) -> Duration {
        match self.seen.get_mut(name) {
            Some((seen_rv, at)) if seen_rv == rv => now.duration_since(*at).unwrap_or_default(),
            Some(entry) => {
                *entry = (rv.to_string(), now);
                Duration::ZERO
            }
            None => {
                self.seen.insert(name.to_string(), (rv.to_string(), now));
                Duration::ZERO
            }
        }
    }

    /// Forgets reports that no longer exist (a report that comes back is
    /// a new observation).
    pub fn retain(&mut self, present: &BTreeSet<String>) {
        self.seen.retain(|k, _| present.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::clock::{Clock, ManualClock};

    /// The reader's clock decides: a writer 15 s behind (its own timestamp
    /// says "15 s old" the moment it writes) is fresh while its report
    /// changes; one 15 s ahead (timestamp "in the future") goes stale once
    /// it stops changing, exactly as a writer with a true clock would.
    #[test]
    fn freshness_is_the_readers_observation_whatever_the_writers_clock() {
        let reader = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let stale_after = Duration::from_secs(3);
        let mut o = Observed::default();
        // Versions carry the writer's timestamp, skewed either way: the
        // observer never looks at it, only at the version changing.
        for (skew, name) in [(-15i64, "behind"), (15, "ahead"), (0, "true")] {
            let writer_ts = 1_000_000i64 + skew;
            assert_eq!(
                o.observe(name, &format!("{writer_ts}"), reader.now()),
                Duration::ZERO
            );
        }
        for step in 1..=10u64 {
            reader.advance(Duration::from_secs(1));
            // "behind" and "true" rewrite every second; "ahead" stopped.
            for name in ["behind", "true"] {
                let age = o.observe(name, &format!("{name}-{step}"), reader.now());
                assert!(age <= stale_after, "{name} live but stale at {step}s");
            }
            let age = o.observe("ahead", "1000015", reader.now());
            assert_eq!(
                age,
                Duration::from_secs(step),
                "a dead writer ages on the reader's clock"
            );
        }
        // The dead one is stale now, and stays stale however far ahead its
        // own timestamp was.
        assert!(o.observe("ahead", "1000015", reader.now()) > stale_after);
    }

    #[test]
    fn a_report_that_disappears_and_returns_is_a_new_observation() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut o = Observed::default();
        o.observe("b", "5", t0);
        assert_eq!(
            o.observe("b", "5", t0 + Duration::from_secs(9)),
            Duration::from_secs(9)
        );
        o.retain(&BTreeSet::new());
        assert_eq!(
            o.observe("b", "5", t0 + Duration::from_secs(10)),
            Duration::ZERO
        );
        // A local clock stepping back does not age or panic.
        assert_eq!(o.observe("b", "5", t0), Duration::ZERO);
    }
}
