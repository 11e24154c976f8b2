//! What untrusted callers can make the audit log write.
//!
//! Owns: the gate every *refusal* passes before it becomes an entry: a
//! token bucket per peer address (refusals are free for an attacker to
//! produce, so each peer gets a bounded share of the disk), folding of
//! identical refusals from one peer within a window into one entry with a
//! `count`, and truncation of the untrusted strings a refusal echoes. Grants
//! never pass through here: each certificate handed out has its own entry.
//! Must not: decide whether a request is refused, or write to the store (the
//! caller appends what this returns).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::Entry;
use crate::util::clock::Clock;

/// Bytes kept of one untrusted word (a run of non-space characters) in a
/// refusal's detail.
pub(crate) const MAX_WORD: usize = 128;
/// Bytes kept of a whole refusal detail.
pub(crate) const MAX_DETAIL: usize = 1024;
/// Peers tracked at once; refusals from further new peers share one bucket.
const MAX_PEERS: usize = 65_536;
const SHARDS: usize = 16;

/// The limits (settings `audit_refusal_rate`, `_burst`, `_window`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Refusal entries per second per peer.
    pub rate: f64,
    /// Burst of refusal entries per peer.
    pub burst: u32,
    /// Identical refusals within this window become one entry.
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate: 2.0,
            burst: 20,
            window: Duration::from_secs(60),
        }
    }
}

/// Cuts `s` to at most `max` bytes at a UTF-8 boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated {} bytes]", &s[..end], s.len() - end)
}

/// Bounds the untrusted strings a refusal's detail may echo (an `iss`, a
/// `kid`, a claimed name): each word to [`MAX_WORD`] bytes, the whole to
/// [`MAX_DETAIL`], each cut marked.
pub(crate) fn bound_detail(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(MAX_DETAIL + 64));
    let mut rest = detail;
    while !rest.is_empty() && out.len() <= MAX_DETAIL {
        let split = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(split);
        out.push_str(&truncate(word, MAX_WORD));
        let ws_end = tail
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(tail.len());
        out.push_str(&tail[..ws_end]);
        rest = &tail[ws_end..];
    }
    if rest.is_empty() && out.len() <= MAX_DETAIL {
        return out;
    }
    let mut end = MAX_DETAIL.min(out.len());
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}…[truncated {} bytes]",
        &out[..end],
        out.len() - end + rest.len()
    )
}

/// What to do with one refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Append it now.
    Record,
    /// Counted into a later summary entry (see [`RefusalGate::drain`]).
    Folded,
}

#[derive(Debug)]
struct Pending {
    since: SystemTime,
    count: u64,
    last: Entry,
}

#[derive(Debug)]
struct Peer {
    tokens: f64,
    at: SystemTime,
    /// Identical refusals seen since the first was recorded, by their key.
    repeats: HashMap<u64, Pending>,
    /// Refusals past the rate limit.
    over: Option<Pending>,
}

/// The gate (one per server; sharded, so concurrent refusals rarely share a lock).
pub(crate) struct RefusalGate {
    limits: Limits,
    clock: Arc<dyn Clock>,
    shards: Vec<Mutex<HashMap<Option<IpAddr>, Peer>>>,
}

impl std::fmt::Debug for RefusalGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalGate")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn key_of(e: &Entry) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &e.api,
        &e.reason,
        &e.detail,
        &e.namespace,
        &e.service_account,
        &e.requested_identity,
    )
        .hash(&mut h);
    h.finish()
}

fn peer_ip(e: &Entry) -> Option<IpAddr> {
    let p = e.peer.as_deref()?;
    p.parse::<std::net::SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| p.parse::<IpAddr>())
        .ok()
}

impl RefusalGate {
    /// A gate with these limits.
    pub(crate) fn new(limits: Limits, clock: Arc<dyn Clock>) -> Self {
        Self {
            limits,
            clock,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, ip: &Option<IpAddr>) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        ip.hash(&mut h);
        h.finish() as usize % SHARDS
    }

    /// Decides whether the refusal `e` is appended now or folded.
    pub(crate) fn admit(&self, e: &Entry) -> Admit {
        let now = self.clock.now();
        let mut ip = peer_ip(e);
        let mut shard = self.shards[self.shard(&ip)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !shard.contains_key(&ip) && shard.len() >= MAX_PEERS / SHARDS {
            // Too many peers at once: the rest share the `None` bucket.
            drop(shard);
            ip = None;
            shard = self.shards[self.shard(&ip)]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
        }
        let burst = f64::from(self.limits.burst);
        let peer = shard.entry(ip).or_insert_with(|| Peer {
            tokens: burst,
            at: now,
            repeats: HashMap::new(),
            over: None,
        });
        let key = key_of(e);
        if let Some(p) = peer.repeats.get_mut(&key) {
            if now.duration_since(p.since).unwrap_or_default() < self.limits.window {
                p.count += 1;
                p.last = e.clone();
                return Admit::Folded;
            }
        }
        let dt = now
            .duration_since(peer.at)
            .unwrap_or_default()
            .as_secs_f64();
        peer.tokens = (peer.tokens + dt * self.limits.rate).min(burst);
        peer.at = now.max(peer.at);
        if peer.tokens >= 1.0 {
            peer.tokens -= 1.0;
            // A repeat whose window ended is summarized by the next drain;
            // keep it until then under a fresh key slot only if it has none.
            if let Some(old) = peer.repeats.remove(&key) {
                if old.count > 0 {
                    fold_over(&mut peer.over, old, now);
                }
            }
            peer.repeats.insert(
                key,
                Pending {
                    since: now,
                    count: 0,
                    last: e.clone(),
                },
            );
            Admit::Record
        } else {
            fold_over(
                &mut peer.over,
                Pending {
                    since: now,
                    count: 1,
                    last: e.clone(),
                },
                now,
            );
            Admit::Folded
        }
    }

    /// The summary entries due (windows that ended before now; all of them
    /// when `all`, at shutdown), and forgets peers that have gone quiet.
    pub(crate) fn drain(&self, all: bool) -> Vec<Entry> {
        let now = self.clock.now();
        let window = self.limits.window;
        let due = |p: &Pending| all || now.duration_since(p.since).unwrap_or_default() >= window;
        let mut out = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, peer| {
                peer.repeats.retain(|_, p| {
                    if !due(p) {
                        return true;
                    }
                    if p.count > 0 {
                        out.push(summary(p, now, None));
                    }
                    false
                });
                if peer.over.as_ref().is_some_and(&due) {
                    if let Some(p) = peer.over.take() {
                        out.push(summary(&p, now, Some(self.limits)));
                    }
                }
                let dt = now
                    .duration_since(peer.at)
                    .unwrap_or_default()
                    .as_secs_f64();
                let refilled = peer.tokens + dt * self.limits.rate >= f64::from(self.limits.burst);
                !(peer.repeats.is_empty() && peer.over.is_none() && refilled)
            });
        }
        out
    }
}

fn fold_over(over: &mut Option<Pending>, p: Pending, _now: SystemTime) {
    match over {
        Some(o) => {
            o.count += p.count;
            o.last = p.last;
        }
        None => *over = Some(p),
    }
}

/// One entry standing for `p.count` refusals.
fn summary(p: &Pending, now: SystemTime, over_limit: Option<Limits>) -> Entry {
    let mut e = p.last.clone();
    e.time = crate::util::clock::rfc3339(now);
    e.time_unix_ms = crate::util::clock::unix_millis(now);
    e.count = Some(p.count);
    if let Some(l) = over_limit {
        e.reason = "refusals_over_audit_limit".into();
        e.detail = Some(bound_detail(&format!(
            "{} refusals from this peer since {} came faster than the audit intake limit ({}/s, burst {}) and are counted here, not listed; the last: {}",
            p.count,
            crate::util::clock::rfc3339(p.since),
            l.rate,
            l.burst,
            p.last.detail.as_deref().unwrap_or("-"),
        )));
        e.namespace = None;
        e.service_account = None;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::clock::ManualClock;

    fn refusal(peer: &str, detail: &str) -> Entry {
        Entry {
            kind: "issuance".into(),
            api: Some("native".into()),
            peer: Some(peer.into()),
            result: "refused".into(),
            reason: "bad_token".into(),
            detail: Some(detail.into()),
            ..Default::default()
        }
    }

    #[test]
    fn truncation_keeps_utf8_and_marks_the_cut() {
        let long = "é".repeat(200); // 400 bytes
        let t = truncate(&long, 127);
        assert!(t.starts_with(&"é".repeat(63)));
        assert!(t.ends_with("…[truncated 274 bytes]"), "{t}");
        let d = bound_detail(&format!("issuer \"{}\" is not trusted", "a".repeat(9000)));
        assert!(d.len() < 200, "{} bytes", d.len());
        assert!(
            d.starts_with("issuer \"aaaa") && d.ends_with("is not trusted"),
            "{d}"
        );
        let spaced = "ab ".repeat(3000);
        let d = bound_detail(&spaced);
        assert!(d.len() <= MAX_DETAIL + 40, "{} bytes", d.len());
        assert!(d.contains("truncated"));
        assert_eq!(bound_detail("short detail"), "short detail");
    }

    #[test]
    fn identical_refusals_fold_and_a_peer_is_rate_limited() {
        let clock = Arc::new(ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        ));
        let gate = RefusalGate::new(
            Limits {
                rate: 1.0,
                burst: 3,
                window: Duration::from_secs(60),
            },
            clock.clone(),
        );
        // 100 identical refusals: one recorded, 99 folded.
        let same = refusal("10.0.0.1:5000", "bad");
        assert_eq!(gate.admit(&same), Admit::Record);
        for port in 0..99 {
            let e = refusal(&format!("10.0.0.1:{port}"), "bad");
            assert_eq!(gate.admit(&e), Admit::Folded);
        }
        // Distinct refusals: the burst (2 left), then folded as over-limit.
        assert_eq!(gate.admit(&refusal("10.0.0.1:1", "x1")), Admit::Record);
        assert_eq!(gate.admit(&refusal("10.0.0.1:1", "x2")), Admit::Record);
        for i in 0..50 {
            assert_eq!(
                gate.admit(&refusal("10.0.0.1:1", &format!("y{i}"))),
                Admit::Folded
            );
        }
        // Another peer has its own bucket.
        assert_eq!(gate.admit(&refusal("10.0.0.2:1", "bad")), Admit::Record);
        assert!(gate.drain(false).is_empty(), "no window has ended");
        clock.advance(Duration::from_secs(61));
        let mut out = gate.drain(false);
        out.sort_by_key(|e| e.count);
        let counts: Vec<_> = out.iter().map(|e| (e.reason.as_str(), e.count)).collect();
        assert_eq!(
            counts,
            [
                ("refusals_over_audit_limit", Some(50)),
                ("bad_token", Some(99))
            ]
        );
        assert!(out[0].detail.as_deref().unwrap().contains("the last: y49"));
        assert!(gate.drain(false).is_empty(), "drained once");
        // The bucket refilled: recorded again.
        assert_eq!(gate.admit(&refusal("10.0.0.1:9", "bad")), Admit::Record);
    }
}
