//! Small, dependency-free helpers every layer may use.
//!
//! Owns: time (the `Clock` seam), human durations and sizes, secret
//! wrappers, rate limiting. Must not: depend on any other meshca module.

pub mod clock;
pub mod duration;
pub mod ratelimit;
pub mod secret;
