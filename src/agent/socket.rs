//! The Workload API's Unix socket: listening, and letting every mainstream
//! gRPC client in.
//!
//! Owns: binding the socket, serving the `workload_api` service on it, and
//! the connection adapter that makes the HTTP/2 `:authority` gRPC clients
//! send over Unix sockets acceptable. gRPC C-core (Python, Ruby, C++, C#)
//! sends the socket path percent-encoded (`tmp%2Fagent.sock`), grpc-java and
//! grpc-swift the raw path, others nothing or `localhost`; the first two are
//! not URI authorities, and h2 resets such streams (PROTOCOL_ERROR) before
//! any service sees them. The adapter sits between the socket and h2: it
//! passes every frame through unchanged except the client's header blocks,
//! which it decodes (HPACK, `util::hpack`, with the client's dynamic table),
//! replaces an `:authority` value that is not a URI authority but consists
//! of visible ASCII with `localhost`, and re-encodes as plain literals (so
//! h2's HPACK table is never used and stays consistent). Everything else —
//! framing, pseudo-header rules, header names and values, an `:authority`
//! with control or non-ASCII bytes — is still validated by h2. On a Unix
//! socket the authority names nothing (no virtual hosts; routing is by
//! `:path`), so the rewrite grants nothing. Frames and header blocks are
//! bounded; a malformed block closes the connection, as h2 would.
//! Must not: be used on TCP listeners (they keep h2's full validation), or
//! know the RPCs (see `workload_api`).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::workload_api::Source;
use crate::util::hpack::{self, Field, HpackError};

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload; the server advertises exactly this
/// (SETTINGS_MAX_FRAME_SIZE), so a client may not send more.
const MAX_FRAME: usize = 16_384;
/// The largest decoded header list (SETTINGS_MAX_HEADER_LIST_SIZE, as h2
/// counts it); also advertised by the server.
const MAX_HEADER_LIST: usize = 16_384;
/// The largest encoded header block buffered across CONTINUATION frames
/// (Huffman coding can make a block larger than its list).
const MAX_HEADER_BLOCK: usize = 65_536;
/// What an unusable `:authority` becomes.
const LOCALHOST: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Accepts `unix:///path`, `unix:/path` or a plain path (the
/// `SPIFFE_ENDPOINT_SOCKET` conventions).
pub(crate) fn socket_path(spec: &str) -> Result<PathBuf, String> {
    let p = spec
        .strip_prefix("unix://")
        .or_else(|| spec.strip_prefix("unix:"))
        .unwrap_or(spec);
    if p.is_empty() || !p.starts_with('/') {
        return Err(format!(
            "Workload API socket {spec:?} must be an absolute path (unix:///path)"
        ));
    }
    Ok(PathBuf::from(p))
}

/// Serves the Workload API on `path` until `stop` resolves.
pub async fn serve(
    path: PathBuf,
    source: impl Into<Source>,
    trust_domain: String,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, String> {
    // A socket left by a previous run would make bind fail.
    if path.exists() {
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let incoming =
        tokio_stream::wrappers::UnixListenerStream::new(listener).map(|s| s.map(Connection::new));
    let svc = super::workload_api::service(source.into(), trust_domain);
    tracing::info!(socket = %path.display(), "SPIFFE Workload API listening");
    Ok(tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            // The adapter's bounds are the limits the server advertises.
            .max_frame_size(MAX_FRAME as u32)
            .http2_max_header_list_size(MAX_HEADER_LIST as u32)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop)
            .await
        {
            tracing::error!(error = %e, "Workload API server failed");
        }
    }))
}

/// Why the adapter closed a connection (h2 would have: a connection error).
#[derive(Debug, thiserror::Error)]
enum AdapterError {
    #[error("undecodable header block: {0}")]
    Hpack(#[from] HpackError),
    #[error("frame of {0} bytes is above the advertised maximum {MAX_FRAME}")]
    FrameTooLarge(usize),
    #[error("header block above {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    #[error("a header block was interrupted by another frame")]
    ExpectedContinuation,
    #[error("HEADERS frame with invalid padding or priority")]
    BadHeadersFrame,
}

/// A header block being received (HEADERS without END_HEADERS so far).
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// The client-to-server byte stream's rewriter.
struct Rewriter {
    /// Bytes of the preface already passed through.
    preface_seen: usize,
    /// Not HTTP/2 with prior knowledge: passed through for h2 to refuse.
    passthrough: bool,
    decoder: hpack::Decoder,
    pending: Option<Pending>,
}

impl Rewriter {
    fn new() -> Rewriter {
        Rewriter {
            preface_seen: 0,
            passthrough: false,
            // The server advertises no SETTINGS_HEADER_TABLE_SIZE: 4096.
            decoder: hpack::Decoder::new(4096),
            pending: None,
        }
    }

    /// Consumes the complete frames at the start of `input`, appending what
    /// h2 should read to `out`.
    fn feed(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), AdapterError> {
        let mut at = 0;
        if self.preface_seen < PREFACE.len() {
            let n = (PREFACE.len() - self.preface_seen).min(input.len());
            if input[..n] != PREFACE[self.preface_seen..self.preface_seen + n] {
                self.passthrough = true;
            }
            out.extend_from_slice(&input[..n]);
            self.preface_seen += n;
            at = n;
        }
        if self.passthrough {
            out.extend_from_slice(&input[at..]);
            input.clear();
            return Ok(());
        }
        while input.len() - at >= 9 {
            let h = &input[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if len > MAX_FRAME {
                return Err(AdapterError::FrameTooLarge(len));
            }
            if input.len() - at < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let frame = &input[at..at + 9 + len];
            self.frame(h[3], h[4], stream, frame, out)?;
            at += 9 + len;
        }
        input.drain(..at);
        Ok(())
    }

    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        frame: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AdapterError> {
        let payload = &frame[9..];
        let mut p = match (self.pending.take(), kind) {
            (Some(mut p), CONTINUATION) if p.stream == stream => {
                if p.block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(AdapterError::BlockTooLarge);
                }
                p.block.extend_from_slice(payload);
                p
            }
            (Some(_), _) => return Err(AdapterError::ExpectedContinuation),
            (None, HEADERS) => headers_frame(flags, stream, payload)?,
            (None, _) => {
                // Everything else (a stray CONTINUATION too) is h2's to judge.
                out.extend_from_slice(frame);
                return Ok(());
            }
        };
        if flags & END_HEADERS == 0 {
            self.pending = Some(p);
            return Ok(());
        }
        let mut fields = self.decoder.decode(&p.block, MAX_HEADER_LIST)?;
        if normalize_authority(&mut fields) {
            tracing::debug!(stream, "Workload API: client's :authority replaced");
        }
        p.block = hpack::encode_literals(&fields);
        write_headers(&p, out);
        Ok(())
    }
}

/// A HEADERS frame's fields, without padding (RFC 9113 section 6.2).
fn headers_frame(flags: u8, stream: u32, payload: &[u8]) -> Result<Pending, AdapterError> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, r) = rest.split_first().ok_or(AdapterError::BadHeadersFrame)?;
        (pad, rest) = (usize::from(n), r);
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let p: [u8; 5] = rest
            .get(..5)
            .and_then(|p| p.try_into().ok())
            .ok_or(AdapterError::BadHeadersFrame)?;
        (priority, rest) = (Some(p), &rest[5..]);
    }
    let end = rest
        .len()
        .checked_sub(pad)
        .ok_or(AdapterError::BadHeadersFrame)?;
    Ok(Pending {
        stream,
        end_stream: flags & END_STREAM != 0,
        priority,
        block: rest[..end].to_vec(),
    })
}

/// Writes a header block as HEADERS (+ CONTINUATION) frames within MAX_FRAME.
fn write_headers(p: &Pending, out: &mut Vec<u8>) {
    let prio = p.priority.as_ref().map_or(&[][..], |b| &b[..]);
    let first_len = p.block.len().min(MAX_FRAME - prio.len());
    let (first, rest) = p.block.split_at(first_len);
    let mut flags = if p.end_stream { END_STREAM } else { 0 };
    if !prio.is_empty() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(out, prio.len() + first.len(), HEADERS, flags, p.stream);
    out.extend_from_slice(prio);
    out.extend_from_slice(first);
    let mut chunks = rest.chunks(MAX_FRAME).peekable();
    while let Some(c) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        frame_header(out, c.len(), CONTINUATION, flags, p.stream);
        out.extend_from_slice(c);
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    // len <= MAX_FRAME (2^14) fits the 24-bit length.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Replaces an `:authority` that is not a URI authority but only visible
/// ASCII (an empty one, a raw or percent-encoded socket path) with
/// `localhost`. Returns whether it did. Other values are left for h2.
fn normalize_authority(fields: &mut [Field]) -> bool {
    let mut changed = false;
    for f in fields.iter_mut().filter(|f| f.name == b":authority") {
        let usable = http::uri::Authority::try_from(f.value.as_slice()).is_ok();
        let visible = f.value.iter().all(|b| (0x21..=0x7e).contains(b));
        if !usable && visible {
            f.value = LOCALHOST.to_vec();
            changed = true;
        }
    }
    changed
}

/// One accepted socket connection, as h2 reads it.
pub struct Connection {
    io: UnixStream,
    rewriter: Rewriter,
    /// Bytes read from the client, not yet a complete frame.
    input: Vec<u8>,
    /// Bytes ready for h2, from `out[out_at..]`.
    out: Vec<u8>,
    out_at: usize,
}

impl Connection {
    fn new(io: UnixStream) -> Connection {
        Connection {
            io,
            rewriter: Rewriter::new(),
            input: Vec::new(),
            out: Vec::new(),
            out_at: 0,
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_at);
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            this.input.extend_from_slice(read.filled());
            if let Err(e) = this.rewriter.feed(&mut this.input, &mut this.out) {
                tracing::debug!(error = %e, "Workload API connection closed");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, value: &[u8]) -> Field {
        Field {
            name: name.as_bytes().to_vec(),
            value: value.to_vec(),
            never_indexed: false,
        }
    }

    #[test]
    fn socket_authorities_become_localhost_and_others_are_left_for_h2() {
        for (sent, want) in [
            (&b"tmp%2Fdir%2Fagent.sock"[..], &b"localhost"[..]),
            (b"/tmp/dir/agent.sock", b"localhost"),
            (b"", b"localhost"),
            (b"localhost", b"localhost"),
            (b"example.org:8080", b"example.org:8080"),
            // Control or non-ASCII bytes: h2 refuses them, as on TCP.
            (b"a b", b"a b"),
            (b"/tmp/\x00x", b"/tmp/\x00x"),
            ("/tmp/é".as_bytes(), "/tmp/é".as_bytes()),
        ] {
            let mut fields = vec![field(":path", b"/x"), field(":authority", sent)];
            normalize_authority(&mut fields);
            assert_eq!(fields[1].value, want, "{:?}", String::from_utf8_lossy(sent));
            assert_eq!(fields[0].value, b"/x", "other fields untouched");
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame_header(&mut f, payload.len(), kind, flags, stream);
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` one byte at a time (worst-case segmentation).
    fn feed_slowly(r: &mut Rewriter, bytes: &[u8]) -> Result<Vec<u8>, AdapterError> {
        let (mut input, mut out) = (Vec::new(), Vec::new());
        for b in bytes {
            input.push(*b);
            r.feed(&mut input, &mut out)?;
        }
        assert!(input.is_empty(), "a partial frame left over");
        Ok(out)
    }

    #[test]
    fn rewrites_split_padded_header_blocks_and_passes_other_frames_verbatim() {
        let block = hpack::encode_literals(&[
            field(":method", b"POST"),
            field(":authority", b"tmp%2Fagent.sock"),
        ]);
        let (a, b) = block.split_at(5);
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0x80, 0, 0, 1, 7]); // priority
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, END_STREAM, 1, b"hello");
        let mut wire = PREFACE.to_vec();
        wire.extend(&settings);
        wire.extend(frame(HEADERS, PADDED | PRIORITY, 1, &padded));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(&data);

        let out = feed_slowly(&mut Rewriter::new(), &wire).unwrap();
        let want_block =
            hpack::encode_literals(&[field(":method", b"POST"), field(":authority", b"localhost")]);
        let mut want = PREFACE.to_vec();
        want.extend(&settings);
        let mut payload = vec![0x80, 0, 0, 1, 7];
        payload.extend(&want_block);
        want.extend(frame(HEADERS, PRIORITY | END_HEADERS, 1, &payload));
        want.extend(&data);
        assert_eq!(out, want);
    }

    #[test]
    fn refuses_what_h2_would_treat_as_a_connection_error() {
        let headers = |flags| frame(HEADERS, flags, 1, &[0x82]);
        let mut wire = PREFACE.to_vec();
        wire.extend(headers(0));
        wire.extend(frame(0x0, 0, 1, b"x"));
        assert!(matches!(
            feed_slowly(&mut Rewriter::new(), &wire),
            Err(AdapterError::ExpectedContinuation)
        ));
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, END_HEADERS, 1, &[0xbe]));
        assert!(matches!(
            feed_slowly(&mut Rewriter::new(), &wire),
            Err(AdapterError::Hpack(HpackError::BadIndex(62)))
        ));
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        assert!(matches!(
            feed_slowly(&mut Rewriter::new(), &wire),
            Err(AdapterError::BadHeadersFrame)
        ));
        let mut big = PREFACE.to_vec();
        big.extend([0x00, 0x40, 0x01, 0x0, 0, 0, 0, 0, 1]);
        assert!(matches!(
            feed_slowly(&mut Rewriter::new(), &big),
            Err(AdapterError::FrameTooLarge(16_385))
        ));
    }

    /// CONTINUATION flood: an endless header block is cut off at the bound
    /// instead of being buffered without limit.
    #[test]
    fn an_endless_header_block_is_cut_off() {
        let mut r = Rewriter::new();
        let (mut input, mut out) = (PREFACE.to_vec(), Vec::new());
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        r.feed(&mut input, &mut out).unwrap();
        let mut sent = 1;
        let err = loop {
            input.extend(frame(CONTINUATION, 0, 1, &[0x82; 1000]));
            sent += 1000;
            if let Err(e) = r.feed(&mut input, &mut out) {
                break e;
            }
            assert!(sent <= MAX_HEADER_BLOCK, "buffered {sent} bytes");
        };
        assert!(matches!(err, AdapterError::BlockTooLarge));
    }

    #[test]
    fn not_http2_passes_through_for_h2_to_refuse() {
        let wire = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3);
        assert_eq!(feed_slowly(&mut Rewriter::new(), &wire).unwrap(), wire);
    }
}
