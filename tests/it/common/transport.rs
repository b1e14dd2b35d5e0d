//! One subscriber over any transport: SSE (a real SSE parser; compressed
//! and decoded on arrival inside `coding::on`), WebSocket (a
//! real WebSocket client, tokio-tungstenite), long-poll (a loop of real
//! HTTP requests, each from the last answer's `next`) or gRPC (a client
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

/// Declares each listed `async fn` as a test per transport and store:
/// `sse::memory::NAME`, `sse::durable::NAME`, `sse::redis::NAME`,
/// `websocket::…`, `poll::…`, `grpc::…`, so every transport passes the same
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
