//! `meshca.v1.Identity`: the native API (certify, bundle get/watch).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{to_timestamp, ApiError, CertifyInput, Core, Credential, WireApi};
use crate::ca::TrustBundle;
use crate::proto::meshca as pb;

/// The native service.
#[derive(Debug, Clone)]
pub struct NativeService(pub Arc<Core>);

fn bundle_msg(b: &TrustBundle, trust_domain: &str) -> pb::TrustBundle {
    pb::TrustBundle {
        version: b.version,
        trust_domain: trust_domain.to_string(),
        roots: b.roots.iter().map(|r| r.to_vec()).collect(),
        tainted_roots: b.tainted.iter().map(|r| r.to_vec()).collect(),
    }
}

#[tonic::async_trait]
impl pb::identity_server::Identity for NativeService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let peer_certs = request.peer_certs();
        let req = request.into_inner();
        let ttl = match req.requested_ttl {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(
                    ApiError::BadRequest("requested_ttl must not be negative".into()).into(),
                )
            }
            Some(d) => Some(Duration::new(d.seconds as u64, d.nanos as u32)),
        };
        let credential = if !req.token.is_empty() {
            Credential::Token(&req.token)
        } else {
            match peer_certs.as_ref().and_then(|c| c.first()) {
                Some(leaf) => Credential::PeerCertificate(leaf),
                None => Credential::None,
            }
        };
        let issued = self
            .0
            .certify(CertifyInput {
                api: WireApi::Native,
                credential,
                csr_der: &req.csr,
                ttl,
                claimed_dns_identity: None,
                peer,
            })
            .await?;
        let mut chain = vec![issued.leaf.to_vec()];
        chain.extend(issued.intermediates.iter().map(|c| c.to_vec()));
        Ok(Response::new(pb::CertifyResponse {
            cert_chain: chain,
            trust_bundle: Some(bundle_msg(
                &issued.bundle,
                self.0.ca.mesh().trust_domain.as_str(),
            )),
            not_after: Some(to_timestamp(issued.not_after)),
            spiffe_id: issued.spiffe_id.to_string(),
            dns_identity: issued.dns_identity.to_string(),
            refresh_at: Some(to_timestamp(issued.refresh_at)),
            ttl_clamped: issued.ttl_clamped,
        }))
    }

    async fn get_trust_bundle(
        &self,
        _request: Request<pb::GetTrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundle>, Status> {
        Ok(Response::new(bundle_msg(
            &self.0.ca.bundle(),
            self.0.ca.mesh().trust_domain.as_str(),
        )))
    }

    type WatchTrustBundleStream =
        Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send + 'static>>;

    async fn watch_trust_bundle(
        &self,
        request: Request<pb::WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let td = self.0.ca.mesh().trust_domain.to_string();
        // A watcher presenting its meshca certificate is tracked under the
        // same key as its renewals; an anonymous one by its address.
        let peer = request.remote_addr();
        let who = request
            .peer_certs()
            .and_then(|c| c.first().and_then(|leaf| crate::ca::uri_san(leaf)));
        let key = match (who, peer) {
            (Some(id), p) => crate::trust::propagation::client_key(&id, p),
            (None, Some(p)) => format!("anonymous {p}"),
            (None, None) => "anonymous".into(),
        };
        let handle = self.0.tracker().watch(key);
        // WatchStream yields the current value at once, then every change.
        let stream =
            tokio_stream::wrappers::WatchStream::new(self.0.ca.watch_bundle()).map(move |b| {
                handle.delivered(b.version);
                Ok(bundle_msg(&b, &td))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
