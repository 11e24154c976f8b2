//! Who may watch the trust bundle, and for how long.
//!
//! Owns: the caps on anonymous `WatchTrustBundle` streams (per peer IP and
//! in total), and the stall watchdog: a stream whose client has not consumed
//! the current bundle version within `watch_stall_timeout` is reported
//! stalled, so the caller can stop counting it and close it. Must not: decide
//! who is authenticated (see `api` and `authn`), or what the activation gate
//! requires (see `trust::rotation`).
//!
//! Why: the activation gate waits until every tracked client has been sent
//! the new bundle. A client that opens a stream and never reads (an HTTP/2
//! window of 0) would otherwise be a live client that never receives it, and
//! hold every rotation hostage. Anonymous watchers are therefore never
//! tracked (only capped), and authenticated ones stop counting once they
//! stall, until a delivery shows they caught up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::ca::TrustBundle;

/// The limits on bundle watchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchSettings {
    /// How long a stream may leave the current version unconsumed.
    pub stall_timeout: Duration,
    /// Anonymous streams allowed from one IP address.
    pub anonymous_per_ip: usize,
    /// Anonymous streams allowed in total.
    pub anonymous_max: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            stall_timeout: Duration::from_secs(30),
            anonymous_per_ip: 16,
            anonymous_max: 4096,
        }
    }
}

/// Why an anonymous stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Too many from one address.
    #[error("too many anonymous bundle watchers from {ip} (the limit is {max} per address, setting watch_anonymous_per_ip); present a client certificate or a token (metadata `authorization: Bearer ...`) to watch without this limit")]
    PerIp {
        /// The address.
        ip: IpAddr,
        /// The limit.
        max: usize,
    },
    /// Too many in total.
    #[error("too many anonymous bundle watchers (the limit is {max}, setting watch_anonymous_max); present a client certificate or a token (metadata `authorization: Bearer ...`) to watch without this limit")]
    Total {
        /// The limit.
        max: usize,
    },
}

impl Refused {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::PerIp { .. } => "anonymous_per_ip",
            Refused::Total { .. } => "anonymous_total",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<Option<IpAddr>, usize>,
}

/// The watcher limits of one server. The lock is taken when a stream opens
/// or closes, never per message.
#[derive(Debug)]
pub struct Watchers {
    settings: WatchSettings,
    anonymous: Mutex<Counts>,
}

impl Watchers {
    /// With `settings`.
    pub fn new(settings: WatchSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            anonymous: Mutex::new(Counts::default()),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &WatchSettings {
        &self.settings
    }

    /// Admits an anonymous stream from `ip`, or refuses it at a cap.
    pub fn admit_anonymous(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<AnonymousSlot, Refused> {
        let mut c = self.anonymous.lock().unwrap_or_else(|e| e.into_inner());
        let here = c.per_ip.get(&ip).copied().unwrap_or(0);
        if let Some(ip) = ip.filter(|_| here >= self.settings.anonymous_per_ip) {
            return Err(Refused::PerIp {
                ip,
                max: self.settings.anonymous_per_ip,
            });
        }
        if c.total >= self.settings.anonymous_max {
            return Err(Refused::Total {
                max: self.settings.anonymous_max,
            });
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Ok(AnonymousSlot {
            watchers: self.clone(),
            ip,
        })
    }

    /// Anonymous streams open now.
    pub fn anonymous(&self) -> usize {
        self.anonymous
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total
    }
}

/// An admitted anonymous stream; dropping it frees its place.
#[derive(Debug)]
pub struct AnonymousSlot {
    watchers: Arc<Watchers>,
    ip: Option<IpAddr>,
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut c = self
            .watchers
            .anonymous
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// How a watchdog ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watchdog {
    /// The stream ended by itself.
    Ended,
    /// The client left bundle `version` unconsumed for the stall timeout.
    Stalled {
        /// The version it was not given.
        version: u64,
        /// The last version it consumed (0: none).
        consumed: u64,
    },
}

/// Watches one stream: `delivered` carries the last version handed to the
/// client's connection (its sender lives in the stream, so the stream's end
/// ends this). Returns when the stream ends or stalls.
pub(crate) async fn watchdog(
    mut bundle: watch::Receiver<Arc<TrustBundle>>,
    mut delivered: watch::Receiver<u64>,
    stall: Duration,
) -> Watchdog {
    loop {
        let want = bundle.borrow_and_update().version;
        let caught_up = match tokio::time::timeout(stall, delivered.wait_for(|v| *v >= want)).await
        {
            Err(_) => None,
            Ok(r) => Some(r.is_ok()),
        };
        match caught_up {
            None => {
                return Watchdog::Stalled {
                    version: want,
                    consumed: *delivered.borrow(),
                }
            }
            Some(false) => return Watchdog::Ended,
            Some(true) => {}
        }
        // Caught up: wait for the next version (or the stream's end).
        tokio::select! {
            r = bundle.changed() => if r.is_err() { return Watchdog::Ended },
            r = delivered.changed() => if r.is_err() { return Watchdog::Ended },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn anonymous_watchers_are_capped_per_address_and_in_total() {
        let w = Watchers::new(WatchSettings {
            anonymous_per_ip: 2,
            anonymous_max: 3,
            ..Default::default()
        });
        let a1 = w.admit_anonymous(ip("10.0.0.1")).unwrap();
        let _a2 = w.admit_anonymous(ip("10.0.0.1")).unwrap();
        let e = w.admit_anonymous(ip("10.0.0.1")).unwrap_err();
        assert_eq!(e.reason(), "anonymous_per_ip");
        assert!(e.to_string().contains("10.0.0.1"), "{e}");
        let _b1 = w.admit_anonymous(ip("10.0.0.2")).unwrap();
        let e = w.admit_anonymous(ip("10.0.0.3")).unwrap_err();
        assert_eq!(e, Refused::Total { max: 3 });
        drop(a1);
        assert_eq!(w.anonymous(), 2);
        w.admit_anonymous(ip("10.0.0.1"))
            .expect("a place was freed for that address");
    }

    fn bundle(version: u64) -> Arc<TrustBundle> {
        Arc::new(TrustBundle {
            version,
            roots: Vec::new(),
            ..Default::default()
        })
    }

    // Real time, scaled down: 1 unit = 100 ms (tokio's paused clock needs a
    // feature the crate does not otherwise use).
    const U: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn a_stream_that_does_not_consume_the_current_version_stalls() {
        let (btx, brx) = watch::channel(bundle(3));
        let (dtx, drx) = watch::channel(0u64);
        let dog = tokio::spawn(watchdog(brx, drx, 5 * U));
        // Consumes version 3 in time, then the bundle moves to 4.
        tokio::time::sleep(2 * U).await;
        dtx.send(3).unwrap();
        tokio::time::sleep(10 * U).await;
        assert!(!dog.is_finished(), "caught up: no stall however long");
        btx.send(bundle(4)).unwrap();
        tokio::time::sleep(2 * U).await;
        assert!(!dog.is_finished(), "not yet");
        assert_eq!(
            tokio::time::timeout(10 * U, dog).await.unwrap().unwrap(),
            Watchdog::Stalled {
                version: 4,
                consumed: 3
            }
        );
    }

    #[tokio::test]
    async fn the_watchdog_ends_with_its_stream() {
        let (_btx, brx) = watch::channel(bundle(1));
        let (dtx, drx) = watch::channel(0u64);
        let dog = tokio::spawn(watchdog(brx, drx, 50 * U));
        dtx.send(1).unwrap();
        drop(dtx);
        let end = tokio::time::timeout(10 * U, dog).await.unwrap().unwrap();
        assert_eq!(end, Watchdog::Ended);
    }
}
