//! Retry pacing: exponential backoff with jitter and a cap, the one policy
//! every retry loop uses (the agent and proxy towards the CA, the
//! Kubernetes watches towards the API server).
//!
//! Owns: computing the next wait. The computation is pure (the caller does
//! the sleeping), so tests read the sequence without sleeping. When the
//! count starts over ([`Backoff::reset`]) is the caller's call: the
//! Kubernetes watches reset only after a stream stayed healthy a while
//! (`kubernetes::watch`), never after a mere answer. Must not: decide
//! *whether* to retry.

use std::time::Duration;

/// Exponential backoff: `initial`, doubling per failure up to `cap`; with
/// jitter each wait is drawn from `[d/2, d)`, so replicas or workloads that
/// failed together do not retry in lock-step, while the wait never drops
/// below half the nominal one (a flapping server still gets relief).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    cap: Duration,
    jitter: bool,
    /// Failures since the last success.
    attempt: u32,
    /// A uniform draw from `[0, 1)`: `rand` in production, fixed in tests.
    random: fn() -> f64,
}

impl Default for Backoff {
    /// meshca's policy for a remote service: 200 ms doubling up to 30 s,
    /// with jitter.
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(30)).with_jitter()
    }
}

impl Backoff {
    /// `initial` doubling up to `cap`, without jitter.
    pub(crate) fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap: cap.max(initial),
            jitter: false,
            attempt: 0,
            random: rand::random::<f64>,
        }
    }

    /// Draws each wait from `[d/2, d)`.
    pub(crate) fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Replaces the random source (tests: a fixed value).
    #[cfg(test)]
    fn with_random(mut self, random: fn() -> f64) -> Self {
        self.random = random;
        self
    }

    /// The nominal (un-jittered) wait for the current attempt.
    fn nominal(&self) -> Duration {
        // 2^31 × any initial is past any sane cap; stop shifting there.
        let factor = 1u32 << self.attempt.min(31);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// The wait before the next retry; each call counts one more failure.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let d = self.nominal();
        self.attempt = self.attempt.saturating_add(1);
        if self.jitter {
            d.mul_f64(0.5 + (self.random)().clamp(0.0, 1.0) * 0.5)
        } else {
            d
        }
    }

    /// The wait after a failure that retrying soon cannot change (e.g. the
    /// operator denied this identity): straight to the cap, so such a
    /// client never retries hot.
    pub(crate) fn wait_at_cap(&mut self) -> Duration {
        while self.nominal() < self.cap {
            self.attempt += 1;
        }
        self.next_wait()
    }

    /// After a success: the next failure waits `initial` again.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(ms(200), Duration::from_secs(30));
        let waits: Vec<_> = (0..10).map(|_| b.next_wait()).collect();
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000].map(ms)
        );
        b.reset();
        assert_eq!(b.next_wait(), ms(200));
        // Thousands of failures neither overflow nor pass the cap.
        for _ in 0..5000 {
            assert!(b.next_wait() <= Duration::from_secs(30));
        }
        assert_eq!(b.next_wait(), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_half_to_full_of_the_nominal_wait() {
        let mut low = Backoff::default().with_random(|| 0.0);
        assert_eq!((low.next_wait(), low.next_wait()), (ms(100), ms(200)));
        let mut high = Backoff::default().with_random(|| 0.999_999);
        let w = high.next_wait();
        assert!(w < ms(200) && w > ms(199), "{w:?}");
        // The real source: every draw within [d/2, d).
        let mut b = Backoff::default();
        for i in 0..12 {
            let nominal = ms(200).saturating_mul(1 << i).min(Duration::from_secs(30));
            let w = b.next_wait();
            assert!(
                w >= nominal / 2 && w <= nominal,
                "{i}: {w:?} vs {nominal:?}"
            );
        }
    }

    #[test]
    fn a_refusal_waits_at_the_cap_at_once() {
        let mut b = Backoff::default().with_random(|| 0.0);
        assert_eq!(b.wait_at_cap(), Duration::from_secs(15));
        let mut b = Backoff::new(ms(200), Duration::from_secs(30));
        assert_eq!(b.wait_at_cap(), Duration::from_secs(30));
        assert_eq!(b.next_wait(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_wait(), ms(200));
    }
}
