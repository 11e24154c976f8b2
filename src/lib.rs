//! meshca: a service-mesh certificate authority.
#![forbid(unsafe_code)]

/// Generated protobuf and gRPC code for the three wire APIs.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    /// meshca's native API (`meshca.v1`).
    pub mod meshca {
        tonic::include_proto!("meshca.v1");
    }
    /// Linkerd's identity API (`io.linkerd.proxy.identity`).
    pub mod linkerd {
        tonic::include_proto!("io.linkerd.proxy.identity");
    }
    /// Istio's certificate API (`istio.v1.auth`).
    pub mod istio {
        tonic::include_proto!("istio.v1.auth");
    }
    /// The SPIFFE Workload API (no protobuf package: `SpiffeWorkloadAPI`).
    pub mod spiffe {
        include!(concat!(env!("OUT_DIR"), "/_.rs"));
    }
}

pub mod admin;
pub mod agent;
pub mod api;
pub mod audit;
pub mod authn;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod federation;
pub mod identity;
pub mod kubernetes;
pub mod metrics;
pub mod proxy;
pub(crate) mod revocation;
pub mod server;
pub mod tls;
pub mod trust;
pub mod util;
