//! `meshca token`: mint a development token shaped like a Kubernetes
//! projected service-account token, signed with the data directory's
//! development key.
//!
//! Owns: those flags and their defaults. Must not: be trusted by anything
//! but a CA that was told to accept the development signer.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::authn::devtoken::{DevSigner, TokenSpec, DEV_ISSUER};
use crate::ca::store::DataDir;
use crate::identity::Workload;
use crate::util::duration::HumanDuration;

/// `meshca token` flags.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Namespace.
    #[arg(long)]
    pub namespace: String,
    /// Service account.
    #[arg(long)]
    pub service_account: String,
    /// Audience (repeatable) [default: meshca, identity.l5d.io, istio-ca].
    #[arg(long)]
    pub audience: Vec<String>,
    /// Lifetime.
    #[arg(long, default_value = "1h")]
    pub ttl: HumanDuration,
    /// Name of the pod the token is bound to [default: <service-account>-dev].
    #[arg(long)]
    pub pod: Option<String>,
    /// Data directory holding token-signer.key.
    #[arg(long, env = "MESHCA_DATA_DIR", default_value = "meshca-data")]
    pub data_dir: PathBuf,
}

/// Mints the token and prints it.
pub(crate) fn run(a: TokenArgs) -> Result<(), String> {
    let workload = Workload::new(&a.namespace, &a.service_account).map_err(|e| e.to_string())?;
    let data = DataDir::new(&a.data_dir);
    let key = data.read_key("token-signer.key").map_err(|e| {
        format!("{e} (run `meshca serve` or `meshca init` once to create the data directory)")
    })?;
    let signer = DevSigner::from_pem(&key)?;
    let audiences = if a.audience.is_empty() {
        let d = crate::api::Audiences::default();
        vec![d.native, d.linkerd, d.istio]
    } else {
        a.audience
    };
    let pod = a
        .pod
        .unwrap_or_else(|| format!("{}-dev", a.service_account));
    let t = signer.mint(
        &TokenSpec {
            workload,
            audiences,
            ttl: a.ttl.0,
            issuer: DEV_ISSUER.into(),
            pod: Some(pod),
        },
        SystemTime::now(),
    )?;
    println!("{t}");
    Ok(())
}
