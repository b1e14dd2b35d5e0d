//! A crowd of SSE subscribers over plain HTTP/1.1, shared by the scenarios
//! that need many connections (`fanout`, `idle`, `storm`, `replay`).
//!
//! Each subscriber is one task over a raw `TcpStream`: it writes its `GET`,
//! parses the answer with [`decode`](super::decode) and hands each `data:`
//! line to its [`Listener`]. Between reads it holds only its socket and a few
//! bytes of parser state; the read buffer lives on the worker's stack for
//! the duration of one read, so tens of thousands of subscribers cost little
//! more than their sockets. Sockets are bound to several loopback source
//! addresses so that the ephemeral ports of one address never run out.
//!
//! A subscriber may ask for a compressed stream (`--accept-encoding`): when
//! the hub answers with a `Content-Encoding`, the body is decoded read by
//! read with a [`Decompressor`] of its own, as a browser does, before its
//! lines are parsed. An identity stream has no decoder and no extra copy.
//!
//! A crowd may also be told to leave (every subscriber closes its socket at
//! once, as when a proxy restarts) and to come back: every subscriber then
//! reconnects at once with `Last-Event-ID` set to the last id its stream
//! gave, as EventSource does.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::decode::{
    Body, DataLines, LastId, Line, WS_CLOSE, WS_PING, WS_PONG, WS_TEXT, WS_TEXT_DEFLATED, WsFrames,
    response_head,
};
use super::grpc::{Call, Channel, GrpcStream};
#[cfg(target_os = "linux")]
use super::subscriber::bind_address_no_port;
pub use super::subscriber::{Ending, Listener, unix_micros};
use crate::coding::{Codec, Decompressor};

/// What every many-subscriber scenario is told about its subscribers.
#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// Base URL of the hub (plain http://).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Path to subscribe to; `{topic}` is replaced (Nchan: `/sub/{topic}`).
    #[arg(long, default_value = "/topics/{topic}")]
    pub subscribe_path: String,
    /// Topic every subscriber subscribes to.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Number of subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Loopback source addresses (127.0.0.2 upwards) to spread subscribers
    /// over, so ephemeral ports never run out and no address reaches the
    /// hub's per-client caps [default: one per 500 subscribers, plus one
    /// spare].
    #[arg(long)]
    pub sources: Option<usize>,
    /// Longest wait for one subscriber's answer and first bytes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// A server process to measure (repeat for a hub of several processes)
    /// [default: the process listening on --url's port, when on this
    /// machine].
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// `Accept-Encoding` every subscriber sends: `zstd`, `br`, `gzip`, or a
    /// browser's whole header (`gzip, deflate, br, zstd`). A stream the hub
    /// answers compressed is decoded read by read, as a browser does; the
    /// result names the coding it answered with [default: no header]
    #[arg(long, value_parser = header_value)]
    pub accept_encoding: Option<String>,
    /// How subscribers subscribe: `sse` (an event stream), `ws` (a
    /// WebSocket handshake on the same path: one JSON text frame per event;
    /// pings answered), `ws-deflate` (the same, offering
    /// permessage-deflate as a browser does; compressed messages inflated),
    /// or `grpc` (a `Subscribe` call to the path's topics over an h2c
    /// connection of its own; crier only).
    #[arg(long, value_enum, default_value = "sse")]
    pub transport: Transport,
    /// With `--transport grpc`: calls sharing each HTTP/2 connection, as a
    /// service's calls share its channel (subscribers 0..N-1 on the first
    /// connection, and so on); 1: a connection per subscriber, like the
    /// SSE and WebSocket crowds.
    #[arg(long, default_value_t = 1)]
    pub calls_per_connection: usize,
}

/// The transport a crowd subscribes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
    WsDeflate,
    Grpc,
}

/// A value that can go in a request header as it is: printable ASCII.
fn header_value(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty()
        || !value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(format!("`{value}` is not a header value"));
    }
    Ok(value.to_owned())
}

/// Subscribers per source address: well under the ~28,000 ephemeral ports
/// Linux offers per address, and under crier's default per-client caps
/// (2,048 connections and a burst of 2,048 new ones per address), so a
/// crowd of thousands measures the hub's fan-out, not its flood defences.
const PER_SOURCE: usize = 500;

/// Subscribers connecting at once: a burst the hub's accept backlog absorbs.
const CONNECTING_AT_ONCE: usize = 256;

/// The hub under test.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written in the URL, for the `Host` header.
    pub authority: String,
    /// The URL's own path, put before every path template.
    base_path: String,
}

impl Target {
    pub async fn resolve(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad --url {url}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url {url}: the bench speaks plain http://"));
        }
        let authority = uri.authority().ok_or("--url needs a host")?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| format!("{host} has no address"))?;
        Ok(Target {
            addr,
            authority: authority.to_string(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The hub's process when it runs on this machine: found from the
    /// port it listens on, so `--pid` is not needed for a local hub.
    pub fn local_pid(&self) -> Result<u32, String> {
        if !self.addr.ip().is_loopback() {
            return Err(format!(
                "{} is not on this machine: give the hub's --pid to measure it",
                self.addr
            ));
        }
        super::procfs::listening_pid(self.addr.port())
    }

    /// The request path for a `{topic}` template.
    pub fn path(&self, template: &str, topic: &str) -> String {
        format!("{}{}", self.base_path, template.replace("{topic}", topic))
    }
}

/// Raises this process's open-file limit as far as allowed and checks that
/// `needed` descriptors fit.
pub fn raise_open_files(needed: usize) -> Result<(), String> {
    let limit = rlimit::increase_nofile_limit(u64::MAX)
        .map_err(|e| format!("cannot raise the open-file limit: {e}"))?;
    if (limit as usize) < needed {
        return Err(format!(
            "{needed} open files are needed and the limit is {limit} (see ulimit -Hn)"
        ));
    }
    Ok(())
}

/// What one subscriber task gives back.
pub struct Outcome<L> {
    pub listener: L,
    /// Whether it got its answer and first bytes.
    pub connected: bool,
    pub wire: Wire,
}

/// What a subscriber read from its socket, over all its streams.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wire {
    /// The content coding of its last stream (`None`: identity).
    pub coding: Option<Codec>,
    /// Bytes read while opening each stream: the response head and the
    /// first bytes of the body (the hub's preamble).
    pub opening_bytes: u64,
    /// Bytes read after that: events, heartbeats and HTTP chunk framing,
    /// as they came over TCP (compressed, for a compressed stream).
    pub stream_bytes: u64,
}

/// The coding a subscriber got, as `Content-Encoding` names it.
pub fn coding_name(coding: Option<Codec>) -> &'static str {
    coding.map_or("identity", Codec::token)
}

/// The codings the hub answered the connected subscribers with: the one
/// they all got (`identity` for none, `mixed` when they differ, `null` when
/// none connected), and how many got each. Also the sum of what they read.
pub fn answered<L>(outcomes: &[Outcome<L>]) -> (serde_json::Value, serde_json::Value, Wire) {
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let mut total = Wire::default();
    for wire in outcomes.iter().filter(|o| o.connected).map(|o| o.wire) {
        *counts.entry(coding_name(wire.coding)).or_default() += 1;
        total.opening_bytes += wire.opening_bytes;
        total.stream_bytes += wire.stream_bytes;
    }
    let one = match counts.len() {
        0 => serde_json::Value::Null,
        1 => counts.keys().next().copied().unwrap_or_default().into(),
        _ => "mixed".into(),
    };
    (one, serde_json::json!(counts), total)
}

/// An open subscription, past its response head and preamble.
struct Stream {
    tcp: TcpStream,
    body: Body,
    lines: DataLines,
    /// The id of the last `id:` line read, even in an incomplete event.
    id: LastId,
    /// The id as of the last complete event: what EventSource sends back.
    last_id: LastId,
    /// The body's content coding, and its decoder (none for identity).
    coding: Option<Codec>,
    decoder: Option<Box<Decompressor>>,
    /// Bytes read from the socket by [`open`](Stream::open), and since.
    opening_bytes: u64,
    stream_bytes: u64,
    /// A WebSocket's frames (`--transport ws`), and pongs owed.
    ws: Option<Box<WsFrames>>,
    pongs: usize,
}

impl Stream {
    /// Connects from `source`, subscribes, and waits for the answer's head
    /// and the first bytes of its body (the hub's preamble), which is when
    /// a hub has the subscription in place. Events in those first bytes go
    /// to `listener`; `last_id` is the id the stream starts from (the
    /// request's `Last-Event-ID`, if any).
    async fn open(
        addr: SocketAddr,
        source: Option<IpAddr>,
        request: &[u8],
        listener: &mut impl Listener,
        last_id: LastId,
    ) -> Result<Self, String> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(ip) = source {
            #[cfg(target_os = "linux")]
            bind_address_no_port(&socket).map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let mut tcp = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        tcp.write_all(request)
            .await
            .map_err(|e| format!("send the request: {e}"))?;

        let mut head = Vec::with_capacity(1024);
        let answer = loop {
            if tcp.read_buf(&mut head).await.map_err(|e| e.to_string())? == 0 {
                return Err("the hub closed the connection before answering".into());
            }
            if let Some(found) = response_head(&head)? {
                break found;
            }
        };
        let decoder = match answer.coding {
            Some(codec) => Some(Box::new(
                Decompressor::new(codec).map_err(|e| format!("{} decoder: {e}", codec.token()))?,
            )),
            None => None,
        };
        let mut stream = Stream {
            tcp,
            body: Body::new(answer.framing),
            lines: DataLines::default(),
            id: last_id,
            last_id,
            coding: answer.coding,
            decoder,
            opening_bytes: head.len() as u64,
            stream_bytes: 0,
            ws: answer.upgraded.then(Box::default),
            pongs: 0,
        };
        let mut seen = stream.feed(&head[answer.len..], listener)?;
        while !seen {
            head.clear();
            let n = stream
                .tcp
                .read_buf(&mut head)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the stream ended before its first bytes".into());
            }
            stream.opening_bytes += n as u64;
            seen = stream.feed(&head, listener)?;
        }
        Ok(stream)
    }

    /// Decodes bytes read from the socket; whether they held body data.
    fn feed(&mut self, bytes: &[u8], listener: &mut impl Listener) -> Result<bool, String> {
        let arrived_us = unix_micros();
        if let Some(ws) = self.ws.as_deref_mut() {
            let (id, last_id, pongs) = (&mut self.id, &mut self.last_id, &mut self.pongs);
            let mut frames = Vec::new();
            let mut closed = false;
            ws.feed(bytes, |opcode, payload| match opcode {
                WS_TEXT => frames.push((false, payload.to_vec())),
                WS_TEXT_DEFLATED => frames.push((true, payload.to_vec())),
                WS_PING => *pongs += 1,
                WS_CLOSE => closed = true,
                _ => {}
            })?;
            for (deflated, frame) in frames {
                let frame = if deflated { ws.inflate(&frame)? } else { frame };
                ws.event_lines(&frame, |line| {
                    match line {
                        Line::Id(value) => id.set(Some(value)),
                        Line::End => *last_id = *id,
                        _ => {}
                    }
                    listener.on_line(line, arrived_us);
                });
            }
            if closed {
                return Err("the hub closed the WebSocket".into());
            }
            return Ok(!bytes.is_empty());
        }
        let mut any = false;
        let mut broken = None;
        let (lines, id, last_id) = (&mut self.lines, &mut self.id, &mut self.last_id);
        let decoder = &mut self.decoder;
        self.body.feed(bytes, |data| {
            any |= !data.is_empty();
            let on_line = |line: Line<'_>| {
                match line {
                    Line::Id(value) => id.set(Some(value)),
                    Line::LongId => id.set(None),
                    Line::End => *last_id = *id,
                    Line::Data(_) | Line::Event(_) => {}
                }
                listener.on_line(line, arrived_us);
            };
            match decoder.as_deref_mut() {
                // Identity: the body's bytes as read, no copy.
                None => lines.feed_lines(data, on_line),
                Some(decoder) if broken.is_none() => match decoder.decompress(data) {
                    Ok(plain) => lines.feed_lines(&plain, on_line),
                    Err(e) => broken = Some(format!("cannot decode the stream: {e}")),
                },
                Some(_) => {}
            }
        })?;
        match broken {
            Some(problem) => Err(problem),
            None => Ok(any),
        }
    }

    /// Adds what this stream read to a subscriber's account.
    fn account(&self, wire: &mut Wire) {
        wire.coding = self.coding;
        wire.opening_bytes += self.opening_bytes;
        wire.stream_bytes += self.stream_bytes;
    }

    /// Reads events into `listener` until `stop` or the end of the stream.
    async fn follow(&mut self, stop: &CancellationToken, listener: &mut impl Listener) -> Ending {
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            if self.body.is_done() {
                return Ending::Dropped("the hub ended the stream".into());
            }
            tokio::select! {
                biased;
                () = &mut stopped => return Ending::Stopped,
                ready = self.tcp.readable() => {
                    if let Err(e) = ready {
                        return Ending::Dropped(e.to_string());
                    }
                }
            }
            {
                // Declared after the await, so it lives on the worker's
                // stack during this read only, not in every subscriber's
                // task (the block ends it before the pongs' await).
                let mut buf = [0u8; 16 * 1024];
                match self.tcp.try_read(&mut buf) {
                    Ok(0) => return Ending::Dropped("the hub closed the connection".into()),
                    Ok(n) => {
                        self.stream_bytes += n as u64;
                        if let Err(e) = self.feed(&buf[..n], listener) {
                            return Ending::Dropped(e);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Ending::Dropped(e.to_string()),
                }
            }
            while self.pongs > 0 {
                self.pongs -= 1;
                if let Err(e) = self.tcp.write_all(&WS_PONG).await {
                    return Ending::Dropped(e.to_string());
                }
            }
        }
    }
}

/// What a subscriber sends to subscribe.
#[derive(Clone)]
enum Request {
    /// The whole HTTP/1.1 request (SSE, or a WebSocket handshake).
    Http(Arc<[u8]>),
    /// A gRPC `Subscribe` call, on its channel's connection.
    Grpc(Arc<Call>, Arc<Channel>),
}

/// An open subscription on either kind of connection. Neither is boxed: a
/// crowd is all of one kind, and its size is each task's state anyway.
#[allow(clippy::large_enum_variant)]
enum Subscription {
    Http(Stream),
    Grpc(GrpcStream),
}

impl Subscription {
    async fn open(
        addr: SocketAddr,
        source: Option<IpAddr>,
        request: &Request,
        listener: &mut impl Listener,
        last_id: LastId,
    ) -> Result<Subscription, String> {
        match request {
            Request::Http(bytes) => Stream::open(addr, source, bytes, listener, last_id)
                .await
                .map(Subscription::Http),
            Request::Grpc(call, channel) => {
                GrpcStream::open(addr, source, call, channel, listener, last_id)
                    .await
                    .map(Subscription::Grpc)
            }
        }
    }

    async fn follow(&mut self, stop: &CancellationToken, listener: &mut impl Listener) -> Ending {
        match self {
            Subscription::Http(stream) => stream.follow(stop, listener).await,
            Subscription::Grpc(stream) => stream.follow(stop, listener).await,
        }
    }

    fn account(&self, wire: &mut Wire) {
        match self {
            Subscription::Http(stream) => stream.account(wire),
            Subscription::Grpc(stream) => {
                wire.coding = None;
                wire.opening_bytes += stream.opening_bytes;
                wire.stream_bytes += stream.stream_bytes;
            }
        }
    }

    fn last_id(&self) -> LastId {
        match self {
            Subscription::Http(stream) => stream.last_id,
            Subscription::Grpc(stream) => stream.last_id,
        }
    }
}

/// Counters the subscriber tasks share with the scenario.
#[derive(Default)]
struct Counts {
    connected: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    /// Subscribers whose connection is closed, waiting to come back.
    left: AtomicUsize,
    /// Subscribers back with `Last-Event-ID`, and those that failed to be.
    rejoined: AtomicUsize,
    rejoin_failed: AtomicUsize,
    first_problem: Mutex<Option<String>>,
}

impl Counts {
    fn note(&self, counter: &AtomicUsize, problem: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_problem.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| problem.to_owned());
    }
}

/// Many subscribers to one path, each its own task.
pub struct Crowd<L> {
    tasks: Vec<JoinHandle<Outcome<L>>>,
    counts: Arc<Counts>,
    stop: CancellationToken,
    /// For a crowd that leaves and comes back ([`Crowd::spawn_rejoining`]).
    rejoin: Option<Rejoin>,
}

/// The signals of a crowd that leaves and comes back, and its request.
#[derive(Clone)]
struct Rejoin {
    /// Cancelled: every subscriber closes its connection.
    leave: CancellationToken,
    /// Cancelled: every subscriber reconnects with `Last-Event-ID`.
    back: CancellationToken,
    /// Subscribers reconnecting at once; `None`: all of them.
    gate: Option<Arc<Semaphore>>,
    /// The subscribe request without its final empty line.
    request_head: Arc<str>,
}

/// Everything a subscriber task needs besides its listener.
struct Task {
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    request: Request,
    gate: Arc<Semaphore>,
    counts: Arc<Counts>,
    stop: CancellationToken,
    rejoin: Option<Rejoin>,
}

impl Task {
    /// Subscribes, follows the stream until stopped, and for a rejoining
    /// crowd leaves and comes back in between.
    async fn run<L: Listener>(self, mut listener: L) -> Outcome<L> {
        let Task {
            addr,
            source,
            timeout,
            counts,
            stop,
            ..
        } = &self;
        let opening = async {
            let _permit = self.gate.acquire().await;
            // Nothing is published before every subscriber is connected, so
            // the preamble holds no event to count.
            let mut preamble = ();
            let opened = Subscription::open(
                *addr,
                *source,
                &self.request,
                &mut preamble,
                LastId::default(),
            );
            tokio::time::timeout(*timeout, opened)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
        };
        let opened = tokio::select! {
            () = stop.cancelled() => Err("stopped while connecting".to_owned()),
            opened = opening => opened,
        };
        let mut wire = Wire::default();
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(problem) => {
                counts.note(&counts.failed, &problem);
                return Outcome {
                    listener,
                    connected: false,
                    wire,
                };
            }
        };
        counts.connected.fetch_add(1, Ordering::Relaxed);
        if let Some(rejoin) = &self.rejoin {
            match self
                .leave_and_rejoin(rejoin, stream, &mut listener, &mut wire)
                .await
            {
                Some(back) => stream = back,
                None => {
                    return Outcome {
                        listener,
                        connected: true,
                        wire,
                    };
                }
            }
        }
        if let Ending::Dropped(problem) = stream.follow(stop, &mut listener).await {
            counts.note(&counts.dropped, &problem);
        }
        stream.account(&mut wire);
        Outcome {
            listener,
            connected: true,
            wire,
        }
    }

    /// Follows `stream` until the crowd leaves, closes it, waits to be
    /// called back and reconnects with `Last-Event-ID`: the new stream, or
    /// `None` when stopped meanwhile or the reconnection failed.
    async fn leave_and_rejoin<L: Listener>(
        &self,
        rejoin: &Rejoin,
        mut stream: Subscription,
        listener: &mut L,
        wire: &mut Wire,
    ) -> Option<Subscription> {
        let counts = &self.counts;
        // `leave` is a child of `stop`: stopping ends this too.
        if let Ending::Dropped(problem) = stream.follow(&rejoin.leave, listener).await {
            // Dropped by the hub early: it comes back with the others.
            counts.note(&counts.dropped, &problem);
        }
        stream.account(wire);
        if self.stop.is_cancelled() {
            return None;
        }
        let last_id = stream.last_id();
        drop(stream);
        listener.on_leave();
        counts.left.fetch_add(1, Ordering::Relaxed);
        rejoin.back.cancelled().await;
        if self.stop.is_cancelled() {
            return None;
        }
        let reopening = async {
            let _permit = match &rejoin.gate {
                Some(gate) => Some(gate.acquire().await),
                None => None,
            };
            let request = match &self.request {
                Request::Http(_) => {
                    Request::Http(rejoin_request(&rejoin.request_head, &last_id)?.into())
                }
                // The call carries the last id itself.
                Request::Grpc(call, channel) => Request::Grpc(call.clone(), channel.clone()),
            };
            let sent_us = unix_micros();
            let opened = Subscription::open(self.addr, self.source, &request, listener, last_id);
            let stream = tokio::time::timeout(self.timeout, opened)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))?;
            Ok::<_, String>((stream, sent_us))
        };
        let reopened = tokio::select! {
            () = self.stop.cancelled() => Err("stopped while reconnecting".to_owned()),
            reopened = reopening => reopened,
        };
        match reopened {
            Ok((stream, sent_us)) => {
                counts.rejoined.fetch_add(1, Ordering::Relaxed);
                listener.on_rejoin(sent_us, unix_micros());
                Some(stream)
            }
            Err(problem) => {
                counts.note(&counts.rejoin_failed, &format!("reconnecting: {problem}"));
                None
            }
        }
    }
}

/// The subscribe request head (without its final empty line).
fn request_head(target: &Target, args: &SubscribeArgs) -> String {
    head_for(
        target,
        &target.path(&args.subscribe_path, &args.topic),
        args,
    )
}

/// The subscribe request head for `path` on the crowd's transport (gRPC:
/// not an HTTP/1.1 request; see [`Request::Grpc`]).
fn head_for(target: &Target, path: &str, args: &SubscribeArgs) -> String {
    match args.transport {
        Transport::Sse | Transport::Grpc => {
            head_for_path(target, path, args.accept_encoding.as_deref())
        }
        Transport::Ws | Transport::WsDeflate => {
            let mut head = head_for_path(target, path, None);
            head.push_str(
                "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            );
            if args.transport == Transport::WsDeflate {
                head.push_str(
                    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
                );
            }
            head
        }
    }
}

/// The subscribe request head for a full `path`, with `Accept-Encoding`
/// when given.
fn head_for_path(target: &Target, path: &str, accept_encoding: Option<&str>) -> String {
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n",
        target.authority
    );
    if let Some(value) = accept_encoding {
        head.push_str("Accept-Encoding: ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head
}

/// The request of a subscriber coming back: with `Last-Event-ID` when its
/// stream gave an id, as EventSource does.
fn rejoin_request(head: &str, last_id: &LastId) -> Result<Vec<u8>, String> {
    let mut request = head.as_bytes().to_vec();
    if let Some(id) = last_id.get()? {
        request.extend_from_slice(b"Last-Event-ID: ");
        request.extend_from_slice(id);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    Ok(request)
}

impl<L: Listener> Crowd<L> {
    /// Starts `args.subscribers` subscribers, a few hundred connecting at a
    /// time; `listener(i)` makes the i-th one's listener.
    pub fn spawn(
        args: &SubscribeArgs,
        target: &Target,
        listener: impl FnMut(usize) -> L,
    ) -> Result<Crowd<L>, String> {
        Crowd::start(args, target, listener, None, None)
    }

    /// Starts a crowd as [`spawn`](Crowd::spawn) does, the i-th subscriber
    /// asking for `path(i)` (after the URL's own path) instead of
    /// `--subscribe-path`.
    pub fn spawn_on_paths(
        args: &SubscribeArgs,
        target: &Target,
        listener: impl FnMut(usize) -> L,
        path: &dyn Fn(usize) -> String,
    ) -> Result<Crowd<L>, String> {
        Crowd::start(args, target, listener, None, Some(path))
    }

    /// Starts a crowd as [`spawn`](Crowd::spawn) does, that will leave and
    /// come back when told ([`leave`](Crowd::leave),
    /// [`come_back`](Crowd::come_back)); `at_once` subscribers reconnect at
    /// a time (0: all of them).
    pub fn spawn_rejoining(
        args: &SubscribeArgs,
        target: &Target,
        listener: impl FnMut(usize) -> L,
        at_once: usize,
    ) -> Result<Crowd<L>, String> {
        let stop = CancellationToken::new();
        let rejoin = Rejoin {
            leave: stop.child_token(),
            back: stop.child_token(),
            gate: (at_once > 0).then(|| Arc::new(Semaphore::new(at_once))),
            request_head: request_head(target, args).into(),
        };
        Crowd::start(args, target, listener, Some((stop, rejoin)), None)
    }

    fn start(
        args: &SubscribeArgs,
        target: &Target,
        mut listener: impl FnMut(usize) -> L,
        rejoin: Option<(CancellationToken, Rejoin)>,
        path: Option<&dyn Fn(usize) -> String>,
    ) -> Result<Crowd<L>, String> {
        let sources = sources(target, args)?;
        let per_connection = args.calls_per_connection;
        if per_connection == 0 {
            return Err("--calls-per-connection must be at least 1".into());
        }
        if per_connection > 1 && args.transport != Transport::Grpc {
            return Err("--calls-per-connection is for --transport grpc".into());
        }
        // Subscriber i calls on connection i / N, from that connection's
        // source address.
        let channels: Vec<Arc<Channel>> = (0..args.subscribers.div_ceil(per_connection))
            .map(|_| Arc::default())
            .collect();
        let one_path = target.path(&args.subscribe_path, &args.topic);
        let request = match args.transport {
            Transport::Grpc => Request::Grpc(
                Call::new(&target.authority, &one_path)?.into(),
                Arc::default(),
            ),
            Transport::Sse | Transport::Ws | Transport::WsDeflate => Request::Http(
                format!("{}\r\n", request_head(target, args))
                    .into_bytes()
                    .into(),
            ),
        };
        let request_of = |i: usize| -> Result<Request, String> {
            let channel = || channels[i / per_connection].clone();
            match (path, args.transport) {
                (Some(path), Transport::Grpc) => Ok(Request::Grpc(
                    Call::new(&target.authority, &target.path(&path(i), ""))?.into(),
                    channel(),
                )),
                (Some(path), Transport::Sse | Transport::Ws | Transport::WsDeflate) => {
                    let path = target.path(&path(i), "");
                    let head = head_for(target, &path, args);
                    Ok(Request::Http(format!("{head}\r\n").into_bytes().into()))
                }
                (None, _) => Ok(match &request {
                    Request::Grpc(call, _) => Request::Grpc(call.clone(), channel()),
                    Request::Http(bytes) => Request::Http(bytes.clone()),
                }),
            }
        };
        let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
        let counts = Arc::new(Counts::default());
        let (stop, rejoin) = match rejoin {
            Some((stop, rejoin)) => (stop, Some(rejoin)),
            None => (CancellationToken::new(), None),
        };
        let tasks = (0..args.subscribers)
            .map(|i| {
                let task = Task {
                    addr: target.addr,
                    source: sources[(i / per_connection) % sources.len()],
                    timeout: args.connect_timeout,
                    request: request_of(i)?,
                    gate: gate.clone(),
                    counts: counts.clone(),
                    stop: stop.clone(),
                    rejoin: rejoin.clone(),
                };
                Ok(tokio::spawn(task.run(listener(i))))
            })
            .collect::<Result<_, String>>()?;
        Ok(Crowd {
            tasks,
            counts,
            stop,
            rejoin,
        })
    }

    /// Tells every subscriber of a rejoining crowd to close its connection.
    pub fn leave(&self) {
        if let Some(rejoin) = &self.rejoin {
            rejoin.leave.cancel();
        }
    }

    /// Subscribers that closed their connection after [`leave`](Crowd::leave)
    /// (or lost it before), waiting to come back.
    pub fn left(&self) -> usize {
        self.counts.left.load(Ordering::Relaxed)
    }

    /// Tells every subscriber that left to reconnect with `Last-Event-ID`.
    pub fn come_back(&self) {
        if let Some(rejoin) = &self.rejoin {
            rejoin.back.cancel();
        }
    }

    /// Subscribers back after [`come_back`](Crowd::come_back).
    pub fn rejoined(&self) -> usize {
        self.counts.rejoined.load(Ordering::Relaxed)
    }

    /// Subscribers that failed to reconnect.
    pub fn rejoin_failed(&self) -> usize {
        self.counts.rejoin_failed.load(Ordering::Relaxed)
    }

    /// Subscribers connected so far.
    pub fn connected(&self) -> usize {
        self.counts.connected.load(Ordering::Relaxed)
    }

    /// Subscribers whose stream ended or broke after connecting.
    pub fn dropped(&self) -> usize {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// The first thing that went wrong with any subscriber.
    pub fn first_problem(&self) -> Option<String> {
        self.counts
            .first_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until every subscriber has connected or failed to, printing
    /// progress each second; returns how many connected, if any did.
    pub async fn wait_connected(&self) -> Result<usize, String> {
        let started = tokio::time::Instant::now();
        let mut reported = started;
        loop {
            let connected = self.connected();
            let failed = self.counts.failed.load(Ordering::Relaxed);
            let done = connected + failed >= self.tasks.len();
            if done || reported.elapsed() >= Duration::from_secs(1) {
                reported = tokio::time::Instant::now();
                eprintln!(
                    "connecting: {connected}/{} connected, {failed} failed ({:.1} s)",
                    self.tasks.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            if done {
                let problem = self.first_problem().filter(|_| failed > 0);
                return match (connected, problem) {
                    (0, problem) => Err(format!(
                        "no subscriber connected: {}",
                        problem.unwrap_or_default()
                    )),
                    (_, Some(problem)) => {
                        eprintln!("first failure: {problem}");
                        Ok(connected)
                    }
                    (_, None) => Ok(connected),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops every subscriber and collects what each recorded.
    pub async fn close(mut self) -> Result<Vec<Outcome<L>>, String> {
        self.stop.cancel();
        let mut outcomes = Vec::with_capacity(self.tasks.len());
        for task in std::mem::take(&mut self.tasks) {
            outcomes.push(
                task.await
                    .map_err(|e| format!("a subscriber task failed: {e}"))?,
            );
        }
        Ok(outcomes)
    }
}

/// A crowd given up on (the scenario failed) stops its subscribers.
impl<L> Drop for Crowd<L> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The source address of each subscriber socket: 127.0.0.2 upwards for a
/// loopback IPv4 hub; the system's choice otherwise.
fn sources(target: &Target, args: &SubscribeArgs) -> Result<Vec<Option<IpAddr>>, String> {
    let count = args
        .sources
        .unwrap_or(args.subscribers.div_ceil(PER_SOURCE) + 1)
        .max(1);
    match target.addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            if count > 1 << 23 {
                return Err(format!("--sources {count}: 127.0.0.0/8 is not that large"));
            }
            let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
            Ok((0..count as u32)
                .map(|i| Some(IpAddr::V4(Ipv4Addr::from(first + i))))
                .collect())
        }
        _ => {
            if args.sources.is_some() {
                eprintln!("--sources ignored: the hub is not on 127.0.0.0/8");
            }
            Ok(vec![None])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returning_subscriber_sends_its_last_id_as_eventsource_does() {
        let head = "GET /topics/t HTTP/1.1\r\nHost: h\r\n";
        let mut id = LastId::default();
        let fresh = rejoin_request(head, &id).unwrap();
        assert_eq!(fresh, b"GET /topics/t HTTP/1.1\r\nHost: h\r\n\r\n");
        id.set(Some(b"17.1x4rup0"));
        let back = rejoin_request(head, &id).unwrap();
        assert_eq!(
            back,
            b"GET /topics/t HTTP/1.1\r\nHost: h\r\nLast-Event-ID: 17.1x4rup0\r\n\r\n"
        );
        id.set(None);
        assert!(rejoin_request(head, &id).is_err());
    }

    #[test]
    fn subscribers_ask_for_the_coding_they_are_told_to() {
        let target = Target {
            addr: "127.0.0.1:8080".parse().unwrap(),
            authority: "h:8080".into(),
            base_path: String::new(),
        };
        let plain = head_for_path(&target, "/topics/t", None);
        assert!(
            !plain.to_ascii_lowercase().contains("accept-encoding"),
            "{plain}"
        );
        let browser = head_for_path(&target, "/topics/t", Some("gzip, deflate, br, zstd"));
        assert!(
            browser.ends_with("\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"),
            "{browser}"
        );
        assert_eq!(header_value(" zstd ").unwrap(), "zstd");
        assert!(header_value("gzip\r\nX-Evil: 1").is_err());
        assert!(header_value("").is_err());
    }

    /// A compressed stream is decoded read by read, however the reads cut
    /// it, and its lines reach the listener as an identity stream's would.
    #[tokio::test]
    async fn a_compressed_stream_gives_the_same_lines_as_identity() {
        #[derive(Default)]
        struct Lines(Vec<String>);
        impl Listener for Lines {
            fn on_data(&mut self, data: &[u8], _: u64) {
                self.0.push(String::from_utf8_lossy(data).into_owned());
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for codec in [Codec::Zstd, Codec::Brotli, Codec::Gzip] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let events: Vec<Vec<u8>> = (0..20)
                .map(|n| format!("id: {n}\ndata: {{\"seq\":{n},\"sent_us\":1}}\n\n").into_bytes())
                .collect();
            let wire = crate::coding::compress_chunks(codec, &events);
            let mut stream = Stream {
                tcp,
                body: Body::new(super::super::decode::Framing::UntilClose),
                lines: DataLines::default(),
                id: LastId::default(),
                last_id: LastId::default(),
                coding: Some(codec),
                decoder: Some(Box::new(Decompressor::new(codec).unwrap())),
                opening_bytes: 0,
                stream_bytes: 0,
                ws: None,
                pongs: 0,
            };
            let mut lines = Lines::default();
            for piece in wire.chunks(7) {
                stream.feed(piece, &mut lines).unwrap();
            }
            let want: Vec<String> = (0..20)
                .map(|n| format!("{{\"seq\":{n},\"sent_us\":1}}"))
                .collect();
            assert_eq!(lines.0, want, "{codec:?}");
            assert_eq!(stream.last_id.get().unwrap(), Some(&b"19"[..]), "{codec:?}");
            if codec == Codec::Gzip {
                // A stream that does not decode ends the subscriber, with why.
                stream.decoder = Some(Box::new(Decompressor::new(codec).unwrap()));
                let err = stream.feed(b"not gzip at all", &mut lines).unwrap_err();
                assert!(err.contains("decode"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn a_following_subscriber_does_not_carry_its_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut stream = Stream {
            tcp,
            body: Body::new(super::super::decode::Framing::Chunked),
            lines: DataLines::default(),
            id: LastId::default(),
            last_id: LastId::default(),
            coding: None,
            decoder: None,
            opening_bytes: 0,
            stream_bytes: 0,
            ws: None,
            pongs: 0,
        };
        let (stop, mut listener) = (CancellationToken::new(), ());
        let following = stream.follow(&stop, &mut listener);
        let size = std::mem::size_of_val(&following);
        assert!(size < 1024, "{size} bytes");
    }
}
