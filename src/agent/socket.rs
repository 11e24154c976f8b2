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
//! `:path`), so the rewrite grants nothing. Frames, header blocks and their
//! CONTINUATION count are bounded; a header list over the limit refuses its
//! stream only (through h2's 431); a connection error (HPACK, flood, frame
//! size) gets a GOAWAY with RFC 9113's code and a debug text, then the
//! close. Also owns the socket file: removing only a stale socket at start,
//! its mode, and removing it at exit only if still ours.
//! Must not: be used on TCP listeners (they keep h2's full validation), or
//! know the RPCs (see `workload_api`).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

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
/// The most CONTINUATION frames one header block may use. Bytes alone are no
/// bound: zero-length CONTINUATION frames add none (the CONTINUATION flood).
/// A client that fills its frames needs MAX_HEADER_BLOCK / MAX_FRAME = 4; h2
/// allows 5 for our settings; 16 leaves room for clients that split finely.
const MAX_CONTINUATIONS: usize = 16;
/// Concurrent streams one connection may open (SETTINGS_MAX_CONCURRENT_STREAMS),
/// the default of the CA's gRPC listener (`grpc_max_concurrent_streams`).
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// What an unusable `:authority` becomes.
const LOCALHOST: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;
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

/// The socket's default mode: any local user may connect. Connecting to a
/// Unix socket needs write permission on it, so the umask's srwxr-xr-x would
/// lock out workloads under another uid; the access boundary is the
/// directory the socket is in (see docs/workload.md), as with SPIRE's agent.
pub const DEFAULT_SOCKET_MODE: u32 = 0o666;

/// Serves the Workload API on `path` until `stop` resolves (socket mode
/// [`DEFAULT_SOCKET_MODE`]; the socket file stays behind at exit — see
/// [`serve_claimed`]).
pub async fn serve(
    path: PathBuf,
    source: impl Into<Source>,
    trust_domain: String,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let (task, _claim) =
        serve_claimed(path, DEFAULT_SOCKET_MODE, source, trust_domain, stop).await?;
    Ok(task)
}

/// Serves the Workload API on `path` (with file `mode`) until `stop`
/// resolves; returns the server task and the claim on the socket file, whose
/// [`SocketClaim::release`] removes it at exit if it is still ours.
pub async fn serve_claimed(
    path: PathBuf,
    mode: u32,
    source: impl Into<Source>,
    trust_domain: String,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(tokio::task::JoinHandle<()>, SocketClaim), String> {
    clear_stale_socket(&path).await?;
    let listener = bind(&path, mode)?;
    let claim = SocketClaim::of(&path)?;
    let incoming =
        tokio_stream::wrappers::UnixListenerStream::new(listener).map(|s| s.map(Connection::new));
    let svc = super::workload_api::service(source.into(), trust_domain);
    tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), "SPIFFE Workload API listening");
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            // The adapter's bounds are the limits the server advertises.
            .max_frame_size(MAX_FRAME as u32)
            .http2_max_header_list_size(MAX_HEADER_LIST as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop)
            .await
        {
            tracing::error!(error = %e, "Workload API server failed");
        }
    });
    Ok((task, claim))
}

/// Creates the socket's directory, binds, and sets the socket's mode.
fn bind(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, String> {
    let hint = "Hint: --workload-api-socket needs an absolute path in a directory this agent \
                may create and write (e.g. unix:///run/spiffe/agent.sock)";
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            format!(
                "cannot create {}, the directory of the Workload API socket {}: {e}. {hint}; \
                 check that its parent exists and is writable (/proc and /sys are not).",
                dir.display(),
                path.display()
            )
        })?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
        format!(
            "cannot listen on the Workload API socket {}: {e}. {hint}.",
            path.display()
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        format!(
            "cannot set mode {mode:o} on the Workload API socket {}: {e}.",
            path.display()
        )
    })?;
    Ok(listener)
}

/// Makes room for the socket: removes a stale socket (one nobody listens on:
/// connecting is refused), and refuses a live socket (another agent's: taking
/// it over would leave that agent unreachable) or anything that is not a
/// socket (never delete an operator's file).
async fn clear_stale_socket(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(format!(
                "cannot inspect {} (the Workload API socket path): {e}. Hint: check the \
                 permissions of its directory.",
                path.display()
            ))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket; the agent will not replace it. Hint: point \
             --workload-api-socket at a path of its own (e.g. unix:///run/spiffe/agent.sock), \
             or move that file away if it is not needed.",
            path.display()
        ));
    }
    let probe = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path)).await;
    match probe {
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| {
                format!(
                    "cannot remove the stale Workload API socket {}: {e}. Hint: remove it by \
                     hand, or check the permissions of its directory.",
                    path.display()
                )
            })?;
            tracing::info!(socket = %path.display(), "removed a stale Workload API socket");
            Ok(())
        }
        Ok(Err(e)) => Err(format!(
            "cannot tell whether {} is in use ({e}); the agent removes only a socket that \
             refuses connections. Hint: check the socket's permissions, or remove it if no \
             agent uses it.",
            path.display()
        )),
        Ok(Ok(_)) | Err(_) => Err(format!(
            "another process is serving on {} (it accepts connections); refusing to take it \
             over. Hint: stop the other agent first, or give this one its own \
             --workload-api-socket.",
            path.display()
        )),
    }
}

/// The socket file this server created, identified by device, inode and
/// change time (inode numbers are reused at once on tmpfs: a successor's
/// socket can get ours; its ctime differs). If ours is chmod-ed later it is
/// left at exit, which is harmless: the next start removes a stale socket.
#[derive(Debug)]
pub struct SocketClaim {
    path: PathBuf,
    id: (u64, u64, i64, i64),
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketClaim {
    fn of(path: &Path) -> Result<SocketClaim, String> {
        let m = std::fs::symlink_metadata(path)
            .map_err(|e| format!("cannot inspect the new socket {}: {e}", path.display()))?;
        Ok(SocketClaim {
            path: path.to_path_buf(),
            id: file_id(&m),
        })
    }

    /// Removes the socket if the file at the path is still the one this
    /// server created (not a successor's); returns whether it did.
    pub fn release(self) -> bool {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id);
        if ours {
            return std::fs::remove_file(&self.path).is_ok();
        }
        tracing::info!(socket = %self.path.display(), "the Workload API socket is no longer ours; left in place");
        false
    }
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
    #[error("header block in more than {MAX_CONTINUATIONS} CONTINUATION frames")]
    TooManyContinuations,
    #[error("a header block was interrupted by another frame")]
    ExpectedContinuation,
    #[error("HEADERS frame with invalid padding or priority")]
    BadHeadersFrame,
}

/// HTTP/2 error codes (RFC 9113 section 7).
const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

impl AdapterError {
    /// The GOAWAY error code RFC 9113 gives this connection error.
    fn code(&self) -> u32 {
        match self {
            AdapterError::Hpack(HpackError::TooLarge(_)) => ENHANCE_YOUR_CALM,
            AdapterError::Hpack(_) => COMPRESSION_ERROR,
            AdapterError::FrameTooLarge(_) => FRAME_SIZE_ERROR,
            AdapterError::BlockTooLarge | AdapterError::TooManyContinuations => ENHANCE_YOUR_CALM,
            AdapterError::ExpectedContinuation | AdapterError::BadHeadersFrame => PROTOCOL_ERROR,
        }
    }
}

/// A GOAWAY frame (RFC 9113 section 6.8) for `err`, its message as debug data.
fn goaway(last_stream: u32, err: &AdapterError) -> Vec<u8> {
    let debug = err.to_string();
    let mut f = Vec::with_capacity(17 + debug.len());
    frame_header(&mut f, 8 + debug.len(), GOAWAY, 0, 0);
    f.extend_from_slice(&last_stream.to_be_bytes());
    f.extend_from_slice(&err.code().to_be_bytes());
    f.extend_from_slice(debug.as_bytes());
    f
}

/// A header block being received (HEADERS without END_HEADERS so far).
struct Pending {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    continuations: usize,
}

/// The client-to-server byte stream's rewriter.
struct Rewriter {
    /// Bytes of the preface already passed through.
    preface_seen: usize,
    /// Not HTTP/2 with prior knowledge: passed through for h2 to refuse.
    passthrough: bool,
    decoder: hpack::Decoder,
    pending: Option<Pending>,
    /// The highest stream whose HEADERS went to h2 (GOAWAY's last stream).
    last_stream: u32,
}

impl Rewriter {
    fn new() -> Rewriter {
        Rewriter {
            preface_seen: 0,
            passthrough: false,
            // The server advertises no SETTINGS_HEADER_TABLE_SIZE: 4096.
            decoder: hpack::Decoder::new(4096),
            pending: None,
            last_stream: 0,
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
                p.continuations += 1;
                if p.continuations > MAX_CONTINUATIONS {
                    return Err(AdapterError::TooManyContinuations);
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
        let decoded = self.decoder.decode(&p.block, MAX_HEADER_LIST)?;
        let mut fields = decoded.fields;
        if decoded.over_size {
            // Refused per stream, not per connection: h2 answers a list
            // over its limit with 431 and a reset of this stream only. Our
            // decoder has kept the dynamic table in step, so give h2 a
            // block it decodes as over size (its own table untouched).
            tracing::debug!(stream, "Workload API: header list over the limit");
            fields = vec![over_size_filler()];
        } else if normalize_authority(&mut fields) {
            tracing::debug!(stream, "Workload API: client's :authority replaced");
        }
        p.block = hpack::encode_literals(&fields);
        self.last_stream = self.last_stream.max(stream);
        write_headers(&p, out);
        Ok(())
    }
}

/// One field whose size alone is over h2's header list limit (but under its
/// abuse limit, so h2 refuses the stream, not the connection).
fn over_size_filler() -> Field {
    Field {
        name: b"x-meshca-header-list-too-large".to_vec(),
        value: vec![b'x'; MAX_HEADER_LIST],
        never_indexed: false,
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
        continuations: 0,
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
    /// Where h2's output stands in its frames (to place a GOAWAY between them).
    written: FrameCursor,
    /// The adapter ended the connection: h2 may write no more.
    closed: bool,
}

/// Follows a stream of HTTP/2 frames (the server's output) to know whether
/// it stands between two frames.
#[derive(Default)]
struct FrameCursor {
    head: [u8; 9],
    head_len: usize,
    body_left: usize,
}

impl FrameCursor {
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                (self.body_left, bytes) = (self.body_left - n, &bytes[n..]);
                continue;
            }
            let n = (9 - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
            (self.head_len, bytes) = (self.head_len + n, &bytes[n..]);
            if self.head_len == 9 {
                let h = &self.head;
                self.body_left =
                    usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.head_len = 0;
            }
        }
    }

    fn between_frames(&self) -> bool {
        self.head_len == 0 && self.body_left == 0
    }
}

impl Connection {
    fn new(io: UnixStream) -> Connection {
        Connection {
            io,
            rewriter: Rewriter::new(),
            input: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            written: FrameCursor::default(),
            closed: false,
        }
    }

    /// Ends the connection on `err` as RFC 9113 section 5.4.1 asks: a GOAWAY
    /// with its code and a debug message, then the close (h2 sees a read
    /// error and drops the connection). The GOAWAY is written only between
    /// h2's frames and only if the socket takes it now (a best effort; the
    /// close happens either way).
    fn fail(&mut self, err: AdapterError) -> io::Error {
        tracing::debug!(error = %err, "Workload API connection closed");
        if self.written.between_frames() {
            let frame = goaway(self.rewriter.last_stream, &err);
            let mut at = 0;
            while at < frame.len() {
                match self.io.try_write(&frame[at..]) {
                    Ok(n) if n > 0 => at += n,
                    _ => break,
                }
            }
        }
        self.closed = true;
        io::Error::new(io::ErrorKind::InvalidData, err)
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
                return Poll::Ready(Err(this.fail(e)));
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
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.written.advance(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            this.written.advance(&b[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
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
            input.extend(frame(CONTINUATION, 0, 1, &[0x82; MAX_FRAME]));
            sent += MAX_FRAME;
            if let Err(e) = r.feed(&mut input, &mut out) {
                break e;
            }
            assert!(sent <= MAX_HEADER_BLOCK, "buffered {sent} bytes");
        };
        assert!(matches!(err, AdapterError::BlockTooLarge));
    }

    /// CONTINUATION flood with zero-length frames: no bytes accumulate, so
    /// only the frame count can stop it.
    #[test]
    fn zero_length_continuations_are_counted() {
        let mut r = Rewriter::new();
        let (mut input, mut out) = (PREFACE.to_vec(), Vec::new());
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        r.feed(&mut input, &mut out).unwrap();
        let mut sent = 0;
        let err = loop {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
            sent += 1;
            if let Err(e) = r.feed(&mut input, &mut out) {
                break e;
            }
            assert!(sent <= 10_000, "{sent} empty CONTINUATION frames accepted");
        };
        assert!(matches!(err, AdapterError::TooManyContinuations), "{err}");
        assert_eq!(sent, MAX_CONTINUATIONS + 1);
        assert_eq!(err.code(), ENHANCE_YOUR_CALM);
    }

    #[test]
    fn connection_errors_map_to_rfc_9113_goaway_codes() {
        for (err, code) in [
            (
                AdapterError::Hpack(HpackError::TableSize(8192, 4096)),
                COMPRESSION_ERROR,
            ),
            (
                AdapterError::Hpack(HpackError::TooLarge(65_536)),
                ENHANCE_YOUR_CALM,
            ),
            (AdapterError::FrameTooLarge(16_385), FRAME_SIZE_ERROR),
            (AdapterError::BlockTooLarge, ENHANCE_YOUR_CALM),
            (AdapterError::ExpectedContinuation, PROTOCOL_ERROR),
            (AdapterError::BadHeadersFrame, PROTOCOL_ERROR),
        ] {
            assert_eq!(err.code(), code, "{err}");
            let f = goaway(7, &err);
            let debug = err.to_string();
            assert_eq!(
                f[..9],
                frame(GOAWAY, 0, 0, &[0; 8])[..9]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| if i == 2 { (8 + debug.len()) as u8 } else { *b })
                    .collect::<Vec<_>>()[..]
            );
            assert_eq!(f[9..13], 7u32.to_be_bytes());
            assert_eq!(f[13..17], code.to_be_bytes());
            assert_eq!(&f[17..], debug.as_bytes());
        }
    }

    /// The GOAWAY may only go between two of h2's frames.
    #[test]
    fn the_frame_cursor_knows_frame_boundaries() {
        let mut c = FrameCursor::default();
        assert!(c.between_frames());
        let two = [frame(0x4, 0, 0, &[0; 6]), frame(0x0, 0, 1, b"hello")].concat();
        for (i, b) in two.iter().enumerate() {
            c.advance(&[*b]);
            let end = i + 1 == 15 || i + 1 == two.len();
            assert_eq!(c.between_frames(), end, "after {} bytes", i + 1);
        }
    }

    /// An over-size list is passed to h2 as a block h2 itself finds over
    /// size (so it refuses the stream with 431), and the HPACK state stays
    /// in step for the next block.
    #[test]
    fn an_over_size_list_becomes_h2s_over_size_stream_error() {
        let mut block = hpack::encode_literals(&[field("x-meta", &[b'a'; 17_000])]);
        block.extend([0x40, 1, b'k', 1, b'v']); // k: v, indexed as 62
        let (a, b) = block.split_at(16_000);
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(HEADERS, 0, 1, a));
        wire.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        wire.extend(frame(HEADERS, END_HEADERS, 3, &[0xbe]));
        let out = feed_slowly(&mut Rewriter::new(), &wire).unwrap();
        let mut want = PREFACE.to_vec();
        write_headers(
            &Pending {
                stream: 1,
                end_stream: false,
                priority: None,
                block: hpack::encode_literals(&[over_size_filler()]),
                continuations: 0,
            },
            &mut want,
        );
        want.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &hpack::encode_literals(&[field("k", b"v")]),
        ));
        assert_eq!(out, want);
        // h2 counts name + value + 32 per field; over its limit, under 4x.
        let filler = over_size_filler();
        let size = filler.name.len() + filler.value.len() + 32;
        assert!(size > MAX_HEADER_LIST && size < 4 * MAX_HEADER_LIST);
    }

    #[tokio::test]
    async fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"precious").unwrap();
        let err = clear_stale_socket(&path).await.unwrap_err();
        assert!(
            err.contains("is not a socket") && err.contains("Hint"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let live = tokio::net::UnixListener::bind(&path).unwrap();
        let err = clear_stale_socket(&path).await.unwrap_err();
        assert!(err.contains("another process is serving"), "{err}");
        assert!(UnixStream::connect(&path).await.is_ok(), "still reachable");
        drop(live); // the file stays, nobody listens: stale
        assert!(path.exists());
        clear_stale_socket(&path).await.unwrap();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn at_exit_only_our_own_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let ours = bind(&path, 0o666).unwrap();
        let claim = SocketClaim::of(&path).unwrap();
        // Someone else's socket now stands at the path.
        drop(ours);
        std::fs::remove_file(&path).unwrap();
        let _theirs = tokio::net::UnixListener::bind(&path).unwrap();
        assert!(!claim.release());
        assert!(path.exists(), "a successor's socket is left alone");
        std::fs::remove_file(&path).unwrap();
        let _ours = bind(&path, 0o666).unwrap();
        assert!(SocketClaim::of(&path).unwrap().release());
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn the_socket_gets_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o666, 0o660] {
            let path = dir.path().join(format!("{mode:o}.sock"));
            let _l = bind(&path, mode).unwrap();
            let m = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(m & 0o777, mode);
        }
    }

    #[test]
    fn an_impossible_socket_directory_is_a_sentence_with_a_hint() {
        let err = bind(Path::new("/proc/x/agent.sock"), 0o666).unwrap_err();
        assert!(err.starts_with("cannot create /proc/x, the directory of the Workload API socket /proc/x/agent.sock"), "{err}");
        assert!(err.contains("Hint: --workload-api-socket"), "{err}");
    }

    #[test]
    fn not_http2_passes_through_for_h2_to_refuse() {
        let wire = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3);
        assert_eq!(feed_slowly(&mut Rewriter::new(), &wire).unwrap(), wire);
    }
}
