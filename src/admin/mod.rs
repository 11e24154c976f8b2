//! The admin HTTP endpoint: probes, metrics, and the operator and auditor
//! routes (rotation, audit, revocation), behind one guard.
//!
//! Owns: HTTP routing, request parsing and the mapping of domain errors to
//! HTTP status codes. Must not: make decisions itself — every route calls
//! the domain service (`trust`, `audit`, `revocation`) that owns the state.

pub mod audit;
mod error;
pub(crate) mod guard;
pub(crate) mod revocation;
pub(crate) mod rotation;

pub(crate) use error::AdminError;
