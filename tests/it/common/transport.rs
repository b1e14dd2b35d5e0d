//! One subscriber over any transport: SSE (a real SSE parser; compressed
//! and decoded on arrival inside `coding::on`), WebSocket (a
//! real WebSocket client, tokio-tungstenite), long-poll (a loop of real
//! HTTP requests, each from the last answer's `next`), WebSocket with
//! permessage-deflate ([`DeflateSocket`], raw frames inflated as a browser
//! does: tokio-tungstenite has no permessage-deflate) or gRPC (a client
//! generated from `proto/crier/v1/crier.proto`, over h2c). Each shows what it
//! receives as [`Ev`]s, exactly as an EventSource would see the same
//! stream, so one suite checks every transport (see
//! [`on_every_transport!`]).

use std::time::Duration;

use crier::grpc::proto;
use crier::grpc::proto::crier_client::CrierClient;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{DEADLINE, Ev, Server, SseClient};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    WebSocket,
    /// A WebSocket that negotiated permessage-deflate.
    WebSocketDeflate,
    Poll,
    Grpc,
}

tokio::task_local! {
    /// The transport the current test's subscribers use.
    static TRANSPORT: Transport;
}

/// The transport the current test runs on (SSE outside
/// [`on_every_transport!`]).
pub fn current() -> Transport {
    TRANSPORT.try_with(|t| *t).unwrap_or(Transport::Sse)
}

/// Runs `test` with its subscribers on `transport`.
pub async fn on<F: std::future::Future>(transport: Transport, test: F) -> F::Output {
    TRANSPORT.scope(transport, test).await
}

/// What a WebSocket or long-poll entry shows as an event: events under
/// their name (`message` without one), `reset` with its fields (less
/// `type` and `id`) as its data, as SSE writes them.
pub fn entry_to_ev(entry: &Value) -> Option<Ev> {
    let id = entry["id"].as_str().unwrap_or_default().to_owned();
    match entry["type"].as_str()? {
        "event" => Some(Ev {
            id,
            event: entry["event"].as_str().unwrap_or("message").to_owned(),
            data: entry["data"].as_str().expect("data is a string").to_owned(),
        }),
        kind @ ("reset" | "reauth") => {
            let mut data = entry.clone();
            let object = data.as_object_mut().expect("an object");
            object.shift_remove("type");
            object.shift_remove("id");
            Some(Ev {
                id,
                event: kind.to_owned(),
                data: data.to_string(),
            })
        }
        _ => None,
    }
}

/// A subscriber on some transport.
pub struct Feed {
    events: mpsc::UnboundedReceiver<Ev>,
    /// Keeps the SSE stream or the WebSocket reader alive.
    _task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(task) = &self._task {
            task.abort();
        }
    }
}

impl Feed {
    /// Subscribes to `path` on the current transport, from `last_event_id`
    /// if given. Returns once the server has fixed the start (SSE and
    /// WebSocket: the stream is open; long-poll needs a position to start
    /// from, so give it one, or `last=N`).
    pub async fn open(server: &Server, path: &str, last_event_id: Option<&str>) -> Feed {
        Feed::open_on(current(), server, path, last_event_id).await
    }

    pub async fn open_on(
        transport: Transport,
        server: &Server,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Feed {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = match transport {
            Transport::Sse => {
                let mut sse = match last_event_id {
                    Some(id) => server.resume(path, id).await,
                    None => server.subscribe(path).await,
                };
                assert_eq!(sse.status, 200, "subscribing to {path}");
                tokio::spawn(async move {
                    while let Some(ev) = next_sse(&mut sse).await {
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                })
            }
            Transport::WebSocket => {
                let url = with_position(&server.url(path), last_event_id).replacen("http", "ws", 1);
                let (mut socket, _) =
                    tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
                        .await
                        .expect("handshake in time")
                        .expect("WebSocket handshake");
                // The first frame says the stream is open.
                let open = next_text(&mut socket).await.expect("an open frame");
                assert_eq!(open["type"], "open", "{open}");
                tokio::spawn(async move {
                    while let Some(entry) = next_text(&mut socket).await {
                        if let Some(ev) = entry_to_ev(&entry)
                            && tx.send(ev).is_err()
                        {
                            return;
                        }
                    }
                })
            }
            Transport::WebSocketDeflate => {
                let url = with_position(&server.url(path), last_event_id);
                let path = url.splitn(4, '/').nth(3).unwrap_or_default();
                let (mut socket, answer) =
                    DeflateSocket::connect(server, &format!("/{path}"), DEFLATE_OFFER).await;
                assert!(answer.is_some(), "permessage-deflate is accepted");
                let open = socket.next_json().await.expect("an open frame");
                assert_eq!(open.1["type"], "open", "{open:?}");
                tokio::spawn(async move {
                    while let Some((compressed, entry)) = socket.next_json().await {
                        // Every event goes compressed; control items plain.
                        assert_eq!(compressed, entry["type"] == "event", "{entry}");
                        if let Some(ev) = entry_to_ev(&entry)
                            && tx.send(ev).is_err()
                        {
                            return;
                        }
                    }
                })
            }
            Transport::Grpc => {
                let (topics, last) = grpc_request_of(path);
                let mut client = grpc_client(server).await;
                let request = proto::SubscribeRequest {
                    topics,
                    last_event_id: last_event_id.unwrap_or_default().to_owned(),
                    last,
                };
                let mut items = tokio::time::timeout(DEADLINE, client.subscribe(request))
                    .await
                    .expect("Subscribe answers in time")
                    .expect("Subscribe")
                    .into_inner();
                // The first item says the stream is open.
                let open = tokio::time::timeout(DEADLINE, items.message())
                    .await
                    .expect("an open item in time")
                    .expect("an open item")
                    .expect("an open item");
                assert!(
                    matches!(open.item, Some(proto::item::Item::Open(_))),
                    "{open:?}"
                );
                tokio::spawn(async move {
                    while let Ok(Some(item)) = items.message().await {
                        if let Some(ev) = item_to_ev(item)
                            && tx.send(ev).is_err()
                        {
                            return;
                        }
                    }
                })
            }
            Transport::Poll => {
                let client = server.client.clone();
                let url = server.url(path);
                let mut next = last_event_id.map(str::to_owned);
                tokio::spawn(async move {
                    loop {
                        let answer = poll_once(&client, &url, next.as_deref()).await;
                        for entry in answer["events"].as_array().expect("events") {
                            if let Some(ev) = entry_to_ev(entry)
                                && tx.send(ev).is_err()
                            {
                                return;
                            }
                        }
                        if let Some(id) = answer["next"].as_str() {
                            next = Some(id.to_owned());
                        }
                        if tx.is_closed() {
                            return;
                        }
                    }
                })
            }
        };
        Feed {
            events: rx,
            _task: Some(task),
        }
    }

    /// The next event; fails the test after the deadline.
    pub async fn next(&mut self) -> Ev {
        match tokio::time::timeout(DEADLINE, self.events.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("the feed ended while an event was expected"),
            Err(_) => panic!("no event within {DEADLINE:?}"),
        }
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next().await);
        }
        events
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn expect_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(ev)) = tokio::time::timeout(quiet, self.events.recv()).await {
            panic!("expected no event, got {ev:?}");
        }
    }
}

/// A gRPC client of `server`, over h2c.
pub async fn grpc_client(server: &Server) -> CrierClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("an endpoint")
        .connect_timeout(DEADLINE)
        .connect()
        .await
        .expect("a gRPC connection");
    CrierClient::new(channel)
}

/// The topics and `last=` of a subscription path (`/topics/T?last=N`,
/// `/events?topic=A&topic=B`), as a `SubscribeRequest` names them.
pub fn grpc_request_of(path: &str) -> (Vec<String>, Option<u64>) {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut topics: Vec<String> = path
        .strip_prefix("/topics/")
        .map(|t| vec![t.to_owned()])
        .unwrap_or_default();
    let mut last = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "topic" => topics.push(value.into_owned()),
            "last" => last = Some(value.parse().expect("last=N")),
            _ => {}
        }
    }
    (topics, last)
}

/// What a gRPC item shows as an event, as [`entry_to_ev`] does for JSON
/// entries: events under their name, `reset` and `reauth` with their
/// fields as data.
pub fn item_to_ev(item: proto::Item) -> Option<Ev> {
    match item.item? {
        proto::item::Item::Event(event) => Some(Ev {
            id: event.id,
            event: if event.event.is_empty() {
                "message".to_owned()
            } else {
                event.event
            },
            data: event.data,
        }),
        proto::item::Item::Reset(reset) => Some(Ev {
            id: reset.id,
            event: "reset".to_owned(),
            data: serde_json::json!({
                "topic": reset.topic,
                "reason": reset.reason,
                "requested": reset.requested,
                "oldest": reset.oldest,
            })
            .to_string(),
        }),
        proto::item::Item::Reauth(reauth) => Some(Ev {
            id: String::new(),
            event: "reauth".to_owned(),
            data: serde_json::json!({ "reason": reauth.reason }).to_string(),
        }),
        proto::item::Item::Farewell(_)
        | proto::item::Item::Heartbeat(_)
        | proto::item::Item::Open(_) => None,
    }
}

async fn next_sse(sse: &mut SseClient) -> Option<Ev> {
    // Feeds live as long as the test wants: no deadline here (the reader,
    // `Feed::next`, has one).
    sse.next_or_end_patiently().await
}

/// `url` with `lastEventId=` added when there is a position.
pub fn with_position(url: &str, last_event_id: Option<&str>) -> String {
    match last_event_id {
        None => url.to_owned(),
        Some(id) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            let id: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            format!("{url}{sep}lastEventId={id}")
        }
    }
}

/// One long-poll: `url?poll=1`, from `next` (as `Last-Event-ID`).
pub async fn poll_once(client: &reqwest::Client, url: &str, next: Option<&str>) -> Value {
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut request = client.get(format!("{url}{sep}poll=1"));
    if let Some(id) = next {
        request = request.header("last-event-id", id);
    }
    let response = tokio::time::timeout(Duration::from_secs(60), request.send())
        .await
        .expect("a long-poll answers within a minute")
        .expect("long-poll request");
    assert_eq!(response.status(), 200, "long-poll of {url}");
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("long-poll answer is JSON")
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame's JSON, or `None` at the close.
pub async fn next_text(socket: &mut Socket) -> Option<Value> {
    loop {
        match socket.next().await? {
            Ok(Message::Text(text)) => {
                return Some(serde_json::from_str(&text).expect("frames are JSON"));
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Sends a text frame.
pub async fn send_text(socket: &mut Socket, text: &str) {
    socket
        .send(Message::text(text.to_owned()))
        .await
        .expect("sending a frame");
}

/// What a browser offers (Chromium's header).
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A WebSocket client over raw TCP that may offer permessage-deflate:
/// server frames read as they come (pings answered), compressed messages
/// (RSV1) inflated alone, as `server_no_context_takeover` allows; client
/// frames masked, compressed on request.
pub struct DeflateSocket {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// A WebSocket message: its opcode, whether it came compressed, its bytes.
pub type RawMessage = (u8, bool, Vec<u8>);

impl DeflateSocket {
    /// Opens a socket on `path` offering `offer` (as
    /// `Sec-WebSocket-Extensions`); returns it with the server's answer.
    pub async fn connect(
        server: &Server,
        path: &str,
        offer: &str,
    ) -> (DeflateSocket, Option<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Extensions: {offer}\r\n\r\n",
            server.addr
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
                .await
                .expect("a handshake answer in time")
                .unwrap();
            assert!(n > 0, "the server closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let answer = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        buf.drain(..end + 4);
        (DeflateSocket { stream, buf }, answer)
    }

    /// The next data or close message (pings answered on the way), or
    /// `None` at the end.
    pub async fn next_message(&mut self) -> Option<RawMessage> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((first, payload)) = self.frame() {
                let compressed = first & 0x40 != 0;
                assert!(first & 0x80 != 0, "crier does not fragment");
                match first & 0x0f {
                    0x9 => {
                        self.send(0xa, &payload, false).await;
                        continue;
                    }
                    0xa => continue,
                    opcode if compressed => return Some((opcode, true, inflate(&payload))),
                    opcode => return Some((opcode, false, payload)),
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text message as JSON, with whether it came compressed;
    /// `None` at the close or the end.
    pub async fn next_json(&mut self) -> Option<(bool, Value)> {
        let (opcode, compressed, payload) = self.next_message().await?;
        if opcode == 0x8 {
            return None;
        }
        assert_eq!(opcode, 0x1, "a text frame");
        Some((
            compressed,
            serde_json::from_slice(&payload).expect("frames are JSON"),
        ))
    }

    /// A complete server frame at the front of the buffer, taken.
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let buf = &self.buf;
        assert!(buf.len() < 2 || buf[1] & 0x80 == 0, "a masked server frame");
        let (len, header) = match *buf.get(1)? & 0x7f {
            126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
            127 => (
                u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let payload = buf.get(header..header + len)?.to_vec();
        let first = buf[0];
        self.buf.drain(..header + len);
        Some((first, payload))
    }

    /// Sends one frame: `first` its first byte as it is, `payload` masked.
    pub async fn send_raw(&mut self, first: u8, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        assert!(payload.len() < 126);
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![first, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Sends one masked frame of `payload` (`opcode` with FIN), compressed
    /// as a permessage-deflate message if `compress`.
    pub async fn send(&mut self, opcode: u8, payload: &[u8], compress: bool) {
        use tokio::io::AsyncWriteExt;
        let payload = if compress {
            deflate(payload)
        } else {
            payload.to_vec()
        };
        let mut frame = vec![0x80 | opcode | if compress { 0x40 } else { 0 }];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.unwrap();
    }
}

/// A permessage-deflate payload inflated alone (RFC 7692 §7.2.2).
fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut compressed = payload.to_vec();
    compressed.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
    let mut inflater = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(64 * 1024);
    inflater
        .decompress_vec(&compressed, &mut out, flate2::FlushDecompress::Sync)
        .expect("a valid deflate payload");
    assert_eq!(
        inflater.total_in() as usize,
        compressed.len(),
        "inflated whole"
    );
    out
}

/// `data` as a permessage-deflate payload (RFC 7692 §7.2.1).
fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    let mut out = encoder.flush_finish().unwrap();
    assert!(out.ends_with(&[0x00, 0x00, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// Declares each listed `async fn` as a test per transport and store:
/// `sse::memory::NAME`, `sse::durable::NAME`, `sse::redis::NAME`,
/// `websocket::…`, `websocket_deflate::…`, `poll::…`, `grpc::…`, so every transport passes the same
/// behavioural suite on every store; and SSE again on compressed streams
/// of every coding on the embedded store
/// ([`on_every_coding!`](crate::on_every_coding): `zstd::memory::NAME`, …;
/// replay.rs runs the compressed streams on the other stores).
#[macro_export]
macro_rules! on_every_transport {
    ($($name:ident),* $(,)?) => {
        $crate::on_every_transport!(@transport sse, Sse, $($name),*);
        $crate::on_every_coding!(@memory $($name),*);
        $crate::on_every_transport!(@transport websocket, WebSocket, $($name),*);
        $crate::on_every_transport!(@transport websocket_deflate, WebSocketDeflate, $($name),*);
        $crate::on_every_transport!(@transport poll, Poll, $($name),*);
        $crate::on_every_transport!(@transport grpc, Grpc, $($name),*);
    };
    (@transport $module:ident, $transport:ident, $($name:ident),*) => {
        mod $module {
            mod memory {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $crate::common::transport::on(
                            $crate::common::transport::Transport::$transport,
                            super::super::$name(),
                        )
                        .await
                    }
                )*
            }
            mod durable {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $crate::common::on_durable($crate::common::transport::on(
                            $crate::common::transport::Transport::$transport,
                            super::super::$name(),
                        ))
                        .await
                    }
                )*
            }
            mod redis {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $crate::common::on_redis($crate::common::transport::on(
                            $crate::common::transport::Transport::$transport,
                            super::super::$name(),
                        ))
                        .await
                    }
                )*
            }
            mod sentinel {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $crate::common::on_sentinel($crate::common::transport::on(
                            $crate::common::transport::Transport::$transport,
                            super::super::$name(),
                        ))
                        .await
                    }
                )*
            }
            mod cluster {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        $crate::common::on_cluster($crate::common::transport::on(
                            $crate::common::transport::Transport::$transport,
                            super::super::$name(),
                        ))
                        .await
                    }
                )*
            }
        }
    };
}
