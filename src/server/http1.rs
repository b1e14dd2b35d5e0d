//! crier's own HTTP/1.1 for subscribe requests (`GET /topics/…`, `GET
//! /events`): it reads the request head itself (`httparse`), calls the
//! router, and writes the answer itself, each batch of ready frames as one
//! write. Every other request (publishes, WebSocket upgrades, `HEAD`,
//! HTTP/1.0, heads that are malformed, oversized or carry a body) goes to
//! hyper, with the bytes read so far, for the rest of the connection.
//!
//! Why: an event stream lives for hours and only writes. Served by hyper's
//! HTTP/1.1 connection, each one keeps a read buffer and a head buffer of 8
//! KiB each for its whole life and passes through hyper's dispatcher on
//! every event; here an idle stream keeps its socket, its body and a few
//! dozen bytes, and an event is one `write`. hyper has no way to hand a
//! connection over mid-response (its upgrades need a `101`), so the request
//! is read here before hyper ever sees the connection.
//!
//! What it does not do: read a request body, upgrade, speak HTTP/1.0 or
//! answer `HEAD` (all hyper's, on the same connection); refuse a request
//! (a malformed or oversized head is handed to hyper, which answers it),
//! or answer anything the router did not; send trailers; accept or close
//! connections on its own account (the caller's `server` does both).

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// As many header lines as hyper's HTTP/1.1 server takes by default; a head
/// with more goes to hyper, which refuses it.
const MAX_HEADERS: usize = 100;
/// Ready frames gathered into one write, at most; past that the socket must
/// take what it has before the body is asked for more.
const MAX_BATCH: usize = 64 * 1024;

/// What the connection does after crier's own part of it.
pub enum After {
    /// Close it: the client left, timed out, asked to close, or the hub is
    /// shutting down.
    Close,
    /// hyper serves the rest of it, starting with these bytes, already
    /// read from the client.
    Hyper(Vec<u8>),
}

/// The limits a request head is read under (hyper's own for the requests
/// it serves).
pub struct HeadLimits {
    /// How long a head may take to arrive, and a keep-alive connection may
    /// idle between requests.
    pub timeout: Duration,
    /// Past this many bytes without a whole head, hyper takes over (and
    /// answers `431`).
    pub max_bytes: usize,
}

/// Serves the connection's subscribe requests until one that is not, the
/// client leaving, or shutdown.
pub async fn serve<I, S, F>(
    io: &mut I,
    service: &mut S,
    limits: &HeadLimits,
    shutdown: &CancellationToken,
) -> After
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<Body>) -> F,
    F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let mut buf = Vec::new();
    loop {
        let head = tokio::select! {
            head = tokio::time::timeout(limits.timeout, read_head(io, &mut buf, limits.max_bytes)) => head,
            () = shutdown.cancelled() => return After::Close,
        };
        let (request, len, keep_alive) = match head {
            Err(_) | Ok(Parsed::Closed | Parsed::Partial) => return After::Close,
            Ok(Parsed::NotOurs) => return After::Hyper(buf),
            Ok(Parsed::Ours {
                request,
                len,
                keep_alive,
            }) => (request, len, keep_alive),
        };
        // What follows the head is the client's next request (pipelined);
        // nothing of this one is kept.
        buf = buf[len..].to_vec();
        // Boxed: a subscribe request's future is large, and inline it would
        // size this task, which lives as long as the stream, for it.
        let mut call = Box::pin(service(request));
        let response = poll_fn(|cx| {
            if let Poll::Ready(Ok(response)) = call.as_mut().poll(cx) {
                return Poll::Ready(Ok::<_, io::Error>(response));
            }
            // A client that leaves while its answer is being made (a
            // long-poll waiting for events) is not waited for.
            watch_reads(cx, io, &mut buf, limits.max_bytes)?;
            Poll::Pending
        })
        .await;
        drop(call);
        let Ok(response) = response else {
            return After::Close;
        };
        match respond(io, response, keep_alive, &mut buf, limits.max_bytes).await {
            Ok(true) if !shutdown.is_cancelled() => {}
            Ok(_) | Err(_) => return After::Close,
        }
    }
}

/// Reads into `buf` until it holds a whole head, or more than `max` bytes.
/// Never `Partial`.
async fn read_head<I: AsyncRead + Unpin>(io: &mut I, buf: &mut Vec<u8>, max: usize) -> Parsed {
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Parsed::Partial if buf.len() <= max => {}
                Parsed::Partial => return Parsed::NotOurs,
                // Whole, but over the limit: hyper refuses it.
                Parsed::Ours { len, .. } if len > max => return Parsed::NotOurs,
                parsed => return parsed,
            }
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().clamp(512, 4096));
        }
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Parsed::Closed,
            Ok(_) => {}
        }
    }
}

/// A request head as read. (Only ever a value on the stack, on its way to
/// the router: its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// Not all of it yet.
    Partial,
    /// Anything but a subscribe request: hyper's.
    NotOurs,
    /// The client left (or the read failed) before a whole head.
    Closed,
    /// A subscribe request crier answers itself, `len` bytes long.
    Ours {
        request: Request<Body>,
        len: usize,
        keep_alive: bool,
    },
}

/// Parses a head, and makes it a request when it is a subscribe request
/// crier answers itself: `GET` over HTTP/1.1 to `/topics/…` or `/events`,
/// without a body, an upgrade or an expectation.
fn parse(buf: &[u8]) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut slots);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotOurs,
    };
    if head.method != Some("GET") || head.version != Some(1) {
        return Parsed::NotOurs;
    }
    let Some(target) = head.path else {
        return Parsed::NotOurs;
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    if path != "/events" && !path.starts_with("/topics/") {
        return Parsed::NotOurs;
    }
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::NotOurs;
    };
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    let mut keep_alive = true;
    for line in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(line.name.as_bytes()) else {
            return Parsed::NotOurs;
        };
        let body_or_upgrade = name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
            || (name == header::CONTENT_LENGTH && line.value != b"0");
        if body_or_upgrade {
            return Parsed::NotOurs;
        }
        if name == header::CONNECTION && has_close(line.value) {
            keep_alive = false;
        }
        let Ok(value) = HeaderValue::from_bytes(line.value) else {
            return Parsed::NotOurs;
        };
        headers.append(name, value);
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Ours {
        request,
        len,
        keep_alive,
    }
}

/// Whether a `Connection` value names `close`.
fn has_close(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// How a response's body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body at all (`204`, `304`).
    None,
    /// `Content-Length`.
    Length,
    Chunked,
}

/// Writes a response, its head and then its body as the body yields it,
/// and watches the client meanwhile. `Ok(true)` when the connection may
/// carry another request.
async fn respond<I>(
    io: &mut I,
    response: Response<Body>,
    keep_alive: bool,
    pipelined: &mut Vec<u8>,
    max_pipelined: usize,
) -> io::Result<bool>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    let keep_alive = keep_alive
        && !parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_close(v.as_bytes()));
    let framing = if parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
        || parts.status.is_informational()
    {
        Framing::None
    } else if parts.headers.contains_key(header::CONTENT_LENGTH)
        || body.size_hint().exact().is_some()
    {
        Framing::Length
    } else {
        Framing::Chunked
    };
    let mut out = Unwritten {
        buf: head(&parts, framing, body.size_hint().exact(), keep_alive),
        at: 0,
        ended: framing == Framing::None,
    };
    drop(parts);
    if framing == Framing::None {
        drop(body);
        body = Body::empty();
    }
    poll_fn(|cx| out.poll(cx, io, &mut body, framing, pipelined, max_pipelined)).await?;
    Ok(keep_alive)
}

/// The response head, with the framing hyper would give it.
fn head(
    parts: &axum::http::response::Parts,
    framing: Framing,
    exact: Option<u64>,
    keep_alive: bool,
) -> Vec<u8> {
    use std::io::Write as _;
    let mut head = Vec::with_capacity(256);
    let status = parts.status;
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length if !parts.headers.contains_key(header::CONTENT_LENGTH) => {
            let _ = write!(head, "content-length: {}\r\n", exact.unwrap_or(0));
        }
        Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length | Framing::None => {}
    }
    if !keep_alive && !parts.headers.contains_key(header::CONNECTION) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// What is still to be written of a response.
struct Unwritten {
    /// The bytes of the current batch (head, chunks), written from `at`;
    /// empty, without an allocation, between batches.
    buf: Vec<u8>,
    at: usize,
    /// The body has ended (its last chunk is in `buf`).
    ended: bool,
}

impl Unwritten {
    /// Writes the body through: gathers what it has ready into one batch,
    /// writes the batch, and waits for more, until the body ends, fails, or
    /// the client leaves.
    fn poll<I>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut I,
        body: &mut Body,
        framing: Framing,
        pipelined: &mut Vec<u8>,
        max_pipelined: usize,
    ) -> Poll<io::Result<()>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            watch_reads(cx, io, pipelined, max_pipelined)?;
            let mut waiting = false;
            while !self.ended && self.buf.len() - self.at < MAX_BATCH {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            self.put(&data, framing);
                        }
                    }
                    Poll::Ready(Some(Err(error))) => {
                        // As hyper does: a body that fails mid-way leaves
                        // its answer unfinished, and the connection closes.
                        return Poll::Ready(Err(io::Error::other(error)));
                    }
                    Poll::Ready(None) => {
                        if framing == Framing::Chunked {
                            self.buf.extend_from_slice(b"0\r\n\r\n");
                        }
                        self.ended = true;
                    }
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                }
            }
            while self.at < self.buf.len() {
                match Pin::new(&mut *io).poll_write(cx, &self.buf[self.at..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => self.at += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Nothing held between batches: an idle stream keeps no buffer.
            self.buf = Vec::new();
            self.at = 0;
            match Pin::new(&mut *io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            if waiting {
                return Poll::Pending;
            }
        }
    }

    /// Adds a data frame to the batch, in its chunk when chunked.
    fn put(&mut self, data: &[u8], framing: Framing) {
        if data.is_empty() {
            // An empty chunk would end the body.
            return;
        }
        if framing == Framing::Chunked {
            self.buf.reserve(data.len() + 20);
            chunk_size(&mut self.buf, data.len());
            self.buf.extend_from_slice(data);
            self.buf.extend_from_slice(b"\r\n");
        } else {
            self.buf.extend_from_slice(data);
        }
    }
}

/// Appends a chunk's size line (`{:x}\r\n`) without the formatter, which
/// is written once per event per subscriber.
fn chunk_size(buf: &mut Vec<u8>, size: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - size.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf.push(HEX[(size >> (i * 4)) & 0xf]);
    }
    buf.extend_from_slice(b"\r\n");
}

/// Reads what the client sends while its answer is being made or written:
/// a pipelined request is kept (up to `max` bytes) for after the answer,
/// and the client closing its side (or the read failing) is an error, which
/// ends the answer, as with hyper. `Ok` once nothing more is to be read now.
fn watch_reads<I: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    io: &mut I,
    pipelined: &mut Vec<u8>,
    max: usize,
) -> io::Result<()> {
    let mut scratch = [0u8; 512];
    loop {
        let mut read = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Poll::Ready(Ok(())) => {
                if pipelined.len() + read.filled().len() > max {
                    return Err(io::Error::other("more pipelined than a request head"));
                }
                pipelined.extend_from_slice(read.filled());
            }
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => return Ok(()),
        }
    }
}

/// A connection whose first bytes were already read: it yields them
/// before anything more from the socket.
pub struct Prefixed<I> {
    prefix: Vec<u8>,
    at: usize,
    io: I,
}

impl<I> Prefixed<I> {
    pub fn new(prefix: Vec<u8>, io: I) -> Prefixed<I> {
        Prefixed { prefix, at: 0, io }
    }

    /// The prefix's bytes not yet read, and the connection: what a
    /// WebSocket takes back from hyper's upgrade.
    pub fn into_parts(self) -> (Vec<u8>, I) {
        let mut prefix = self.prefix;
        prefix.drain(..self.at);
        (prefix, self.io)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = buf.remaining().min(this.prefix.len() - this.at);
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(head: &str) -> bool {
        matches!(parse(head.as_bytes()), Parsed::Ours { .. })
    }

    #[test]
    fn only_plain_subscribe_requests_are_ours() {
        assert!(ours("GET /topics/a HTTP/1.1\r\nhost: x\r\n\r\n"));
        assert!(ours("GET /events?topic=a&topic=b HTTP/1.1\r\n\r\n"));
        assert!(ours("GET /topics/a HTTP/1.1\r\ncontent-length: 0\r\n\r\n"));
        for head in [
            "POST /topics/a HTTP/1.1\r\ncontent-length: 1\r\n\r\nx",
            "HEAD /topics/a HTTP/1.1\r\n\r\n",
            "GET /topics/a HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n\r\n",
            "GET /eventsx HTTP/1.1\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\ncontent-length: 5\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET /topics/a HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(!ours(head), "{head:?}");
        }
        assert!(matches!(
            parse(b"GET /topics/a HTTP/1.1\r\nhost: x\r\n"),
            Parsed::Partial
        ));
    }

    #[test]
    fn chunk_sizes_are_lower_case_hex_as_the_formatter_writes_them() {
        for size in [0, 1, 9, 10, 15, 16, 255, 256, 4095, 65_536, usize::MAX] {
            let mut buf = Vec::new();
            chunk_size(&mut buf, size);
            assert_eq!(buf, format!("{size:x}\r\n").into_bytes());
        }
    }

    #[test]
    fn connection_close_is_heard_among_other_tokens() {
        assert!(has_close(b"close"));
        assert!(has_close(b"keep-alive, Close"));
        assert!(!has_close(b"keep-alive"));
        let Parsed::Ours {
            keep_alive, len, ..
        } = parse(b"GET /topics/a HTTP/1.1\r\nConnection: TE, close\r\n\r\nGET")
        else {
            panic!("a subscribe request");
        };
        assert!(!keep_alive);
        assert_eq!(len, 49);
    }
}
