//! On the wire: compression flushed per event, HTTP/2 over TLS with many
//! streams on one connection, and h2c with prior knowledge.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls::TestCerts;
use common::*;
use crier::compress::Decompressor;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Decodes one content coding incrementally, as a browser does.
struct Decoder(Decompressor);

impl Decoder {
    fn new(coding: &str) -> Decoder {
        Decoder(Decompressor::new(coding.parse().unwrap()).unwrap())
    }

    /// Everything `wire` decodes to, right now.
    fn decode(&mut self, wire: &[u8]) -> Vec<u8> {
        self.0.decompress(wire).unwrap()
    }
}

/// A compressed subscription: events decoded from the wire as each chunk
/// arrives, and a count of compressed bytes received.
struct CompressedSubscriber {
    events: std::pin::Pin<Box<dyn futures_util::Stream<Item = Ev> + Send>>,
    wire_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl CompressedSubscriber {
    async fn connect(server: &Server, path: &str, coding: &str) -> CompressedSubscriber {
        let response = server
            .client
            .get(server.url(path))
            .header("accept-encoding", coding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-encoding"].to_str().unwrap(),
            coding
        );
        let mut decoder = Decoder::new(coding);
        let wire_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = wire_bytes.clone();
        let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
        let mut body = response.bytes_stream();
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = body.next().await {
                counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::SeqCst);
                let plain = decoder.decode(&chunk);
                if tx.send(Ok(Bytes::from(plain))).is_err() {
                    return;
                }
            }
        });
        let events = UnboundedReceiverStream::new(rx).eventsource().map(|e| {
            let e = e.expect("decodable stream");
            Ev::new(&e.id, &e.event, &e.data)
        });
        CompressedSubscriber {
            events: Box::pin(events),
            wire_bytes,
        }
    }

    async fn next(&mut self) -> Ev {
        tokio::time::timeout(DEADLINE, self.events.next())
            .await
            .expect("an event in time")
            .expect("stream open")
    }
}

/// A realistic JSON event: a dashboard metric update.
fn metric(n: usize) -> String {
    format!(
        r#"{{"metric":"cpu.utilisation","host":"web-{:02}.eu-west","value":{}.{},"unit":"percent","tags":{{"env":"production","team":"platform"}},"seq":{n}}}"#,
        n % 17,
        20 + n % 60,
        n % 10
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_codec_delivers_an_event_on_an_idle_stream_within_100ms_and_stays_decodable() {
    let server = Server::start().await;
    for coding in ["zstd", "br", "gzip"] {
        let topic = format!("c-{coding}");
        let path = format!("/topics/{topic}");
        let mut sub = CompressedSubscriber::connect(&server, &path, coding).await;

        // The stream is idle (only its preamble went out). Measure from the
        // publish to the decoded event.
        for n in 0..5 {
            let data = metric(n);
            let sent = Instant::now();
            let id = server.publish_id(&topic, &data).await;
            let event = sub.next().await;
            let latency = sent.elapsed();
            assert_eq!(event, Ev::new(&id, "message", &data), "{coding}");
            assert!(
                latency < Duration::from_millis(100),
                "{coding}: event {n} took {latency:?} to arrive decoded"
            );
        }
        // Many more, in a burst: still byte-exact, in order.
        let mut expected = Vec::new();
        for n in 5..300 {
            let data = metric(n);
            let id = server.publish_id(&topic, &data).await;
            expected.push(Ev::new(&id, "message", &data));
        }
        for want in expected {
            assert_eq!(sub.next().await, want, "{coding}");
        }
        assert!(sub.wire_bytes.load(std::sync::atomic::Ordering::SeqCst) > 0);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_flushed_through_the_compressor() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(50)).await;
    let response = server
        .client
        .get(server.url("/topics/hb"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    let mut decoder = Decoder::new("gzip");
    let mut body = response.bytes_stream();
    let mut plain = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while String::from_utf8_lossy(&plain)
        .matches(": heartbeat\n\n")
        .count()
        < 2
    {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("heartbeats arrive decoded")
            .unwrap()
            .unwrap();
        plain.extend(decoder.decode(&chunk));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_can_be_switched_off_and_identity_is_always_possible() {
    let server = Server::start_with(|c| c.transports.compression = vec![None]).await;
    let response = server
        .client
        .get(server.url("/topics/plain"))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("content-encoding").is_none());
    server.stop().await;

    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/plain").await; // no Accept-Encoding
    assert!(sub.headers.get("content-encoding").is_none());
    let id = server.publish_id("plain", "as is").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "as is"));
    server.stop().await;
}

/// Opens one TLS connection to `addr`, negotiating `h2` by ALPN, and
/// returns an HTTP/2 sender multiplexing requests on it.
async fn h2_over_tls(addr: std::net::SocketAddr, ca: &std::path::Path) -> H2 {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    H2 {
        sender,
        base: format!("https://localhost:{}", addr.port()),
    }
}

/// One HTTP/2 connection and the origin it speaks to.
#[derive(Clone)]
struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    base: String,
}

impl H2 {
    async fn send(
        &mut self,
        method: hyper::Method,
        path: &str,
        body: &str,
    ) -> hyper::Response<hyper::body::Incoming> {
        self.sender.ready().await.unwrap();
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        response
    }

    /// Publishes and returns the event's id.
    async fn publish(&mut self, topic: &str, data: &str) -> String {
        let response = self
            .send(hyper::Method::POST, &format!("/topics/{topic}"), data)
            .await;
        assert_eq!(response.status(), 201);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        answer["id"].as_str().unwrap().to_owned()
    }

    /// Subscribes; the events of the stream as a browser would parse them.
    async fn subscribe(
        &mut self,
        path: &str,
    ) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = Ev> + Send>> {
        let response = self.send(hyper::Method::GET, path, "").await;
        assert_eq!(response.status(), 200);
        sse_events(response.into_body())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_multiplexed_on_one_http2_tls_connection_all_receive_the_same_sequence()
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = TestCerts::new();
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    let server = Server::start_with(move |c| {
        c.listen.tls_cert = Some(cert);
        c.listen.tls_key = Some(key);
    })
    .await;

    // All 200 subscriptions share this one connection.
    let mut shared = h2_over_tls(server.addr, &certs.ca_cert).await;
    let mut subscribers = Vec::new();
    for _ in 0..200 {
        subscribers.push(shared.subscribe("/topics/mux").await);
    }
    let mut publisher = h2_over_tls(server.addr, &certs.ca_cert).await;
    let mut expected = Vec::new();
    for n in 0..20 {
        let data = metric(n);
        let id = publisher.publish("mux", &data).await;
        expected.push(Ev::new(&id, "message", &data));
    }
    let received = futures_util::future::join_all(subscribers.iter_mut().map(|events| {
        let n = expected.len();
        async move {
            let mut got = Vec::with_capacity(n);
            for _ in 0..n {
                let next = tokio::time::timeout(DEADLINE, events.next()).await;
                got.push(next.expect("event in time").expect("stream open"));
            }
            got
        }
    }))
    .await;
    for (n, got) in received.iter().enumerate() {
        assert_eq!(got, &expected, "stream {n}");
    }
    drop(subscribers);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_speaks_http2_with_prior_knowledge() {
    let server = Server::start().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut h2c = H2 {
        sender,
        base: format!("http://{}", server.addr),
    };
    let mut events = h2c.subscribe("/topics/h2c").await;
    let id = h2c.publish("h2c", "cleartext h2").await;
    let got = tokio::time::timeout(DEADLINE, events.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, Ev::new(&id, "message", "cleartext h2"));
    drop(events);
    server.stop().await;
}

/// A client whose first bytes arrive in pieces still gets its protocol:
/// HTTP/1.1 from a lone `P`, HTTP/2 from a preface split in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_first_bytes_trickle_in_gets_its_protocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start().await;
    // Connects and sends `first` alone, then `rest`: the pause is the
    // trickle itself, so that the server sees the first piece on its own.
    let trickle = async |first: &[u8], rest: &[u8]| {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket.write_all(rest).await.unwrap();
        socket
    };

    let mut h1 = trickle(
        b"P",
        b"OST /topics/trickle HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, h1.read_to_string(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(answer.ends_with(r#""seq":1}"#), "{answer}");

    // The rest of the preface, then an empty SETTINGS frame.
    let mut h2 = trickle(b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await;
    let mut frame = [0u8; 9];
    tokio::time::timeout(DEADLINE, h2.read_exact(&mut frame))
        .await
        .expect("the server's first frame")
        .unwrap();
    assert_eq!(frame[3], 0x04, "the server answers HTTP/2 with SETTINGS");
    drop(h2);
    server.stop().await;
}

/// JSON answers are compressed with what the client accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_compressed() {
    let server = Server::start().await;
    for coding in ["zstd", "br", "gzip"] {
        let response = server
            .client
            .post(server.url("/events"))
            .header("accept-encoding", coding)
            .body(r#"[{"topic":"a","data":"one"},{"topic":"b","data":"two"}]"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["content-encoding"], coding);
        let wire = response.bytes().await.unwrap();
        let answer: serde_json::Value =
            serde_json::from_slice(&Decoder::new(coding).decode(&wire)).unwrap();
        let seqs: Vec<u64> = answer["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs.len(), 2, "{answer}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_wire_reports_bytes_per_event_for_every_coding() {
    let server = Server::start().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["bench", "wire", "--events", "50", "--url"])
        .arg(format!("http://{}", server.addr))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["events"], 50);
    let codings = result["codings"].as_array().unwrap();
    let names: Vec<&str> = codings
        .iter()
        .map(|c| c["coding"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["identity", "gzip", "br", "zstd"]);
    for coding in &codings[1..] {
        let ratio = coding["ratio_to_identity"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio < 0.5, "{coding}");
    }
    server.stop().await;
}

/// A stream whose client stops opening its flow-control window, on an
/// HTTP/2 connection that otherwise lives on (another stream read, pings
/// answered), is cut in bounded time: the connection closes once the stream
/// has taken nothing for the stall timeout, while an idle stream that reads
/// is kept; both resume exactly on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_starved_of_window_closes_its_connection_in_bounded_time() {
    // Stall timeout: the larger of the write timeout and two heartbeats.
    let server = Server::start_with(|c| {
        c.limits.write_timeout = Duration::from_secs(1);
        c.transports.heartbeat = Duration::from_millis(200);
    })
    .await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(4096)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(conn);
    let mut h2c = H2 {
        sender,
        base: format!("http://{}", server.addr),
    };
    let mut read = h2c.subscribe("/topics/read").await;
    let first = server.publish_id("read", "r1").await;
    assert_eq!(
        tokio::time::timeout(DEADLINE, read.next()).await.unwrap(),
        Some(Ev::new(&first, "message", "r1"))
    );
    // Idle but read, for longer than the stall timeout: kept (only its
    // heartbeats arrive).
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), read.next())
            .await
            .is_err(),
        "an idle stream that reads stays open"
    );

    // A second stream whose body is never read: its 4 KiB window fills.
    let starved = h2c.send(hyper::Method::GET, "/topics/starved", "").await;
    assert_eq!(starved.status(), 200);
    let mut starved_ids = Vec::new();
    for _ in 0..8 {
        starved_ids.push(server.publish_id("starved", &"x".repeat(1000)).await);
    }
    let filled = Instant::now();
    let end = tokio::time::timeout(DEADLINE, read.next())
        .await
        .expect("the connection is closed within the deadline");
    assert_eq!(end, None, "the reading stream ends with its connection");
    assert!(
        filled.elapsed() >= Duration::from_millis(500),
        "cut after the stall timeout, not at once: {:?}",
        filled.elapsed()
    );
    tokio::time::timeout(DEADLINE, connection)
        .await
        .expect("the client sees the connection end")
        .unwrap()
        .ok();
    drop(starved);

    // Both resume exactly on a new connection.
    let second = server.publish_id("read", "r2").await;
    let mut resumed = server.resume("/topics/read", &first).await;
    assert_eq!(resumed.next().await, Ev::new(&second, "message", "r2"));
    let mut resumed = server.resume("/topics/starved", &starved_ids[0]).await;
    let ids: Vec<String> = resumed.take(7).await.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, starved_ids[1..]);
    server.stop().await;
}

/// One HTTP/1.1 answer read off a raw connection.
struct Answer {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

type RawReader = tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>;

async fn read_line(reader: &mut RawReader) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    let n = tokio::time::timeout(DEADLINE, reader.read_line(&mut line))
        .await
        .expect("a line in time")
        .unwrap();
    assert!(n > 0, "the connection closed mid-answer");
    line.trim_end_matches("\r\n").to_owned()
}

/// Reads a status line and headers.
async fn read_head(reader: &mut RawReader) -> Answer {
    let status_line = read_line(reader).await;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader).await;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').expect("a header line");
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Answer {
        status,
        headers,
        body: Vec::new(),
    }
}

/// Reads one chunk of a chunked body; `None` for the last (empty) one.
async fn read_chunk(reader: &mut RawReader) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let size = usize::from_str_radix(&read_line(reader).await, 16).expect("a chunk size");
    let mut chunk = vec![0; size + 2];
    tokio::time::timeout(DEADLINE, reader.read_exact(&mut chunk))
        .await
        .expect("a chunk in time")
        .unwrap();
    assert_eq!(&chunk[size..], b"\r\n", "a chunk ends its line");
    chunk.truncate(size);
    (size > 0).then_some(chunk)
}

/// Reads a whole answer, its body delimited by length or chunks.
async fn read_answer(reader: &mut RawReader) -> Answer {
    use tokio::io::AsyncReadExt;
    let mut answer = read_head(reader).await;
    if answer.header("transfer-encoding") == Some("chunked") {
        while let Some(chunk) = read_chunk(reader).await {
            answer.body.extend_from_slice(&chunk);
        }
    } else {
        let len: usize = answer
            .header("content-length")
            .expect("a length or chunks")
            .parse()
            .unwrap();
        answer.body = vec![0; len];
        reader.read_exact(&mut answer.body).await.unwrap();
    }
    answer
}

async fn raw_connection(server: &Server) -> (RawReader, tokio::net::tcp::OwnedWriteHalf) {
    let (read, write) = TcpStream::connect(server.addr).await.unwrap().into_split();
    (tokio::io::BufReader::new(read), write)
}

/// crier answers HTTP/1.1 subscribe requests itself and hands the rest of
/// a connection to hyper at the first other request: one keep-alive
/// connection carrying pipelined long-polls, then a publish, then a
/// long-poll that closes the connection, gets every answer, in order.
#[tokio::test]
async fn one_http1_connection_carries_pipelined_subscribe_answers_then_other_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start().await;
    let a = server.publish_id("kept", "a").await;
    let b = server.publish_id("kept", "b").await;
    let (mut reader, mut writer) = raw_connection(&server).await;
    let requests = [
        "GET /topics/kept?poll=1&last=2 HTTP/1.1\r\nHost: hub\r\n\r\n",
        "GET /topics/kept?poll=1&last=1 HTTP/1.1\r\nHost: hub\r\n\r\n",
        "POST /topics/kept HTTP/1.1\r\nHost: hub\r\nContent-Length: 1\r\n\r\nc",
        "GET /topics/kept?poll=1&last=1 HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n",
    ];
    writer
        .write_all(requests.concat().as_bytes())
        .await
        .unwrap();

    let event = |id: &str, seq: u64, data: &str| json!({"id": id, "type": "event", "topic": "kept", "seq": seq, "data": data});
    let first = read_answer(&mut reader).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), Some("application/json"));
    assert!(first.header("date").is_some(), "{:?}", first.headers);
    assert_eq!(
        first.json(),
        json!({"events": [event(&a, 1, "a"), event(&b, 2, "b")], "next": b})
    );
    let second = read_answer(&mut reader).await;
    assert_eq!(
        second.json(),
        json!({"events": [event(&b, 2, "b")], "next": b})
    );
    let published = read_answer(&mut reader).await;
    assert_eq!(published.status, 201);
    let c = published.json()["id"].as_str().unwrap().to_owned();
    let last = read_answer(&mut reader).await;
    assert_eq!(
        last.json(),
        json!({"events": [event(&c, 3, "c")], "next": c})
    );
    assert_eq!(last.header("connection"), Some("close"));
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut rest))
        .await
        .expect("the hub closes the connection after `Connection: close`")
        .unwrap();
    assert_eq!(rest, b"");
    server.stop().await;
}

/// An HTTP/1.1 event stream is chunked, each event in one chunk as it is
/// published; the client leaving frees its share of the per-client cap.
#[tokio::test]
async fn an_http1_event_stream_sends_each_event_as_one_chunk_and_frees_its_slot_when_the_client_leaves()
 {
    use tokio::io::AsyncWriteExt;
    let server = Server::start_with(|c| {
        c.limits.max_streams_per_ip = 2;
        c.transports.retry = Duration::from_millis(1500);
        c.transports.heartbeat = Duration::from_secs(600);
    })
    .await;
    let request = "GET /topics/raw HTTP/1.1\r\nHost: hub\r\n\r\n";
    let (mut reader, mut writer) = raw_connection(&server).await;
    writer.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut reader).await;
    assert_eq!(head.status, 200);
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("transfer-encoding", "chunked"),
        ("cache-control", "no-cache"),
    ] {
        assert_eq!(head.header(name), Some(value), "{:?}", head.headers);
    }
    assert_eq!(head.header("content-length"), None);
    assert!(head.header("date").is_some());
    assert_eq!(
        read_chunk(&mut reader).await.unwrap(),
        b"retry: 1500\nid: 0\n: crier stream open\n\n"
    );
    for data in ["one", "two"] {
        let id = server.publish_id("raw", data).await;
        assert_eq!(
            String::from_utf8(read_chunk(&mut reader).await.unwrap()).unwrap(),
            format!("id: {id}\ndata: {data}\n\n")
        );
    }

    // The open stream and a second one fill the cap of 2; a third request
    // is refused until the first client leaves.
    let (mut second_reader, mut second) = raw_connection(&server).await;
    second.write_all(request.as_bytes()).await.unwrap();
    // Answered, so it holds its slot before the third request is made.
    assert_eq!(read_head(&mut second_reader).await.status, 200);
    let publish = || {
        server
            .client
            .post(server.url("/topics/raw"))
            .body("three")
            .send()
    };
    assert_problem(publish().await.unwrap(), 429, "too-many-streams").await;
    drop((reader, writer));
    eventually("the first stream's slot freed", || async {
        let answer = publish().await.map_err(|e| e.to_string())?;
        (answer.status() == 201)
            .then_some(())
            .ok_or(format!("{}", answer.status()))
    })
    .await;
    server.stop().await;
}

/// Which of the hub's HTTP paths a request takes: crier's own HTTP/1.1
/// (subscribe GETs), hyper's HTTP/1 (an HTTP/1.0 GET goes there) or
/// HTTP/2 (h2c with prior knowledge).
#[derive(Debug, Clone, Copy)]
enum Via {
    Own,
    Hyper,
    Http2,
}

/// What keeps an answer's connection (and its stream) open.
type Held = Box<dyn std::any::Any + Send>;

/// Sends `GET path` with `headers` over `via`: the answer's status and
/// headers, its whole body when `whole` (a stream's is left unread), and
/// what holds it open.
async fn get_via(
    server: &Server,
    via: Via,
    path: &str,
    headers: &[(&str, &str)],
    whole: bool,
) -> (Answer, Held) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let client = match via {
        Via::Own => server.client.clone(),
        Via::Http2 => reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
        Via::Hyper => {
            let mut socket = TcpStream::connect(server.addr).await.unwrap();
            let mut request = format!("GET {path} HTTP/1.0\r\nHost: hub\r\n");
            for (name, value) in headers {
                request += &format!("{name}: {value}\r\n");
            }
            socket
                .write_all(format!("{request}\r\n").as_bytes())
                .await
                .unwrap();
            // HTTP/1.0: the head ends at a blank line, the body at the close.
            let mut bytes = Vec::new();
            let head_end = loop {
                if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end;
                }
                let mut buf = [0u8; 1024];
                let n = tokio::time::timeout(DEADLINE, socket.read(&mut buf))
                    .await
                    .expect("a head in time")
                    .unwrap();
                assert!(n > 0, "closed before the head");
                bytes.extend_from_slice(&buf[..n]);
            };
            let head = String::from_utf8(bytes[..head_end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .unwrap()
                .split(' ')
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            let headers = lines
                .map(|line| {
                    let (name, value) = line.split_once(':').unwrap();
                    (name.to_ascii_lowercase(), value.trim().to_owned())
                })
                .collect();
            let mut body = bytes[head_end + 4..].to_vec();
            if whole {
                tokio::time::timeout(DEADLINE, socket.read_to_end(&mut body))
                    .await
                    .expect("a body in time")
                    .unwrap();
            }
            let answer = Answer {
                status,
                headers,
                body,
            };
            return (answer, Box::new(socket));
        }
    };
    let mut request = client.get(server.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("an answer in time")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    if whole {
        let body = response.bytes().await.unwrap().to_vec();
        return (
            Answer {
                status,
                headers,
                body,
            },
            Box::new(()),
        );
    }
    let answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    (answer, Box::new(response))
}

/// `GET /topics/{topic}` (and `/events`) answers an event stream or a
/// long-poll's JSON by `Accept`, each maybe compressed: both say `Vary:
/// accept, accept-encoding`; a compressed stream says `no-transform`; a
/// long-poll's JSON is compressed like every JSON answer, exactly what the
/// plain answer says once decoded. On crier's own HTTP/1.1, hyper's and
/// HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_answers_vary_by_accept_and_compressed_streams_say_no_transform() {
    let server = Server::start().await;
    let first = server.publish_id("vary", &metric(1)).await;
    let second = server.publish_id("vary", &metric(2)).await;
    for via in [Via::Own, Via::Hyper, Via::Http2] {
        for path in ["/topics/vary", "/events?topic=vary&topic=other"] {
            for coding in [None, Some("zstd"), Some("gzip"), Some("br")] {
                let mut headers = vec![("accept", "text/event-stream")];
                headers.extend(coding.map(|c| ("accept-encoding", c)));
                let (stream, held) = get_via(&server, via, path, &headers, false).await;
                let what = format!("{via:?} {path} {coding:?} stream");
                assert_eq!(stream.status, 200, "{what}");
                assert_eq!(stream.header("content-encoding"), coding, "{what}");
                assert_eq!(
                    stream.header("vary"),
                    Some("accept, accept-encoding"),
                    "{what}"
                );
                let cache = match coding {
                    Some(_) => "no-cache, no-transform",
                    None => "no-cache",
                };
                assert_eq!(stream.header("cache-control"), Some(cache), "{what}");
                drop(held);
            }
        }
        let plain = {
            let url = format!("/topics/vary?poll=1&lastEventId={first}");
            let (answer, _) = get_via(&server, via, &url, &[], true).await;
            assert_eq!(answer.header("content-encoding"), None);
            assert_eq!(answer.header("vary"), Some("accept, accept-encoding"));
            let json = answer.json();
            assert_eq!(json["events"][0]["id"], second.as_str(), "{json}");
            assert_eq!(json["events"][0]["data"], metric(2).as_str(), "{json}");
            json
        };
        for coding in ["zstd", "gzip", "br"] {
            let what = format!("{via:?} {coding} long-poll");
            let headers = [("accept", "application/json"), ("accept-encoding", coding)];
            let url = format!("/topics/vary?lastEventId={first}");
            let (answer, _) = get_via(&server, via, &url, &headers, true).await;
            assert_eq!(answer.status, 200, "{what}");
            assert_eq!(answer.header("content-encoding"), Some(coding), "{what}");
            assert_eq!(
                answer.header("vary"),
                Some("accept, accept-encoding"),
                "{what}"
            );
            let decoded = Decoder::new(coding).decode(&answer.body);
            assert!(answer.body.len() < decoded.len(), "{what}: compressed");
            let json: serde_json::Value = serde_json::from_slice(&decoded).unwrap();
            assert_eq!(json, plain, "{what}");
        }
    }
    server.stop().await;
}

/// The page and the browser helper are revalidated on every use and
/// carry a validator (`304` while unchanged); `/healthz` is never cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_carry_a_validator_and_healthz_is_never_cached() {
    let server = Server::start().await;
    for via in [Via::Hyper, Via::Http2] {
        for path in ["/", "/crier.js"] {
            let what = format!("{via:?} {path}");
            let (answer, _) = get_via(&server, via, path, &[], true).await;
            assert_eq!(answer.status, 200, "{what}");
            assert_eq!(answer.header("cache-control"), Some("no-cache"), "{what}");
            let etag = answer.header("etag").expect("a validator").to_owned();
            assert!(etag.starts_with("W/\"") && etag.len() > 8, "{what}: {etag}");
            assert!(!answer.body.is_empty(), "{what}");
            let (again, _) = get_via(&server, via, path, &[("if-none-match", &etag)], true).await;
            assert_eq!(again.status, 304, "{what}");
            assert_eq!(again.header("etag"), Some(etag.as_str()), "{what}");
            assert!(again.body.is_empty(), "{what}");
            let other = [("if-none-match", "W/\"someone-else\"")];
            let (changed, _) = get_via(&server, via, path, &other, true).await;
            assert_eq!(changed.status, 200, "{what}");
        }
        let (health, _) = get_via(&server, via, "/healthz", &[], true).await;
        assert_eq!(health.status, 200);
        assert_eq!(health.header("cache-control"), Some("no-store"), "{via:?}");
    }
    server.stop().await;
}

/// `--tls-self-signed`: the hub makes a certificate for localhost in the
/// user's cache directory, logs where it is, and serves HTTP/2 by ALPN to a
/// client that trusts that file; a second start reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_self_signed_serves_http2_to_a_client_trusting_the_logged_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().to_str().unwrap().to_owned();
    let hub = common::process::Process::start_with_env(
        &["--tls-self-signed"],
        &[("XDG_CACHE_HOME", cache_dir.as_str())],
    );
    let cert = cache.path().join("crier").join("localhost.pem");
    assert!(
        hub.log()
            .iter()
            .any(|l| l.contains(&format!("self-signed certificate {}", cert.display()))),
        "the log names the certificate: {:?}",
        hub.log()
    );
    assert!(hub.base.starts_with("https://"), "{}", hub.base);
    let first = std::fs::read_to_string(&cert).unwrap();

    let mut subscriber = h2_over_tls(hub.addr(), &cert).await;
    let mut events = subscriber.subscribe("/topics/tls").await;
    let mut publisher = h2_over_tls(hub.addr(), &cert).await;
    let id = publisher.publish("tls", "over h2").await;
    let event = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("event in time")
        .expect("stream open");
    assert_eq!(event, Ev::new(&id, "message", "over h2"));
    drop(hub);

    let again = common::process::Process::start_with_env(
        &["--tls-self-signed"],
        &[("XDG_CACHE_HOME", cache_dir.as_str())],
    );
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), first);
    drop(again);
}
