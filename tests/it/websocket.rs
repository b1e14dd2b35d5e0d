//! The WebSocket face: the handshake's defences, pings, frames that close
//! the socket, publishing over it, permessage-deflate, and a crowd of
//! sockets.

use crate::common;

use std::time::Duration;

use common::auth::{token, with_secret};
use common::transport::{DEFLATE_OFFER, DeflateSocket, next_text, send_text};
use common::{DEADLINE, Server};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket on `path` with these extra handshake headers.
async fn connect(
    server: &Server,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let url = server.url(path).replacen("http", "ws", 1);
    let mut request = url.into_client_request().expect("a request");
    for (name, value) in headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")
        .map(|(socket, _)| socket)
}

/// Opens a socket and reads its `open` frame.
async fn open(server: &Server, path: &str, headers: &[(&str, &str)]) -> Socket {
    let mut socket = connect(server, path, headers).await.expect("handshake");
    let open = next_frame(&mut socket).await;
    assert_eq!(open["type"], "open", "{open}");
    socket
}

async fn next_frame(socket: &mut Socket) -> Value {
    tokio::time::timeout(DEADLINE, next_text(socket))
        .await
        .expect("a frame in time")
        .expect("a frame before the close")
}

/// Reads until the server's close frame and returns its code (frames
/// before it are skipped).
async fn close_code(socket: &mut Socket) -> CloseCode {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("no close within {DEADLINE:?}"),
            Ok(None) => panic!("the socket ended without a close frame"),
            Ok(Some(Err(error))) => panic!("the socket broke instead of closing: {error}"),
            Ok(Some(Ok(Message::Close(frame)))) => {
                return frame.expect("a close frame with a code").code;
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// How many events `topic` holds (a replay from the start).
async fn stored(server: &Server, topic: &str) -> u64 {
    let answer = server.publish(topic, "probe").await;
    answer["seq"].as_u64().expect("seq") - 1
}

#[tokio::test]
async fn a_cross_site_origin_is_refused_at_the_handshake() {
    let server = Server::start_with(|c| {
        c.access.allowed_origins = vec!["https://listed.example".into()];
    })
    .await;
    let refused = connect(
        &server,
        "/topics/news",
        &[("origin", "https://evil.example")],
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["type"], "urn:crier:problem:origin-not-allowed");
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    let mut socket = open(
        &server,
        "/topics/news",
        &[("origin", "https://listed.example")],
    )
    .await;
    let id = server.publish_id("news", "hi").await;
    let frame = next_frame(&mut socket).await;
    assert_eq!(
        frame,
        json!({"id": id, "type": "event", "topic": "news", "seq": 1, "data": "hi"})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_peer_that_answers_no_pings_is_closed() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(200)).await;
    let mut socket = open(&server, "/topics/quiet", &[]).await;
    // Not reading: no pong goes back. A ping after 200ms, no answer by
    // 400ms: the hub ends the socket's stream.
    server
        .wait_for_metric("crier_open_streams{transport=\"websocket\"} 0")
        .await;
    // Reading now answers the queued pings, which may fail on the closed
    // connection before the close frame is read: either way it is closed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("the socket is still open"),
            Ok(Some(Ok(Message::Close(frame)))) => {
                assert_eq!(frame.expect("a close frame").code, CloseCode::Error);
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(None | Some(Err(_))) => break,
        }
    }

    // A peer that reads (and so answers pings) stays.
    let mut socket = open(&server, "/topics/quiet", &[]).await;
    let quiet = tokio::time::timeout(Duration::from_millis(1500), next_text(&mut socket)).await;
    assert!(quiet.is_err(), "a reading peer was closed: {quiet:?}");
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_stores_nothing() {
    let server = Server::start_with(|c| c.limits.max_batch_bytes = 1024).await;
    let mut socket = open(&server, "/topics/big", &[]).await;
    let frame = json!({"type": "publish", "topic": "big", "data": "x".repeat(2000)});
    send_text(&mut socket, &frame.to_string()).await;
    assert_eq!(close_code(&mut socket).await, CloseCode::Size);
    assert_eq!(stored(&server, "big").await, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_malformed_frame_closes_with_1007_and_a_binary_one_with_1003_storing_nothing() {
    let server = Server::start().await;
    for bad in [
        "not json",
        r#"{"type":"publish","topic":"bad"}"#,
        r#"{"type":"subscribe","topic":"bad","data":"x"}"#,
        r#"{"type":"publish","topic":"bad","data":"x","extra":1}"#,
    ] {
        let mut socket = open(&server, "/topics/bad", &[]).await;
        send_text(&mut socket, bad).await;
        assert_eq!(close_code(&mut socket).await, CloseCode::Invalid, "{bad}");
    }
    let mut socket = open(&server, "/topics/bad", &[]).await;
    futures_util::SinkExt::send(&mut socket, Message::binary(b"{}".to_vec()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut socket).await, CloseCode::Unsupported);
    assert_eq!(stored(&server, "bad").await, 0);
    server.stop().await;
}

/// RFC 6455 §8.1: a text frame that is not UTF-8 fails the connection with
/// 1007, a close frame the client reads, not a dropped TCP connection.
#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007_and_stores_nothing() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let server = Server::start().await;
    let mut socket = open(&server, "/topics/utf8", &[]).await;
    let mut payload = br#"{"type":"publish","topic":"utf8","data":""#.to_vec();
    payload.extend_from_slice(&[0xff, 0xfe]);
    payload.extend_from_slice(br#""}"#);
    let frame = Frame::message(payload, OpCode::Data(Data::Text), true);
    futures_util::SinkExt::send(&mut socket, Message::Frame(frame))
        .await
        .unwrap();
    assert_eq!(close_code(&mut socket).await, CloseCode::Invalid);
    assert_eq!(stored(&server, "utf8").await, 0);
    server.stop().await;
}

/// A handshake's answer: status, headers and (for a refusal) its problem.
struct Answer {
    status: u16,
    headers: axum::http::HeaderMap,
    problem: Option<Value>,
}

/// Sends a WebSocket handshake for `/topics/shake` with these headers
/// (added to `Connection`/`Upgrade`, or to the extended CONNECT's
/// `:protocol` over HTTP/2), on a connection of its own.
async fn handshake(server: &Server, http2: bool, headers: &[(&str, &str)]) -> Answer {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let io = TokioIo::new(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    let mut request = axum::http::Request::builder();
    if http2 {
        request = request
            .method(axum::http::Method::CONNECT)
            .uri(format!("http://{}/topics/shake", server.addr))
            .extension(hyper::ext::Protocol::from_static("websocket"));
    } else {
        request = request
            .uri("/topics/shake")
            .header("host", server.addr.to_string())
            .header("connection", "upgrade")
            .header("upgrade", "websocket");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<bytes::Bytes>::new()).unwrap();
    let exchange = async {
        let response = if http2 {
            let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .expect("an HTTP/2 connection");
            tokio::spawn(conn);
            send.send_request(request).await.expect("an answer")
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("an HTTP/1.1 connection");
            tokio::spawn(conn.with_upgrades());
            send.send_request(request).await.expect("an answer")
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let problem = if status < 300 {
            None
        } else {
            assert_eq!(
                headers["content-type"], "application/problem+json",
                "{status}"
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            Some(serde_json::from_slice(&body).expect("a problem"))
        };
        Answer {
            status,
            headers,
            problem,
        }
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("an answer in time")
}

/// RFC 6455 §4.2.1, §4.4 and RFC 6454 §7.3, over HTTP/1.1 and over HTTP/2's
/// extended CONNECT (which has no key): a key that is not the base64 of 16
/// bytes and a repeated `Origin` are 400, a version other than 13 is 426
/// naming 13; each with a problem, and a proper handshake still opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_with_a_bad_key_two_origins_or_another_version_is_refused() {
    let server = Server::start_with(|c| {
        c.access.allowed_origins = vec!["https://a.example".into(), "https://b.example".into()];
    })
    .await;
    let key = ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    let v13 = ("sec-websocket-version", "13");
    let (a, b) = (
        ("origin", "https://a.example"),
        ("origin", "https://b.example"),
    );
    let kind = |answer: &Answer| answer.problem.as_ref().map(|p| p["type"].clone());
    let bad_upgrade = Some(json!("urn:crier:problem:bad-upgrade"));
    let repeated = Some(json!("urn:crier:problem:repeated-header"));

    for bad_key in [
        "short",
        "",
        "dGhlIHNhbXBsZSBub25j",
        "dGhlIHNhbXBsZSBub25jZSE=",
    ] {
        let answer = handshake(&server, false, &[("sec-websocket-key", bad_key), v13]).await;
        assert_eq!(
            (answer.status, kind(&answer)),
            (400, bad_upgrade.clone()),
            "{bad_key:?}"
        );
    }
    for http2 in [false, true] {
        let answer = handshake(&server, http2, &[key, v13, a, b]).await;
        assert_eq!(
            (answer.status, kind(&answer)),
            (400, repeated.clone()),
            "{http2}"
        );
        for version in ["8", "14", "13, 8"] {
            let answer = handshake(
                &server,
                http2,
                &[key, ("sec-websocket-version", version), a],
            )
            .await;
            assert_eq!(
                (answer.status, kind(&answer)),
                (426, bad_upgrade.clone()),
                "{http2}"
            );
            assert_eq!(answer.headers["sec-websocket-version"], "13", "{http2}");
        }
        let answer = handshake(&server, http2, &[key, v13, a]).await;
        assert_eq!(answer.status, if http2 { 200 } else { 101 });
    }
    // Not only handshakes: an SSE request with two origins is refused too.
    let response = server
        .client
        .get(server.url("/topics/shake"))
        .header("origin", "https://a.example")
        .header("origin", "https://b.example")
        .send()
        .await
        .unwrap();
    common::assert_problem(response, 400, "repeated-header").await;
    server.stop().await;
}

#[tokio::test]
async fn publishing_over_the_socket_needs_the_grant_and_is_acknowledged_with_its_id() {
    let server = Server::start_with(with_secret).await;
    let may = token(&["news"], &["news"]);
    let may_not = token(&[], &["news"]);

    let mut reader = open(
        &server,
        "/topics/news",
        &[("authorization", &format!("Bearer {may_not}"))],
    )
    .await;
    send_text(
        &mut reader,
        &json!({"type": "publish", "topic": "news", "data": "no", "ref": 1}).to_string(),
    )
    .await;
    let problem = next_frame(&mut reader).await;
    assert_eq!(problem["type"], "problem", "{problem}");
    assert_eq!(problem["ref"], 1);
    assert_eq!(
        problem["problem"]["type"],
        "urn:crier:problem:forbidden-topic"
    );
    assert_eq!(problem["problem"]["status"], 403);

    let mut writer = open(
        &server,
        "/topics/news",
        &[("authorization", &format!("Bearer {may}"))],
    )
    .await;
    send_text(
        &mut writer,
        &json!({"type": "publish", "topic": "news", "event": "note", "data": {"n": 1}, "ref": "a"})
            .to_string(),
    )
    .await;
    // The ack and the event itself (the writer reads the topic too), in
    // either order.
    let mut frames = [next_frame(&mut writer).await, next_frame(&mut writer).await];
    frames.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    let ack = &frames[0];
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["ref"], "a");
    assert_eq!(ack["topic"], "news");
    assert_eq!(ack["seq"], 1);
    let id = ack["id"].as_str().unwrap();
    let event = json!({"id": id, "type": "event", "topic": "news", "seq": 1, "event": "note", "data": "{\"n\":1}"});
    assert_eq!(frames[1], event);
    // Every reader sees it once, and the refused publish never happened.
    assert_eq!(next_frame(&mut reader).await, event);
    server.stop().await;
}

#[tokio::test]
async fn a_publish_retried_with_its_idempotency_key_is_stored_once() {
    let server = Server::start().await;
    let mut socket = open(&server, "/topics/other", &[]).await;
    let frame = |data: &str| {
        json!({"type": "publish", "topic": "once", "data": data, "idempotency_key": "k-1"})
            .to_string()
    };
    send_text(&mut socket, &frame("x")).await;
    let first = next_frame(&mut socket).await;
    assert_eq!(first["type"], "ack", "{first}");
    assert_eq!(first.get("replayed"), None);
    send_text(&mut socket, &frame("x")).await;
    let again = next_frame(&mut socket).await;
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["replayed"], true);
    send_text(&mut socket, &frame("y")).await;
    let reused = next_frame(&mut socket).await;
    assert_eq!(
        reused["problem"]["type"],
        "urn:crier:problem:idempotency-key-reused"
    );
    // The same key over HTTP is the same publisher's key: a replay.
    let response = server
        .client
        .post(server.url("/topics/once"))
        .header("idempotency-key", "k-1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(stored(&server, "once").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sockets_receive_the_identical_sequence() {
    const SOCKETS: usize = 1000;
    const EVENTS: usize = 20;
    let server = Server::start_with(|c| {
        c.limits.max_streams_per_ip = 10_000;
        c.limits.max_connections_per_ip = 10_000;
    })
    .await;
    let mut sockets = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS {
        sockets.push(open(&server, "/topics/crowd", &[]).await);
    }
    let mut expected = Vec::new();
    for n in 1..=EVENTS {
        let answer = server.publish("crowd", &format!("crowd-{n}")).await;
        expected.push(json!({
            "id": answer["id"], "type": "event", "topic": "crowd", "seq": n, "data": format!("crowd-{n}"),
        }));
    }
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(EVENTS);
                for _ in 0..EVENTS {
                    got.push(next_frame(&mut socket).await);
                }
                got
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.unwrap(), expected);
    }
    server.stop().await;
}

#[tokio::test]
async fn sockets_count_against_the_stream_cap_until_they_close() {
    let server = Server::start_with(|c| c.limits.max_streams_per_ip = 2).await;
    let first = open(&server, "/topics/cap", &[]).await;
    let _second = open(&server, "/topics/cap", &[]).await;
    match connect(&server, "/topics/cap", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
        }
        other => panic!("expected a 429, got {other:?}"),
    }
    drop(first);
    // The slot is released once the server has seen the socket go.
    common::eventually("the slot is released", || {
        connect(&server, "/topics/cap", &[])
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_ticket_opens_one_socket_once() {
    let server = Server::start_with(with_secret).await;
    let response = server
        .client
        .post(server.url("/tickets"))
        .bearer_auth(token(&[], &["news"]))
        .json(&json!({"topics": ["news"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let ticket: Value = response.json().await.unwrap();
    let path = format!("/topics/news?ticket={}", ticket["ticket"].as_str().unwrap());
    let mut socket = open(&server, &path, &[]).await;
    let id = server
        .client
        .post(server.url("/topics/news"))
        .bearer_auth(token(&["news"], &[]))
        .body("hi")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .clone();
    assert_eq!(next_frame(&mut socket).await["id"], id);
    match connect(&server, &path, &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("a spent ticket must be refused, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_socket_is_closed_with_1012_when_the_hub_shuts_down() {
    let server = Server::start().await;
    let mut socket = open(&server, "/topics/bye", &[]).await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(close_code(&mut socket).await, CloseCode::Restart);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_socket_whose_token_expires_gets_reauth_then_1008() {
    let server = Server::start_with(with_secret).await;
    let exp = common::auth::now() + 2;
    let token = common::auth::signed(&common::auth::claims(&[], &["news"], exp));
    let mut socket = open(
        &server,
        "/topics/news",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    let reauth = next_frame(&mut socket).await;
    assert_eq!(reauth, json!({"type": "reauth", "reason": "token-expired"}));
    assert_eq!(close_code(&mut socket).await, CloseCode::Policy);
    server.stop().await;
}

#[tokio::test]
async fn a_socket_on_a_public_topic_stops_publishing_when_its_token_expires() {
    let server = Server::start_with(|c| {
        with_secret(c);
        c.access.public_topics = vec!["lobby".into()];
        c.access.jwt.jwt_leeway = Duration::ZERO;
    })
    .await;
    let exp = common::auth::now() + 2;
    let token = common::auth::signed(&common::auth::claims(&["lobby"], &[], exp));
    let mut socket = open(
        &server,
        "/topics/lobby",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    let frame = json!({"type": "publish", "topic": "lobby", "data": "x", "ref": 1}).to_string();
    send_text(&mut socket, &frame).await;
    let mut answers = [next_frame(&mut socket).await, next_frame(&mut socket).await];
    answers.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    assert_eq!(answers[0]["type"], "ack", "{answers:?}");
    // The stream of a public topic does not end with the token.
    tokio::time::sleep_until(
        tokio::time::Instant::now()
            + Duration::from_secs(exp + 1).saturating_sub(Duration::from_secs(common::auth::now())),
    )
    .await;
    send_text(&mut socket, &frame).await;
    let refused = next_frame(&mut socket).await;
    assert_eq!(
        refused["problem"]["type"], "urn:crier:problem:token-expired",
        "{refused}"
    );
    // One event stored: a fresh publish is the second.
    let probe: Value = server
        .client
        .post(server.url("/topics/lobby"))
        .bearer_auth(token_for(&["lobby"]))
        .body("probe")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(probe["seq"], 2, "{probe}");
    server.stop().await;
}

fn token_for(publish: &[&str]) -> String {
    token(publish, &[])
}

/// RFC 8441: over HTTP/2 (here h2c with prior knowledge) a socket opens
/// with an extended CONNECT, and carries the same subscription: the same
/// `open`, replay from the client's position, and live events with the
/// same ids; and it counts as an open stream, so its connection outlives
/// the idle timeout for connections without streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_over_http2_opens_with_an_extended_connect_and_resumes_exactly() {
    use http_body_util::Empty;
    use hyper::ext::Protocol;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::tungstenite::protocol::Role;

    let server = Server::start_with(|c| {
        c.limits.idle_timeout = Duration::from_secs(1);
        c.transports.heartbeat = Duration::from_millis(300);
    })
    .await;
    let first = server.publish("h2", "one").await;
    server.publish("h2", "two").await;

    let io = TokioIo::new(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(io)
        .await
        .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    let request = axum::http::Request::builder()
        .method(axum::http::Method::CONNECT)
        .uri(format!(
            "http://{}/topics/h2?lastEventId={}",
            server.addr,
            first["id"].as_str().unwrap()
        ))
        .extension(Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let mut response = tokio::time::timeout(DEADLINE, send.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert_eq!(response.status(), 200);
    let upgraded = hyper::upgrade::on(&mut response).await.expect("upgraded");
    let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    assert_eq!(next_json(&mut socket).await["type"], "open");
    let replayed = next_json(&mut socket).await;
    assert_eq!(
        (
            replayed["type"].as_str(),
            replayed["seq"].as_u64(),
            replayed["data"].as_str()
        ),
        (Some("event"), Some(2), Some("two"))
    );
    // Pings come every heartbeat (answered as they are read); five of them
    // take the socket past the idle timeout.
    let mut pings = 0;
    while pings < 5 {
        let message = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("a ping in time")
            .expect("the socket still open")
            .expect("a frame");
        if matches!(message, Message::Ping(_)) {
            pings += 1;
        }
    }
    // The connection was not taken for idle (which would have sent GOAWAY):
    // it still opens new streams.
    let health = axum::http::Request::builder()
        .uri(format!("http://{}/healthz", server.addr))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let health = tokio::time::timeout(DEADLINE, send.send_request(health))
        .await
        .expect("an answer in time")
        .expect("a new stream on the socket's connection");
    assert_eq!(health.status(), 200);
    // Another connection publishes; the socket hears it.
    let publish = axum::http::Request::builder()
        .method(axum::http::Method::POST)
        .uri(format!("http://{}/topics/h2", server.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"three",
        )))
        .unwrap();
    let mut publisher = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, http_body_util::Full<bytes::Bytes>>(TokioIo::new(
            tokio::net::TcpStream::connect(server.addr).await.unwrap(),
        ))
        .await
        .unwrap();
    tokio::spawn(publisher.1);
    let answer = publisher.0.send_request(publish).await.unwrap();
    assert_eq!(answer.status(), 201);
    let live = next_json(&mut socket).await;
    assert_eq!(
        (
            live["type"].as_str(),
            live["seq"].as_u64(),
            live["data"].as_str()
        ),
        (Some("event"), Some(3), Some("three"))
    );
}

/// The next text frame of any socket, as JSON (pings are answered as read).
async fn next_json<S>(socket: &mut S) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("a frame in time")
            .expect("a frame before the end")
            .expect("a frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// What crier answers every permessage-deflate offer it accepts.
const DEFLATE_ANSWER: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The next JSON message of a permessage-deflate socket, with whether it
/// came compressed.
async fn next_deflated(socket: &mut DeflateSocket) -> (bool, Value) {
    tokio::time::timeout(DEADLINE, socket.next_json())
        .await
        .expect("a frame in time")
        .expect("a frame before the close")
}

/// RFC 7692: a socket that negotiated permessage-deflate gets every event
/// as a compressed message (RSV1) inflating to exactly the JSON a plain
/// socket of the same topic gets, control items plain; and a message the
/// client compressed is inflated and published.
#[tokio::test]
async fn a_deflate_socket_gets_each_event_compressed_and_may_publish_compressed() {
    let server = Server::start().await;
    let one = server.publish("pmd", "one").await;
    let two = server.publish("pmd", "two two two two two").await;
    let (mut deflated, answer) =
        DeflateSocket::connect(&server, "/topics/pmd?last=2", DEFLATE_OFFER).await;
    assert_eq!(answer.as_deref(), Some(DEFLATE_ANSWER));
    let mut plain = open(&server, "/topics/pmd?last=2", &[]).await;
    let (compressed, open) = next_deflated(&mut deflated).await;
    assert_eq!((compressed, open["type"].as_str()), (false, Some("open")));
    let event = |id: &Value, seq: u64, data: &str| json!({"id": id, "type": "event", "topic": "pmd", "seq": seq, "data": data});
    let replayed = [
        event(&one["id"], 1, "one"),
        event(&two["id"], 2, "two two two two two"),
    ];
    for expected in &replayed {
        assert_eq!(next_deflated(&mut deflated).await, (true, expected.clone()));
        assert_eq!(&next_frame(&mut plain).await, expected);
    }
    // A publish the client compressed (a browser compresses what it
    // sends), larger than the read buffer.
    let data = "compressible ".repeat(400);
    let publish = json!({"type": "publish", "topic": "pmd", "data": data, "ref": 7});
    deflated
        .send(0x1, publish.to_string().as_bytes(), true)
        .await;
    let mut frames = [
        next_deflated(&mut deflated).await,
        next_deflated(&mut deflated).await,
    ];
    frames.sort_by_key(|(_, f)| f["type"].as_str().unwrap().to_owned());
    let [(false, ack), (true, live)] = frames else {
        panic!("an ack (plain) and the event (compressed): {frames:?}")
    };
    assert_eq!(
        (
            ack["type"].as_str(),
            ack["ref"].as_u64(),
            ack["seq"].as_u64()
        ),
        (Some("ack"), Some(7), Some(3))
    );
    let expected = event(&ack["id"], 3, &data);
    assert_eq!(live, expected);
    assert_eq!(next_frame(&mut plain).await, expected);
    // And uncompressed messages still go as they are.
    let publish = json!({"type": "publish", "topic": "pmd", "data": "plain", "ref": 8});
    deflated
        .send(0x1, publish.to_string().as_bytes(), false)
        .await;
    let mut frames = [
        next_deflated(&mut deflated).await,
        next_deflated(&mut deflated).await,
    ];
    frames.sort_by_key(|(_, f)| f["type"].as_str().unwrap().to_owned());
    assert_eq!(frames[0].1["ref"], 8);
    assert_eq!(frames[1], (true, event(&frames[0].1["id"], 4, "plain")));
    assert_eq!(stored(&server, "pmd").await, 4);
    server.stop().await;
}

/// A compressed client message that inflates past `--max-batch-bytes`
/// (however small it came) closes the socket with 1009, storing nothing;
/// one that is not deflate data ends the socket.
#[tokio::test]
async fn a_compressed_message_inflating_past_the_limit_closes_with_1009() {
    let server = Server::start_with(|c| c.limits.max_batch_bytes = 2048).await;
    let (mut socket, answer) = DeflateSocket::connect(&server, "/topics/bomb", DEFLATE_OFFER).await;
    assert_eq!(answer.as_deref(), Some(DEFLATE_ANSWER));
    assert_eq!(next_deflated(&mut socket).await.1["type"], "open");
    let data = "a".repeat(10_000);
    let publish = json!({"type": "publish", "topic": "bomb", "data": data});
    socket.send(0x1, publish.to_string().as_bytes(), true).await;
    let close = tokio::time::timeout(DEADLINE, socket.next_message())
        .await
        .expect("a close in time")
        .expect("a close frame");
    assert_eq!((close.0, &close.2[..2]), (0x8, &1009u16.to_be_bytes()[..]));

    let (mut socket, _) = DeflateSocket::connect(&server, "/topics/bomb", DEFLATE_OFFER).await;
    assert_eq!(next_deflated(&mut socket).await.1["type"], "open");
    // Invalid deflate data, compressed or not: nothing to publish.
    socket
        .send_raw(0x80 | 0x40 | 0x1, &[0xff, 0xff, 0xff])
        .await;
    let end = tokio::time::timeout(DEADLINE, socket.next_message())
        .await
        .expect("the end in time");
    assert!(matches!(end, None | Some((0x8, _, _))), "{end:?}");
    assert_eq!(stored(&server, "bomb").await, 0);
    server.stop().await;
}

/// Offers crier cannot honour are declined, and the socket opens without
/// the extension (plain frames), over HTTP/1.1 and HTTP/2; the first
/// acceptable offer is answered; `--ws-deflate false` declines them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_offers_are_answered_or_declined_cleanly() {
    let key = ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    let v13 = ("sec-websocket-version", "13");
    let server = Server::start().await;
    for http2 in [false, true] {
        let opened = if http2 { 200 } else { 101 };
        for (offer, answer) in [
            ("permessage-deflate", Some(DEFLATE_ANSWER.to_owned())),
            (
                "permessage-deflate; server_max_window_bits=15; client_max_window_bits=10",
                Some(format!("{DEFLATE_ANSWER}; server_max_window_bits=15")),
            ),
            (
                "permessage-deflate; server_max_window_bits=9, permessage-deflate",
                Some(DEFLATE_ANSWER.to_owned()),
            ),
            ("permessage-deflate; server_max_window_bits=9", None),
            ("permessage-deflate; client_max_window_bits=7", None),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                None,
            ),
            ("permessage-deflate; unheard_of", None),
            ("x-webkit-deflate-frame", None),
        ] {
            let got = handshake(
                &server,
                http2,
                &[key, v13, ("sec-websocket-extensions", offer)],
            )
            .await;
            assert_eq!(got.status, opened, "{offer}");
            let extensions = got
                .headers
                .get("sec-websocket-extensions")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(extensions, answer, "{offer} over HTTP/2: {http2}");
        }
    }
    // A declined offer: the socket carries plain frames.
    let id = server.publish("shake", "plain").await["id"].clone();
    let (mut socket, answer) =
        DeflateSocket::connect(&server, "/topics/shake?last=1", "permessage-deflate; x=1").await;
    assert_eq!(answer, None);
    assert_eq!(next_deflated(&mut socket).await.1["type"], "open");
    assert_eq!(
        next_deflated(&mut socket).await,
        (
            false,
            json!({"id": id, "type": "event", "topic": "shake", "seq": 1, "data": "plain"})
        )
    );
    server.stop().await;

    let server = Server::start_with(|c| c.transports.ws_deflate = false).await;
    let (mut socket, answer) = DeflateSocket::connect(&server, "/topics/off", DEFLATE_OFFER).await;
    assert_eq!(answer, None);
    assert_eq!(next_deflated(&mut socket).await.1["type"], "open");
    let id = server.publish("off", "plain").await["id"].clone();
    assert_eq!(
        next_deflated(&mut socket).await,
        (
            false,
            json!({"id": id, "type": "event", "topic": "off", "seq": 1, "data": "plain"})
        )
    );
    server.stop().await;
}
