//! `meshca inspect`: print a PEM certificate chain readably (or as JSON).
//!
//! Owns: the per-certificate summary (its JSON keys are a contract). Must
//! not: validate the chain (this is a viewer; `certify` verifies).

use std::path::{Path, PathBuf};

use x509_parser::prelude::*;

use crate::ca::{fingerprint, pem_to_certs, to_system_time};
use crate::cli::output::{print_json, Output};
use crate::util::clock::rfc3339;

/// `meshca inspect` flags.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A PEM file with one or more certificates.
    pub file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// The table's rows, in order (`sans` follow, one line each).
const TABLE_KEYS: [&str; 8] = [
    "subject",
    "issuer",
    "serial",
    "not_before",
    "not_after",
    "key",
    "sha256_fingerprint",
    "spki_sha256",
];

/// Reads the file and prints every certificate in it.
pub(crate) fn run(a: InspectArgs) -> Result<(), String> {
    let rows = summarize_file(&a.file)?;
    match a.output {
        Output::Json => print_json(&rows)?,
        Output::Table => {
            for (i, r) in rows.iter().enumerate() {
                let kind = if r["is_ca"] == true {
                    "CA certificate"
                } else {
                    "end-entity certificate"
                };
                println!("[{i}] {kind}");
                for k in TABLE_KEYS {
                    println!("    {:<20} {}", k, r[k].as_str().unwrap_or(""));
                }
                for s in r["sans"].as_array().into_iter().flatten() {
                    println!("    {:<20} {}", "san", s.as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}

/// One JSON object per certificate in the PEM file.
fn summarize_file(file: &Path) -> Result<Vec<serde_json::Value>, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let certs = pem_to_certs(&bytes).map_err(|e| format!("{}: {e}", file.display()))?;
    certs.iter().map(|der| summarize(der)).collect()
}

fn summarize(der: &[u8]) -> Result<serde_json::Value, String> {
    let (_, x) = X509Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
    let key = match x.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::EC(p)) => {
            format!("ECDSA ({} bits)", p.key_size())
        }
        Ok(x509_parser::public_key::PublicKey::RSA(r)) => {
            format!("RSA ({} bits)", r.key_size())
        }
        _ => x.public_key().algorithm.algorithm.to_id_string(),
    };
    let ca = x
        .basic_constraints()
        .ok()
        .flatten()
        .map(|b| b.value.ca)
        .unwrap_or(false);
    Ok(serde_json::json!({
        "subject": x.subject().to_string(),
        "issuer": x.issuer().to_string(),
        "serial": x.raw_serial_as_string().replace(':', ""),
        "sans": sans(&x),
        "not_before": rfc3339(to_system_time(x.validity().not_before)),
        "not_after": rfc3339(to_system_time(x.validity().not_after)),
        "key": key,
        "is_ca": ca,
        "sha256_fingerprint": fingerprint(der),
        "spki_sha256": fingerprint(x.public_key().raw),
    }))
}

/// A certificate's subject alternative names as `DNS:…` / `URI:…`.
pub(crate) fn sans(x: &X509Certificate<'_>) -> Vec<String> {
    x.subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|g| match g {
                    GeneralName::DNSName(d) => format!("DNS:{d}"),
                    GeneralName::URI(u) => format!("URI:{u}"),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}
