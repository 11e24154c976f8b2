//! Where the proxy's identity comes from when no agent runs in-process: the
//! SPIFFE Workload API on a Unix socket (the agent beside it, or any
//! SPIFFE-compatible agent).
//!
//! Owns: streaming `FetchX509SVID` (with the required security header),
//! turning each response (SVID, bundle, federated bundles) into an agent
//! [`State`], and reconnecting with
//! backoff when the socket goes away. Must not: request certificates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use x509_parser::prelude::*;

use crate::agent::{Bundle, FederatedBundle, State, Svid};
use crate::identity::SpiffeId;
use crate::proto::spiffe as pb;
use crate::util::backoff::Backoff;
use crate::util::secret::SecretBytes;

/// Splits concatenated DER certificates.
pub(crate) fn split_der(mut b: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (rest, _) = X509Certificate::from_der(b).map_err(|e| format!("certificate: {e}"))?;
        let len = b.len() - rest.len();
        out.push(CertificateDer::from(b[..len].to_vec()));
        b = rest;
    }
    Ok(out)
}

fn pkcs8_pem(der: &[u8]) -> SecretBytes {
    let mut pem = crate::util::pem::encode_secret("PRIVATE KEY", der);
    // Moves the buffer (no copy left behind) into the zeroizing wrapper.
    SecretBytes::new(std::mem::take(&mut *pem).into_bytes())
}

/// The federated bundles of a response, keyed by trust domain name. Keys
/// are the trust domain's SPIFFE ID per the specification (`spiffe://b.test`);
/// a bare name is accepted too, as other SPIFFE libraries do. An entry that
/// does not parse is dropped with a warning: a peer of that domain is then
/// refused (no bundle), never trusted on a bundle we could not read.
fn federated(map: std::collections::HashMap<String, Vec<u8>>) -> BTreeMap<String, FederatedBundle> {
    map.into_iter()
        .filter_map(|(key, der)| {
            let td = key.strip_prefix("spiffe://").unwrap_or(&key);
            let parsed = format!("spiffe://{td}")
                .parse::<SpiffeId>()
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    if !id.path().is_empty() {
                        return Err(format!("{key:?} is not a trust domain"));
                    }
                    Ok((id.trust_domain().to_string(), split_der(&der)?))
                });
            match parsed {
                Ok((td, roots)) => Some((
                    td,
                    FederatedBundle {
                        x509_authorities: roots,
                        ..Default::default()
                    },
                )),
                Err(e) => {
                    tracing::warn!(trust_domain = %key, error = %e, "unusable federated bundle from the Workload API; ignored");
                    None
                }
            }
        })
        .collect()
}

fn to_state(r: pb::X509svidResponse, version: u64) -> Result<State, String> {
    let s = r
        .svids
        .into_iter()
        .next()
        .ok_or("the response holds no SVID")?;
    let chain = split_der(&s.x509_svid)?;
    let (_, leaf) = X509Certificate::from_der(&chain[0]).map_err(|e| e.to_string())?;
    let not_after = crate::ca::to_system_time(leaf.validity().not_after);
    let key_pem = pkcs8_pem(&s.x509_svid_key);
    let trust_domain = s
        .spiffe_id
        .parse::<SpiffeId>()
        .map_err(|e| format!("the SVID's {e}"))?
        .trust_domain()
        .to_string();
    Ok(State {
        svid: Some(Arc::new(Svid {
            spiffe_id: s.spiffe_id,
            chain,
            key_pkcs8: SecretBytes::new(s.x509_svid_key),
            key_pem,
            not_after,
            renew_at: not_after,
        })),
        bundle: Arc::new(Bundle {
            version,
            trust_domain,
            roots: split_der(&s.bundle)?,
            federated: federated(r.federated_bundles),
            federation_version: version,
            ..Default::default()
        }),
    })
}

async fn connect(path: PathBuf) -> Result<tonic::transport::Channel, String> {
    // The URI is required by tonic but unused: the connector dials the socket.
    tonic::transport::Endpoint::try_from("http://workload-api.invalid")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("{e}"))
}

/// Follows the Workload API at `socket`; the receiver sees each new SVID.
pub fn follow(socket: PathBuf) -> watch::Receiver<State> {
    let (tx, rx) = watch::channel(State {
        svid: None,
        bundle: Arc::new(Bundle {
            version: 0,
            trust_domain: String::new(),
            roots: Vec::new(),
            ..Default::default()
        }),
    });
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        let mut version = 0u64;
        loop {
            let r: Result<(), String> = async {
                let ch = connect(socket.clone()).await?;
                let mut req = tonic::Request::new(pb::X509svidRequest {});
                req.metadata_mut().insert(
                    crate::agent::workload_api::SECURITY_HEADER,
                    "true".parse().expect("valid metadata"),
                );
                let mut stream = pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
                    .fetch_x509svid(req)
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner();
                while let Some(msg) = stream.message().await.map_err(|s| s.message().to_string())? {
                    version += 1;
                    match to_state(msg, version) {
                        Ok(st) => {
                            backoff.reset();
                            tracing::info!(spiffe_id = %st.svid.as_ref().map(|s| s.spiffe_id.as_str()).unwrap_or("-"), "identity from the Workload API");
                            if tx.send(st).is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unusable Workload API response"),
                    }
                }
                Err("the Workload API closed the stream".into())
            }
            .await;
            if tx.is_closed() {
                return;
            }
            let wait = backoff.next_wait();
            tracing::warn!(socket = %socket.display(), error = ?r.err(), retry_in_ms = wait.as_millis() as u64, "Workload API unavailable; retrying");
            tokio::time::sleep(wait).await;
        }
    });
    rx
}
