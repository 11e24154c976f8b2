//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, wire-compatible
//! with istio-agent: bearer token in `authorization` metadata, PEM CSR, PEM
//! chain with the trust bundle last.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{ApiError, CertifyInput, Core, Credential, WireApi};
use crate::ca::{csr, der_to_pem};
use crate::proto::istio as pb;

/// The Istio certificate service.
#[derive(Debug, Clone)]
pub struct IstioService(pub Arc<Core>);

#[tonic::async_trait]
impl pb::istio_certificate_service_server::IstioCertificateService for IstioService {
    async fn create_certificate(
        &self,
        request: Request<pb::IstioCertificateRequest>,
    ) -> Result<Response<pb::IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let token = match request.metadata().get("authorization") {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| {
                    ApiError::BadRequest("authorization metadata is not ASCII".into())
                })?;
                let t = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        ApiError::Authn(crate::authn::AuthnError::Invalid(
                            "authorization metadata must be `Bearer <token>`".into(),
                        ))
                    })?;
                Some(t.to_string())
            }
        };
        let req = request.into_inner();
        if req.validity_duration < 0 {
            return Err(
                ApiError::BadRequest("validity_duration must not be negative".into()).into(),
            );
        }
        let csr_der = csr::pem_to_der(&req.csr).map_err(ApiError::Ca)?;
        let credential = match &token {
            Some(t) => Credential::Token(t),
            None => Credential::None,
        };
        let issued = self
            .0
            .certify(CertifyInput {
                api: WireApi::Istio,
                credential,
                csr_der: &csr_der,
                ttl: Some(Duration::from_secs(req.validity_duration as u64)),
                claimed_dns_identity: None,
                peer,
            })
            .await?;
        let mut chain = vec![der_to_pem(&issued.leaf)];
        chain.extend(issued.intermediates.iter().map(|c| der_to_pem(c)));
        chain.extend(issued.bundle.roots.iter().map(|c| der_to_pem(c)));
        Ok(Response::new(pb::IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
