//! Running inside Kubernetes: the singleton work of a replicated CA.
//!
//! Owns: leader election over a Lease (`lease`) and, on the leader,
//! publishing the trust bundle as a ConfigMap in every (selected) namespace
//! (`publish`). Talks to the API server through kube with the configured
//! credentials (`--kubeconfig`, or `in-cluster`). Must not: issue
//! certificates or change the CA's state. Shared CA state in Secrets (issue
//! 6) is not here yet: each replica keeps its own data directory.

pub mod lease;
pub mod publish;
pub mod rbac;
pub mod state;
