//! Small, dependency-free helpers every layer may use.
//!
//! Owns: time (the `Clock` seam), human durations and sizes, secret
//! wrappers, rate limiting, PEM text, retry backoff, HPACK. Must not: depend on
//! any other meshca module.

pub(crate) mod backoff;
pub mod clock;
pub mod duration;
pub mod hpack;
pub mod pem;
pub(crate) mod ratelimit;
pub mod secret;
pub mod settings;
