//! Fan-out: many subscribers, slow subscribers, quiet streams.

use crate::common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_subscribers_all_receive_the_identical_sequence() {
    const SUBSCRIBERS: usize = 1000;
    const EVENTS: usize = 20;
    // Each subscriber is two descriptors in this process (client and server).
    rlimit::increase_nofile_limit(10_000).expect("raise the open-file limit");
    let server = Server::start().await;

    // One client: each concurrent stream gets its own HTTP/1.1 connection.
    let client = common::client();
    let url = server.url("/topics/crowd");
    let connects = (0..SUBSCRIBERS).map(|_| SseClient::connect(&client, &url, None));
    // The answer's headers are sent only after the subscription joined the
    // hub, so once all have answered, all will see every event.
    let mut subscribers = futures_util::future::join_all(connects).await;
    assert!(subscribers.iter().all(|s| s.status == 200));

    let mut expected = Vec::new();
    for i in 0..EVENTS {
        let data = format!("{{\"n\":{i}}}");
        let id = server.publish_id("crowd", &data).await;
        expected.push(Ev::new(&id, "message", &data));
    }
    let received =
        futures_util::future::join_all(subscribers.iter_mut().map(|s| s.take(EVENTS))).await;
    for (n, events) in received.iter().enumerate() {
        assert_eq!(events, &expected, "subscriber {n}");
    }
    drop(subscribers);
    server.stop().await;
}

/// A subscriber whose socket has a tiny receive buffer and that reads only
/// when told to: the way a client on a congested link looks to the server.
struct SlowSubscriber {
    body: hyper::body::Incoming,
}

impl SlowSubscriber {
    async fn connect(server: &Server, path: &str) -> SlowSubscriber {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", server.addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        SlowSubscriber {
            body: response.into_body(),
        }
    }

    /// Reads everything until the server ends the stream.
    async fn read_to_end(self) -> Vec<Ev> {
        let events = sse_events(self.body).collect::<Vec<_>>();
        tokio::time::timeout(DEADLINE, events)
            .await
            .expect("the server ends a lagging stream")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_disconnected_while_a_fast_one_keeps_receiving() {
    const EVENTS: usize = 600;
    let server = Server::start_with(|c| c.transports.subscriber_backlog = 16).await;
    let slow = SlowSubscriber::connect(&server, "/topics/t").await;
    let mut fast = server.subscribe("/topics/t").await;

    // 16 KiB events: far more than the socket buffers and the backlog hold.
    let mut expected = Vec::new();
    for i in 0..EVENTS {
        let data = format!("{i:05}{}", "x".repeat(16 * 1024));
        let id = server.publish_id("t", &data).await;
        expected.push(Ev::new(&id, "message", &data));
        // The fast subscriber keeps up as events are published.
        assert_eq!(fast.next().await, expected[i]);
    }

    // The slow subscriber got a gap-free prefix, then the server hung up.
    let got = slow.read_to_end().await;
    assert!(
        !got.is_empty(),
        "the slow subscriber got the start of the feed"
    );
    assert!(
        got.len() < EVENTS,
        "the slow subscriber was cut off, not served all {EVENTS} events"
    );
    assert_eq!(got[..], expected[..got.len()]);

    // Reconnecting with its Last-Event-ID, it loses nothing.
    let last = got.last().unwrap().id.clone();
    let mut resumed = server.resume("/topics/t", &last).await;
    assert_eq!(
        resumed.take(EVENTS - got.len()).await,
        expected[got.len()..]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_carries_heartbeats_and_still_delivers() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(100)).await;
    let mut sub = server.subscribe("/topics/quiet").await;
    let raw = sub.raw.clone();
    let heartbeats = || {
        String::from_utf8_lossy(&raw.lock().unwrap())
            .matches(": heartbeat\n\n")
            .count()
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while heartbeats() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no heartbeats");
        // Polling the stream pulls bytes in; heartbeats are not events.
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
            panic!("a heartbeat must not surface as an event: {item:?}");
        }
    }
    let id = server.publish_id("quiet", "after the silence").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&id, "message", "after the silence")
    );
    server.stop().await;
}
