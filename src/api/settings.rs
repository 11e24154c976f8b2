//! The request-path settings: token audiences, the per-pod and
//! per-service-account rate limits, the bundle-watcher caps and the gRPC
//! listener's limits; and their validation.
//!
//! Must not: read flags or files (see `config`).

use std::time::Duration;

use crate::util::settings::{positive, InvalidSetting};

use super::watchers::WatchSettings;
use super::Audiences;

/// What the APIs accept and how fast.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Audiences per API.
    pub audiences: Audiences,
    /// Per-pod rate.
    pub rate_limit: f64,
    /// Per-pod burst.
    pub rate_burst: u32,
    /// The per-service-account ceiling, watcher and listener limits.
    pub limits: Limits,
}

/// Limits and fairness: the per-service-account rate ceiling, the
/// trust-bundle watchers, and the gRPC listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Certificates per second for one service account (all its pods).
    pub identity_rate_limit: f64,
    /// Burst of the above.
    pub identity_rate_burst: u32,
    /// Bundle watchers.
    pub watch: WatchSettings,
    /// Open connections.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// HTTP/2 keepalive PING interval (None: off).
    pub keepalive_interval: Option<Duration>,
    /// HTTP/2 keepalive PING deadline.
    pub keepalive_timeout: Duration,
    /// Idle connection timeout (None: never).
    pub idle_timeout: Option<Duration>,
    /// Largest header list, bytes.
    pub max_header_bytes: u32,
}

impl Settings {
    /// Positive rates, non-empty audiences, and limits that let a client in.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        positive("rate_limit", self.rate_limit)?;
        for (k, v) in [
            ("native_audience", &self.audiences.native),
            ("linkerd_audience", &self.audiences.linkerd),
            ("istio_audience", &self.audiences.istio),
        ] {
            if v.is_empty() {
                return Err(InvalidSetting::new(k, "must not be empty"));
            }
        }
        self.limits.validate()
    }
}

impl Limits {
    /// Each limit names its setting (`identity_rate_limit`, `watch_*`, `grpc_*`).
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        positive("identity_rate_limit", self.identity_rate_limit)?;
        let at_least_one = [
            ("watch_anonymous_per_ip", self.watch.anonymous_per_ip),
            ("watch_anonymous_max", self.watch.anonymous_max),
            ("grpc_max_connections", self.max_connections),
            (
                "grpc_max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
        ];
        for (k, v) in at_least_one {
            if v == 0 {
                return Err(InvalidSetting::new(k, "must be at least 1"));
            }
        }
        let at_least_100ms = [
            ("watch_stall_timeout", self.watch.stall_timeout),
            ("grpc_handshake_timeout", self.handshake_timeout),
        ];
        for (k, v) in at_least_100ms {
            if v < Duration::from_millis(100) {
                return Err(InvalidSetting::new(k, "must be at least 100ms"));
            }
        }
        if self.max_header_bytes < 1024 {
            return Err(InvalidSetting::new(
                "grpc_max_header_bytes",
                "must be at least 1024",
            ));
        }
        if self.keepalive_interval.is_some() && self.keepalive_timeout.is_zero() {
            return Err(InvalidSetting::new(
                "grpc_keepalive_timeout",
                "must be more than 0",
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
            audiences: Audiences::default(),
            rate_limit: 5.0,
            rate_burst: 20,
            limits: Limits {
                identity_rate_limit: 100.0,
                identity_rate_burst: 1000,
                watch: WatchSettings::default(),
                max_connections: 10_000,
                max_concurrent_streams: 100,
                handshake_timeout: Duration::from_secs(10),
                keepalive_interval: Some(Duration::from_secs(30)),
                keepalive_timeout: Duration::from_secs(10),
                idle_timeout: Some(Duration::from_secs(300)),
                max_header_bytes: 16 * 1024,
            },
        }
    }

    #[test]
    fn each_rule_names_its_setting() {
        assert!(ok().validate().is_ok());
        let cases: [(&str, Breaks); 11] = [
            ("rate_limit", |s| s.rate_limit = -1.0),
            ("linkerd_audience", |s| s.audiences.linkerd.clear()),
            ("identity_rate_limit", |s| {
                s.limits.identity_rate_limit = f64::NAN
            }),
            ("watch_anonymous_per_ip", |s| {
                s.limits.watch.anonymous_per_ip = 0
            }),
            ("watch_anonymous_max", |s| s.limits.watch.anonymous_max = 0),
            ("grpc_max_connections", |s| s.limits.max_connections = 0),
            ("grpc_max_concurrent_streams", |s| {
                s.limits.max_concurrent_streams = 0
            }),
            ("watch_stall_timeout", |s| {
                s.limits.watch.stall_timeout = Duration::from_millis(99)
            }),
            ("grpc_handshake_timeout", |s| {
                s.limits.handshake_timeout = Duration::from_millis(99)
            }),
            ("grpc_max_header_bytes", |s| {
                s.limits.max_header_bytes = 1023
            }),
            ("grpc_keepalive_timeout", |s| {
                s.limits.keepalive_timeout = Duration::ZERO
            }),
        ];
        for (setting, break_it) in cases {
            let mut s = ok();
            break_it(&mut s);
            assert_eq!(s.validate().unwrap_err().setting, setting);
        }
        // Keepalive off: a zero timeout is irrelevant.
        let mut s = ok();
        s.limits.keepalive_interval = None;
        s.limits.keepalive_timeout = Duration::ZERO;
        assert!(s.validate().is_ok());
    }
}
