//! Leader election over a `coordination.k8s.io/v1` Lease, with client-go's
//! timing rules, so that two replicas never both believe they lead.
//!
//! Owns: deciding, from the Lease as last read and this replica's own
//! monotonic clock, whether to create, renew or take over the Lease, or
//! wait ([`decide`], [`Observed`], [`Term`]: pure, tested without sleeps);
//! and the loop that applies that decision with resourceVersion
//! preconditions — a write that loses a race (409) is never retried blindly
//! but re-read — and, on shutdown, hands the Lease back before the process
//! exits. Publishes whether this replica leads. Must not: do the singleton
//! work itself, or read another replica's wall-clock times as times.
//!
//! The timing rules (docs/kubernetes.md, "High availability"):
//! - A leader leads for `renew_deadline` from the moment it SENT its last
//!   renewal that succeeded; when that passes without another success it
//!   publishes `false`, even while a call still hangs (every round is cut
//!   at that instant).
//! - Another replica considers the Lease expired only `leaseDurationSeconds`
//!   after it first OBSERVED the current version of the record, on its own
//!   monotonic clock (client-go's `observedTime`): the holder's `renewTime`
//!   is never compared with the local clock, so clock skew between replicas
//!   cannot expire a healthy Lease.
//! - `renew_deadline` < lease duration: the observation happens after the
//!   write, and the write after it was sent, so the leader has stepped down
//!   `lease duration - renew_deadline` before anyone may take over
//!   (assuming clock *rates* agree, which monotonic clocks do to ppm).
//! - A failed or throttled renewal does not end leadership: the leader
//!   retries until its renew deadline.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long the Lease hand-back on shutdown may take.
const RELEASE_LIMIT: Duration = Duration::from_secs(3);

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

/// The version of the Lease record this replica last saw, and when it first
/// saw it on its own monotonic clock. A record that changes (a renewal, a
/// takeover, a release) restarts the count; one that stays the same for a
/// lease duration has expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Observed {
    version: String,
    since: Instant,
}

impl Observed {
    /// The observation after reading `version` at `now`: the first sight of
    /// a version is kept while it stays the same.
    pub(crate) fn see(prev: Option<Observed>, version: &str, now: Instant) -> Observed {
        match prev {
            Some(p) if p.version == version => p,
            _ => Observed {
                version: version.to_string(),
                since: now,
            },
        }
    }
}

/// Decides what `me` should do with `lease`, whose current version this
/// replica first saw at `observed_since`, at `now` (both monotonic).
///
/// Nobody takes a Lease at once, whoever last wrote it: a deleted Lease (an
/// operator's `kubectl delete`) is created only once it has been seen absent
/// for `own` (this replica's lease duration), and one without a holder (a
/// release, or `kubectl edit`) is taken only once that record has been seen
/// unchanged for its own `leaseDurationSeconds` (a release writes 1 s, so a
/// hand-over stays fast). The old leader's belief ends within its renew
/// deadline of its last renewal, which was sent before the edit, so it has
/// ended before anyone acts on the edit.
pub(crate) fn decide(
    lease: Option<&LeaseSpec>,
    me: &str,
    observed_since: Instant,
    now: Instant,
    own: Duration,
) -> Action {
    let Some(spec) = lease else {
        return if now >= observed_since + own {
            Action::Create
        } else {
            Action::Wait {
                holder: String::new(),
            }
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == me {
        return Action::Renew;
    }
    if now >= observed_since + valid_for(lease, own) {
        Action::TakeOver
    } else {
        Action::Wait { holder }
    }
}

/// How long the record as read stays valid once observed: an absent Lease
/// for `own`, one without `leaseDurationSeconds` for 15 s (the API's
/// default), otherwise its own duration (at least 1 s).
fn valid_for(lease: Option<&LeaseSpec>, own: Duration) -> Duration {
    let Some(spec) = lease else {
        return own;
    };
    let secs = spec.lease_duration_seconds.unwrap_or(15).max(1);
    Duration::from_secs(u64::try_from(secs).unwrap_or(1))
}

/// This replica's term as leader, on its monotonic clock: it leads until
/// `renew_deadline` after the sending of its latest renewal that succeeded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Term {
    renew_deadline: Duration,
    sent: Option<Instant>,
}

impl Term {
    /// Not leading.
    pub(crate) fn new(renew_deadline: Duration) -> Self {
        Self {
            renew_deadline,
            sent: None,
        }
    }

    /// A write holding the Lease, sent at `sent`, succeeded.
    pub(crate) fn renewed(&mut self, sent: Instant) {
        self.sent = Some(self.sent.map_or(sent, |s| s.max(sent)));
    }

    /// Someone else holds the Lease.
    pub(crate) fn lost(&mut self) {
        self.sent = None;
    }

    /// When leadership ends unless renewed again.
    pub(crate) fn ends(&self) -> Option<Instant> {
        self.sent.map(|s| s + self.renew_deadline)
    }

    /// Whether this replica leads at `now`.
    pub(crate) fn leading(&self, now: Instant) -> bool {
        self.ends().is_some_and(|end| now < end)
    }
}

fn micro(t: SystemTime) -> MicroTime {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(us)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
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
    /// How long a Lease is valid without renewal (whole seconds in the
    /// record, at least 1).
    pub lease_duration: Duration,
}

impl Settings {
    /// The lease duration as written in the record.
    fn lease_secs(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// The lease duration as the record carries it (whole seconds).
    fn recorded_duration(&self) -> Duration {
        Duration::from_secs(u64::from(self.lease_secs().unsigned_abs()))
    }

    /// How long a leader leads after sending its last successful renewal:
    /// two thirds of the lease duration (client-go's defaults: 10 s of 15).
    pub(crate) fn renew_deadline(&self) -> Duration {
        self.recorded_duration() * 2 / 3
    }

    /// How often the Lease is renewed or checked: a fifth of the lease
    /// duration, so a leader gets several attempts within its deadline.
    pub(crate) fn retry_period(&self) -> Duration {
        (self.lease_duration / 5).max(Duration::from_millis(100))
    }
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Our write holding the Lease succeeded.
    Holding,
    /// Someone else holds it.
    Held(String, Instant),
    /// Our write lost a race (409): read again soon.
    Raced,
}

/// Runs leader election until `stop` flips; the receiver says whether this
/// replica leads. On stop, leadership ends at once and a held Lease is
/// released (bounded by [`RELEASE_LIMIT`]) before the task ends, so await
/// the handle before the process exits.
pub(crate) fn run(
    client: kube::Client,
    s: Settings,
    stop: watch::Receiver<bool>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let e = Elector {
        api: Api::namespaced(client, &s.namespace),
        term: Term::new(s.renew_deadline()),
        observed: None,
        mine: false,
        s,
        tx,
        metrics,
    };
    (rx, tokio::spawn(e.elect(stop)))
}

/// The election loop's state.
struct Elector {
    api: Api<Lease>,
    s: Settings,
    term: Term,
    observed: Option<Observed>,
    /// The record named this replica when last read (or was written by it).
    mine: bool,
    tx: watch::Sender<bool>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Elector {
    async fn elect(mut self, mut stop: watch::Receiver<bool>) {
        let retry = self.s.retry_period();
        loop {
            let started = Instant::now();
            // A round never outlives this replica's term (nor, standing
            // by, one renew deadline): a hung call cannot keep it leading.
            let limit = self
                .term
                .ends()
                .filter(|end| *end > started)
                .unwrap_or(started + self.term.renew_deadline);
            let result = tokio::select! {
                r = tokio::time::timeout_at(limit, self.round(started)) => r,
                _ = stop.wait_for(|v| *v) => break,
            };
            let next = self.settle(result, started, retry);
            self.publish(Instant::now());
            // Wake at the end of the term, too, to say we stopped leading.
            let wake = self.term.ends().filter(|e| *e > Instant::now());
            let wake = wake.map_or(next, |e| e.min(next));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|v| *v) => break,
            }
            self.publish(Instant::now());
        }
        self.step_down().await;
    }

    /// Applies a round's result; returns when the next round starts.
    fn settle(
        &mut self,
        result: Result<Result<Outcome, kube::Error>, tokio::time::error::Elapsed>,
        started: Instant,
        retry: Duration,
    ) -> Instant {
        let name = &self.s.name;
        match result {
            Ok(Ok(Outcome::Holding)) => {
                self.term.renewed(started);
                started + retry
            }
            Ok(Ok(Outcome::Held(holder, expires))) => {
                self.term.lost();
                tracing::debug!(lease = %name, %holder, "leader election: held by another replica");
                // Look again when the record, as observed, would expire (a
                // released Lease after 1 s), not a whole period later.
                (started + retry).min(expires.max(Instant::now()))
            }
            Ok(Ok(Outcome::Raced)) => Instant::now() + retry / 4,
            // Not fatal: a leader keeps leading until its renew deadline
            // and retries meanwhile.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, lease = %name, leading = self.term.leading(Instant::now()), "leader election: Kubernetes API error; retrying");
                Instant::now() + retry
            }
            Err(_) => {
                tracing::warn!(lease = %name, waited_ms = u64::try_from((Instant::now() - started).as_millis()).unwrap_or(u64::MAX), leading = self.term.leading(Instant::now()), "leader election: the API server did not answer in time; retrying");
                Instant::now()
            }
        }
    }

    /// Says whether we lead at `now`, when that changed.
    fn publish(&self, now: Instant) {
        let leading = self.term.leading(now);
        if *self.tx.borrow() != leading {
            tracing::info!(identity = %self.s.identity, leading, "leader election: leadership changed");
            self.metrics.set_leader(leading);
            let _ = self.tx.send(leading);
        }
    }

    /// Shutdown: stop leading first (the singleton work stops), then hand
    /// the Lease back so the next replica need not wait for its expiry.
    async fn step_down(mut self) {
        self.term.lost();
        self.publish(Instant::now());
        if !self.mine {
            return;
        }
        match tokio::time::timeout(RELEASE_LIMIT, self.release()).await {
            Ok(Ok(true)) => {
                tracing::info!(identity = %self.s.identity, "leader election: Lease released")
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election: could not release the Lease")
            }
            Err(_) => tracing::warn!(
                limit_s = RELEASE_LIMIT.as_secs(),
                "leader election: could not release the Lease in time"
            ),
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        // Wall-clock times are for humans (kubectl); no decision reads them.
        let now = micro(SystemTime::now());
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            lease_duration_seconds: Some(self.s.lease_secs()),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Reads the Lease and notes the version's first sighting.
    async fn read(&mut self) -> Result<Option<Lease>, kube::Error> {
        let current = self.api.get_opt(&self.s.name).await?;
        // After the answer arrived, so after the write it shows.
        let now = Instant::now();
        // An absent Lease is a state too ("" as its version): it must be
        // seen absent for a lease duration before anyone creates it.
        let version = current
            .as_ref()
            .map_or(Some(""), |l| l.metadata.resource_version.as_deref());
        self.observed = version.map(|v| Observed::see(self.observed.take(), v, now));
        self.mine = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|sp| sp.holder_identity.as_deref())
            == Some(self.s.identity.as_str());
        Ok(current)
    }

    /// One round: read, decide, write with a precondition.
    async fn round(&mut self, started: Instant) -> Result<Outcome, kube::Error> {
        let current = self.read().await?;
        let since = self.observed.as_ref().map_or(started, |o| o.since);
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let own = self.s.recorded_duration();
        let action = decide(spec, &self.s.identity, since, Instant::now(), own);
        let expires = since + valid_for(spec, own);
        let write = match (action, current) {
            (Action::Wait { holder }, _) => return Ok(Outcome::Held(holder, expires)),
            (Action::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.s.name.clone()),
                        namespace: Some(self.s.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Action::Renew | Action::TakeOver, None) => return Ok(Outcome::Raced),
            (action, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let transitions = old.lease_transitions.unwrap_or(0);
                lease.spec = Some(if action == Action::Renew {
                    self.spec(transitions, old.acquire_time)
                } else {
                    self.spec(transitions + 1, None)
                });
                // metadata.resourceVersion is kept: a concurrent write fails with 409.
                self.api
                    .replace(&self.s.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match write {
            Ok(_) => {
                self.mine = true;
                Ok(Outcome::Holding)
            }
            // Lost a race (409 Conflict, or 409 AlreadyExists on create):
            // someone else wrote first. Not an error; read again.
            Err(kube::Error::Api(st)) if st.code == 409 => Ok(Outcome::Raced),
            Err(e) => Err(e),
        }
    }

    /// Hands the Lease back as client-go's ReleaseOnCancel does: no holder,
    /// a one-second duration, renewed now. Ok(false): it was not ours.
    async fn release(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.read().await? else {
            return Ok(false);
        };
        if !self.mine {
            return Ok(false);
        }
        let old = lease.spec.clone().unwrap_or_default();
        let now = micro(SystemTime::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: old.lease_transitions,
            ..Default::default()
        });
        self.api
            .replace(&self.s.name, &PostParams::default(), &lease)
            .await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn held_by(holder: &str, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: (!holder.is_empty()).then(|| holder.to_string()),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn decisions_follow_the_lease_and_the_observed_time() {
        let t0 = Instant::now();
        let l = S(15);
        assert_eq!(
            decide(None, "a", t0, t0 + S(14), l),
            Action::Wait {
                holder: String::new()
            },
            "a deleted Lease is not created before it was seen absent for a lease duration"
        );
        assert_eq!(decide(None, "a", t0, t0 + S(15), l), Action::Create);
        let b = held_by("b", 15);
        assert_eq!(
            decide(Some(&b), "a", t0, t0 + S(14), S(15)),
            Action::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&b), "a", t0, t0 + S(15), S(15)),
            Action::TakeOver
        );
        assert_eq!(decide(Some(&b), "b", t0, t0, S(15)), Action::Renew);
        assert_eq!(
            decide(Some(&held_by("", 15)), "a", t0, t0 + S(14), l),
            Action::Wait {
                holder: String::new()
            },
            "a holder cleared by an edit waits the record's duration"
        );
        assert_eq!(
            decide(Some(&held_by("", 1)), "a", t0, t0 + S(1), l),
            Action::TakeOver,
            "released (1 s)"
        );
    }

    /// The holder's `renewTime` is never compared with the local clock: a
    /// standby whose clock is 15 s ahead, reading a Lease renewed "15 s
    /// ago" by its clock, still waits a whole lease duration from when it
    /// saw that version; one 15 s behind does not wait 15 s longer.
    #[test]
    fn skewed_renew_times_do_not_change_the_decision() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + S(1_000_000);
        for skew in [S(15), Duration::ZERO] {
            for sign in [true, false] {
                let mut spec = held_by("b", 6);
                let written = if sign { wall + skew } else { wall - skew };
                spec.renew_time = Some(micro(written));
                spec.acquire_time = Some(micro(written));
                let seen = Observed::see(None, "7", t0);
                assert_eq!(
                    decide(Some(&spec), "a", seen.since, t0 + S(5), S(15)),
                    Action::Wait { holder: "b".into() },
                    "skew {skew:?} sign {sign}"
                );
                assert_eq!(
                    decide(Some(&spec), "a", seen.since, t0 + S(6), S(15)),
                    Action::TakeOver,
                    "skew {skew:?} sign {sign}"
                );
            }
        }
    }

    /// Expiry counts from the first sighting of a version; any new version
    /// (a renewal) restarts it, the same version seen again does not.
    #[test]
    fn the_observed_time_restarts_only_when_the_record_changes() {
        let t0 = Instant::now();
        let o = Observed::see(None, "5", t0);
        let o = Observed::see(Some(o), "5", t0 + S(4));
        assert_eq!(o.since, t0, "same version: first sighting kept");
        let o = Observed::see(Some(o), "6", t0 + S(5));
        assert_eq!(o.since, t0 + S(5), "renewed: counting restarts");
        let b = held_by("b", 6);
        assert_eq!(
            decide(Some(&b), "a", o.since, t0 + S(10), S(15)),
            Action::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&b), "a", o.since, t0 + S(11), S(15)),
            Action::TakeOver
        );
    }

    /// The leader's term ends `renew_deadline` after it SENT its last
    /// successful renewal, strictly before the earliest instant another
    /// replica can see that renewal expire (it saw the write after it was
    /// sent, and waits a whole lease duration).
    #[test]
    fn a_leader_steps_down_before_anyone_may_take_over() {
        let s = Settings {
            namespace: "meshca".into(),
            name: "l".into(),
            identity: "a".into(),
            lease_duration: S(15),
        };
        assert_eq!(s.renew_deadline(), S(10));
        assert_eq!(s.retry_period(), S(3));
        let t0 = Instant::now();
        let mut term = Term::new(s.renew_deadline());
        assert!(!term.leading(t0));
        term.renewed(t0);
        // Failed renewals at +3, +6, +9 change nothing: still leading.
        assert!(term.leading(t0 + S(9)));
        assert!(!term.leading(t0 + S(10)), "renew deadline passed");
        // The standby saw the write at the earliest when it was sent.
        let seen = Observed::see(None, "9", t0);
        let b = held_by("a", s.lease_secs());
        let first_takeover = t0 + S(15);
        assert_eq!(
            decide(
                Some(&b),
                "b",
                seen.since,
                first_takeover - Duration::from_millis(1),
                S(15)
            ),
            Action::Wait { holder: "a".into() }
        );
        assert_eq!(
            decide(Some(&b), "b", seen.since, first_takeover, S(15)),
            Action::TakeOver
        );
        assert!(term.ends().unwrap() < first_takeover);
        // A renewal that succeeds late (sent earlier) never moves the end back.
        term.renewed(t0 + S(3));
        term.renewed(t0 + S(1));
        assert_eq!(term.ends(), Some(t0 + S(13)));
        term.lost();
        assert!(!term.leading(t0 + S(4)));
    }

    #[test]
    fn short_leases_keep_the_ordering() {
        for secs in [1, 2, 3, 15, 60] {
            let s = Settings {
                namespace: "n".into(),
                name: "l".into(),
                identity: "a".into(),
                lease_duration: S(secs),
            };
            assert!(s.renew_deadline() < S(secs), "{secs}");
            assert!(s.retry_period() < s.renew_deadline(), "{secs}");
        }
    }
}
