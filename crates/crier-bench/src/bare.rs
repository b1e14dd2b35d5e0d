//! `crier bench bare-hub`: the floor a hub is measured against. The least
//! user-space work per delivery a tokio program can do with one task per
//! connection: per subscriber, a task doing `broadcast::Receiver::recv` then
//! one `write_all` of bytes encoded once per event (events that are already
//! waiting behind the first go in the same write, as crier coalesces them).
//!
//! It speaks just enough HTTP/1.1 for `crier bench fanout` and `crier bench
//! idle`: `GET /topics/{topic}` answers `text/event-stream`, chunked, with
//! crier's preamble; `POST /topics/{topic}` numbers the body as the topic's
//! next event and answers `201`. Each event is encoded as crier encodes it
//! (`id: SEQ.EPOCH`, `data:` lines) with its chunk framing around it, once,
//! so every subscriber writes the same bytes crier writes, in one `write`
//! (crier: one `writev` of chunk header, frame and CRLF). There is nothing
//! else: no history, no limits, no auth, no heartbeats, no compression, and
//! topics are never forgotten. It listens on loopback addresses only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Args)]
pub struct BareHubArgs {
    /// Where to listen (a loopback address; port 0 picks one). The address
    /// is written to stderr as `bare hub listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Events a subscriber may fall behind before its stream is closed.
    #[arg(long, default_value_t = 1024)]
    pub backlog: usize,
}

/// Longest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Longest request body (an event) accepted.
const MAX_BODY: usize = 1024 * 1024;

/// One topic: its numbering and its broadcast channel.
struct Topic {
    seq: u64,
    sender: broadcast::Sender<Bytes>,
}

struct Hub {
    topics: Mutex<HashMap<String, Topic>>,
    /// The hub's epoch, as crier writes one: base 36.
    epoch: String,
    backlog: usize,
}

impl Hub {
    fn topic<'a>(&self, topics: &'a mut HashMap<String, Topic>, name: &str) -> &'a mut Topic {
        topics.entry(name.to_owned()).or_insert_with(|| Topic {
            seq: 0,
            sender: broadcast::channel(self.backlog).0,
        })
    }

    fn subscribe(&self, name: &str) -> broadcast::Receiver<Bytes> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        self.topic(&mut topics, name).sender.subscribe()
    }

    /// Numbers `data` as the topic's next event and sends its chunk to
    /// every subscriber.
    fn publish(&self, name: &str, data: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let topic = self.topic(&mut topics, name);
        topic.seq += 1;
        let frame = event_frame(topic.seq, &self.epoch, data);
        // Nobody subscribed: nothing to do (an error only says so).
        let _ = topic.sender.send(chunk(&frame));
    }
}

/// What crier writes first on a stream with no start position.
const PREAMBLE: &[u8] = b"retry: 3000\n: crier stream open\n\n";

/// An event as crier frames it: `id: SEQ.EPOCH`, a `data:` line per line
/// of `data` (CR, LF and CRLF all end a line), a blank line.
fn event_frame(seq: u64, epoch: &str, data: &str) -> Bytes {
    let mut frame = BytesMut::with_capacity(data.len() + 32);
    frame.put_slice(format!("id: {seq}.{epoch}\n").as_bytes());
    let bytes = data.as_bytes();
    let (mut start, mut i) = (0, 0);
    let line = |frame: &mut BytesMut, line: &[u8]| {
        frame.put_slice(b"data: ");
        frame.put_slice(line);
        frame.put_u8(b'\n');
    };
    while i < bytes.len() {
        if matches!(bytes[i], b'\n' | b'\r') {
            line(&mut frame, &bytes[start..i]);
            if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            start = i + 1;
        }
        i += 1;
    }
    line(&mut frame, &bytes[start..]);
    frame.put_u8(b'\n');
    frame.freeze()
}

/// A new epoch: 32 random bits in base 36, as crier's are.
fn random_epoch() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let mut n = h.finish() & 0xffff_ffff;
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// `bytes` as one HTTP/1.1 chunk: size line, bytes, CRLF.
fn chunk(bytes: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(bytes.len() + 12);
    out.put_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
    out.freeze()
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn run(args: BareHubArgs) -> Result<serde_json::Value, String> {
    if !args.listen.ip().is_loopback() {
        return Err(format!(
            "the bare hub has no limits and listens on loopback addresses only, not {}",
            args.listen
        ));
    }
    if args.backlog == 0 {
        return Err("--backlog must be at least 1".into());
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("bare hub listening on {addr}");
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let hub = Arc::new(Hub {
        topics: Mutex::default(),
        epoch: random_epoch(),
        backlog: args.backlog,
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(connection(tcp, hub.clone()));
                }
                // Out of descriptors, say: the next accept may succeed.
                Err(error) => {
                    eprintln!("accept: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    Ok(json!({ "scenario": "bare-hub", "listen": addr.to_string() }))
}

/// A request head, parsed.
struct Head {
    post: bool,
    topic: Option<String>,
    content_length: usize,
}

/// Parses a request head at the start of `buf`: the head and its length,
/// `None` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("400 Bad Request"),
    };
    let post = match request.method {
        Some("GET") => false,
        Some("POST") => true,
        _ => return Err("405 Method Not Allowed"),
    };
    let path = request.path.unwrap_or_default();
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let topic = path
        .strip_prefix("/topics/")
        .filter(|t| !t.is_empty() && !t.contains('/'))
        .map(str::to_owned);
    let mut content_length = 0;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("400 Bad Request")?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("411 Length Required");
        }
    }
    Ok(Some((
        Head {
            post,
            topic,
            content_length,
        },
        len,
    )))
}

/// Serves one connection: publishes, kept alive, until a subscribe or an
/// error.
async fn connection(mut tcp: TcpStream, hub: Arc<Hub>) {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(head)) => break head,
                Ok(None) if buf.len() < MAX_HEAD => {}
                Ok(None) => return refuse(tcp, "431 Request Header Fields Too Large").await,
                Err(status) => return refuse(tcp, status).await,
            }
            match tcp.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let (
            Head {
                post,
                topic,
                content_length,
            },
            len,
        ) = head;
        buf.advance(len);
        let Some(topic) = topic else {
            return refuse(tcp, "404 Not Found").await;
        };
        if !post {
            drop(buf);
            return subscribe(tcp, &hub, &topic).await;
        }
        if content_length > MAX_BODY {
            return refuse(tcp, "413 Content Too Large").await;
        }
        while buf.len() < content_length {
            match tcp.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let body = buf.split_to(content_length);
        let Ok(data) = std::str::from_utf8(&body) else {
            return refuse(tcp, "400 Bad Request").await;
        };
        hub.publish(&topic, data);
        let answered = b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n";
        if tcp.write_all(answered).await.is_err() {
            return;
        }
    }
}

/// Answers `status` with no body and closes.
async fn refuse(mut tcp: TcpStream, status: &str) {
    let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = tcp.write_all(answer.as_bytes()).await;
}

/// The stream: the answer's head and crier's preamble, then each event's
/// chunk as it comes, from a task of its own. This task waits for the
/// client to close and stops it then (the writer never reads).
async fn subscribe(tcp: TcpStream, hub: &Hub, topic: &str) {
    let mut receiver = hub.subscribe(topic);
    let (mut read, mut write) = tcp.into_split();
    let mut opening = BytesMut::new();
    opening.put_slice(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
          transfer-encoding: chunked\r\n\r\n",
    );
    opening.put_slice(&chunk(PREAMBLE));
    let writer = tokio::spawn(async move {
        if write.write_all(&opening).await.is_err() {
            return;
        }
        drop(opening);
        // A lone event is written as the shared chunk; events already
        // waiting behind it go in the same write, as crier does. Lagged or
        // closed: the stream ends.
        let mut more = BytesMut::new();
        while let Ok(frame) = receiver.recv().await {
            loop {
                match receiver.try_recv() {
                    Ok(next) => {
                        if more.is_empty() {
                            more.put_slice(&frame);
                        }
                        more.put_slice(&next);
                    }
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(_) => return,
                }
            }
            let written = if more.is_empty() {
                write.write_all(&frame).await
            } else {
                write.write_all(&more.split()).await
            };
            if written.is_err() {
                return;
            }
        }
    });
    let mut byte = [0u8; 1];
    // Whatever the client sends is ignored until it closes.
    while let Ok(1..) = read.read(&mut byte).await {}
    writer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_and_chunks_framed() {
        let (head, len) =
            parse_head(b"POST /topics/a?x=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
                .unwrap()
                .unwrap();
        assert_eq!(
            (head.post, head.topic.as_deref(), head.content_length, len),
            (true, Some("a"), 3, 50)
        );
        assert!(parse_head(b"GET /topics/a HTTP/1.1\r\n").unwrap().is_none());
        let (head, _) = parse_head(b"GET /other HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.topic, None);
        assert_eq!(
            parse_head(b"PUT /topics/a HTTP/1.1\r\n\r\n").err(),
            Some("405 Method Not Allowed")
        );
        assert_eq!(&chunk(b"id: 1\n\n")[..], b"7\r\nid: 1\n\n\r\n");
    }

    /// Framed as crier frames it: one `data:` line per line, whatever ends
    /// the line.
    #[test]
    fn events_are_framed_as_crier_frames_them() {
        assert_eq!(&event_frame(3, "ab1", "x")[..], b"id: 3.ab1\ndata: x\n\n");
        assert_eq!(
            &event_frame(4, "ab1", "a\r\nb\rc\n")[..],
            b"id: 4.ab1\ndata: a\ndata: b\ndata: c\ndata: \n\n"
        );
        assert!(random_epoch().bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
