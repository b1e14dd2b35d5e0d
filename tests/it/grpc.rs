//! The gRPC face, beyond the shared transport suite (tests/transports.rs):
//! publishing with idempotency keys and batches, the bidirectional
//! `Connect`, refusals as status codes
//! carrying the problem's type, calls that end (cancelled, past their
//! deadline) releasing their subscription, and a client generated in
//! another language (Python's grpcio) that subscribes, publishes and
//! resumes across a restart.

use crate::common;

use std::time::Duration;

use common::auth::{self, with_secret};
use common::process::Process;
use common::transport::{grpc_client, item_to_ev};
use common::{DEADLINE, Ev, Server};
use crier::grpc::proto::{self, PublishBatchRequest, PublishRequest, SubscribeRequest};
use tonic::Code;
use tonic_types::StatusExt;

fn publish(topic: &str, data: &str, key: &str) -> PublishRequest {
    PublishRequest {
        topic: topic.into(),
        data: data.into(),
        event: String::new(),
        idempotency_key: key.into(),
    }
}

/// A request carrying `token` as a bearer token.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    request
}

/// The problem type's last part (`ErrorInfo.reason`) and the status code.
#[track_caller]
fn assert_refused(status: &tonic::Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("an ErrorInfo detail");
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, "crier");
    assert_eq!(info.metadata["type"], format!("urn:crier:problem:{reason}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_publish_is_numbered_like_an_http_one_and_a_retried_key_is_replayed() {
    let server = Server::start().await;
    let first = server.publish("news", "over http").await;
    let mut client = grpc_client(&server).await;
    let reply = client
        .publish(publish("news", "over grpc", "key-1"))
        .await
        .expect("publish")
        .into_inner();
    let epoch = first["id"].as_str().unwrap().split_once('.').unwrap().1;
    assert_eq!(
        reply,
        proto::PublishReply {
            topic: "news".into(),
            id: format!("2.{epoch}"),
            seq: 2,
            replayed: false,
        }
    );
    let retried = client
        .publish(publish("news", "over grpc", "key-1"))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(
        retried,
        proto::PublishReply {
            replayed: true,
            ..reply.clone()
        }
    );
    // The same key for another event is refused; nothing is stored.
    let reused = client
        .publish(publish("news", "something else", "key-1"))
        .await
        .expect_err("a reused key");
    assert_refused(&reused, Code::FailedPrecondition, "idempotency-key-reused");
    let named = client
        .publish(PublishRequest {
            event: "update".into(),
            ..publish("news", "a\nb", "")
        })
        .await
        .expect("named publish")
        .into_inner();
    assert_eq!(named.seq, 3);

    let mut sse = server.resume("/topics/news", "0").await;
    assert_eq!(
        sse.take(3).await,
        vec![
            Ev::new(&format!("1.{epoch}"), "message", "over http"),
            Ev::new(&format!("2.{epoch}"), "message", "over grpc"),
            Ev::new(&format!("3.{epoch}"), "update", "a\nb"),
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stores_every_event_or_none() {
    let server = Server::start().await;
    let mut client = grpc_client(&server).await;
    let bad = client
        .publish_batch(PublishBatchRequest {
            events: vec![publish("a", "1", ""), publish("no spaces", "2", "")],
        })
        .await
        .expect_err("an invalid item");
    assert_refused(&bad, Code::InvalidArgument, "malformed-batch");
    assert!(bad.message().contains("item 1"), "{bad:?}");
    let batch = || PublishBatchRequest {
        events: vec![publish("a", "1", "k-a"), publish("b", "2", "k-b")],
    };
    let stored = client
        .publish_batch(batch())
        .await
        .expect("batch")
        .into_inner();
    let seqs: Vec<(String, u64, bool)> = stored
        .events
        .iter()
        .map(|e| (e.topic.clone(), e.seq, e.replayed))
        .collect();
    assert_eq!(
        seqs,
        vec![("a".into(), 1, false), ("b".into(), 1, false)],
        "nothing of the refused batch was stored"
    );
    let again = client
        .publish_batch(batch())
        .await
        .expect("retry")
        .into_inner();
    assert!(again.events.iter().all(|e| e.replayed), "{again:?}");
    assert_eq!(again.events[0].id, stored.events[0].id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_status_codes_carrying_the_problem_type() {
    let server = Server::start_with(|config| {
        with_secret(config);
        config.limits.max_event_bytes = 16;
        config.limits.publish_rate = 1;
        config.limits.publish_burst = 1;
    })
    .await;
    let mut client = grpc_client(&server).await;
    let missing = client
        .publish(publish("news", "x", ""))
        .await
        .expect_err("no token");
    assert_refused(&missing, Code::Unauthenticated, "unauthenticated");
    let bad = client
        .publish(with_token(publish("news", "x", ""), "not-a-token"))
        .await
        .expect_err("a bad token");
    assert_refused(&bad, Code::Unauthenticated, "invalid-token");
    let token = auth::token(&["news"], &["news"]);
    let forbidden = client
        .publish(with_token(publish("other", "x", ""), &token))
        .await
        .expect_err("not granted");
    assert_refused(&forbidden, Code::PermissionDenied, "forbidden-topic");
    let too_large = client
        .publish(with_token(publish("news", &"x".repeat(17), ""), &token))
        .await
        .expect_err("over --max-event-bytes");
    assert_refused(&too_large, Code::InvalidArgument, "payload-too-large");
    let invalid = client
        .publish(with_token(publish("a b", "x", ""), &token))
        .await
        .expect_err("an invalid topic");
    assert_refused(&invalid, Code::InvalidArgument, "invalid-topic");
    let subscribe = client
        .subscribe(SubscribeRequest {
            topics: vec!["news".into()],
            ..Default::default()
        })
        .await
        .expect_err("a private topic without a token");
    assert_refused(&subscribe, Code::Unauthenticated, "unauthenticated");

    // The rate: one event, then refused with the time to wait.
    let mut items = client
        .subscribe(with_token(
            SubscribeRequest {
                topics: vec!["news".into()],
                ..Default::default()
            },
            &token,
        ))
        .await
        .expect("subscribe with a token")
        .into_inner();
    let stored = client
        .publish(with_token(publish("news", "ok", ""), &token))
        .await
        .expect("within the rate")
        .into_inner();
    let limited = client
        .publish(with_token(publish("news", "fast", ""), &token))
        .await
        .expect_err("over the rate");
    assert_refused(&limited, Code::ResourceExhausted, "publish-rate");
    let retry = limited.get_error_details().retry_info().cloned();
    let delay = retry.and_then(|r| r.retry_delay).expect("a retry delay");
    assert!(delay >= Duration::from_secs(1), "{delay:?}");
    let mut seen = Vec::new();
    while seen.is_empty() {
        let item = tokio::time::timeout(DEADLINE, items.message())
            .await
            .expect("an item in time")
            .expect("an item")
            .expect("the stream goes on");
        seen.extend(item_to_ev(item));
    }
    assert_eq!(seen, vec![Ev::new(&stored.id, "message", "ok")]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_and_one_past_its_deadline_release_their_subscription() {
    let server = Server::start().await;
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 0")
        .await;
    let mut client = grpc_client(&server).await;
    let request = || SubscribeRequest {
        topics: vec!["news".into()],
        ..Default::default()
    };
    let items = client
        .subscribe(request())
        .await
        .expect("subscribe")
        .into_inner();
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 1")
        .await;
    drop(items);
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 0")
        .await;

    let mut timed = tonic::Request::new(request());
    timed.set_timeout(Duration::from_millis(500));
    let mut items = client
        .subscribe(timed)
        .await
        .expect("subscribe")
        .into_inner();
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 1")
        .await;
    let ended = loop {
        match tokio::time::timeout(DEADLINE, items.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the call ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the deadline did not end the call"),
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 0")
        .await;
    // The connection is still good for HTTP and gRPC alike.
    server.publish("news", "after").await;
    server.stop().await;
}

/// What a `Connect` call shows: each message's reference with the event,
/// ack (`ack SEQ`) or problem (`problem TYPE`) it carries.
fn connect_line(message: proto::ServerMessage) -> Option<(String, String)> {
    use proto::server_message::Message;
    let shown = match message.message? {
        Message::Item(item) => {
            let ev = item_to_ev(item)?;
            format!("{} {} {}", ev.event, ev.id, ev.data)
        }
        Message::Ack(reply) => format!("ack {} {}", reply.seq, reply.replayed),
        Message::Problem(problem) => format!("problem {}", problem.r#type),
    };
    Some((message.reference, shown))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_subscribes_publishes_with_references_and_ends_on_cancel_or_deadline() {
    use proto::client_message::Message;
    use proto::{ClientMessage, Unsubscribe};

    let server = Server::start().await;
    let first = server.publish("a", "before").await;
    let epoch = first["id"]
        .as_str()
        .unwrap()
        .split_once('.')
        .unwrap()
        .1
        .to_owned();
    let mut client = grpc_client(&server).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<ClientMessage>(8);
    let send = |reference: &str, message: Message| {
        let tx = tx.clone();
        let message = ClientMessage {
            reference: reference.into(),
            message: Some(message),
        };
        async move { tx.send(message).await.expect("the call is open") }
    };
    send(
        "sub-a",
        Message::Subscribe(SubscribeRequest {
            topics: vec!["a".into()],
            last_event_id: "0".into(),
            last: None,
        }),
    )
    .await;
    let mut answers = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("connect")
        .into_inner();
    let mut next = async || loop {
        let message = tokio::time::timeout(DEADLINE, answers.message())
            .await
            .expect("a message in time")
            .expect("a message")
            .expect("the call goes on");
        if let Some(line) = connect_line(message) {
            return line;
        }
    };
    let line = |reference: &str, shown: String| (reference.to_owned(), shown);
    assert_eq!(
        next().await,
        line("sub-a", format!("message 1.{epoch} before"))
    );
    send(
        "pub-1",
        Message::Publish(publish("a", "over connect", "k1")),
    )
    .await;
    let mut got = vec![next().await, next().await];
    got.sort();
    assert_eq!(
        got,
        vec![
            line("pub-1", "ack 2 false".into()),
            line("sub-a", format!("message 2.{epoch} over connect")),
        ]
    );
    send(
        "pub-1",
        Message::Publish(publish("a", "over connect", "k1")),
    )
    .await;
    assert_eq!(next().await, line("pub-1", "ack 2 true".into()));
    send("pub-2", Message::Publish(publish("no spaces", "x", ""))).await;
    assert_eq!(
        next().await,
        line("pub-2", "problem urn:crier:problem:invalid-topic".into())
    );
    send(
        "sub-b",
        Message::Subscribe(SubscribeRequest {
            topics: vec!["b".into()],
            last: Some(0),
            ..Default::default()
        }),
    )
    .await;
    send(
        "unsub-a",
        Message::Unsubscribe(Unsubscribe {
            topics: vec!["a".into()],
        }),
    )
    .await;
    // Answered in order: once this publish is acked, both took effect.
    send("pub-3", Message::Publish(publish("b", "to b", ""))).await;
    let mut got = vec![next().await, next().await];
    got.sort();
    let b_id = got[1].1.split(' ').nth(1).unwrap_or_default().to_owned();
    assert_eq!(
        got,
        vec![
            line("pub-3", "ack 1 false".into()),
            line("sub-b", format!("message {b_id} to b")),
        ]
    );
    server.publish("a", "unheard").await;
    let after = server.publish("b", "heard").await;
    assert_eq!(
        next().await,
        line(
            "sub-b",
            format!("message {} heard", after["id"].as_str().unwrap())
        )
    );
    // Cancelling the call (both its halves) ends its subscriptions.
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 1")
        .await;
    drop((answers, tx));
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 0")
        .await;

    // A call past its deadline ends, and its subscriptions with it.
    let (tx, rx) = tokio::sync::mpsc::channel::<ClientMessage>(8);
    tx.send(ClientMessage {
        reference: "sub".into(),
        message: Some(Message::Subscribe(SubscribeRequest {
            topics: vec!["a".into()],
            ..Default::default()
        })),
    })
    .await
    .expect("the call is open");
    let mut timed = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    timed.set_timeout(Duration::from_millis(500));
    let mut answers = client.connect(timed).await.expect("connect").into_inner();
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 1")
        .await;
    let ended = loop {
        match tokio::time::timeout(DEADLINE, answers.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the call ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the deadline did not end the call"),
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded, "{ended:?}");
    server
        .wait_for_metric("crier_open_streams{transport=\"grpc\"} 0")
        .await;
    drop(tx);
    server.stop().await;
}

/// The Python helper, or why it cannot run.
fn python_with_grpcio() -> std::process::Command {
    let check = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .expect("python3 runs");
    assert!(
        check.status.success(),
        "the Python gRPC test needs `pip install grpcio grpcio-tools` (.ci/run installs them): {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut command = std::process::Command::new("python3");
    command.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/grpc_client.py"
    ));
    command
}

/// Runs the Python client's `args` against `addr`; returns the lines it
/// printed (one JSON object each).
fn python(addr: std::net::SocketAddr, args: &[&str]) -> Vec<serde_json::Value> {
    let output = python_with_grpcio()
        .arg(addr.to_string())
        .args(args)
        .output()
        .expect("the Python client runs");
    assert!(
        output.status.success(),
        "python {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpcio_client_publishes_subscribes_and_resumes_after_a_restart() {
    let dir = tempfile::tempdir().expect("a data directory");
    let data = dir.path().join("data");
    let data = data.to_str().expect("a UTF-8 path");
    let mut hub = Process::start(&["--data-dir", data]);
    let addr = hub.addr();
    let first = tokio::task::spawn_blocking(move || {
        let a = python(addr, &["publish", "news", "one", "key-1"]);
        let again = python(addr, &["publish", "news", "one", "key-1"]);
        let b = python(addr, &["publish", "news", "two", ""]);
        (a, again, b)
    })
    .await
    .expect("the Python client");
    let (one, again, two) = first;
    assert_eq!(one[0]["seq"], 1);
    assert_eq!(one[0]["replayed"], false);
    assert_eq!(again[0]["id"], one[0]["id"]);
    assert_eq!(again[0]["replayed"], true);
    assert_eq!(two[0]["seq"], 2);
    let id = |v: &serde_json::Value| v["id"].as_str().expect("an id").to_owned();
    let (id1, id2) = (id(&one[0]), id(&two[0]));
    let seen = tokio::task::spawn_blocking(move || python(addr, &["subscribe", "news", "0", "2"]))
        .await
        .expect("the Python client");
    assert_eq!(
        seen,
        vec![
            serde_json::json!({"id": id1, "topic": "news", "event": "", "data": "one", "seq": 1}),
            serde_json::json!({"id": id2, "topic": "news", "event": "", "data": "two", "seq": 2}),
        ]
    );
    hub.terminate();
    assert!(hub.wait_exit(DEADLINE).success(), "a clean stop");

    // The same data directory: the ids go on, and the last one resumes.
    let mut hub = Process::start(&["--data-dir", data]);
    let addr = hub.addr();
    let resumed = tokio::task::spawn_blocking(move || {
        let three = python(addr, &["publish", "news", "three", ""]);
        let seen = python(addr, &["subscribe", "news", &id1, "2"]);
        (three, seen)
    })
    .await
    .expect("the Python client");
    let (three, seen) = resumed;
    assert_eq!(three[0]["seq"], 3);
    let id3 = id(&three[0]);
    assert_eq!(
        seen,
        vec![
            serde_json::json!({"id": id(&two[0]), "topic": "news", "event": "", "data": "two", "seq": 2}),
            serde_json::json!({"id": id3, "topic": "news", "event": "", "data": "three", "seq": 3}),
        ]
    );
    hub.terminate();
    assert!(hub.wait_exit(DEADLINE).success(), "a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflects_readiness_and_reflection_lists_the_services() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = Server::start().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("an endpoint")
        .connect()
        .await
        .expect("a connection");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "crier.v1.Crier"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("a health check")
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Nope".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("an answer")
        .expect("an answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("not a service list: {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "crier.v1.Crier",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_for_gzip_gets_gzip_messages_with_the_same_items() {
    use tonic::codec::CompressionEncoding;

    let server = Server::start().await;
    let mut client = grpc_client(&server)
        .await
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip);
    let stored = client
        .publish(publish("news", &"compressible ".repeat(50), ""))
        .await
        .expect("a gzip publish")
        .into_inner();
    let response = client
        .subscribe(SubscribeRequest {
            topics: vec!["news".into()],
            last_event_id: "0".into(),
            last: None,
        })
        .await
        .expect("subscribe");
    assert_eq!(
        response
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    let mut items = response.into_inner();
    let mut seen = Vec::new();
    while seen.is_empty() {
        let item = tokio::time::timeout(DEADLINE, items.message())
            .await
            .expect("an item in time")
            .expect("an item")
            .expect("the stream goes on");
        seen.extend(item_to_ev(item));
    }
    assert_eq!(
        seen,
        vec![Ev::new(&stored.id, "message", &"compressible ".repeat(50))]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_reader_that_falls_behind_is_cut_off_like_a_slow_sse_one() {
    const EVENTS: usize = 300;
    let server = Server::start_with(|c| c.transports.subscriber_backlog = 16).await;
    let mut slow = grpc_client(&server).await;
    let request = SubscribeRequest {
        topics: vec!["t".into()],
        ..Default::default()
    };
    // Not read while the events are published: HTTP/2 flow control holds
    // the hub's writes, and its backlog fills.
    let mut items = slow
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();
    let mut fast = server.subscribe("/topics/t").await;
    let mut expected = Vec::new();
    for i in 0..EVENTS {
        let data = format!("{i:05}{}", "x".repeat(16 * 1024));
        let id = server.publish_id("t", &data).await;
        expected.push(Ev::new(&id, "message", &data));
        assert_eq!(fast.next().await, expected[i]);
    }

    // Reading again: a gap-free prefix, then RESOURCE_EXHAUSTED (the call
    // learns it lagged at its next turn).
    let mut got = Vec::new();
    let ended = loop {
        match tokio::time::timeout(DEADLINE, items.message()).await {
            Ok(Ok(Some(item))) => got.extend(item_to_ev(item)),
            Ok(Ok(None)) => panic!("the call ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the lagging call was not ended"),
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(!got.is_empty(), "the slow reader got the start of the feed");
    assert!(got.len() < EVENTS, "the slow reader was cut off");
    assert_eq!(got[..], expected[..got.len()]);
    server
        .wait_for_metric("crier_stream_ends_total{transport=\"grpc\",reason=\"slow_consumer\"} 1")
        .await;

    // Resuming with its last id, it loses nothing.
    let mut resumed = grpc_client(&server)
        .await
        .subscribe(SubscribeRequest {
            topics: vec!["t".into()],
            last_event_id: got.last().expect("an event").id.clone(),
            last: None,
        })
        .await
        .expect("resume")
        .into_inner();
    let mut rest = Vec::new();
    while rest.len() < EVENTS - got.len() {
        let item = tokio::time::timeout(DEADLINE, resumed.message())
            .await
            .expect("an item in time")
            .expect("an item")
            .expect("the stream goes on");
        rest.extend(item_to_ev(item));
    }
    assert_eq!(rest[..], expected[got.len()..]);
    server.stop().await;
}

/// The events of `items` until `n` arrived.
async fn take_events(items: &mut tonic::Streaming<proto::Item>, n: usize) -> Vec<Ev> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let item = tokio::time::timeout(DEADLINE, items.message())
            .await
            .expect("an item in time")
            .expect("an item")
            .expect("the stream goes on");
        seen.extend(item_to_ev(item));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_is_served_over_tls_by_alpn_h2_on_the_same_port() {
    use rustls_pki_types::pem::PemObject;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = common::tls::TestCerts::new();
    let (cert, key) = (certs.cert.clone(), certs.key.clone());
    let server = Server::start_with(|config| {
        config.listen.tls_cert = Some(cert);
        config.listen.tls_key = Some(key);
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(&certs.ca_cert).expect("the CA"))
        .expect("a root");
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = std::sync::Arc::new(tls);
    let addr = server.addr;
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("a name");
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .expect("a TLS connection");
    let mut client = proto::crier_client::CrierClient::new(channel);
    let mut items = client
        .subscribe(SubscribeRequest {
            topics: vec!["secure".into()],
            last_event_id: "0".into(),
            last: None,
        })
        .await
        .expect("subscribe over TLS")
        .into_inner();
    let reply = client
        .publish(publish("secure", "over tls", ""))
        .await
        .expect("publish over TLS")
        .into_inner();
    assert_eq!(reply.seq, 1);
    assert_eq!(
        take_events(&mut items, 1).await,
        vec![Ev::new(&reply.id, "message", "over tls")]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_in_metadata_opens_one_subscription_and_an_expiring_token_ends_with_reauth() {
    let server = Server::start_with(with_secret).await;
    let token = auth::token(&["t"], &["t"]);
    let answer: serde_json::Value = server
        .client
        .post(server.url("/tickets"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "topics": ["t"] }))
        .send()
        .await
        .expect("a ticket request")
        .json()
        .await
        .expect("a ticket");
    let ticket = answer["ticket"].as_str().expect("a ticket").to_owned();
    let with_ticket = || {
        let mut request = tonic::Request::new(SubscribeRequest {
            topics: vec!["t".into()],
            last_event_id: "0".into(),
            last: None,
        });
        request
            .metadata_mut()
            .insert("crier-ticket", ticket.parse().expect("metadata"));
        request
    };
    let mut client = grpc_client(&server).await;
    let mut items = client
        .subscribe(with_ticket())
        .await
        .expect("subscribe with a ticket")
        .into_inner();
    let reply = client
        .publish(with_token(publish("t", "by ticket", ""), &token))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(
        take_events(&mut items, 1).await,
        vec![Ev::new(&reply.id, "message", "by ticket")]
    );
    let used = client
        .subscribe(with_ticket())
        .await
        .expect_err("a ticket is single-use");
    assert_refused(&used, Code::Unauthenticated, "invalid-ticket");

    // A token that expires in two seconds: `reauth`, then UNAUTHENTICATED.
    let short = auth::signed(&auth::claims(&[], &["t"], auth::now() + 2));
    let mut items = client
        .subscribe(with_token(
            SubscribeRequest {
                topics: vec!["t".into()],
                ..Default::default()
            },
            &short,
        ))
        .await
        .expect("subscribe")
        .into_inner();
    let mut seen = Vec::new();
    let ended = loop {
        match tokio::time::timeout(DEADLINE, items.message()).await {
            Ok(Ok(Some(item))) => seen.extend(item_to_ev(item)),
            Ok(Ok(None)) => panic!("the call ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the expiry did not end the call"),
        }
    };
    assert_eq!(
        seen,
        vec![Ev::new("", "reauth", r#"{"reason":"token-expired"}"#)]
    );
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_turns_health_to_not_serving_and_ends_calls_with_a_farewell() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut crier = Process::start(&[
        "--drain-delay",
        "1s",
        "--drain-window",
        "300ms",
        "--retry",
        "400ms",
    ]);
    let channel = tonic::transport::Endpoint::from_shared(crier.url(""))
        .expect("an endpoint")
        .connect()
        .await
        .expect("a connection");
    let mut client = proto::crier_client::CrierClient::new(channel.clone());
    let health = HealthClient::new(channel);
    let mut items = client
        .subscribe(SubscribeRequest {
            topics: vec!["t".into()],
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    crier.terminate();
    common::eventually("health NOT_SERVING", || {
        let mut health = health.clone();
        async move {
            let answer = health
                .check(HealthCheckRequest::default())
                .await
                .map_err(|status| status.to_string())?
                .into_inner();
            (answer.status == ServingStatus::NotServing as i32)
                .then_some(())
                .ok_or_else(|| format!("{answer:?}"))
        }
    })
    .await;
    let mut farewell = None;
    let ended = loop {
        match tokio::time::timeout(DEADLINE, items.message()).await {
            Ok(Ok(Some(proto::Item {
                item: Some(proto::item::Item::Farewell(last)),
            }))) => farewell = Some(last),
            Ok(Ok(Some(item))) => assert!(farewell.is_none(), "{item:?} after the farewell"),
            Ok(Ok(None)) => panic!("the call ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the drain did not end the call"),
        }
    };
    let farewell = farewell.expect("a farewell item");
    assert!(farewell.retry_ms <= 400, "{farewell:?}");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
        .await
        .expect("the wait");
    assert!(status.success(), "{status:?}");
}

/// A gRPC call's answer is HTTP 200 whatever became of it: the request log
/// records the call's own status, `grpc_status`: 0 for a publish served,
/// 3 (`InvalidArgument`) at INFO for one refused, and the status its
/// trailers carried for a stream that ended (here past its deadline, 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_records_each_calls_grpc_status() {
    let crier = Process::start_with_env(
        &["--log-format", "json"],
        &[("RUST_LOG", "debug,hyper=info,h2=info")],
    );
    let channel = tonic::transport::Endpoint::from_shared(crier.base.clone())
        .expect("an endpoint")
        .connect_timeout(DEADLINE)
        .connect()
        .await
        .expect("a gRPC connection");
    let mut client = proto::crier_client::CrierClient::new(channel);
    client
        .publish(publish("news", "ok", ""))
        .await
        .expect("publish");
    let refused = client
        .publish(publish("not a topic!", "no", ""))
        .await
        .expect_err("a bad topic is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut timed = tonic::Request::new(SubscribeRequest {
        topics: vec!["news".into()],
        ..Default::default()
    });
    timed.set_timeout(Duration::from_millis(300));
    let mut items = client
        .subscribe(timed)
        .await
        .expect("subscribe")
        .into_inner();
    let ended = loop {
        match tokio::time::timeout(DEADLINE, items.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the call ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the deadline did not end the call"),
        }
    };
    assert_eq!(ended.code(), Code::DeadlineExceeded);
    let calls = || -> Vec<serde_json::Value> {
        crier
            .log()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .filter(|l: &serde_json::Value| {
                l["span"]["name"] == "request" && l["grpc_status"].is_number()
            })
            .collect()
    };
    common::wait_for("three call lines", || calls().len() >= 3).await;
    let line = |path: &str, grpc_status: u64| {
        calls()
            .into_iter()
            .find(|l| l["span"]["path"] == path && l["grpc_status"] == grpc_status)
            .unwrap_or_else(|| panic!("no {path} line with {grpc_status}: {:#?}", calls()))
    };
    let served = line("/crier.v1.Crier/Publish", 0);
    assert_eq!(served["level"], "DEBUG");
    assert_eq!(served["status"], 200);
    let refused = line("/crier.v1.Crier/Publish", 3);
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["message"], "refused");
    let ended = line("/crier.v1.Crier/Subscribe", 4);
    assert_eq!(ended["level"], "DEBUG");
    assert_eq!(ended["message"], "ended");
}
