//! Trust anchors over time: rotation of roots and issuers.
//!
//! Owns: the rotation state machine (`rotation`, pure), its journal
//! (`journal`), the files derived from it in the data directory
//! (`manager`), which bundle version each client has seen (`propagation`),
//! the live service that applies steps to the running CA (`service`), the
//! status report (`status`), the admin HTTP routes (`http`) and the SPIFFE
//! bundle document (`spiffe_bundle`).

pub mod journal;
pub mod manager;
pub mod propagation;
pub mod rotation;
pub(crate) mod service;
mod settings;
pub mod spiffe_bundle;
pub mod status;
