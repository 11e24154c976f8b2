//! The propagation report's wire format (a ConfigMap's data).
//!
//! Owns: encoding this replica's clients into a report small enough for the
//! API server's object limit, and decoding (and validating) the reports
//! other replicas wrote, including the first format. Must not: talk to the
//! API server or judge freshness.
//!
//! Format 2 (since 20,000 clients did not fit the first one):
//! - `data["report.json"]`: a JSON [`Header`] — the replica, the number of
//!   clients, the roots the rows refer to, the keys of the [`SAMPLE`] oldest
//!   clients, the SHA-256 of the rows, a write counter, or `refused` with
//!   the reason when the clients could not be published;
//! - `binaryData["clients.bin"]`: one row per client, ~13 bytes: the
//!   client's id (8 bytes, big-endian; `trust::propagation::client_id`),
//!   then LEB128 varints: the bundle version, `live_until - updated`
//!   zigzag-encoded, and `(root index + 1) << 1 | watching`.
//!
//! The first format (`{"replica", "updated", "clients": [{key, version,
//! live_until, watching, root}]}` in `report.json`, ~190 bytes per client)
//! is still read, for replicas of an earlier version during an upgrade.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use serde::{Deserialize, Serialize};

use crate::trust::propagation::{ClientView, Export, RemoteClients, Row, SAMPLE};

/// The data key holding the report's header (and the whole first format).
pub const KEY: &str = "report.json";
/// The binaryData key holding the rows.
pub const ROWS_KEY: &str = "clients.bin";
/// The format written.
pub const FORMAT: u32 = 2;
/// kube-apiserver refuses a ConfigMap whose data (keys, values, decoded
/// binaryData) exceeds 1 MiB with 422 Invalid.
pub const OBJECT_LIMIT: usize = 1024 * 1024;
/// What a report may use of that: room is left for the header's growth
/// between measuring and writing, and for a margin.
pub const BUDGET: usize = OBJECT_LIMIT - 64 * 1024;
/// The least bytes a row takes (id + three one-byte varints).
const MIN_ROW: usize = 11;

/// A report in the first format (still read during upgrades).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The replica.
    pub replica: String,
    /// When it was written (Unix seconds).
    pub updated: u64,
    /// Its live clients.
    pub clients: Vec<ClientView>,
}

/// A named client in a report's sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    /// SPIFFE ID and peer IP.
    pub key: String,
    /// Highest bundle version delivered.
    pub version: u64,
}

/// The JSON part of a format-2 report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: u32,
    /// The replica.
    pub replica: String,
    /// The writer's clock when written (Unix seconds): the base of the
    /// rows' times. Never used for freshness (clock skew).
    pub updated: u64,
    /// Counts this replica's writes, so a heartbeat always changes the
    /// object (an unchanged update would not get a new resourceVersion).
    pub seq: u64,
    /// How many rows follow.
    pub clients: usize,
    /// Root fingerprints the rows refer to by index.
    #[serde(default)]
    pub roots: Vec<String>,
    /// The keys of the clients with the oldest versions.
    #[serde(default)]
    pub sample: Vec<Named>,
    /// SHA-256 of the rows (hex): a report whose rows were lost or
    /// mixed up is unreadable, never silently short.
    pub rows_sha256: String,
    /// Set when the replica could not publish its clients: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A report ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// For `data`.
    pub header: String,
    /// For `binaryData` (None: a refusal, no rows).
    pub rows: Option<Vec<u8>>,
    /// For a refusal: why.
    pub refused: Option<String>,
}

impl Encoded {
    /// For a refusal: why.
    pub fn refused(&self) -> Option<String> {
        self.refused.clone()
    }

    /// What the API server counts against [`OBJECT_LIMIT`].
    pub fn size(&self) -> usize {
        KEY.len() + self.header.len() + self.rows.as_ref().map_or(0, |r| ROWS_KEY.len() + r.len())
    }

    /// As ConfigMap `data` and `binaryData`.
    pub fn into_data(
        self,
    ) -> (
        BTreeMap<String, String>,
        Option<BTreeMap<String, ByteString>>,
    ) {
        (
            BTreeMap::from([(KEY.to_string(), self.header)]),
            self.rows
                .map(|r| BTreeMap::from([(ROWS_KEY.to_string(), ByteString(r))])),
        )
    }
}

/// What a report says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// The replica's clients.
    Clients(String, RemoteClients),
    /// The replica could not publish them: why.
    Refused(String, String),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).ok_or("the rows end inside a number")?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a number in the rows is longer than 64 bits".into())
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b))
}

/// Encodes this replica's clients (write number `seq`, at `updated`).
pub fn encode(replica: &str, e: &Export, updated: u64, seq: u64) -> Result<Encoded, String> {
    let mut roots: Vec<String> = Vec::new();
    let mut rows = Vec::with_capacity(e.rows.len() * 14);
    for r in &e.rows {
        let root = match &r.root {
            None => 0,
            Some(fp) => match roots.iter().position(|x| x == fp) {
                Some(i) => i + 1,
                None => {
                    roots.push(fp.clone());
                    roots.len()
                }
            },
        };
        rows.extend_from_slice(&r.id.to_be_bytes());
        put_varint(&mut rows, r.version);
        put_varint(&mut rows, zigzag(r.live_until.wrapping_sub(updated) as i64));
        put_varint(&mut rows, ((root as u64) << 1) | u64::from(r.watching));
    }
    let header = Header {
        format: FORMAT,
        replica: replica.to_string(),
        updated,
        seq,
        clients: e.rows.len(),
        roots,
        sample: e
            .sample
            .iter()
            .map(|(key, version)| Named {
                key: key.clone(),
                version: *version,
            })
            .collect(),
        rows_sha256: sha256_hex(&rows),
        refused: None,
    };
    Ok(Encoded {
        header: serde_json::to_string(&header).map_err(|e| e.to_string())?,
        rows: Some(rows),
        refused: None,
    })
}

/// A report that says this replica could not publish its clients, and why
/// (small: no rows, no sample).
pub fn refusal(replica: &str, why: &str, updated: u64, seq: u64) -> Result<Encoded, String> {
    let mut why = why.to_string();
    if why.len() > 2048 {
        let mut cut = 2048;
        while !why.is_char_boundary(cut) {
            cut -= 1;
        }
        why.truncate(cut);
    }
    let header = Header {
        format: FORMAT,
        replica: replica.to_string(),
        updated,
        seq,
        clients: 0,
        roots: Vec::new(),
        sample: Vec::new(),
        rows_sha256: sha256_hex(&[]),
        refused: Some(why.clone()),
    };
    Ok(Encoded {
        header: serde_json::to_string(&header).map_err(|e| e.to_string())?,
        rows: None,
        refused: Some(why),
    })
}

/// Decodes a report from its ConfigMap's data; an error says why it
/// cannot be read (for the operator).
pub fn decode(
    data: Option<&BTreeMap<String, String>>,
    binary: Option<&BTreeMap<String, ByteString>>,
) -> Result<Decoded, String> {
    let text = data
        .and_then(|d| d.get(KEY))
        .ok_or_else(|| format!("no {KEY} in it"))?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("{KEY} is not JSON: {e}"))?;
    if v.get("format").is_none() {
        let r: Report =
            serde_json::from_value(v).map_err(|e| format!("{KEY} is not a report: {e}"))?;
        return Ok(Decoded::Clients(r.replica, r.clients.into()));
    }
    let h: Header = serde_json::from_value(v).map_err(|e| format!("{KEY} is not a report: {e}"))?;
    if h.format != FORMAT {
        return Err(format!(
            "format {} (this replica reads formats 1 and {FORMAT}: upgrade it)",
            h.format
        ));
    }
    if let Some(why) = h.refused {
        return Ok(Decoded::Refused(h.replica, why));
    }
    let rows = binary
        .and_then(|b| b.get(ROWS_KEY))
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    if sha256_hex(rows) != h.rows_sha256 {
        return Err(format!("its rows ({ROWS_KEY}) do not match its header"));
    }
    let clients = decode_rows(&h, rows)?;
    Ok(Decoded::Clients(h.replica, clients))
}

fn decode_rows(h: &Header, b: &[u8]) -> Result<RemoteClients, String> {
    if h.clients > b.len() / MIN_ROW {
        return Err(format!(
            "it announces {} clients in {} bytes",
            h.clients,
            b.len()
        ));
    }
    let mut out = RemoteClients {
        rows: Vec::with_capacity(h.clients),
        names: BTreeMap::new(),
    };
    let mut at = 0;
    for _ in 0..h.clients {
        let id = b
            .get(at..at + 8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .ok_or("the rows end inside a client id")?;
        at += 8;
        let version = get_varint(b, &mut at)?;
        let live_until = h
            .updated
            .saturating_add_signed(unzigzag(get_varint(b, &mut at)?));
        let flags = get_varint(b, &mut at)?;
        let root = match (flags >> 1) as usize {
            0 => None,
            i => Some(
                h.roots
                    .get(i - 1)
                    .ok_or_else(|| format!("a row names root {i} of {}", h.roots.len()))?
                    .clone(),
            ),
        };
        out.rows.push(Row {
            id: u64::from_be_bytes(id),
            version,
            live_until,
            watching: flags & 1 == 1,
            root,
        });
    }
    if at != b.len() {
        return Err(format!("{} bytes follow the last row", b.len() - at));
    }
    let ids: std::collections::HashSet<u64> = out.rows.iter().map(|r| r.id).collect();
    for n in h.sample.iter().take(SAMPLE) {
        let id = crate::trust::propagation::client_id(&n.key);
        // Only names of clients the rows carry: a sample cannot add clients.
        if ids.contains(&id) {
            out.names.insert(id, n.key.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::propagation::client_id;

    fn export(n: usize) -> Export {
        let mut rows: Vec<Row> = (0..n)
            .map(|i| Row {
                id: client_id(&format!(
                    "spiffe://cluster.local/ns/shop/sa/w{i} 10.0.{}.{}",
                    i / 256,
                    i % 256
                )),
                version: 3 + (i % 2) as u64,
                live_until: 1_700_000_000 + 3600 + i as u64,
                watching: i % 3 == 0,
                root: (i % 5 != 0).then(|| format!("{:064x}", i % 2)),
            })
            .collect();
        rows.sort_by_key(|r| r.id);
        Export {
            sample: vec![("spiffe://cluster.local/ns/shop/sa/w0 10.0.0.0".into(), 3)],
            rows,
        }
    }

    fn roundtrip(e: &Encoded) -> Result<Decoded, String> {
        let (data, binary) = e.clone().into_data();
        decode(Some(&data), binary.as_ref())
    }

    #[test]
    fn rows_round_trip_and_20000_clients_fit_with_room() {
        let e = export(20_000);
        let enc = encode("b", &e, 1_700_000_000, 7).unwrap();
        assert!(enc.size() < BUDGET / 2, "{} bytes", enc.size());
        let Decoded::Clients(replica, got) = roundtrip(&enc).unwrap() else {
            panic!("not clients")
        };
        assert_eq!(replica, "b");
        assert_eq!(got.rows, e.rows);
        let w0 = client_id("spiffe://cluster.local/ns/shop/sa/w0 10.0.0.0");
        assert_eq!(got.names.len(), 1);
        assert_eq!(
            got.names[&w0],
            "spiffe://cluster.local/ns/shop/sa/w0 10.0.0.0"
        );
        // A live_until before the writer's clock (a watcher whose
        // certificate expired) survives the zigzag.
        let mut past = export(1);
        past.rows[0].live_until = 5;
        let Decoded::Clients(_, got) =
            roundtrip(&encode("b", &past, 1_700_000_000, 1).unwrap()).unwrap()
        else {
            panic!()
        };
        assert_eq!(got.rows[0].live_until, 5);
    }

    #[test]
    fn damaged_reports_are_unreadable_not_short() {
        let enc = encode("b", &export(50), 1_700_000_000, 1).unwrap();
        // Rows cut short, or swapped for another report's: refused.
        let mut cut = enc.clone();
        cut.rows.as_mut().unwrap().truncate(200);
        assert!(roundtrip(&cut).unwrap_err().contains("do not match"));
        let mut gone = enc.clone();
        gone.rows = None;
        assert!(roundtrip(&gone).is_err());
        // A header that claims more clients than the rows hold.
        let mut h: Header = serde_json::from_str(&enc.header).unwrap();
        h.clients = 51;
        let mut more = enc.clone();
        more.header = serde_json::to_string(&h).unwrap();
        assert!(roundtrip(&more).is_err());
        h.clients = usize::MAX;
        more.header = serde_json::to_string(&h).unwrap();
        assert!(roundtrip(&more).unwrap_err().contains("announces"));
        // A root index past the table.
        let mut h: Header = serde_json::from_str(&enc.header).unwrap();
        h.roots.truncate(1);
        let mut fewer = enc.clone();
        fewer.header = serde_json::to_string(&h).unwrap();
        assert!(roundtrip(&fewer).unwrap_err().contains("root"));
        // Not JSON, no header, a future format.
        assert!(decode(None, None).is_err());
        let bad = BTreeMap::from([(KEY.to_string(), "{\"format\": 3".to_string())]);
        assert!(decode(Some(&bad), None).is_err());
        let future = BTreeMap::from([(
            KEY.to_string(),
            serde_json::json!({"format": 3, "replica": "b", "updated": 1, "seq": 1,
                               "clients": 0, "rows_sha256": ""})
            .to_string(),
        )]);
        assert!(decode(Some(&future), None)
            .unwrap_err()
            .contains("format 3"));
    }

    /// Rows from another replica are untrusted: every truncation and
    /// every single-byte change (with the header's digest recomputed, so
    /// the parser itself is reached) decodes to an error or to at most the
    /// announced clients, never a panic or an over-allocation.
    #[test]
    fn mangled_rows_never_panic() {
        let enc = encode("b", &export(40), 1_700_000_000, 1).unwrap();
        let rows = enc.rows.clone().unwrap();
        let header: Header = serde_json::from_str(&enc.header).unwrap();
        let try_rows = |rows: Vec<u8>, clients: usize| {
            let mut h = header.clone();
            h.rows_sha256 = sha256_hex(&rows);
            h.clients = clients;
            let e = Encoded {
                header: serde_json::to_string(&h).unwrap(),
                rows: Some(rows),
                refused: None,
            };
            if let Ok(Decoded::Clients(_, c)) = roundtrip(&e) {
                assert_eq!(c.rows.len(), clients);
            }
        };
        for cut in 0..rows.len() {
            try_rows(rows[..cut].to_vec(), 40);
        }
        for i in 0..rows.len() {
            for v in [0x00, 0x7f, 0x80, 0xff] {
                let mut r = rows.clone();
                r[i] = v;
                try_rows(r, 40);
            }
        }
        try_rows(vec![0xff; 200], 18);
    }

    #[test]
    fn a_sample_names_only_clients_in_the_rows() {
        let mut e = export(2);
        e.sample.push(("spiffe://evil/not-a-row 1.2.3.4".into(), 0));
        let Decoded::Clients(_, got) = roundtrip(&encode("b", &e, 1, 1).unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(got.rows.len(), 2);
        assert!(got.names.values().all(|k| !k.contains("evil")));
    }

    #[test]
    fn refusals_and_the_first_format_are_read() {
        let r = refusal("b", &"x".repeat(5000), 1, 2).unwrap();
        assert!(r.size() < 3000);
        assert_eq!(
            roundtrip(&r).unwrap(),
            Decoded::Refused("b".into(), "x".repeat(2048))
        );
        let v1 = serde_json::json!({"replica": "c", "updated": 10, "clients": [
            {"key": "k 10.0.0.1", "version": 2, "live_until": 99, "watching": true}]});
        let data = BTreeMap::from([(KEY.to_string(), v1.to_string())]);
        let Decoded::Clients(replica, got) = decode(Some(&data), None).unwrap() else {
            panic!()
        };
        assert_eq!(replica, "c");
        assert_eq!(got.rows[0].id, client_id("k 10.0.0.1"));
        assert_eq!(got.names[&client_id("k 10.0.0.1")], "k 10.0.0.1");
    }
}
