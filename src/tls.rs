//! rustls plumbing shared by the server, the clients and the proxy.
//!
//! Owns: the one crypto provider meshca uses (ring) and turning a trust
//! bundle into a rustls root store. Must not: know about configuration,
//! the CA or any wire API.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// The ring crypto provider (the one crypto backend in the tree).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trust bundle of a running server, as rustls roots (for clients).
pub fn root_store(roots: &[CertificateDer<'static>]) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        let _ = store.add(r.clone());
    }
    store
}
