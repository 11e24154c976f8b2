//! Leader election over a `coordination.k8s.io/v1` Lease.
//!
//! Owns: deciding, from the Lease as last read and the time, whether this
//! replica should create, renew or take over the Lease, or wait ([`decide`],
//! pure, tested without sleeps); and the loop that applies that decision
//! with resourceVersion preconditions — a write that loses a race (409) is
//! never retried blindly but re-read — and hands the Lease back on shutdown
//! so the next leader does not wait for expiry. Publishes whether this
//! replica leads. Must not: do the singleton work itself.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// What to do with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// No Lease exists: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Its holder let it expire (or released it): take it over.
    TakeOver,
    /// Someone else holds it.
    Wait {
        /// The holder.
        holder: String,
    },
}

fn to_system(t: &MicroTime) -> SystemTime {
    // Microsecond precision, as the API stores it.
    let us = t.0.as_microsecond();
    if us >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_micros(us as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

fn micro(t: SystemTime) -> MicroTime {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(d.as_micros() as i64)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Decides what `me` should do with `lease` at `now`.
pub(crate) fn decide(lease: Option<&LeaseSpec>, me: &str, now: SystemTime) -> Action {
    let Some(spec) = lease else {
        return Action::Create;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Action::Renew;
    }
    if holder.is_empty() {
        return Action::TakeOver;
    }
    let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
    let renewed = spec
        .renew_time
        .as_ref()
        .map(to_system)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if renewed + duration <= now {
        Action::TakeOver
    } else {
        Action::Wait { holder }
    }
}

/// Leader-election settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a Lease is valid without renewal.
    pub lease_duration: Duration,
    /// How often the Lease is renewed or checked.
    pub retry_period: Duration,
}

/// Runs leader election until `stop` flips; the receiver says whether this
/// replica leads. On stop, a held Lease is released.
pub(crate) fn run(
    client: kube::Client,
    s: Settings,
    mut stop: watch::Receiver<bool>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &s.namespace);
        loop {
            let leading = match step(&api, &s).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %s.name, "leader election: Kubernetes API error");
                    // Fail safe: without a confirmed renewal, stop leading
                    // once our Lease could have expired.
                    false
                }
            };
            let was = *tx.borrow();
            if was != leading {
                tracing::info!(identity = %s.identity, leading, "leader election: leadership changed");
                metrics.set_leader(leading);
                let _ = tx.send(leading);
            }
            tokio::select! {
                _ = tokio::time::sleep(s.retry_period) => {}
                _ = async { let _ = stop.wait_for(|v| *v).await; } => {
                    let was_leading = *tx.borrow();
                    if was_leading {
                        if let Err(e) = release(&api, &s).await {
                            tracing::warn!(error = %e, "leader election: could not release the Lease");
                        } else {
                            tracing::info!(identity = %s.identity, "leader election: Lease released");
                        }
                        metrics.set_leader(false);
                        let _ = tx.send(false);
                    }
                    return;
                }
            }
        }
    });
    rx
}

fn spec(s: &Settings, now: SystemTime, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(s.identity.clone()),
        lease_duration_seconds: Some(s.lease_duration.as_secs().max(1) as i32),
        acquire_time: Some(acquired.unwrap_or_else(|| micro(now))),
        renew_time: Some(micro(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// One round: read, decide, write with a precondition. Ok(true) = we lead.
async fn step(api: &Api<Lease>, s: &Settings) -> Result<bool, kube::Error> {
    let now = SystemTime::now();
    let current = api.get_opt(&s.name).await?;
    let action = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &s.identity,
        now,
    );
    let write = match (&action, current) {
        (Action::Create, _) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    namespace: Some(s.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec(s, now, 0, None)),
            };
            api.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        (Action::Renew, Some(mut lease)) => {
            let old = lease.spec.clone().unwrap_or_default();
            lease.spec = Some(spec(
                s,
                now,
                old.lease_transitions.unwrap_or(0),
                old.acquire_time,
            ));
            // metadata.resourceVersion is kept: a concurrent write fails with 409.
            api.replace(&s.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (Action::TakeOver, Some(mut lease)) => {
            let old = lease.spec.clone().unwrap_or_default();
            lease.spec = Some(spec(s, now, old.lease_transitions.unwrap_or(0) + 1, None));
            api.replace(&s.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        (Action::Wait { .. }, _) => return Ok(false),
        (_, None) => return Ok(false),
    };
    match write {
        Ok(()) => Ok(true),
        // Lost a race (409 Conflict, or 409 AlreadyExists on create): someone
        // else wrote first. Not an error; read again next round.
        Err(kube::Error::Api(st)) if st.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Hands the Lease back: no holder, so the next replica takes it at once.
async fn release(api: &Api<Lease>, s: &Settings) -> Result<(), kube::Error> {
    if let Some(mut lease) = api.get_opt(&s.name).await? {
        let mine = lease
            .spec
            .as_ref()
            .and_then(|sp| sp.holder_identity.as_deref())
            == Some(s.identity.as_str());
        if mine {
            if let Some(sp) = lease.spec.as_mut() {
                sp.holder_identity = None;
            }
            api.replace(&s.name, &PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_of(holder: &str, renewed: SystemTime, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: (!holder.is_empty()).then(|| holder.to_string()),
            renew_time: Some(micro(renewed)),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn decisions_follow_the_lease_and_the_clock() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(decide(None, "a", t0), Action::Create);
        let held_by_b = spec_of("b", t0, 15);
        assert_eq!(
            decide(Some(&held_by_b), "a", t0 + Duration::from_secs(14)),
            Action::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&held_by_b), "a", t0 + Duration::from_secs(15)),
            Action::TakeOver,
            "expired"
        );
        assert_eq!(decide(Some(&held_by_b), "b", t0), Action::Renew);
        assert_eq!(
            decide(Some(&spec_of("", t0, 15)), "a", t0),
            Action::TakeOver,
            "released"
        );
    }
}
