//! `meshca.v1.Identity`: the native API (certify, mint JWT-SVIDs, bundle get/watch).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::jwt_svid::MintInput;
use super::{to_timestamp, ApiError, CertifyInput, Core, Credential, WireApi};
use crate::authn::{Authenticated, AuthnError};
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
        jwt_authorities: b
            .jwt_keys
            .iter()
            .map(|k| pb::JwtAuthority {
                key_id: k.key_id.clone(),
                public_key: k.spki_der.clone(),
                expires_at: k.expires_at.map(to_timestamp),
            })
            .collect(),
        // Filled by the federation work (issue 14).
        ..Default::default()
    }
}

/// A request's lifetime: unset is None; negative is refused.
fn requested_ttl(d: Option<prost_types::Duration>) -> Result<Option<Duration>, ApiError> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => Err(ApiError::BadRequest(
            "requested_ttl must not be negative".into(),
        )),
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
    }
}

/// The request's token, else the verified mTLS client certificate, else nothing.
fn credential<'a>(
    token: &'a str,
    peer_certs: Option<&'a Arc<Vec<rustls::pki_types::CertificateDer<'static>>>>,
) -> Credential<'a> {
    if !token.is_empty() {
        return Credential::Token(token);
    }
    match peer_certs.and_then(|c| c.first()) {
        Some(leaf) => Credential::PeerCertificate(leaf),
        None => Credential::None,
    }
}

/// Adds the federated bundles (issue 14, part 4) to a bundle message. They
/// have their own `federation_version`: `version` counts only this trust
/// domain's anchors, which the rotation gate reads.
fn with_federated(mut msg: pb::TrustBundle, f: &crate::federation::Federated) -> pb::TrustBundle {
    msg.federation_version = f.version;
    msg.federated_bundles = f
        .bundles
        .iter()
        .map(|(td, b)| {
            let fb = pb::FederatedBundle {
                x509_authorities: b.x509_authorities.iter().map(|c| c.to_vec()).collect(),
                jwt_authorities: b
                    .jwt_keys
                    .iter()
                    .map(|k| pb::JwtAuthority {
                        key_id: k.key_id.clone(),
                        public_key: k.spki_der.clone(),
                        expires_at: k.expires_at.map(to_timestamp),
                    })
                    .collect(),
                sequence: b.sequence.unwrap_or_default(),
            };
            (td.clone(), fb)
        })
        .collect();
    msg
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
        let ttl = requested_ttl(req.requested_ttl)?;
        let credential = credential(&req.token, peer_certs.as_ref());
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
            trust_bundle: Some(with_federated(
                bundle_msg(&issued.bundle, self.0.ca.mesh().trust_domain.as_str()),
                &self.0.federation().current(),
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
        request: Request<pb::GetTrustBundleRequest>,
    ) -> Result<Response<pb::TrustBundle>, Status> {
        let certs = request.peer_certs();
        self.0
            .check_bundle_caller(certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref()))?;
        Ok(Response::new(with_federated(
            bundle_msg(&self.0.ca.bundle(), self.0.ca.mesh().trust_domain.as_str()),
            &self.0.federation().current(),
        )))
    }

    async fn mint_jwtsvid(
        &self,
        request: Request<pb::MintJwtsvidRequest>,
    ) -> Result<Response<pb::MintJwtsvidResponse>, Status> {
        let peer = request.remote_addr();
        let peer_certs = request.peer_certs();
        let req = request.into_inner();
        let ttl = requested_ttl(req.requested_ttl)?;
        let minted = self
            .0
            .mint_jwt_svid(MintInput {
                api: WireApi::Native,
                credential: credential(&req.token, peer_certs.as_ref()),
                audiences: &req.audience,
                ttl,
                peer,
            })
            .await?;
        Ok(Response::new(pb::MintJwtsvidResponse {
            token: minted.token,
            spiffe_id: minted.spiffe_id.to_string(),
            issued_at: Some(to_timestamp(minted.issued_at)),
            expires_at: Some(to_timestamp(minted.expires_at)),
        }))
    }

    type WatchTrustBundleStream =
        Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send + 'static>>;

    async fn watch_trust_bundle(
        &self,
        request: Request<pb::WatchTrustBundleRequest>,
    ) -> Result<Response<Self::WatchTrustBundleStream>, Status> {
        let core = &self.0;
        let metrics = &core.metrics;
        let peer = request.remote_addr();
        let who = match self.watcher(&request).await {
            Ok(w) => w,
            Err(e) => {
                metrics.bundle_watch_refused("unauthenticated");
                return Err(e.into());
            }
        };
        if let Some(a) = &who {
            core.check_denied(&a.workload)?;
        }
        // Only an authenticated watcher is tracked (the activation gate
        // counts it), under the same key as its renewals; an anonymous one
        // is capped instead (see `watchers`).
        let counted = match &who {
            Some(a) => {
                let id = a.workload.spiffe_id(core.ca.mesh());
                let key = crate::trust::propagation::client_key(id.as_str(), peer);
                Watcher::Counted(core.tracker().watch(key))
            }
            None => match core.watchers().admit_anonymous(peer.map(|p| p.ip())) {
                Ok(slot) => Watcher::Anonymous(slot, core.tracker().watch_anonymous()),
                Err(e) => {
                    metrics.bundle_watch_refused(e.reason());
                    return Err(ApiError::TooManyWatchers(e).into());
                }
            },
        };
        let open = metrics.bundle_watch_open(who.is_some());
        let (delivered_tx, delivered_rx) = tokio::sync::watch::channel(0u64);
        let stalled = Arc::new(AtomicBool::new(false));
        let counted = Arc::new(counted);
        tokio::spawn(stall_watchdog(
            core.clone(),
            peer,
            counted.clone(),
            delivered_rx,
            stalled.clone(),
        ));
        let td = core.ca.mesh().trust_domain.to_string();
        let stall_timeout = core.watchers().settings().stall_timeout;
        let mut inner = tokio_stream::wrappers::WatchStream::new(core.ca.watch_bundle());
        // Federated bundles change on their own: a change there sends the
        // same own bundle (same `version`) with the new federated set.
        let mut fed = tokio_stream::wrappers::WatchStream::new(core.federation().subscribe());
        let mut fed_open = true;
        let mut own: Option<Arc<crate::ca::TrustBundle>> = None;
        let mut federated = core.federation().current();
        let mut done = false;
        let mut sent: Option<(u64, u32)> = None;
        // WatchStream yields the current value at once, then every change.
        // When is an item "delivered"? hyper takes one chunk of a body even
        // when the client grants no window, and holds it until it may send;
        // it asks for the next chunk only after handing that one to HTTP/2,
        // which needs the client to have granted window. tonic polls once
        // more right after each item (to batch), so the second poll after
        // an item is hyper asking for more: the item has left.
        let stream = futures_util::stream::poll_fn(move |cx| {
            let _keep = (&open, &counted);
            if let Some((version, polls)) = sent.as_mut() {
                *polls += 1;
                if *polls >= 2 {
                    if let Watcher::Counted(h) = counted.as_ref() {
                        h.delivered(*version);
                    }
                    let _ = delivered_tx.send(*version);
                    sent = None;
                }
            }
            if done {
                return std::task::Poll::Ready(None);
            }
            if stalled.load(Ordering::Acquire) {
                done = true;
                return std::task::Poll::Ready(Some(Err(Status::unavailable(format!(
                    "this stream did not consume a trust-bundle update within {}s (setting watch_stall_timeout); reconnect",
                    stall_timeout.as_secs_f64()
                )))));
            }
            let mut changed = false;
            match std::pin::Pin::new(&mut inner).poll_next(cx) {
                std::task::Poll::Ready(Some(b)) => {
                    own = Some(b);
                    changed = true;
                }
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(None),
                std::task::Poll::Pending => {}
            }
            if fed_open {
                match std::pin::Pin::new(&mut fed).poll_next(cx) {
                    std::task::Poll::Ready(Some(f)) => {
                        federated = f;
                        changed = true;
                    }
                    std::task::Poll::Ready(None) => fed_open = false,
                    std::task::Poll::Pending => {}
                }
            }
            match (&own, changed) {
                (Some(b), true) => {
                    sent = Some((b.version, 0));
                    let msg = with_federated(bundle_msg(b, &td), &federated);
                    std::task::Poll::Ready(Some(Ok(msg)))
                }
                _ => std::task::Poll::Pending,
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A bundle stream's place: tracked (authenticated) or under the anonymous caps.
#[derive(Debug)]
enum Watcher {
    Counted(crate::trust::propagation::WatchHandle),
    /// Held for their `Drop`.
    Anonymous(
        #[allow(dead_code)] super::watchers::AnonymousSlot,
        #[allow(dead_code)] crate::trust::propagation::AnonymousHandle,
    ),
}

impl NativeService {
    /// Who is watching: a token in the `authorization` metadata (`Bearer`),
    /// else the client certificate, else nobody. A credential that is
    /// presented must be good: it is never downgraded to anonymous.
    async fn watcher(
        &self,
        request: &Request<pb::WatchTrustBundleRequest>,
    ) -> Result<Option<Authenticated>, ApiError> {
        let core = &self.0;
        if let Some(v) = request.metadata().get("authorization") {
            let token = v
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    ApiError::Authn(AuthnError::Invalid(
                        "the authorization metadata must be `Bearer <service-account token>`"
                            .into(),
                    ))
                })?;
            let a = core
                .authn
                .authenticate_from(
                    token,
                    core.audience(WireApi::Native),
                    request.remote_addr().map(|p| p.ip()),
                )
                .await?;
            return Ok(Some(a));
        }
        match request.peer_certs().as_ref().and_then(|c| c.first()) {
            Some(leaf) => Ok(Some(core.peer_identity(leaf)?)),
            None => Ok(None),
        }
    }
}

/// Runs the stall watchdog of one stream; on a stall, stops counting the
/// client, ends the stream, and closes its connection (hyper does not poll
/// a stream whose client grants no window, so only that ends it).
async fn stall_watchdog(
    core: Arc<Core>,
    peer: Option<std::net::SocketAddr>,
    counted: Arc<Watcher>,
    delivered: tokio::sync::watch::Receiver<u64>,
    stalled: Arc<AtomicBool>,
) {
    let timeout = core.watchers().settings().stall_timeout;
    let end = super::watchers::watchdog(core.ca.watch_bundle(), delivered, timeout).await;
    let super::watchers::Watchdog::Stalled { version, consumed } = end else {
        return;
    };
    let who = match counted.as_ref() {
        Watcher::Counted(h) => {
            h.stalled(core.ca.clock().now());
            h.key().to_string()
        }
        Watcher::Anonymous(..) => "anonymous".to_string(),
    };
    drop(counted);
    stalled.store(true, Ordering::Release);
    core.metrics.bundle_watch_refused("stalled");
    tracing::warn!(
        client = %who,
        peer = ?peer,
        version,
        consumed,
        timeout_s = timeout.as_secs_f64(),
        "closing a trust-bundle stream that did not consume an update in time; it no longer counts for the activation gate until it catches up"
    );
    if let Some(conn) = peer.and_then(|p| core.connections().and_then(|c| c.get(&p))) {
        conn.close(super::connections::CloseReason::Stalled);
    }
}
