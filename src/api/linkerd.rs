//! `io.linkerd.proxy.identity.Identity/Certify`, wire-compatible with
//! linkerd2-proxy: raw token bytes, DER CSR, DER leaf + intermediates.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{to_timestamp, ApiError, CertifyInput, Core, Credential, WireApi};
use crate::proto::linkerd as pb;

/// The Linkerd identity service.
#[derive(Debug, Clone)]
pub struct LinkerdService(pub Arc<Core>);

#[tonic::async_trait]
impl pb::identity_server::Identity for LinkerdService {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let peer = request.remote_addr();
        let req = request.into_inner();
        if req.identity.is_empty() {
            return Err(ApiError::BadRequest(
                "identity is empty: send the proxy's DNS identity".into(),
            )
            .into());
        }
        let token = std::str::from_utf8(&req.token).map_err(|_| {
            ApiError::Authn(crate::authn::AuthnError::Invalid(
                "the token is not UTF-8 text".into(),
            ))
        })?;
        let credential = if token.is_empty() {
            Credential::None
        } else {
            Credential::Token(token)
        };
        let issued = self
            .0
            .certify(CertifyInput {
                api: WireApi::Linkerd,
                credential,
                csr_der: &req.certificate_signing_request,
                ttl: None,
                claimed_dns_identity: Some(&req.identity),
                peer,
            })
            .await?;
        Ok(Response::new(pb::CertifyResponse {
            leaf_certificate: issued.leaf.to_vec(),
            intermediate_certificates: issued.intermediates.iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(to_timestamp(issued.not_after)),
        }))
    }
}
