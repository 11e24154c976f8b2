//! The last good bundle of each followed trust domain, kept in the data
//! directory (`federation/<trust domain>.json`, the SPIFFE bundle document
//! as fetched), so a restart does not depend on the foreign endpoint being
//! up, and an https_spiffe endpoint is authenticated with the latest bundle
//! (Federation §5.2.2.4) rather than the bootstrap one.
//!
//! Must not: decide whether a bundle is acceptable (the follower does).

use std::path::{Path, PathBuf};

use crate::identity::TrustDomain;
use crate::trust::spiffe_bundle::SpiffeBundle;

/// Where the followed bundles live under a data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("federation")
}

fn file(data_dir: &Path, td: &TrustDomain) -> PathBuf {
    // Trust domain names are [a-z0-9.-] (identity::TrustDomain): safe as file names.
    dir(data_dir).join(format!("{td}.json"))
}

/// Persists `doc` (a validated document) atomically.
pub fn save(data_dir: &Path, td: &TrustDomain, doc: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir(data_dir))?;
    crate::util::secret::write_public(&file(data_dir, td), doc)
}

/// The persisted bundle of `td`, if any; a file that no longer validates
/// is reported (and ignored) rather than trusted.
pub fn load(data_dir: &Path, td: &TrustDomain) -> Result<Option<SpiffeBundle>, String> {
    let path = file(data_dir, td);
    match std::fs::read(&path) {
        Ok(bytes) => SpiffeBundle::parse(&bytes, td)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// A bootstrap bundle file: a SPIFFE bundle document, or PEM roots.
pub fn read_bootstrap(path: &Path, td: &TrustDomain) -> Result<SpiffeBundle, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.trim_ascii_start().starts_with(b"{") {
        return SpiffeBundle::parse(&bytes, td).map_err(|e| format!("{}: {e}", path.display()));
    }
    let roots = crate::ca::pem_to_certs(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if roots.is_empty() {
        return Err(format!(
            "{}: neither a SPIFFE bundle nor PEM certificates",
            path.display()
        ));
    }
    Ok(SpiffeBundle {
        x509_authorities: roots,
        ..SpiffeBundle::default()
    })
}
