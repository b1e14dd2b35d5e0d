//! What an operator relies on: readiness that notices a stalled live feed,
//! and a drain on SIGTERM that moves subscribers to other nodes as a trickle,
//! without losing or repeating an event. The real binary, on real Redis.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::process::Process;
use common::redis::{Proxy, RedisServer};
use common::*;

/// `/readyz`'s status and problem type (`None` when ready).
async fn readiness(client: &reqwest::Client, base: &str) -> (u16, Option<String>) {
    let Ok(response) = client.get(format!("{base}/readyz")).send().await else {
        return (0, None);
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let kind = body["type"].as_str().map(str::to_owned);
    (status, kind)
}

/// Waits until `/readyz` answers `status` (and, if given, that problem
/// type); returns how long that took.
async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    status: u16,
    kind: Option<&str>,
) -> Duration {
    let started = Instant::now();
    let deadline = started + DEADLINE;
    loop {
        let (got, got_kind) = readiness(client, base).await;
        let kind_matches = kind.is_none_or(|k| got_kind.as_deref() == Some(k));
        if got == status && kind_matches {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status} {kind:?}; last {got} {got_kind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node with canaries every 100 ms, overdue after 600 ms.
fn canary_node(url: &str) -> Process {
    Process::start(&[
        "--redis",
        url,
        "--redis-timeout",
        "500ms",
        "--canary-interval",
        "100ms",
        "--canary-timeout",
        "600ms",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_redis_is_frozen_and_recovers_when_it_goes_on() {
    let redis = RedisServer::start();
    let node = canary_node(&redis.url());
    let client = common::client();
    wait_ready(&client, &node.base, 200, None).await;
    {
        let _paused = redis.pause();
        // Commands time out, and canaries stop coming back: either way, 503.
        wait_ready(&client, &node.base, 503, None).await;
        let (_, kind) = readiness(&client, &node.base).await;
        assert!(
            matches!(
                kind.as_deref(),
                Some("urn:crier:problem:feed-stalled" | "urn:crier:problem:store-unavailable")
            ),
            "{kind:?}"
        );
    }
    wait_ready(&client, &node.base, 200, None).await;
    // Still serving: the live feed works end to end.
    let mut sub = node.subscribe("/topics/t").await;
    let id = node.publish_id("t", "after the freeze").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&id, "message", "after the freeze")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_live_feed_fails_readiness_though_redis_answers_commands() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let node = canary_node(&proxy.url());
    let client = common::client();
    wait_ready(&client, &node.base, 200, None).await;

    // Only the pub/sub connection stalls: PING and publishes still work, so
    // only the canary can tell.
    proxy.freeze_subscribers();
    let stalled_after = wait_ready(
        &client,
        &node.base,
        503,
        Some("urn:crier:problem:feed-stalled"),
    )
    .await;
    assert!(
        stalled_after >= Duration::from_millis(300),
        "noticed after {stalled_after:?}, before any canary could be overdue"
    );
    let publish = client
        .post(node.url("/topics/t"))
        .body("stored while the feed stalls")
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 201);

    proxy.thaw_subscribers();
    wait_ready(&client, &node.base, 200, None).await;
    common::wait_for("the stall and its end logged", || {
        let log = node.log();
        log.iter().any(|l| l.contains("has stalled"))
            && log.iter().any(|l| l.contains("flows again"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_at_once_serves_new_streams_for_the_delay_then_ends_them_with_a_retry_hint()
 {
    // The embedded store: ready until draining.
    let delay = Duration::from_millis(1500);
    let mut crier = Process::start(&[
        "--drain-delay",
        "1500ms",
        "--drain-window",
        "0s",
        "--retry",
        "400ms",
    ]);
    let client = common::client();
    assert_eq!(readiness(&client, &crier.base).await, (200, None));
    let mut before = SseClient::connect(&client, &crier.url("/topics/t"), None).await;

    let signalled = Instant::now();
    crier.terminate();
    wait_ready(
        &client,
        &crier.base,
        503,
        Some("urn:crier:problem:draining"),
    )
    .await;
    assert!(
        signalled.elapsed() < delay,
        "/readyz failed only after the delay"
    );
    let health = client.get(crier.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "alive while draining");

    // A load balancer has not noticed yet: a new stream is still served.
    let mut during = SseClient::connect(&client, &crier.url("/topics/t"), None).await;
    assert_eq!(during.status, 200);
    let id = client
        .post(crier.url("/topics/t"))
        .body("while draining")
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(signalled.elapsed() < delay, "the test itself was too slow");
    let event = Ev::new(&id, "message", "while draining");
    for sub in [&mut before, &mut during] {
        assert_eq!(sub.next().await, event);
        assert_eq!(sub.until_end().await, vec![]);
        assert!(signalled.elapsed() >= delay, "closed before the delay");
        let raw = sub.raw_text();
        let hint = retry_hint(&raw).unwrap_or_else(|| panic!("no retry hint at the end: {raw:?}"));
        assert!(hint <= 400, "{raw:?}");
    }
    let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The `retry:` a stream's last bytes suggest.
fn retry_hint(raw: &str) -> Option<u64> {
    let tail = raw.strip_suffix(": crier draining\n\n")?;
    let line = tail.strip_suffix('\n')?.rsplit('\n').next()?;
    line.strip_prefix("retry: ")?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_or_a_second_sigterm_cuts_a_drain_short() {
    let client = common::client();
    for second in ["SIGTERM", "SIGINT"] {
        let mut crier = Process::start(&["--drain-delay", "30s", "--drain-window", "30s"]);
        let mut sub = SseClient::connect(&client, &crier.url("/topics/t"), None).await;
        crier.terminate();
        wait_ready(
            &client,
            &crier.base,
            503,
            Some("urn:crier:problem:draining"),
        )
        .await;
        let stopping = Instant::now();
        if second == "SIGTERM" {
            crier.terminate();
        } else {
            crier.interrupt();
        }
        assert_eq!(sub.until_end().await, vec![]);
        let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
            .await
            .unwrap();
        assert!(status.success(), "{second}: {status:?}");
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "{second} did not cut the drain short"
        );
    }
}

/// What one subscriber saw: every event, over both nodes, and when and how
/// its stream on the draining node ended.
struct Seen {
    events: Vec<Ev>,
    closed_at: Instant,
    hint_ms: u64,
}

/// Subscribes on `a`; when the stream ends, waits its `retry:` hint (as
/// EventSource does) and resumes on `b` with its Last-Event-ID, reading
/// until the event `end`.
async fn drained_subscriber(
    client: reqwest::Client,
    a: String,
    b: String,
    connected: Arc<AtomicUsize>,
    got_one: Arc<AtomicUsize>,
    resumed: Arc<AtomicUsize>,
) -> Seen {
    let mut sub = SseClient::connect(&client, &format!("{a}/topics/drain"), None).await;
    assert_eq!(sub.status, 200);
    connected.fetch_add(1, Ordering::SeqCst);
    let mut events = Vec::new();
    while let Some(event) = sub.next_or_end().await {
        events.push(event);
        if events.len() == 1 {
            got_one.fetch_add(1, Ordering::SeqCst);
        }
    }
    let closed_at = Instant::now();
    let raw = sub.raw_text();
    let hint_ms = retry_hint(&raw).unwrap_or_else(|| panic!("no retry hint at the end: {raw:?}"));
    drop(sub);
    tokio::time::sleep(Duration::from_millis(hint_ms)).await;
    let last = events.last().expect("an event before the drain").id.clone();
    let mut sub =
        SseClient::connect(&client, &format!("{b}/topics/drain"), Some(last.as_str())).await;
    assert_eq!(sub.status, 200);
    resumed.fetch_add(1, Ordering::SeqCst);
    loop {
        let event = sub.next().await;
        let end = event.data == "end";
        events.push(event);
        if end {
            break;
        }
    }
    Seen {
        events,
        closed_at,
        hint_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_moves_200_subscribers_to_another_node_spread_over_the_window_without_loss() {
    const SUBSCRIBERS: usize = 200;
    let delay = Duration::from_millis(1500);
    let window = Duration::from_millis(2500);
    let redis = RedisServer::start();
    let mut a = Process::start(&[
        "--redis",
        &redis.url(),
        "--drain-delay",
        "1500ms",
        "--drain-window",
        "2500ms",
        "--retry",
        "200ms",
    ]);
    let b = Process::start(&["--redis", &redis.url()]);
    let client = common::client();
    let (connected, got_one, resumed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            tokio::spawn(drained_subscriber(
                client.clone(),
                a.base.clone(),
                b.base.clone(),
                connected.clone(),
                got_one.clone(),
                resumed.clone(),
            ))
        })
        .collect();
    wait_for("every subscriber connected to a", || {
        connected.load(Ordering::SeqCst) == SUBSCRIBERS
    })
    .await;

    // Events published on b throughout, every 20 ms, until told to stop;
    // then `end`.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (client, url, stop, sent) = (
            client.clone(),
            b.url("/topics/drain"),
            stop.clone(),
            sent.clone(),
        );
        tokio::spawn(async move {
            let mut published = Vec::new();
            let mut n = 0;
            loop {
                let done = stop.load(Ordering::SeqCst);
                let data = if done {
                    "end".to_owned()
                } else {
                    n += 1;
                    format!("event {n}")
                };
                let answer: serde_json::Value = client
                    .post(&url)
                    .body(data.clone())
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let id = answer["id"].as_str().expect("published").to_owned();
                published.push(Ev::new(&id, "message", &data));
                sent.fetch_add(1, Ordering::SeqCst);
                if done {
                    return published;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_for("every subscriber got an event on a", || {
        got_one.load(Ordering::SeqCst) == SUBSCRIBERS
    })
    .await;

    let signalled = Instant::now();
    a.terminate();
    wait_ready(&client, &a.base, 503, Some("urn:crier:problem:draining")).await;
    assert!(signalled.elapsed() < delay / 2, "/readyz was slow to fail");
    // A new subscription during the delay is served.
    let mut late = SseClient::connect(&client, &a.url("/topics/drain"), None).await;
    assert_eq!(late.status, 200);
    let first = late.next().await;
    assert!(first.data.starts_with("event "), "{first:?}");
    assert!(signalled.elapsed() < delay, "the test itself was too slow");
    drop(late);

    let status = tokio::task::spawn_blocking(move || a.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let exited = signalled.elapsed();
    wait_for("every subscriber resumed on b", || {
        resumed.load(Ordering::SeqCst) == SUBSCRIBERS
    })
    .await;
    // A few more events after everyone moved, then `end`.
    let moved = sent.load(Ordering::SeqCst);
    wait_for("five more events published on b", || {
        sent.load(Ordering::SeqCst) >= moved + 5
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let published = publisher.await.unwrap();

    let mut closes = Vec::with_capacity(SUBSCRIBERS);
    for (i, subscriber) in subscribers.into_iter().enumerate() {
        let seen = subscriber.await.unwrap();
        // Every event exactly once, in order: the first the subscriber got
        // is the first published (all subscribed before it), the rest follow.
        assert_eq!(
            seen.events, published,
            "subscriber {i} saw a different feed"
        );
        assert!(seen.hint_ms <= 200, "retry hint {} ms", seen.hint_ms);
        closes.push(seen.closed_at - signalled);
    }
    closes.sort();
    let (first, last) = (closes[0], closes[SUBSCRIBERS - 1]);
    assert!(
        first >= delay,
        "first close after {first:?}, before the delay"
    );
    let slack = Duration::from_millis(1000);
    assert!(last <= delay + window + slack, "last close after {last:?}");
    assert!(
        exited <= delay + window + slack + slack,
        "exited after {exited:?}"
    );
    // Spread: no tenth of the window holds more than a quarter of the closes
    // (an even spread puts a tenth in each).
    assert_spread(&closes, delay, window, SUBSCRIBERS / 4, 8);
}

/// Asserts that `closes` (each after the start of a drain) spread over the
/// `window` after its `delay`: no tenth of it holds more than `most`, and
/// at least `tenths` tenths hold some.
fn assert_spread(
    closes: &[Duration],
    delay: Duration,
    window: Duration,
    most: usize,
    tenths: usize,
) {
    let mut per_tenth = [0usize; 10];
    for close in closes {
        let into = close.saturating_sub(delay).as_secs_f64() / window.as_secs_f64();
        per_tenth[((into * 10.0) as usize).min(9)] += 1;
    }
    assert!(
        per_tenth.iter().all(|n| *n <= most),
        "closes per tenth of the window: {per_tenth:?}"
    );
    assert!(
        per_tenth.iter().filter(|n| **n > 0).count() >= tenths,
        "closes per tenth of the window: {per_tenth:?}"
    );
}

/// At `RUST_LOG=trace`, with a token, a ticket, idempotency keys and event
/// data crossing HTTP, a WebSocket and SSE, no log line holds any of them
/// (the WebSocket library logs whole messages at trace: crier silences it
/// whatever `RUST_LOG` says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_ticket_key_or_event_data_is_logged_even_at_trace() {
    use common::auth::{SECRET, token};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mut crier = Process::start_with_env(
        &[],
        &[
            ("RUST_LOG", "trace,tungstenite::protocol=trace"),
            ("CRIER_JWT_SECRET", SECRET),
        ],
    );
    let client = common::client();
    // HTTP/2 too: its library logs every frame it reads at debug.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let token = token(&["*"], &["*"]);
    let published = h2
        .post(crier.url("/topics/logged"))
        .bearer_auth(&token)
        .header("idempotency-key", "key-over-http-5e1d")
        .body("body-over-http-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(published.status(), 201);

    let mut request = crier
        .url("/topics/logged")
        .replacen("http", "ws", 1)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut socket, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    let frame = serde_json::json!({
        "type": "publish",
        "topic": "logged",
        "data": "body-over-websocket-9c1e",
        "idempotency_key": "key-over-websocket-2b7c",
    });
    socket.send(Message::text(frame.to_string())).await.unwrap();
    // The ack, and the event itself back on the socket.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|f: &serde_json::Value| f["data"] == "body-over-websocket-9c1e")
    {
        let message = tokio::time::timeout(DEADLINE, socket.next())
            .await
            .expect("frames in time")
            .expect("an open socket")
            .unwrap();
        if let Message::Text(text) = message {
            seen.push(serde_json::from_str(&text).unwrap());
        }
    }
    assert!(seen.iter().any(|f| f["type"] == "ack"), "{seen:?}");

    let ticket: serde_json::Value = client
        .post(crier.url("/tickets"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"topics": ["logged"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = ticket["ticket"].as_str().unwrap().to_owned();
    let url = crier.url(&format!("/topics/logged?last=2&ticket={ticket}"));
    let mut sse = SseClient::connect(&h2, &url, None).await;
    let data: Vec<String> = sse.take(2).await.into_iter().map(|e| e.data).collect();
    assert_eq!(data, ["body-over-http-7f3a", "body-over-websocket-9c1e"]);
    drop(sse);
    drop(socket);

    crier.terminate();
    crier.wait_exit(DEADLINE);
    let log = crier.full_log();
    assert!(
        log.iter().any(|l| l.contains(" TRACE ")),
        "the log is at trace level"
    );
    for secret in [
        token.as_str(),
        ticket.as_str(),
        "key-over-http-5e1d",
        "key-over-websocket-2b7c",
        "body-over-http-7f3a",
        "body-over-websocket-9c1e",
    ] {
        let leaks: Vec<&String> = log.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret:?} logged: {leaks:#?}");
    }
}
/// How one stream on a draining node ended, whatever its transport.
struct Ended {
    /// Every event's data, in order.
    events: Vec<String>,
    /// The retry hint of its last words (a `farewell` frame, or `retry:`).
    hint_ms: Option<u64>,
    /// A WebSocket's close code and reason.
    close: Option<(u16, String)>,
    /// When the stream ended, after the signal.
    after: Duration,
}

/// Reads a WebSocket until the server closes it; `ready` is counted once
/// the socket has its `open` frame.
async fn drained_socket(
    url: String,
    ready: Arc<AtomicUsize>,
    signalled: Arc<OnceInstant>,
) -> Ended {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let url = url.replacen("http", "ws", 1);
    let (mut socket, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("WebSocket handshake");
    let (mut events, mut hint_ms, mut close) = (Vec::new(), None, None);
    loop {
        let message = tokio::time::timeout(DEADLINE * 2, socket.next())
            .await
            .expect("the socket closed in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("open") => {
                        ready.fetch_add(1, Ordering::SeqCst);
                    }
                    Some("event") => events.push(frame["data"].as_str().unwrap().to_owned()),
                    Some("farewell") => {
                        assert!(close.is_none() && hint_ms.is_none(), "{frame}");
                        hint_ms = frame["retry"].as_u64();
                    }
                    _ => panic!("unexpected frame {frame}"),
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close frame with a code");
                close = Some((u16::from(frame.code), frame.reason.to_string()));
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break,
        }
    }
    Ended {
        events,
        hint_ms,
        close,
        after: signalled.elapsed(),
    }
}

/// Reads an SSE stream until the server ends it.
async fn drained_stream(
    url: String,
    ready: Arc<AtomicUsize>,
    signalled: Arc<OnceInstant>,
) -> Ended {
    let client = common::client();
    let mut sub = SseClient::connect(&client, &url, None).await;
    assert_eq!(sub.status, 200);
    ready.fetch_add(1, Ordering::SeqCst);
    let mut events = Vec::new();
    while let Some(event) = sub.next_or_end().await {
        events.push(event.data);
    }
    Ended {
        events,
        hint_ms: retry_hint(&sub.raw_text()),
        close: None,
        after: signalled.elapsed(),
    }
}

/// The moment of the signal, set once the streams are open.
#[derive(Default)]
struct OnceInstant(std::sync::OnceLock<Instant>);

impl OnceInstant {
    fn elapsed(&self) -> Duration {
        self.0.get().expect("the signal was sent").elapsed()
    }
}

/// Drains a node holding `sockets` WebSockets and `streams` SSE streams
/// (delay 500 ms, window 2 s, retry 300 ms): every stream hears the events
/// published before, then its last words with a retry hint (a WebSocket: a
/// `farewell` frame, then close 1012 `draining`), at its own moment of the
/// window; the closes spread over it, and the node exits after the last.
async fn drain_node(sockets: usize, streams: usize) {
    let delay = Duration::from_millis(500);
    let window = Duration::from_millis(2000);
    let mut crier = Process::start(&[
        "--drain-delay",
        "500ms",
        "--drain-window",
        "2s",
        "--retry",
        "300ms",
    ]);
    let url = crier.url("/topics/drain");
    let ready = Arc::new(AtomicUsize::new(0));
    let signalled = Arc::new(OnceInstant::default());
    let mut tasks: Vec<_> = (0..sockets)
        .map(|_| {
            tokio::spawn(drained_socket(
                url.clone(),
                ready.clone(),
                signalled.clone(),
            ))
        })
        .collect();
    tasks.extend((0..streams).map(|_| {
        tokio::spawn(drained_stream(
            url.clone(),
            ready.clone(),
            signalled.clone(),
        ))
    }));
    wait_for("every stream open", || {
        ready.load(Ordering::SeqCst) == sockets + streams
    })
    .await;
    let client = common::client();
    for data in ["one", "two"] {
        let answer = client.post(&url).body(data).send().await.unwrap();
        assert_eq!(answer.status(), 201);
    }
    let _ = signalled.0.set(Instant::now());
    crier.terminate();
    let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let exited = signalled.elapsed();

    let mut closes = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let ended = task.await.unwrap();
        let what = if i < sockets { "socket" } else { "SSE stream" };
        assert_eq!(ended.events, ["one", "two"], "{what} {i}");
        let hint = ended
            .hint_ms
            .unwrap_or_else(|| panic!("{what} {i} ended without a retry hint"));
        assert!(hint <= 300, "{what} {i}: retry hint {hint} ms");
        if i < sockets {
            assert_eq!(
                ended.close,
                Some((1012, "draining".to_owned())),
                "socket {i}"
            );
        }
        assert!(
            ended.after >= delay,
            "{what} {i} closed after {:?}",
            ended.after
        );
        assert!(ended.after <= exited, "{what} {i} closed after the exit");
        closes.push(ended.after);
    }
    let slack = Duration::from_millis(1000);
    assert!(exited <= delay + window + slack, "exited after {exited:?}");
    // Spread over the window: no tenth of it holds more than a quarter of
    // the closes (an even spread puts a tenth in each), most tenths some.
    assert_spread(&closes, delay, window, (sockets + streams) / 4, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_websocket_only_node_says_farewell_to_each_socket_spread_over_the_window() {
    drain_node(40, 0).await;
}

/// Few SSE streams among many sockets, so that sockets are left to close
/// after the last SSE stream has (once, they were cut there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_node_of_sockets_and_sse_streams_drains_both_alike() {
    drain_node(38, 2).await;
}

/// A load balancer probes `/readyz` every few seconds: a node that is not
/// ready says so once, at WARN with the problem type, not at ERROR on every
/// probe; the probes themselves stay out of the refusal log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_logs_a_change_of_readiness_once_not_every_probe() {
    let node = Process::start_with_env(&[], &[("CRIER_DRAIN_DELAY", "30s")]);
    let client = common::client();
    wait_ready(&client, &node.base, 200, None).await;
    node.terminate();
    wait_ready(&client, &node.base, 503, Some("urn:crier:problem:draining")).await;
    for _ in 0..5 {
        let (status, _) = readiness(&client, &node.base).await;
        assert_eq!(status, 503);
    }
    // A refusal logged after the probes: once it is in the log, so is
    // everything the probes logged. It carries its problem type.
    let missing = client.get(node.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    wait_for("the 404's log line", || {
        node.log().iter().any(|l| l.contains("refused"))
    })
    .await;
    let log = node.log();
    let not_ready: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("not ready: /readyz"))
        .collect();
    assert_eq!(not_ready.len(), 1, "{log:#?}");
    assert!(
        not_ready[0].contains("WARN") && not_ready[0].contains("problem=\"draining\""),
        "{not_ready:?}"
    );
    let refused: Vec<&String> = log.iter().filter(|l| l.contains("refused")).collect();
    assert_eq!(refused.len(), 1, "{log:#?}");
    assert!(
        refused[0].contains("status=404") && refused[0].contains("problem=\"not-found\""),
        "{refused:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("response failed")),
        "{log:#?}"
    );
}
