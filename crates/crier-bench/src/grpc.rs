//! A gRPC subscriber of the crowd (`--transport grpc`): one `Subscribe`
//! call over an h2c connection (hyper's HTTP/2 client, as grpcurl or a
//! generated client would open one per channel), its `Item` messages
//! decoded with prost and handed to the [`Listener`] as the lines an SSE
//! stream would give: `id`, `data`, end of event.
//!
//! By default one connection per subscriber, like the SSE and WebSocket
//! crowds, so the hub's memory and CPU per subscriber compare line for
//! line; with `--calls-per-connection N`, N calls share each connection
//! (a [`Channel`]), as a service's calls share its channel. The bytes
//! counted are the gRPC messages (with their 5-byte prefix), not HTTP/2's
//! frame headers.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::decode::{LastId, Line};
use super::subscriber::{Ending, Listener, unix_micros};
use crate::proto;

/// What a gRPC subscriber asks for: its topics and `last`, from the
/// crowd's subscribe path, and where.
#[derive(Debug, Clone)]
pub struct Call {
    uri: hyper::Uri,
    request: proto::SubscribeRequest,
}

impl Call {
    /// The call for `path` (`/topics/T`, `/events?topic=A&topic=B`, with
    /// `last=N` if any) on the hub at `authority`.
    pub fn new(authority: &str, path: &str) -> Result<Call, String> {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let mut request = proto::SubscribeRequest::default();
        if let Some((_, topic)) = path.rsplit_once("/topics/") {
            request.topics.push(topic.to_owned());
        }
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "topic" => request.topics.push(value.into_owned()),
                "last" => {
                    request.last = Some(
                        value
                            .parse()
                            .map_err(|_| format!("{path}: last={value} is not a count"))?,
                    );
                }
                _ => {}
            }
        }
        if request.topics.is_empty() {
            return Err(format!(
                "{path}: --transport grpc subscribes to /topics/T or /events?topic=…"
            ));
        }
        let uri = format!("http://{authority}/crier.v1.Crier/Subscribe")
            .parse()
            .map_err(|e| format!("{authority}: {e}"))?;
        Ok(Call { uri, request })
    }

    /// The request's message, length-prefixed, resuming after `last_id`.
    fn body(&self, last_id: &LastId) -> Result<Bytes, String> {
        let mut request = self.request.clone();
        if let Some(id) = last_id.get()? {
            request.last_event_id = String::from_utf8_lossy(id).into_owned();
        }
        let len = request.encoded_len();
        let mut body = BytesMut::with_capacity(5 + len);
        body.extend_from_slice(&[0]);
        body.extend_from_slice(&(len as u32).to_be_bytes());
        request
            .encode(&mut body)
            .map_err(|e| format!("encoding the request: {e}"))?;
        Ok(body.freeze())
    }
}

/// One HTTP/2 connection that several calls share: the first call to
/// need it connects; the others reuse it while any call holds it (then it
/// closes, as a crowd that leaves closes its connections).
#[derive(Default)]
pub struct Channel(tokio::sync::Mutex<Option<Shared>>);

/// A channel's live connection: its request handle and its driver, held
/// by the calls on it.
struct Shared {
    sender: SendRequest<Full<Bytes>>,
    driver: Weak<Driver>,
}

/// Drives a connection; aborted (the connection closed) when its last
/// call drops it.
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Channel {
    /// The channel's connection, opened from `source` when it has none
    /// alive.
    async fn connection(
        &self,
        addr: SocketAddr,
        source: Option<IpAddr>,
    ) -> Result<(SendRequest<Full<Bytes>>, Arc<Driver>), String> {
        let mut shared = self.0.lock().await;
        if let Some(live) = shared.as_ref()
            && let Some(driver) = live.driver.upgrade()
            && !live.sender.is_closed()
        {
            return Ok((live.sender.clone(), driver));
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(ip) = source {
            #[cfg(target_os = "linux")]
            super::subscriber::bind_address_no_port(&socket)
                .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        let driver = Arc::new(Driver(tokio::spawn(async move {
            let _ = connection.await;
        })));
        *shared = Some(Shared {
            sender: sender.clone(),
            driver: Arc::downgrade(&driver),
        });
        Ok((sender, driver))
    }
}

/// An open `Subscribe` call, past its `Open` item.
pub struct GrpcStream {
    body: Incoming,
    /// The connection, held open while this call is.
    _connection: Arc<Driver>,
    /// A message read in part.
    pending: BytesMut,
    id: LastId,
    pub last_id: LastId,
    pub opening_bytes: u64,
    pub stream_bytes: u64,
}

impl GrpcStream {
    /// Calls `Subscribe` on `channel` (connecting from `source` when it
    /// has no connection alive) and waits for the answer's head and its
    /// first message (the `Open` item), when the hub has the subscription
    /// in place.
    pub async fn open(
        addr: SocketAddr,
        source: Option<IpAddr>,
        call: &Call,
        channel: &Channel,
        listener: &mut impl Listener,
        last_id: LastId,
    ) -> Result<GrpcStream, String> {
        let (mut sender, connection) = channel.connection(addr, source).await?;
        let request = hyper::Request::post(call.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(call.body(&last_id)?))
            .map_err(|e| format!("the request: {e}"))?;
        sender
            .ready()
            .await
            .map_err(|e| format!("the connection: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("the call: {e}"))?;
        if let Some(status) = response.headers().get("grpc-status") {
            let message = response
                .headers()
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or_default();
            return Err(format!(
                "refused: grpc-status {} {message}",
                String::from_utf8_lossy(status.as_bytes())
            ));
        }
        if response.status() != 200 {
            return Err(format!("HTTP {} to a gRPC call", response.status()));
        }
        let mut stream = GrpcStream {
            body: response.into_body(),
            _connection: connection,
            pending: BytesMut::new(),
            id: last_id,
            last_id,
            opening_bytes: 0,
            stream_bytes: 0,
        };
        loop {
            match stream.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        stream.opening_bytes += data.len() as u64;
                        if stream.feed(&data, listener)? {
                            return Ok(stream);
                        }
                    }
                }
                Some(Err(e)) => return Err(format!("reading the call: {e}")),
                None => return Err("the call ended before its first item".into()),
            }
        }
    }

    /// Decodes the messages in `data`; whether there was one.
    fn feed(&mut self, data: &[u8], listener: &mut impl Listener) -> Result<bool, String> {
        let arrived_us = unix_micros();
        self.pending.extend_from_slice(data);
        let mut any = false;
        while self.pending.len() >= 5 {
            if self.pending[0] != 0 {
                return Err("a compressed message, which the bench did not ask for".into());
            }
            let len = u32::from_be_bytes([
                self.pending[1],
                self.pending[2],
                self.pending[3],
                self.pending[4],
            ]) as usize;
            if self.pending.len() < 5 + len {
                break;
            }
            self.pending.advance(5);
            let message = self.pending.split_to(len);
            let item = proto::Item::decode(message.freeze())
                .map_err(|e| format!("an undecodable item: {e}"))?;
            any = true;
            match item.item {
                Some(proto::item::Item::Event(event)) => {
                    self.id.set(Some(event.id.as_bytes()));
                    listener.on_line(Line::Id(event.id.as_bytes()), arrived_us);
                    listener.on_line(Line::Data(event.data.as_bytes()), arrived_us);
                    listener.on_line(Line::End, arrived_us);
                    self.last_id = self.id;
                }
                Some(proto::item::Item::Reset(reset)) => {
                    self.id.set(Some(reset.id.as_bytes()));
                    listener.on_line(Line::Event(b"reset"), arrived_us);
                    listener.on_line(Line::Id(reset.id.as_bytes()), arrived_us);
                    listener.on_line(Line::End, arrived_us);
                    self.last_id = self.id;
                }
                Some(_) | None => {}
            }
        }
        Ok(any)
    }

    /// Reads items into `listener` until `stop` or the end of the call.
    pub async fn follow(
        &mut self,
        stop: &CancellationToken,
        listener: &mut impl Listener,
    ) -> Ending {
        loop {
            let frame = tokio::select! {
                biased;
                () = stop.cancelled() => return Ending::Stopped,
                frame = self.body.frame() => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.stream_bytes += data.len() as u64;
                        if let Err(e) = self.feed(&data, listener) {
                            return Ending::Dropped(e);
                        }
                    }
                    Err(frame) => {
                        let status = frame
                            .trailers_ref()
                            .and_then(|t| t.get("grpc-status"))
                            .map(|s| String::from_utf8_lossy(s.as_bytes()).into_owned());
                        return Ending::Dropped(format!(
                            "the hub ended the call (grpc-status {})",
                            status.unwrap_or_default()
                        ));
                    }
                },
                Some(Err(e)) => return Ending::Dropped(e.to_string()),
                None => return Ending::Dropped("the hub ended the call".into()),
            }
        }
    }
}
