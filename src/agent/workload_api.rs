//! The SPIFFE Workload API on a Unix socket.
//!
//! Owns: serving the agent's state to SPIFFE-aware software in the pod, per
//! the SPIFFE Workload API specification: `FetchX509SVID` and
//! `FetchX509Bundles` are server streams that send the full current state at
//! once and again on every change (renewal, new bundle, or a change of the
//! federated bundles, which both carry keyed by the foreign trust domain's
//! SPIFFE ID, as the specification says); a request without
//! the `workload.spiffe.io: true` metadata gets `INVALID_ARGUMENT`; the JWT
//! methods delegate to `jwt`. Anything that can open the socket gets
//! this workload's identity, so the socket belongs in a directory only the
//! workload's containers share. Must not: obtain certificates (see `agent`),
//! or handle the socket and its connections (see `agent::socket`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::jwt::JwtSvids;
use super::State;
use crate::proto::spiffe as pb;
use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

// Serving the socket lives in `agent::socket`; these paths stay for callers.
pub(crate) use super::socket::socket_path;
pub use super::socket::{serve, serve_claimed, SocketClaim, DEFAULT_SOCKET_MODE};

/// The metadata every Workload API request must carry.
pub(crate) const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The service.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadApi {
    state: watch::Receiver<State>,
    trust_domain: String,
    jwt: Arc<JwtSvids>,
}

/// What a Workload API server serves: the agent's state and its JWT-SVID
/// side ([`super::Agent::workload_source`]). A bare state receiver converts
/// too; then `FetchJWTSVID` answers `UNAVAILABLE` (no CA link).
#[derive(Debug, Clone)]
pub struct Source {
    /// The agent's state.
    pub state: watch::Receiver<State>,
    /// Minting, caching and validating JWT-SVIDs.
    pub jwt: Arc<JwtSvids>,
}

impl From<watch::Receiver<State>> for Source {
    fn from(state: watch::Receiver<State>) -> Self {
        Source {
            state,
            jwt: Arc::new(JwtSvids::without_ca()),
        }
    }
}

fn check_header<T>(r: &Request<T>) -> Result<(), Status> {
    match r
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "security header missing from request: send the metadata `{SECURITY_HEADER}: true`"
        ))),
    }
}

fn concat(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

/// The federated trust domains' X.509 authorities, keyed by the trust
/// domain's SPIFFE ID (`spiffe://b.test`) as the Workload API specification
/// says, each the concatenated DER of its roots. A domain without X.509
/// authorities is left out (it could verify nothing), and so is an entry
/// that names our own trust domain (our own anchors come only from our CA).
fn federated_x509(bundle: &super::Bundle, own: &str) -> HashMap<String, Vec<u8>> {
    bundle
        .federated
        .iter()
        .filter(|(td, b)| td.as_str() != own && !b.x509_authorities.is_empty())
        .map(|(td, b)| (format!("spiffe://{td}"), concat(&b.x509_authorities)))
        .collect()
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream_<pb::X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let own = self.trust_domain.clone();
        let s =
            tokio_stream::wrappers::WatchStream::new(self.state.clone()).filter_map(move |st| {
                let svid = st.svid.as_ref()?;
                Some(Ok(pb::X509svidResponse {
                    svids: vec![pb::X509svid {
                        spiffe_id: svid.spiffe_id.clone(),
                        x509_svid: concat(&svid.chain),
                        x509_svid_key: svid.key_pkcs8.expose().to_vec(),
                        bundle: concat(&st.bundle.roots),
                        hint: String::new(),
                    }],
                    crl: Vec::new(),
                    federated_bundles: federated_x509(&st.bundle, &own),
                }))
            });
        Ok(Response::new(Box::pin(s)))
    }

    type FetchX509BundlesStream = Stream_<pb::X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let td = self.trust_domain.clone();
        let mut last = None;
        let s =
            tokio_stream::wrappers::WatchStream::new(self.state.clone()).filter_map(move |st| {
                // Only bundle changes matter here (our own anchors or the
                // federated ones), not renewals.
                let mut bundles = federated_x509(&st.bundle, &td);
                bundles.insert(td.clone(), concat(&st.bundle.roots));
                if last.as_ref() == Some(&bundles) {
                    return None;
                }
                last = Some(bundles.clone());
                Some(Ok(pb::X509BundlesResponse {
                    crl: Vec::new(),
                    bundles,
                }))
            });
        Ok(Response::new(Box::pin(s)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_header(&request)?;
        let (ours, published) = {
            let st = self.state.borrow();
            let ours = st.svid.as_ref().map(|s| s.spiffe_id.clone());
            (ours, st.bundle.jwt_authorities.clone())
        };
        let r = self
            .jwt
            .fetch(ours.as_deref(), &published, request.into_inner())
            .await?;
        Ok(Response::new(r))
    }

    type FetchJWTBundlesStream = Stream_<pb::JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let s = super::jwt::bundle_stream(self.state.clone(), self.trust_domain.clone());
        Ok(Response::new(Box::pin(s)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let bundle = self.state.borrow().bundle.clone();
        let r = self
            .jwt
            .validate(&self.trust_domain, &bundle, request.into_inner())?;
        Ok(Response::new(r))
    }
}

/// The service, for the socket (`agent::socket`) to serve.
pub(crate) fn service(
    source: Source,
    trust_domain: String,
) -> SpiffeWorkloadApiServer<WorkloadApi> {
    let Source { state, jwt } = source;
    SpiffeWorkloadApiServer::new(WorkloadApi {
        state,
        trust_domain,
        jwt,
    })
}
