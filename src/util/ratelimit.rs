//! Token-bucket rate limiting.
//!
//! Owns: [`TokenBucket`] (one bucket) and [`KeyedLimiter`] (one bucket per
//! key, sharded so concurrent callers rarely share a lock). Time comes from a
//! [`Clock`], so tests step it instead of sleeping. Must not: know what the
//! keys mean.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::util::clock::Clock;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

impl Bucket {
    fn take(&mut self, now: SystemTime, rate: f64, burst: f64) -> bool {
        let dt = now
            .duration_since(self.at)
            .unwrap_or_default()
            .as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now.max(self.at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One token bucket: `rate` tokens per second, at most `burst` banked.
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
    clock: Arc<dyn Clock>,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: f64, burst: u32, clock: Arc<dyn Clock>) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                at: clock.now(),
            }),
            clock,
        }
    }

    /// Takes a token if one is available.
    pub(crate) fn try_take(&self) -> bool {
        let now = self.clock.now();
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(now, self.rate, self.burst)
    }
}

const SHARDS: usize = 32;

/// One bucket per key.
pub(crate) struct KeyedLimiter<K> {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<K, Bucket>>>,
    clock: Arc<dyn Clock>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// `rate` per second and `burst` per key.
    pub(crate) fn new(rate: f64, burst: u32, clock: Arc<dyn Clock>) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            clock,
        }
    }

    /// Takes a token from `key`'s bucket if one is available.
    pub(crate) fn try_take(&self, key: &K) -> bool {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        let now = self.clock.now();
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 50_000 {
            // Forget buckets that have refilled completely: they carry no state.
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| {
                b.tokens + now.duration_since(b.at).unwrap_or_default().as_secs_f64() * rate < burst
            });
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.take(now, self.rate, self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::clock::ManualClock;
    use std::time::Duration;

    #[test]
    fn bucket_refills_with_time() {
        let clock = Arc::new(ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1000),
        ));
        let l = KeyedLimiter::new(2.0, 3, clock.clone());
        assert!((0..3).all(|_| l.try_take(&"a")));
        assert!(!l.try_take(&"a"));
        assert!(l.try_take(&"b"), "keys are independent");
        clock.advance(Duration::from_millis(500));
        assert!(l.try_take(&"a"));
        assert!(!l.try_take(&"a"));
        clock.advance(Duration::from_secs(60));
        assert!((0..3).all(|_| l.try_take(&"a")), "refills up to burst");
        assert!(!l.try_take(&"a"));
    }
}
