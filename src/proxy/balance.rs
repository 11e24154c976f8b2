//! Choosing an upstream endpoint for each new connection.
//!
//! Owns: the upstream's endpoint set (from DNS, re-resolved periodically,
//! keeping each endpoint's statistics across refreshes), power-of-two-choices
//! over least outstanding connections among healthy endpoints, and ejection
//! of endpoints that fail to connect, with exponential backoff before they
//! are tried again. Time is passed in, so ejection is tested without sleeps.
//! Must not: open connections itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;

/// One upstream address and what we know about it.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// The address.
    pub addr: SocketAddr,
    outstanding: AtomicUsize,
    failures: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            outstanding: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    /// Connections open through it.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn ejected_at(&self, now: Instant) -> Option<Instant> {
        let g = self.ejected_until.lock().unwrap_or_else(|e| e.into_inner());
        g.filter(|t| *t > now)
    }
}

/// Holds one outstanding connection on an endpoint; dropping it releases it.
#[derive(Debug)]
pub(crate) struct Lease(Arc<Endpoint>);

impl Lease {
    /// The endpoint.
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one upstream.
#[derive(Debug)]
pub(crate) struct Balancer {
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            endpoints: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

impl Balancer {
    /// Replaces the address set, keeping the state of addresses still present.
    pub(crate) fn set_addresses(&self, addrs: &[SocketAddr]) {
        let old = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == *a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(*a)))
            })
            .collect();
        self.endpoints.store(Arc::new(next));
    }

    /// The current endpoints (the tests inspect them).
    #[cfg(test)]
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// Picks an endpoint for a new connection, skipping `tried`: two random
    /// healthy candidates, the one with fewer outstanding connections wins.
    /// When every endpoint is ejected, the one whose ejection ends first is
    /// tried (better than refusing outright).
    pub(crate) fn pick(&self, now: Instant, tried: &[SocketAddr]) -> Option<Lease> {
        let all = self.endpoints.load();
        let open: Vec<&Arc<Endpoint>> = all.iter().filter(|e| !tried.contains(&e.addr)).collect();
        if open.is_empty() {
            return None;
        }
        let healthy: Vec<&Arc<Endpoint>> = open
            .iter()
            .copied()
            .filter(|e| e.ejected_at(now).is_none())
            .collect();
        let chosen = match healthy.len() {
            0 => open.iter().copied().min_by_key(|e| e.ejected_at(now))?,
            1 => healthy[0],
            n => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (x, y) = (healthy[a], healthy[b]);
                if y.outstanding() < x.outstanding() {
                    y
                } else {
                    x
                }
            }
        };
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease(chosen.clone()))
    }

    /// A connection attempt failed: eject for 1 s, doubling per consecutive
    /// failure up to 30 s.
    pub(crate) fn failed(&self, ep: &Endpoint, now: Instant) -> Duration {
        let f = ep.failures.fetch_add(1, Ordering::Relaxed);
        let wait = Duration::from_secs(1 << f.min(5)).min(Duration::from_secs(30));
        *ep.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(now + wait);
        wait
    }

    /// A connection attempt succeeded: the endpoint is healthy again.
    pub(crate) fn succeeded(&self, ep: &Endpoint) {
        ep.failures.store(0, Ordering::Relaxed);
        *ep.ejected_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn least_outstanding_of_two_choices_spreads_load() {
        let b = Balancer::default();
        b.set_addresses(&[addr(1), addr(2), addr(3)]);
        let now = Instant::now();
        let mut leases = Vec::new();
        for _ in 0..300 {
            leases.push(b.pick(now, &[]).unwrap());
        }
        let counts: Vec<usize> = b.endpoints().iter().map(|e| e.outstanding()).collect();
        // With P2C the spread stays tight (random choice alone would not).
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 2, "{counts:?}");
        drop(leases);
        assert!(b.endpoints().iter().all(|e| e.outstanding() == 0));
    }

    #[test]
    fn failing_endpoints_are_ejected_with_backoff_and_come_back() {
        let b = Balancer::default();
        b.set_addresses(&[addr(1), addr(2)]);
        let t0 = Instant::now();
        let bad = b.endpoints()[0].clone();
        assert_eq!(b.failed(&bad, t0), Duration::from_secs(1));
        assert_eq!(b.failed(&bad, t0), Duration::from_secs(2));
        for _ in 0..50 {
            assert_eq!(b.pick(t0, &[]).unwrap().endpoint().addr, addr(2));
        }
        // A retry skips what was already tried; with everything tried, none.
        assert!(b.pick(t0, &[addr(2), addr(1)]).is_none());
        // All ejected: the soonest back is tried rather than nothing.
        let good = b.endpoints()[1].clone();
        b.failed(&good, t0);
        assert_eq!(b.pick(t0, &[]).unwrap().endpoint().addr, addr(2));
        // After the backoff, healthy again; success resets the count.
        let later = t0 + Duration::from_secs(3);
        let picked: std::collections::HashSet<_> = (0..50)
            .map(|_| b.pick(later, &[]).unwrap().endpoint().addr)
            .collect();
        assert_eq!(picked.len(), 2);
        b.succeeded(&bad);
        assert_eq!(b.failed(&bad, later), Duration::from_secs(1));
        // A refresh keeps state for addresses that remain.
        b.set_addresses(&[addr(1), addr(3)]);
        assert!(b.endpoints()[0].ejected_at(later).is_some());
        assert_eq!(b.endpoints().len(), 2);
    }
}
