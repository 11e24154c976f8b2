//! HPACK (RFC 7541): decoding a peer's header blocks, and writing a header
//! list back as plain literals.
//!
//! Owns: the static table, the decoder's dynamic table carried from block to
//! block (with the size updates the encoder signals, bounded by the limit
//! the receiver advertised), Huffman-coded strings, strict rejection of
//! malformed blocks (bad index, truncated or oversized integers, bad Huffman
//! padding, EOS in a string, late or oversized table size updates), a bound
//! on the decoded list's size; and [`encode_literals`], which writes fields
//! as "literal without indexing" representations so that the block it makes
//! never touches the receiver's dynamic table. Used by the Workload API
//! socket's `:authority` adapter (`agent::socket`). Must not: interpret
//! header names or values; whoever receives the re-encoded block validates
//! them.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// One header field as the encoder sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name (HPACK carries names lower-case; not checked here).
    pub name: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Sent as "never indexed" (a sensitive value): kept so on re-encoding.
    pub never_indexed: bool,
}

/// Why a header block could not be decoded (a connection error,
/// COMPRESSION_ERROR, in HTTP/2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("the header block is truncated")]
    Truncated,
    /// An integer does not fit the bounds HPACK implementations use.
    #[error("an HPACK integer is too large")]
    IntegerOverflow,
    /// Index 0, or beyond the static and dynamic tables.
    #[error("header table index {0} does not exist")]
    BadIndex(usize),
    /// A Huffman string with bad padding, or the EOS symbol.
    #[error("invalid Huffman-coded string")]
    Huffman,
    /// A dynamic table size update above the receiver's limit.
    #[error("dynamic table size {0} is above the limit {1}")]
    TableSize(usize, usize),
    /// A dynamic table size update after a header field.
    #[error("dynamic table size update after a header field")]
    LateSizeUpdate,
    /// The decoded header list exceeds the abuse bound (a multiple of the
    /// advertised limit): decoding stops, a connection error.
    #[error("the header list is larger than {0} bytes")]
    TooLarge(usize),
}

/// A decoded header block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The fields, in order; empty when `over_size`.
    pub fields: Vec<Field>,
    /// The list exceeded the advertised limit: the whole block was still
    /// decoded (so the dynamic table stays in step with the encoder's) but
    /// its fields were dropped; the stream, not the connection, is refused.
    pub over_size: bool,
}

/// How far past the advertised list size a block is still decoded (to keep
/// the dynamic table in step) before the connection is given up, as h2's
/// `MAX_HEADER_LIST_ABUSE_MULTIPLIER` does.
const ABUSE_MULTIPLIER: usize = 4;

/// The RFC 7541 Appendix A static table (index 1 is the first entry).
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Code lengths of the RFC 7541 Appendix B Huffman code, symbols 0..=256
/// (256 is EOS). The code is canonical, so the codes follow from the
/// lengths (checked against the RFC's examples in the tests).
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;

/// (length, code) → symbol, built once from the canonical code lengths.
fn huffman_codes() -> &'static std::collections::HashMap<(u8, u32), u16> {
    static CODES: OnceLock<std::collections::HashMap<(u8, u32), u16>> = OnceLock::new();
    CODES.get_or_init(|| {
        let mut order: Vec<u16> = (0..=EOS).collect();
        order.sort_by_key(|&s| (HUFFMAN_LENGTHS[usize::from(s)], s));
        let mut map = std::collections::HashMap::with_capacity(order.len());
        let (mut code, mut prev) = (0u32, HUFFMAN_LENGTHS[usize::from(order[0])]);
        for (i, &sym) in order.iter().enumerate() {
            let len = HUFFMAN_LENGTHS[usize::from(sym)];
            if i > 0 {
                code = (code + 1) << (len - prev);
            }
            prev = len;
            map.insert((len, code), sym);
        }
        map
    })
}

/// Decodes a Huffman-coded string (RFC 7541 section 5.2).
fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let codes = huffman_codes();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0u8);
    for byte in src {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            match codes.get(&(len, code)) {
                Some(&EOS) => return Err(HpackError::Huffman),
                Some(&sym) => {
                    out.push(u8::try_from(sym).map_err(|_| HpackError::Huffman)?);
                    (code, len) = (0, 0);
                }
                None if len >= 30 => return Err(HpackError::Huffman),
                None => {}
            }
        }
    }
    // Padding: at most 7 bits, all ones (the start of EOS).
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// Reads an integer with an `prefix`-bit prefix (RFC 7541 section 5.1).
fn read_int(buf: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let mask = (1u8 << prefix) - 1;
    let (&first, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
    *buf = rest;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok(value);
    }
    // At most four continuation bytes: values up to 2^28, like h2 and nghttp2.
    for shift in [0u32, 7, 14, 21] {
        let (&b, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
        *buf = rest;
        value += usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(HpackError::IntegerOverflow)
}

/// Reads a string literal (RFC 7541 section 5.2).
fn read_string(buf: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let huffman = buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(buf, 7)?;
    if len > buf.len() {
        return Err(HpackError::Truncated);
    }
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    if huffman {
        huffman_decode(s)
    } else {
        Ok(s.to_vec())
    }
}

/// An entry's size for the table's accounting (RFC 7541 section 4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// A decoder: one per connection direction, fed every header block in order.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first (index 62 is the front).
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// SETTINGS_HEADER_TABLE_SIZE the receiver advertised.
    limit: usize,
}

impl Decoder {
    /// A decoder whose receiver advertised `limit` as its table size
    /// (4096 unless its SETTINGS say otherwise).
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    fn get(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        if let Some((n, v)) = index.checked_sub(1).and_then(|i| STATIC.get(i)) {
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        index
            .checked_sub(STATIC.len() + 1)
            .and_then(|i| self.table.get(i))
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    fn evict_to(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => break,
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        // An entry larger than the table empties it and is not added.
        self.evict_to(size.min(self.max_size.saturating_add(1)));
        if size <= self.max_size {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    /// A literal's name (index with `prefix` bits, or a string) and value.
    fn literal(&self, buf: &mut &[u8], prefix: u8) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
        let index = read_int(buf, prefix)?;
        let name = if index == 0 {
            read_string(buf)?
        } else {
            self.get(index)?.0
        };
        Ok((name, read_string(buf)?))
    }

    /// Decodes one complete header block. A decoded list (RFC 9113 size:
    /// name + value + 32 per field) above `max_list` is reported as
    /// [`Decoded::over_size`]; above `ABUSE_MULTIPLIER` times that, decoding
    /// fails ([`HpackError::TooLarge`]).
    pub fn decode(&mut self, mut block: &[u8], max_list: usize) -> Result<Decoded, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        while let Some(&b) = block.first() {
            let (name, value, never_indexed) = if b & 0x80 != 0 {
                let (n, v) = self.get(read_int(&mut block, 7)?)?;
                (n, v, false)
            } else if b & 0x40 != 0 {
                let (n, v) = self.literal(&mut block, 6)?;
                self.insert(n.clone(), v.clone());
                (n, v, false)
            } else if b & 0x20 != 0 {
                if list_size > 0 {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = read_int(&mut block, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSize(size, self.limit));
                }
                self.max_size = size;
                self.evict_to(0);
                continue;
            } else {
                let (n, v) = self.literal(&mut block, 4)?;
                (n, v, b & 0x10 != 0)
            };
            list_size += entry_size(&name, &value);
            if list_size > max_list.saturating_mul(ABUSE_MULTIPLIER) {
                return Err(HpackError::TooLarge(
                    max_list.saturating_mul(ABUSE_MULTIPLIER),
                ));
            }
            if list_size > max_list {
                fields.clear();
            } else {
                fields.push(Field {
                    name,
                    value,
                    never_indexed,
                });
            }
        }
        Ok(Decoded {
            fields,
            over_size: list_size > max_list,
        })
    }
}

fn write_int(out: &mut Vec<u8>, flags: u8, prefix: u8, mut value: usize) {
    let mask = (1u8 << prefix) - 1;
    if value < usize::from(mask) {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask);
    value -= usize::from(mask);
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    write_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Writes `fields` as a header block of literals with literal names, without
/// indexing (or never indexed, as received), so the receiver's dynamic table
/// is never used or changed.
pub fn encode_literals(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.push(if f.never_indexed { 0x10 } else { 0x00 });
        write_string(&mut out, &f.name);
        write_string(&mut out, &f.value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        hex::decode(s).unwrap()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.clone()).unwrap(),
                    String::from_utf8(f.value.clone()).unwrap(),
                )
            })
            .collect()
    }

    fn want(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one
    /// connection, each using the previous ones' dynamic table entries.
    #[test]
    fn decodes_the_rfc_7541_request_examples_with_their_dynamic_table() {
        for blocks in [
            [
                "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
                "8286 84be 5808 6e6f 2d63 6163 6865",
                "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
            ],
            [
                "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
                "8286 84be 5886 a8eb 1064 9cbf",
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ],
        ] {
            let mut d = Decoder::new(4096);
            let first = d.decode(&hex(blocks[0]), 1 << 16).unwrap().fields;
            assert_eq!(
                pairs(&first),
                want(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com")
                ])
            );
            assert_eq!(d.size, 57);
            let second = d.decode(&hex(blocks[1]), 1 << 16).unwrap().fields;
            assert_eq!(
                pairs(&second)[3],
                pairs(&first)[3],
                "from the dynamic table"
            );
            assert_eq!(
                pairs(&second)[4],
                ("cache-control".into(), "no-cache".into())
            );
            let third = d.decode(&hex(blocks[2]), 1 << 16).unwrap().fields;
            assert_eq!(
                pairs(&third),
                want(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value")
                ])
            );
            assert_eq!(d.size, 164);
        }
    }

    /// RFC 7541 C.5: a 256-byte table evicts the oldest entries.
    #[test]
    fn evicts_oldest_entries_when_the_table_is_full() {
        let mut d = Decoder::new(256);
        d.decode(
            &hex(
                "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
                 6c65 2e63 6f6d",
            ),
            1 << 16,
        )
        .unwrap();
        assert_eq!(d.size, 222);
        let second = d
            .decode(&hex("4803 3330 37c1 c0bf"), 1 << 16)
            .unwrap()
            .fields;
        assert_eq!(pairs(&second)[0], (":status".into(), "307".into()));
        assert_eq!(pairs(&second)[3].0, "location");
        assert_eq!(d.size, 222);
        assert_eq!(d.table.len(), 4);
        assert_eq!(d.table[0].1, b"307", "newest first");
        assert_eq!(d.table[3].1, b"private", "the 302 entry was evicted");
    }

    #[test]
    fn refuses_malformed_blocks() {
        let cases: [(&str, HpackError); 8] = [
            ("80", HpackError::BadIndex(0)),
            ("be", HpackError::BadIndex(62)),
            ("ff ff ff ff ff 0f", HpackError::IntegerOverflow),
            ("41 05 61 62", HpackError::Truncated),
            // Huffman "a" padded with zeros instead of ones.
            ("41 81 18", HpackError::Huffman),
            // EOS coded inside a string (30 ones, padded).
            ("41 84 ff ff ff ff", HpackError::Huffman),
            ("82 3f e1 1f", HpackError::LateSizeUpdate),
            ("3f e2 1f", HpackError::TableSize(4097, 4096)),
        ];
        for (block, err) in cases {
            assert_eq!(
                Decoder::new(4096).decode(&hex(block), 1 << 16),
                Err(err),
                "{block}"
            );
        }
    }

    #[test]
    fn bounds_the_decoded_list() {
        // ":method: GET" is 7 + 3 + 32 = 42 bytes.
        let mut d = Decoder::new(4096);
        let over = d.decode(&hex("82 82"), 83).unwrap();
        assert!(over.over_size && over.fields.is_empty(), "{over:?}");
        let fits = d.decode(&hex("82 82"), 84).unwrap();
        assert!(!fits.over_size);
        assert_eq!(fits.fields.len(), 2);
        // Beyond four times the limit decoding stops: a connection error.
        assert_eq!(
            d.decode(&hex("82 82 82 82 82"), 42),
            Err(HpackError::TooLarge(168))
        );
    }

    /// An over-size block is still decoded to its end: the entries it adds
    /// to the dynamic table are there for the next block (else every later
    /// block on the connection would decode wrongly).
    #[test]
    fn an_over_size_block_keeps_the_dynamic_table_in_step() {
        let mut d = Decoder::new(4096);
        // 82, then "custom-key: custom-value" with incremental indexing.
        let block = hex("82 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65");
        assert!(d.decode(&block, 50).unwrap().over_size);
        let next = d.decode(&hex("be"), 1 << 16).unwrap();
        assert_eq!(pairs(&next.fields), want(&[("custom-key", "custom-value")]));
        // A size update after an (over-size, dropped) field is still late.
        assert_eq!(
            d.decode(&hex("82 82 3f e1 1f"), 50),
            Err(HpackError::LateSizeUpdate)
        );
    }

    #[test]
    fn a_size_update_shrinks_the_table() {
        let mut d = Decoder::new(4096);
        d.decode(
            &hex("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
            1 << 16,
        )
        .unwrap();
        assert_eq!(d.table.len(), 1);
        // Size 0 (flush), then an indexed static field.
        assert_eq!(
            pairs(&d.decode(&hex("20 82"), 1 << 16).unwrap().fields).len(),
            1
        );
        assert!(d.table.is_empty());
        assert_eq!(d.decode(&hex("be"), 1 << 16), Err(HpackError::BadIndex(62)));
    }

    #[test]
    fn literals_round_trip_without_touching_the_dynamic_table() {
        let fields = vec![
            Field {
                name: b":authority".to_vec(),
                value: vec![b'x'; 300],
                never_indexed: false,
            },
            Field {
                name: b"authorization".to_vec(),
                value: b"secret".to_vec(),
                never_indexed: true,
            },
        ];
        let block = encode_literals(&fields);
        let mut d = Decoder::new(4096);
        assert_eq!(d.decode(&block, 1 << 16).unwrap().fields, fields);
        assert!(d.table.is_empty());
    }
}
