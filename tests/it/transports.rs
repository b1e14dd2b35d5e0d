//! The replay/resume suite on every transport (SSE, WebSocket, long-poll,
//! gRPC): the same ids, the same replay-then-live join, the same `reset`,
//! whichever way the events travel; and a client that switches transports with its
//! last id receives each event exactly once.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::transport::{Feed, Transport};
use common::{Config, Ev, Server, wait_for};
use serde_json::{Value, json};

fn msg(id: &str, data: &str) -> Ev {
    Ev::new(id, "message", data)
}

fn epoch_of(id: &str) -> String {
    id.split_once('.').expect("SEQ.EPOCH id").1.to_owned()
}

fn pos(seq: u64, epoch: &str) -> String {
    format!("{seq}.{epoch}")
}

fn multi(topic: &str, positions: &[&str]) -> String {
    format!("{topic}/{}", positions.join(","))
}

/// Publishes `TOPIC-N` for each `N` in `seqs`; returns the events a
/// single-topic stream shows for them.
async fn publish_n(server: &Server, topic: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Ev> {
    let mut events = Vec::new();
    for n in seqs {
        let data = format!("{topic}-{n}");
        let answer = server.publish(topic, &data).await;
        assert_eq!(answer["seq"], n, "{answer}");
        events.push(msg(answer["id"].as_str().expect("id"), &data));
    }
    events
}

#[track_caller]
fn assert_reset(ev: &Ev, id: &str, data: Value) {
    assert_eq!(ev.event, "reset", "not a reset: {ev:?}");
    assert_eq!(ev.id, id, "reset id: {ev:?}");
    let got: Value = serde_json::from_str(&ev.data).expect("reset data is JSON");
    assert_eq!(got, data, "reset data: {ev:?}");
}

/// Short long-polls, so an idle poll loop turns over within the tests.
fn quick_polls(config: &mut Config) {
    config.transports.poll_timeout = Duration::from_millis(500);
}

async fn resume_with_the_last_id_replays_exactly_the_missed_events_then_live() {
    let server = Server::start_with(quick_polls).await;
    let first = publish_n(&server, "news", 1..=3).await;
    let mut sub = Feed::open(&server, "/topics/news", Some("0")).await;
    assert_eq!(sub.take(3).await, first);
    let live = publish_n(&server, "news", 4..=5).await;
    assert_eq!(sub.take(2).await, live);
    drop(sub);

    let missed = publish_n(&server, "news", 6..=9).await;
    let mut sub = Feed::open(&server, "/topics/news", Some(&live[1].id)).await;
    assert_eq!(sub.take(4).await, missed);
    let live = publish_n(&server, "news", 10..=10).await;
    assert_eq!(sub.next().await, live[0]);
    sub.expect_quiet(Duration::from_millis(700)).await;
    server.stop().await;
}

async fn last_n_replays_the_n_most_recent_events_then_live() {
    let server = Server::start_with(quick_polls).await;
    let all = publish_n(&server, "news", 1..=10).await;
    let mut sub = Feed::open(&server, "/topics/news?last=3", None).await;
    assert_eq!(sub.take(3).await, all[7..10]);
    let live = publish_n(&server, "news", 11..=12).await;
    assert_eq!(sub.take(2).await, live);
    server.stop().await;
}

async fn multi_topic_resume_replays_each_topics_missed_events_then_live() {
    let server = Server::start_with(quick_polls).await;
    let a = publish_n(&server, "a", 1..=2).await;
    let b = publish_n(&server, "b", 1..=1).await;
    let (ea, eb) = (epoch_of(&a[0].id), epoch_of(&b[0].id));
    let mut sub = Feed::open(&server, "/events?topic=b&topic=a", Some("0,0")).await;
    assert_eq!(
        sub.take(3).await,
        vec![
            msg(&multi("a", &[&pos(1, &ea), "0"]), "a-1"),
            msg(&multi("a", &[&pos(2, &ea), "0"]), "a-2"),
            msg(&multi("b", &[&pos(2, &ea), &pos(1, &eb)]), "b-1"),
        ]
    );
    drop(sub);
    let last = multi("b", &[&pos(2, &ea), &pos(1, &eb)]);
    publish_n(&server, "b", 2..=2).await;
    publish_n(&server, "a", 3..=3).await;
    let mut sub = Feed::open(&server, "/events?topic=a&topic=b", Some(&last)).await;
    assert_eq!(
        sub.take(2).await,
        vec![
            msg(&multi("a", &[&pos(3, &ea), &pos(1, &eb)]), "a-3"),
            msg(&multi("b", &[&pos(3, &ea), &pos(2, &eb)]), "b-2"),
        ]
    );
    publish_n(&server, "b", 3..=3).await;
    assert_eq!(
        sub.next().await,
        msg(&multi("b", &[&pos(3, &ea), &pos(3, &eb)]), "b-3")
    );
    server.stop().await;
}

async fn resume_from_a_trimmed_position_sends_reset_trimmed_then_every_retained_event() {
    let server = Server::start_with(|c| {
        quick_polls(c);
        c.storage.retention_events = 5;
    })
    .await;
    let all = publish_n(&server, "news", 1..=10).await;
    let epoch = epoch_of(&all[0].id);
    let mut sub = Feed::open(&server, "/topics/news", Some(&all[1].id)).await;
    assert_reset(
        &sub.next().await,
        &pos(5, &epoch),
        json!({"topic": "news", "reason": "trimmed", "requested": all[1].id, "oldest": all[5].id}),
    );
    assert_eq!(sub.take(5).await, all[5..10]);
    let live = publish_n(&server, "news", 11..=11).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

/// A subscriber that leaves and resumes from its last id after every
/// `per_connection` events while a publisher races it: it reads exactly
/// what was published.
async fn reconnects_during_concurrent_publishing_lose_and_duplicate_nothing() {
    const TOTAL: u64 = 400;
    let server = Server::start_with(|c| {
        quick_polls(c);
        c.storage.retention_events = 10_000;
        c.transports.subscriber_backlog = 10_000;
        c.limits.publish_rate = 0;
    })
    .await;
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let client = server.client.clone();
        let url = server.url("/topics/race");
        let published = published.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 1..=TOTAL {
                let response = client
                    .post(&url)
                    .body(format!("race-{n}"))
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(response.status(), 201);
                let answer: Value = response.json().await.expect("JSON");
                ids.push(answer["id"].as_str().expect("id").to_owned());
                published.store(n, Ordering::SeqCst);
            }
            ids
        })
    };
    let mut seen = Vec::new();
    let mut last = "0".to_owned();
    while (seen.len() as u64) < TOTAL {
        let mut sub = Feed::open(&server, "/topics/race", Some(&last)).await;
        for _ in 0..37 {
            if seen.len() as u64 == TOTAL {
                break;
            }
            let ev = sub.next().await;
            last.clone_from(&ev.id);
            seen.push(ev);
        }
    }
    let ids = publisher.await.expect("publisher");
    let expected: Vec<Ev> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| msg(id, &format!("race-{}", i + 1)))
        .collect();
    assert_eq!(seen, expected);
    wait_for("every publish answered", || {
        published.load(Ordering::SeqCst) == TOTAL
    })
    .await;
    server.stop().await;
}

/// The `transport` label of the hub's metrics for `transport`.
fn label_of(transport: Transport) -> &'static str {
    match transport {
        Transport::Sse => "sse",
        Transport::WebSocket | Transport::WebSocketDeflate => "websocket",
        Transport::Poll => "longpoll",
        Transport::Grpc => "grpc",
    }
}

/// The sum of a metric's series of one transport in a `/metrics` scrape
/// (bytes: over every coding); `None` while there is none.
async fn metric(server: &Server, name: &str, transport: &str) -> Option<f64> {
    let text = server.scrape().await;
    let label = format!("transport=\"{transport}\"");
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label))
        .map(|line| {
            let (_, value) = line.rsplit_once(' ').expect("a sample");
            value.parse::<f64>().expect("a sample's value")
        })
        .reduce(|a, b| a + b)
}

/// The same series for every transport label: a subscriber's stream, its
/// events and its bytes are counted under its own transport, and under
/// no other.
async fn a_subscriber_shows_up_in_the_metrics_under_its_own_transport() {
    let server = Server::start_with(quick_polls).await;
    let mine = label_of(common::transport::current());
    let replayed = publish_n(&server, "news", 1..=2).await;
    let mut sub = Feed::open(&server, "/topics/news?last=2", None).await;
    assert_eq!(sub.take(2).await, replayed);
    let live = publish_n(&server, "news", 3..=3).await;
    assert_eq!(sub.next().await, live[0]);
    // A long-poll is an open stream while it waits: the loop's next one.
    server
        .wait_for_metric(&format!("crier_open_streams{{transport=\"{mine}\"}} 1"))
        .await;
    server
        .wait_for_metric(&format!(
            "crier_stream_events_total{{transport=\"{mine}\"}} 3"
        ))
        .await;
    for other in ["sse", "websocket", "longpoll", "grpc"] {
        let bytes = metric(&server, "crier_stream_bytes_total", other)
            .await
            .expect("bytes by transport");
        if other == mine {
            assert!(bytes > 0.0, "{other}: no bytes counted");
            continue;
        }
        assert_eq!(bytes, 0.0, "{other}: bytes of another transport's stream");
        for name in ["crier_open_streams", "crier_stream_events_total"] {
            assert_eq!(
                metric(&server, name, other).await,
                Some(0.0),
                "{name} of {other}, with a {mine} subscriber"
            );
        }
    }
    drop(sub);
    server
        .wait_for_metric(&format!("crier_open_streams{{transport=\"{mine}\"}} 0"))
        .await;
    server.stop().await;
}

on_every_transport!(
    a_subscriber_shows_up_in_the_metrics_under_its_own_transport,
    resume_with_the_last_id_replays_exactly_the_missed_events_then_live,
    last_n_replays_the_n_most_recent_events_then_live,
    multi_topic_resume_replays_each_topics_missed_events_then_live,
    resume_from_a_trimmed_position_sends_reset_trimmed_then_every_retained_event,
    reconnects_during_concurrent_publishing_lose_and_duplicate_nothing,
);

/// SSE → WebSocket → long-poll → gRPC → SSE → … → WebSocket with
/// permessage-deflate, each from the last id the previous
/// one saw, with events published while away and while connected: each
/// event arrives exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_transports_with_the_last_id_receives_each_event_exactly_once() {
    let server = Server::start_with(quick_polls).await;
    let mut expected = Vec::new();
    let mut seen = Vec::new();
    let mut last = "0".to_owned();
    let mut n = 0;
    for transport in [
        Transport::Sse,
        Transport::WebSocket,
        Transport::Poll,
        Transport::Grpc,
        Transport::Sse,
        Transport::Poll,
        Transport::Grpc,
        Transport::WebSocket,
        Transport::WebSocketDeflate,
    ] {
        // Published while away.
        expected.extend(publish_n(&server, "switch", n + 1..=n + 3).await);
        n += 3;
        let mut sub = Feed::open_on(transport, &server, "/topics/switch", Some(&last)).await;
        // Published while connected.
        expected.extend(publish_n(&server, "switch", n + 1..=n + 2).await);
        n += 2;
        while seen.len() < expected.len() {
            let ev = sub.next().await;
            last.clone_from(&ev.id);
            seen.push(ev);
        }
        sub.expect_quiet(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, expected);
    server.stop().await;
}
