//! Token bindings: whether the objects a projected token is bound to (its
//! pod, its service account) still exist.
//!
//! A projected service-account token names the pod and the service account
//! it was minted for, by name and UID. Kubernetes' own authenticator
//! (TokenReview) refuses such a token once either object is gone, or was
//! recreated under a new UID; a locally verified JWT would otherwise stay
//! good until its `exp`. Owns: the [`BindingCheck`] interface the token
//! sources consult and the [`Binding`] a token names. Must not: call the API
//! server — the answers come from an in-memory cache kept by a watch
//! (`kubernetes::bindings`), so issuance never waits on a round trip.

/// A `{name, uid}` reference as a token carries it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ObjectRef<'a> {
    /// Object name.
    pub name: &'a str,
    /// Object UID.
    pub uid: &'a str,
}

/// What a token is bound to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding<'a> {
    /// The namespace of the service account (and of the pod).
    pub namespace: &'a str,
    /// The service account, when the token names its UID.
    pub service_account: Option<ObjectRef<'a>>,
    /// The pod, when the token is bound to one.
    pub pod: Option<ObjectRef<'a>>,
}

/// The answer of a [`BindingCheck`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Presence {
    /// Every object the token is bound to exists, with the same UID.
    Present,
    /// An object the token is bound to is gone (or was recreated): the token
    /// is dead. The text says which object, for the caller.
    Gone {
        /// `pod` or `serviceaccount` (metrics label).
        kind: &'static str,
        /// A sentence for the caller.
        why: String,
    },
    /// The cache cannot tell yet (not synced, or its watch is failing): ask
    /// another source or answer UNAVAILABLE — never pass the token unchecked.
    Unknown(String),
}

/// Answers whether a token's bound objects still exist, from memory.
pub(crate) trait BindingCheck: Send + Sync {
    /// Checks `binding`. Must not block or do I/O.
    fn check(&self, binding: &Binding<'_>) -> Presence;
    /// True when the answers are current (synced, watch healthy).
    fn is_synced(&self) -> bool;
}
