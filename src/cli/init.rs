//! `meshca init` and `meshca bundle`: create a CA in a data directory, and
//! print the trust bundle it holds.
//!
//! Owns: those flags and their printed summary. Must not: touch key
//! material itself (`ca::store::DataDir` does).

use std::path::PathBuf;
use std::time::SystemTime;

use crate::ca::store::{DataDir, InitOptions};
use crate::cli::Error;
use crate::util::clock::rfc3339;
use crate::util::duration::HumanDuration;

/// `meshca init` flags.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Data directory.
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    pub data_dir: PathBuf,
    /// Import this root certificate (PEM) instead of generating one.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// The imported root's private key (PEM).
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// Lifetime of a generated root.
    #[arg(long, default_value = "365d")]
    pub root_ttl: HumanDuration,
    /// Lifetime of the issuer (clamped to the root's expiry).
    #[arg(long, default_value = "30d")]
    pub issuer_ttl: HumanDuration,
}

/// `meshca bundle` flags.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// Data directory.
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    pub data_dir: PathBuf,
}

/// Creates the CA and prints what was created.
pub(crate) fn run(a: InitArgs) -> Result<(), Error> {
    let opts = InitOptions {
        root_lifetime: a.root_ttl.0,
        issuer_lifetime: a.issuer_ttl.0,
        import_root: a.root_cert.zip(a.root_key),
        ..Default::default()
    };
    let r = DataDir::new(&a.data_dir).init(&opts, SystemTime::now())?;
    println!("created CA in {}", a.data_dir.display());
    println!(
        "  root    {} ({})",
        r.root_fingerprint,
        if r.imported { "imported" } else { "generated" }
    );
    println!(
        "  issuer  {} (expires {})",
        r.issuer_fingerprint,
        rfc3339(r.issuer_not_after)
    );
    if r.issuer_clamped {
        eprintln!(
            "WARNING: the issuer lifetime was cut short to the root's expiry; rotate the root soon"
        );
    }
    Ok(())
}

/// Prints the trust bundle (PEM roots).
pub(crate) fn bundle(a: BundleArgs) -> Result<(), Error> {
    print!("{}", DataDir::new(a.data_dir).bundle_pem()?);
    Ok(())
}
