//! Resuming and replaying: `Last-Event-ID`, `lastEventId`, `last=N` and the
//! `reset` control event, as docs/API.md ("Where the stream starts", "Event ids
//! and resuming", "The `reset` control event", "Retention") describes them.
//!
//! Every test asserts the exact sequence a subscriber sees: ids, event types
//! and data. Replays are bounded by publishing one live event afterwards and
//! expecting it next, so "nothing more was replayed" is checked without
//! waiting for silence.
//!
//! The suite runs on every store over plain SSE, and again on compressed
//! streams (`on_every_store_and_coding!`: zstd, gzip and brotli, each chunk
//! decoded on arrival), where the same exact sequences must hold.

use crate::common;

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// An epoch that is certainly not `epoch`.
fn other_epoch(epoch: &str) -> &'static str {
    if epoch == "zzzzz" { "zzzzy" } else { "zzzzz" }
}

/// Publishes `TOPIC-N` for each `N` in `seqs`, checks that each answer names
/// the topic and has seq `N`, and returns the events a single-topic stream
/// must show for them.
async fn publish_n(server: &Server, topic: &str, seqs: RangeInclusive<u64>) -> Vec<Ev> {
    let mut events = Vec::new();
    for n in seqs {
        let data = format!("{topic}-{n}");
        let answer = server.publish(topic, &data).await;
        assert_eq!(answer["topic"], topic, "{answer}");
        assert_eq!(answer["seq"], n, "{answer}");
        events.push(msg(answer["id"].as_str().expect("id"), &data));
    }
    events
}

/// Asserts that `ev` is a `reset` with this id and this data (compared as
/// JSON, so key order does not matter).
#[track_caller]
fn assert_reset(ev: &Ev, id: &str, data: Value) {
    assert_eq!(ev.event, "reset", "not a reset: {ev:?}");
    assert_eq!(ev.id, id, "reset id: {ev:?}");
    let got: Value = serde_json::from_str(&ev.data).expect("reset data is JSON");
    assert_eq!(got, data, "reset data: {ev:?}");
}

// ---------------------------------------------------------------------------
// Resuming a single topic
// ---------------------------------------------------------------------------

async fn reconnect_with_last_event_id_header_replays_exactly_the_missed_events_then_live() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/news").await;
    assert_eq!(sub.status, 200);
    let seen = publish_n(&server, "news", 1..=3).await;
    assert_eq!(sub.take(3).await, seen);
    drop(sub);

    // Missed while away, one of them with an event name.
    let mut missed = publish_n(&server, "news", 4..=4).await;
    let named = server
        .publish_to("/topics/news?event=headline", "news-5")
        .await;
    assert_eq!(named["seq"], 5);
    missed.push(Ev::new(named["id"].as_str().unwrap(), "headline", "news-5"));
    missed.extend(publish_n(&server, "news", 6..=6).await);

    let mut sub = server.resume("/topics/news", &seen[2].id).await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.take(3).await, missed);
    let live = publish_n(&server, "news", 7..=7).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn reconnect_with_last_event_id_parameter_replays_exactly_the_missed_events_then_live() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/news").await;
    let seen = publish_n(&server, "news", 1..=2).await;
    assert_eq!(sub.take(2).await, seen);
    drop(sub);
    let missed = publish_n(&server, "news", 3..=5).await;

    let mut sub = server
        .subscribe(&format!("/topics/news?lastEventId={}", seen[1].id))
        .await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.take(3).await, missed);
    let live = publish_n(&server, "news", 6..=6).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn last_event_id_header_wins_over_the_parameter() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=6).await;

    // Header later than the parameter: replay after the header's position.
    let mut sub = server
        .resume(
            &format!("/topics/news?lastEventId={}", all[1].id),
            &all[3].id,
        )
        .await;
    assert_eq!(sub.take(2).await, all[4..6]);

    // Header earlier than the parameter: still the header (not the later of
    // the two).
    let mut early = server
        .resume(
            &format!("/topics/news?lastEventId={}", all[3].id),
            &all[0].id,
        )
        .await;
    assert_eq!(early.take(5).await, all[1..6]);

    let live = publish_n(&server, "news", 7..=7).await;
    assert_eq!(sub.next().await, live[0]);
    assert_eq!(early.next().await, live[0]);
    server.stop().await;
}

async fn last_event_id_zero_replays_every_retained_event() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=4).await;

    let mut by_param = server.subscribe("/topics/news?lastEventId=0").await;
    let mut by_header = server.resume("/topics/news", "0").await;
    assert_eq!(by_param.take(4).await, all);
    assert_eq!(by_header.take(4).await, all);

    let live = publish_n(&server, "news", 5..=5).await;
    assert_eq!(by_param.next().await, live[0]);
    assert_eq!(by_header.next().await, live[0]);
    server.stop().await;
}

async fn last_event_id_without_epoch_is_taken_in_the_current_epoch() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=4).await;

    let mut sub = server.subscribe("/topics/news?lastEventId=2").await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.take(2).await, all[2..4]);
    let live = publish_n(&server, "news", 5..=5).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn a_leading_topic_prefix_in_last_event_id_is_ignored() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=4).await;

    // Any topic name before the `/`, by header and by parameter.
    let mut by_header = server
        .resume("/topics/news", &format!("news/{}", all[1].id))
        .await;
    let mut by_param = server
        .subscribe(&format!("/topics/news?lastEventId=other/{}", all[1].id))
        .await;
    assert_eq!(by_header.take(2).await, all[2..4]);
    assert_eq!(by_param.take(2).await, all[2..4]);

    let live = publish_n(&server, "news", 5..=5).await;
    assert_eq!(by_header.next().await, live[0]);
    assert_eq!(by_param.next().await, live[0]);
    server.stop().await;
}

async fn last_event_id_zero_on_trimmed_history_sends_reset_trimmed_then_every_retained_event() {
    // `0` is a position like any other: before the oldest retained event,
    // with events in between gone.
    let server = Server::start_with(|c| c.storage.retention_events = 5).await;
    let all = publish_n(&server, "news", 1..=8).await;
    let epoch = epoch_of(&all[0].id);

    let mut sub = server.subscribe("/topics/news?lastEventId=0").await;
    assert_reset(
        &sub.next().await,
        &pos(3, &epoch),
        json!({"topic": "news", "reason": "trimmed", "requested": "0", "oldest": all[3].id}),
    );
    assert_eq!(sub.take(5).await, all[3..8]);
    let live = publish_n(&server, "news", 9..=9).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn duplicate_topics_are_merged_before_counting_positions() {
    let server = Server::start().await;
    let a = publish_n(&server, "a", 1..=3).await;
    let b = publish_n(&server, "b", 1..=2).await;

    // `b, a, b`: two topics, so two positions (a's, then b's).
    let cursor = multi("a", &[&a[0].id, &b[1].id]);
    let mut sub = server
        .resume("/events?topic=b&topic=a&topic=b", &cursor)
        .await;
    assert_eq!(sub.status, 200);
    assert_eq!(
        sub.take(2).await,
        vec![
            msg(&multi("a", &[&a[1].id, &b[1].id]), "a-2"),
            msg(&multi("a", &[&a[2].id, &b[1].id]), "a-3"),
        ]
    );
    let b3 = server.publish_id("b", "b-3").await;
    assert_eq!(sub.next().await, msg(&multi("b", &[&a[2].id, &b3]), "b-3"));

    let three = server
        .client
        .get(server.url("/events?topic=b&topic=a&topic=b"))
        .header("last-event-id", format!("{},0", cursor))
        .send()
        .await
        .unwrap();
    assert_problem(three, 400, "invalid-last-event-id").await;
    server.stop().await;
}

async fn last_event_id_with_the_wrong_number_of_positions_is_refused() {
    let server = Server::start().await;
    let id = server.publish_id("a", "x").await;
    let epoch = epoch_of(&id);
    let cases = [
        // One topic, two positions.
        ("/topics/a", format!("1.{epoch},0")),
        // Two topics, one position.
        ("/events?topic=a&topic=b", format!("a/1.{epoch}")),
        // Two topics, three positions.
        ("/events?topic=a&topic=b", format!("a/1.{epoch},0,0")),
    ];
    for (path, last_event_id) in cases {
        let by_header = server
            .client
            .get(server.url(path))
            .header("last-event-id", &last_event_id)
            .send()
            .await
            .unwrap();
        assert_problem(by_header, 400, "invalid-last-event-id").await;
        let separator = if path.contains('?') { '&' } else { '?' };
        let by_param = server
            .client
            .get(server.url(&format!("{path}{separator}lastEventId={last_event_id}")))
            .send()
            .await
            .unwrap();
        assert_problem(by_param, 400, "invalid-last-event-id").await;
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Resuming several topics
// ---------------------------------------------------------------------------

async fn multi_topic_reconnect_replays_each_topics_missed_events_in_sorted_topic_order() {
    let server = Server::start().await;
    // Unsorted on purpose: positions are still in sorted topic order (a, b).
    let mut sub = server.subscribe("/events?topic=b&topic=a").await;
    assert_eq!(sub.status, 200);

    // Live, one at a time so the arrival order is the publish order.
    let a1 = server.publish_id("a", "a-1").await;
    let ea = epoch_of(&a1);
    assert_eq!(
        sub.next().await,
        msg(&multi("a", &[&pos(1, &ea), "0"]), "a-1")
    );
    let b1 = server.publish_id("b", "b-1").await;
    let eb = epoch_of(&b1);
    assert_eq!(
        sub.next().await,
        msg(&multi("b", &[&pos(1, &ea), &pos(1, &eb)]), "b-1")
    );
    let a2 = server.publish_id("a", "a-2").await;
    assert_eq!(a2, pos(2, &ea));
    let last = sub.next().await;
    assert_eq!(last, msg(&multi("a", &[&a2, &b1]), "a-2"));
    drop(sub);

    // Away: interleaved publishes to both topics.
    let b2 = server.publish_id("b", "b-2").await;
    let a3 = server.publish_id("a", "a-3").await;
    let b3 = server.publish_id("b", "b-3").await;
    let a4 = server.publish_id("a", "a-4").await;
    assert_eq!(
        [&a3, &a4, &b2, &b3],
        [&pos(3, &ea), &pos(4, &ea), &pos(2, &eb), &pos(3, &eb)]
    );

    let mut sub = server.resume("/events?topic=b&topic=a", &last.id).await;
    assert_eq!(sub.status, 200);
    let replay = sub.take(4).await;
    assert_eq!(
        replay,
        vec![
            msg(&multi("a", &[&a3, &b1]), "a-3"),
            msg(&multi("a", &[&a4, &b1]), "a-4"),
            msg(&multi("b", &[&a4, &b2]), "b-2"),
            msg(&multi("b", &[&a4, &b3]), "b-3"),
        ]
    );
    for ev in &replay {
        assert!(
            ev.id
                .starts_with(&format!("{}/", ev.data.split('-').next().unwrap()))
        );
    }

    // Then live, in publish order.
    let b4 = server.publish_id("b", "b-4").await;
    assert_eq!(sub.next().await, msg(&multi("b", &[&a4, &b4]), "b-4"));
    let a5 = server.publish_id("a", "a-5").await;
    assert_eq!(sub.next().await, msg(&multi("a", &[&a5, &b4]), "a-5"));
    server.stop().await;
}

async fn multi_topic_last_event_id_parameter_resumes_each_topic_from_its_own_position() {
    let server = Server::start().await;
    let a = publish_n(&server, "a", 1..=3).await;
    let b = publish_n(&server, "b", 1..=3).await;
    let ea = epoch_of(&a[0].id);
    let eb = epoch_of(&b[0].id);

    // a from after 2, b from after 0 (all of it); a `TOPIC/` prefix is ignored.
    let cursor = multi("b", &[&pos(2, &ea), "0"]);
    let mut sub = server
        .subscribe(&format!("/events?topic=a&topic=b&lastEventId={cursor}"))
        .await;
    assert_eq!(
        sub.take(4).await,
        vec![
            msg(&multi("a", &[&pos(3, &ea), "0"]), "a-3"),
            msg(&multi("b", &[&pos(3, &ea), &pos(1, &eb)]), "b-1"),
            msg(&multi("b", &[&pos(3, &ea), &pos(2, &eb)]), "b-2"),
            msg(&multi("b", &[&pos(3, &ea), &pos(3, &eb)]), "b-3"),
        ]
    );
    let a4 = server.publish_id("a", "a-4").await;
    assert_eq!(
        sub.next().await,
        msg(&multi("a", &[&a4, &pos(3, &eb)]), "a-4")
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Resuming while events are being published
// ---------------------------------------------------------------------------

/// Publishes `race-1` … `race-{total}` to `race` as fast as it can,
/// `batch` events per request (`1`: `POST /topics/race`, else `POST /events`),
/// and returns the ids in order; `published` counts the events stored so far.
/// With `pace = Some((consumed, lead))` it publishes only while it is at most
/// `lead` events ahead of `consumed`.
fn spawn_publisher(
    server: &Server,
    total: u64,
    batch: u64,
    published: Arc<AtomicU64>,
    pace: Option<(Arc<AtomicU64>, u64)>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let client = server.client.clone();
    let one = server.url("/topics/race");
    let many = server.url("/events");
    tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut n = 0;
        while n < total {
            if let Some((consumed, lead)) = &pace {
                wait_for("the subscriber to keep up", || {
                    consumed.load(Ordering::SeqCst) + lead >= n
                })
                .await;
            }
            let count = batch.min(total - n);
            let request = if batch == 1 {
                client.post(&one).body(format!("race-{}", n + 1))
            } else {
                let items: Vec<Value> = (n + 1..=n + count)
                    .map(|k| json!({"topic": "race", "data": format!("race-{k}")}))
                    .collect();
                client.post(&many).body(Value::Array(items).to_string())
            };
            let response = request.send().await.expect("publish request");
            assert_eq!(response.status(), 201);
            let answer: Value = response.json().await.expect("publish answer");
            let stored = if batch == 1 {
                vec![answer]
            } else {
                answer["events"].as_array().expect("events").clone()
            };
            for event in stored {
                n += 1;
                assert_eq!(event["seq"], n, "{event}");
                ids.push(event["id"].as_str().unwrap().to_owned());
            }
            published.store(n, Ordering::SeqCst);
        }
        ids
    })
}

fn race_expected(ids: &[String]) -> Vec<Ev> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| msg(id, &format!("race-{}", i + 1)))
        .collect()
}

/// Enough retention and backlog for the races below, so that neither a
/// `reset` nor a lagging subscriber's disconnection is a legitimate outcome.
fn roomy(config: &mut Config) {
    config.storage.retention_events = 10_000;
    config.transports.subscriber_backlog = 10_000;
    // These publishers race the subscriber as fast as they can: the race
    // is the point, not the publish rate limit.
    config.limits.publish_rate = 0;
}

/// A subscriber that drops its connection and resumes with `Last-Event-ID`
/// after every `per_connection` events, while `total` events are published
/// `batch` at a time, at most `lead` events ahead of it (so that the
/// reconnects happen all along the publishing, close to its head); the whole
/// sequence it reads must be exactly what was published.
async fn reconnect_during_publishing(total: u64, batch: u64, lead: u64, per_connection: usize) {
    let server = Server::start_with(roomy).await;
    // From the beginning, so the first connection cannot miss anything the
    // publisher sends before the stream has started.
    let mut sub = server.resume("/topics/race", "0").await;
    let published = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    let pace = Some((consumed.clone(), lead));
    let publisher = spawn_publisher(&server, total, batch, published.clone(), pace);

    let mut received: Vec<Ev> = Vec::new();
    let mut reconnects_while_publishing = 0;
    while (received.len() as u64) < total {
        received.push(sub.next().await);
        consumed.store(received.len() as u64, Ordering::SeqCst);
        if received.len().is_multiple_of(per_connection) && (received.len() as u64) < total {
            drop(sub);
            if published.load(Ordering::SeqCst) < total {
                reconnects_while_publishing += 1;
            }
            sub = server
                .resume("/topics/race", &received.last().unwrap().id)
                .await;
            assert_eq!(sub.status, 200);
        }
    }
    let ids = publisher.await.expect("publisher");
    assert_eq!(received, race_expected(&ids));
    assert!(
        reconnects_while_publishing >= 5,
        "only {reconnects_while_publishing} reconnects while publishing; the test raced too little"
    );

    let live = server.publish_id("race", "after").await;
    assert_eq!(sub.next().await, msg(&live, "after"));
    server.stop().await;
}

/// Subscribers that join with `lastEventId=0` once `join_points` events of
/// `total` (published `batch` at a time) are stored, one per join point, and
/// must each read exactly all of them once, then the next live event.
///
/// The publisher keeps at most a batch and a step between join points
/// ahead of the last subscriber to start joining, so every join races the
/// batches after it however fast publishing is; each join request goes out
/// while the publisher goes on.
async fn join_from_zero_during_publishing(total: u64, batch: u64, join_points: &[u64]) {
    let server = Server::start_with(roomy).await;
    let published = Arc::new(AtomicU64::new(0));
    let joining = Arc::new(AtomicU64::new(0));
    let step = std::iter::once(&0)
        .chain(join_points)
        .zip(join_points)
        .map(|(before, point)| point - before)
        .max()
        .unwrap_or(0);
    let pace = Some((joining.clone(), batch + step));
    let publisher = spawn_publisher(&server, total, batch, published.clone(), pace);

    let mut readers = Vec::new();
    let mut joined_while_publishing = 0;
    for &point in join_points {
        let progress = published.clone();
        wait_for("the publisher to reach the join point", || {
            progress.load(Ordering::SeqCst) >= point
        })
        .await;
        joining.store(point, Ordering::SeqCst);
        let mut sub = server.subscribe("/topics/race?lastEventId=0").await;
        assert_eq!(sub.status, 200);
        if published.load(Ordering::SeqCst) < total {
            joined_while_publishing += 1;
        }
        readers.push(tokio::spawn(async move {
            let received = sub.take(total as usize).await;
            (sub, received)
        }));
    }
    // Every subscriber has joined: the publisher may finish.
    joining.store(total, Ordering::SeqCst);
    let expected = race_expected(&publisher.await.expect("publisher"));
    assert!(
        joined_while_publishing * 2 >= join_points.len(),
        "only {joined_while_publishing} of {} subscribers joined while publishing; the test raced too little",
        join_points.len()
    );
    let live = server.publish_id("race", "after").await;
    for reader in readers {
        let (mut sub, received) = reader.await.expect("reader");
        assert_eq!(received, expected);
        assert_eq!(sub.next().await, msg(&live, "after"));
    }
    server.stop().await;
}

async fn repeated_reconnects_during_concurrent_publishing_lose_and_duplicate_nothing() {
    reconnect_during_publishing(300, 1, 20, 7).await;
}

async fn repeated_reconnects_during_concurrent_batch_publishing_lose_and_duplicate_nothing() {
    // Batches deliver events in bursts: a reconnect can join the live feed
    // while a batch is still being stored, and replays span several pages.
    reconnect_during_publishing(3000, 100, 200, 37).await;
}

async fn fresh_subscriber_from_zero_during_concurrent_publishing_gets_every_event_once() {
    join_from_zero_during_publishing(300, 1, &[50]).await;
}

async fn fresh_subscriber_from_zero_during_concurrent_batch_publishing_gets_every_event_once() {
    join_from_zero_during_publishing(5000, 500, &[250, 750, 1250, 1750, 2250, 2750]).await;
}

// ---------------------------------------------------------------------------
// last=N
// ---------------------------------------------------------------------------

async fn last_n_replays_the_n_most_recent_events_then_live() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=10).await;
    let mut sub = server.subscribe("/topics/news?last=3").await;
    assert_eq!(sub.take(3).await, all[7..10]);
    let live = publish_n(&server, "news", 11..=12).await;
    assert_eq!(sub.take(2).await, live);
    server.stop().await;
}

async fn last_zero_gives_only_live_events() {
    let server = Server::start().await;
    publish_n(&server, "news", 1..=10).await;
    let mut sub = server.subscribe("/topics/news?last=0").await;
    let live = publish_n(&server, "news", 11..=11).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn last_larger_than_history_replays_everything_without_reset() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=10).await;
    let mut sub = server.subscribe("/topics/news?last=100").await;
    assert_eq!(sub.take(10).await, all);
    let live = publish_n(&server, "news", 11..=11).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn last_larger_than_trimmed_history_replays_what_is_retained_without_reset() {
    let server = Server::start_with(|c| c.storage.retention_events = 5).await;
    let all = publish_n(&server, "news", 1..=10).await;
    let mut sub = server.subscribe("/topics/news?last=100").await;
    assert_eq!(sub.take(5).await, all[5..10]);
    let live = publish_n(&server, "news", 11..=11).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn last_event_id_wins_over_last_n() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=10).await;
    let mut sub = server
        .subscribe(&format!("/topics/news?last=2&lastEventId={}", all[5].id))
        .await;
    assert_eq!(sub.take(4).await, all[6..10]);
    let live = publish_n(&server, "news", 11..=11).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn last_n_on_several_topics_applies_per_topic() {
    let server = Server::start().await;
    let a = publish_n(&server, "a", 1..=5).await;
    let b = publish_n(&server, "b", 1..=3).await;
    let ea = epoch_of(&a[0].id);
    let eb = epoch_of(&b[0].id);

    // `c` has no history: its position is 0 throughout.
    let mut sub = server
        .subscribe("/events?topic=c&topic=b&topic=a&last=2")
        .await;
    assert_eq!(
        sub.take(4).await,
        vec![
            msg(&multi("a", &[&pos(4, &ea), &pos(1, &eb), "0"]), "a-4"),
            msg(&multi("a", &[&pos(5, &ea), &pos(1, &eb), "0"]), "a-5"),
            msg(&multi("b", &[&pos(5, &ea), &pos(2, &eb), "0"]), "b-2"),
            msg(&multi("b", &[&pos(5, &ea), &pos(3, &eb), "0"]), "b-3"),
        ]
    );
    let c1 = server.publish_id("c", "c-1").await;
    assert_eq!(
        sub.next().await,
        msg(&multi("c", &[&pos(5, &ea), &pos(3, &eb), &c1]), "c-1")
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// reset
// ---------------------------------------------------------------------------

async fn resume_from_a_trimmed_position_sends_reset_trimmed_then_every_retained_event() {
    let server = Server::start_with(|c| c.storage.retention_events = 5).await;
    let all = publish_n(&server, "news", 1..=10).await;
    let epoch = epoch_of(&all[0].id);

    let mut sub = server.resume("/topics/news", &all[1].id).await;
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

async fn resume_from_an_expired_position_sends_reset_trimmed_then_only_unexpired_events() {
    let server = Server::start_with(|c| c.storage.retention_age = Duration::from_millis(200)).await;
    // A subscriber keeps the topic alive: a topic with no retained event and
    // no subscriber is forgotten (and would restart in a new epoch).
    let mut watcher = server.subscribe("/topics/news").await;
    let old = publish_n(&server, "news", 1..=3).await;
    assert_eq!(watcher.take(3).await, old);
    let epoch = epoch_of(&old[0].id);

    // Wait until all three have expired: a replay from the beginning then
    // starts with a reset whose `oldest` is null. The sleep between polls only
    // lets time pass for age-based expiry; the condition has a deadline.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut probe = server.resume("/topics/news", &pos(0, &epoch)).await;
        let first = probe.next().await;
        if first.event == "reset" {
            let data: Value = serde_json::from_str(&first.data).unwrap();
            if data["oldest"].is_null() {
                assert_reset(
                    &first,
                    &pos(3, &epoch),
                    json!({"topic": "news", "reason": "trimmed", "requested": pos(0, &epoch), "oldest": null}),
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events did not expire"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fresh = publish_n(&server, "news", 4..=4).await;
    assert_eq!(watcher.next().await, fresh[0]);
    let mut sub = server.resume("/topics/news", &old[0].id).await;
    assert_reset(
        &sub.next().await,
        &pos(3, &epoch),
        json!({"topic": "news", "reason": "trimmed", "requested": old[0].id, "oldest": fresh[0].id}),
    );
    assert_eq!(sub.next().await, fresh[0]);
    let live = publish_n(&server, "news", 5..=5).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn topic_forgotten_after_expiry_restarts_at_seq_1_and_old_positions_get_reset_epoch() {
    let server = Server::start_with(|c| {
        c.storage.retention_age = Duration::from_millis(100);
        // Quick heartbeats let the hub notice dropped probes promptly.
        c.transports.heartbeat = Duration::from_millis(50);
    })
    .await;
    let old = publish_n(&server, "news", 1..=3).await;
    let old_epoch = epoch_of(&old[0].id);

    // Poll until the topic is forgotten: resuming from `1.OLD` then says
    // `epoch` with nothing retained (before that it says `trimmed`, or
    // replays). The sleep between polls only lets time pass for expiry.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut probe = server.resume("/topics/news", &old[0].id).await;
        let first = probe.next().await;
        if first.event == "reset" {
            let data: Value = serde_json::from_str(&first.data).unwrap();
            if data["reason"] == "epoch" {
                assert_reset(
                    &first,
                    "0",
                    json!({"topic": "news", "reason": "epoch", "requested": old[0].id, "oldest": null}),
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "topic was not forgotten"
        );
        drop(probe);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let new = publish_n(&server, "news", 1..=1).await;
    let new_epoch = epoch_of(&new[0].id);
    assert_ne!(new_epoch, old_epoch);
    let mut sub = server.resume("/topics/news", &old[2].id).await;
    assert_reset(
        &sub.next().await,
        &pos(0, &new_epoch),
        json!({"topic": "news", "reason": "epoch", "requested": old[2].id, "oldest": new[0].id}),
    );
    assert_eq!(sub.next().await, new[0]);
    let live = publish_n(&server, "news", 2..=2).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn resume_from_a_future_position_sends_reset_ahead_then_every_retained_event() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=3).await;
    let epoch = epoch_of(&all[0].id);
    let future = pos(99, &epoch);

    let mut sub = server
        .subscribe(&format!("/topics/news?lastEventId={future}"))
        .await;
    assert_reset(
        &sub.next().await,
        &pos(0, &epoch),
        json!({"topic": "news", "reason": "ahead", "requested": future, "oldest": all[0].id}),
    );
    assert_eq!(sub.take(3).await, all);

    // The same without an epoch: the position is taken in the current one.
    let mut bare = server.subscribe("/topics/news?lastEventId=99").await;
    assert_reset(
        &bare.next().await,
        &pos(0, &epoch),
        json!({"topic": "news", "reason": "ahead", "requested": "99", "oldest": all[0].id}),
    );
    assert_eq!(bare.take(3).await, all);

    let live = publish_n(&server, "news", 4..=4).await;
    assert_eq!(sub.next().await, live[0]);
    assert_eq!(bare.next().await, live[0]);
    server.stop().await;
}

/// Positions past any number a store hands out. Redis numbers events in Lua,
/// whose numbers are doubles, exact up to 2^53 - 1: these are around that
/// bound, around 2^63 (where the read script's `after + 1` overflowed and
/// the stream went silent) and at 2^64 - 1.
const PAST_ANY_NUMBER: [&str; 9] = [
    "18446744073709551615",
    "18446744073709551614",
    "9223372036854775808",
    "9223372036854775807",
    "9223372036854775806",
    "9007199254740993",
    "9007199254740992",
    "9007199254740991",
    "9007199254740990",
];

/// How soon a `reset` must arrive: one store read, not a retry loop.
const PROMPTLY: Duration = Duration::from_secs(3);

/// The next event, which must come within [`PROMPTLY`].
async fn next_promptly(sub: &mut SseClient, what: &str) -> Ev {
    tokio::time::timeout(PROMPTLY, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {PROMPTLY:?} for {what}"))
}

async fn resume_from_a_position_past_any_number_sends_reset_ahead_then_every_retained_event() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=3).await;
    let epoch = epoch_of(&all[0].id);

    let mut subs = Vec::new();
    for seq in PAST_ANY_NUMBER {
        // Without an epoch by header, with the topic's own epoch by parameter.
        let with_epoch = format!("{seq}.{epoch}");
        for (requested, by_header) in [(seq.to_owned(), true), (with_epoch, false)] {
            let mut sub = if by_header {
                server.resume("/topics/news", &requested).await
            } else {
                server
                    .subscribe(&format!("/topics/news?lastEventId={requested}"))
                    .await
            };
            assert_eq!(sub.status, 200, "{requested}");
            assert_reset(
                &next_promptly(&mut sub, &requested).await,
                &pos(0, &epoch),
                json!({"topic": "news", "reason": "ahead", "requested": requested, "oldest": all[0].id}),
            );
            assert_eq!(sub.take(3).await, all, "{requested}");
            subs.push((requested, sub));
        }
    }

    // The same in a multi-topic stream, next to a topic resumed normally.
    let b = publish_n(&server, "other", 1..=2).await;
    let huge = PAST_ANY_NUMBER[0];
    let mut multi_sub = server
        .resume(
            "/events?topic=news&topic=other",
            &format!("news/{huge},{}", b[0].id),
        )
        .await;
    assert_reset(
        &next_promptly(&mut multi_sub, "a multi-topic stream").await,
        &multi("news", &[&pos(0, &epoch), &b[0].id]),
        json!({"topic": "news", "reason": "ahead", "requested": huge, "oldest": all[0].id}),
    );
    let mut expected: Vec<Ev> = all
        .iter()
        .map(|e| msg(&multi("news", &[&e.id, &b[0].id]), &e.data))
        .collect();
    expected.push(msg(&multi("other", &[&all[2].id, &b[1].id]), &b[1].data));
    assert_eq!(multi_sub.take(4).await, expected);

    // Then live events, exactly.
    let live = publish_n(&server, "news", 4..=4).await;
    for (requested, sub) in &mut subs {
        assert_eq!(next_promptly(sub, requested).await, live[0], "{requested}");
    }
    assert_eq!(
        next_promptly(&mut multi_sub, "a multi-topic stream").await,
        msg(&multi("news", &[&live[0].id, &b[1].id]), &live[0].data)
    );
    server.stop().await;
}

async fn resume_from_a_position_past_any_number_on_a_topic_without_history_sends_reset_ahead() {
    let server = Server::start().await;
    let mut subs = Vec::new();
    for seq in PAST_ANY_NUMBER {
        let mut sub = server.resume("/topics/fresh", seq).await;
        assert_reset(
            &next_promptly(&mut sub, seq).await,
            "0",
            json!({"topic": "fresh", "reason": "ahead", "requested": seq, "oldest": null}),
        );
        subs.push(sub);
    }
    let live = publish_n(&server, "fresh", 1..=1).await;
    for sub in &mut subs {
        assert_eq!(next_promptly(sub, "live").await, live[0]);
    }
    server.stop().await;
}

/// `last=N` takes any `u64`: a number past the history replays all of it.
async fn last_n_past_any_number_replays_every_retained_event() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=3).await;
    let mut subs = Vec::new();
    for n in PAST_ANY_NUMBER {
        let mut sub = server.subscribe(&format!("/topics/news?last={n}")).await;
        assert_eq!(sub.status, 200);
        assert_eq!(sub.take(3).await, all, "last={n}");
        subs.push(sub);
    }
    let live = publish_n(&server, "news", 4..=4).await;
    for sub in &mut subs {
        assert_eq!(next_promptly(sub, "live").await, live[0]);
    }
    // One past u64 is not a number of events: refused.
    let response = server
        .client
        .get(server.url("/topics/news?last=18446744073709551616"))
        .send()
        .await
        .expect("request");
    assert_problem(response, 400, "invalid-parameter").await;
    server.stop().await;
}

async fn resume_on_a_topic_without_history_sends_reset_with_null_oldest_then_live_from_seq_1() {
    let server = Server::start().await;
    // A position with an epoch points into a history that is gone.
    let requested = "99.abcde";
    let mut sub = server.resume("/topics/fresh", requested).await;
    assert_reset(
        &sub.next().await,
        "0",
        json!({"topic": "fresh", "reason": "epoch", "requested": requested, "oldest": null}),
    );
    // One without an epoch is simply ahead of the (empty) history.
    let mut bare = server.resume("/topics/fresh", "99").await;
    assert_reset(
        &bare.next().await,
        "0",
        json!({"topic": "fresh", "reason": "ahead", "requested": "99", "oldest": null}),
    );
    let live = publish_n(&server, "fresh", 1..=2).await;
    assert_eq!(sub.take(2).await, live);
    assert_eq!(bare.take(2).await, live);
    server.stop().await;
}

async fn resume_from_another_epoch_sends_reset_epoch_then_every_retained_event() {
    let server = Server::start().await;
    let all = publish_n(&server, "news", 1..=4).await;
    let epoch = epoch_of(&all[0].id);
    let stale = pos(3, other_epoch(&epoch));

    let mut sub = server.resume("/topics/news", &stale).await;
    assert_reset(
        &sub.next().await,
        &pos(0, &epoch),
        json!({"topic": "news", "reason": "epoch", "requested": stale, "oldest": all[0].id}),
    );
    assert_eq!(sub.take(4).await, all);
    let live = publish_n(&server, "news", 5..=5).await;
    assert_eq!(sub.next().await, live[0]);
    server.stop().await;
}

async fn multi_topic_reset_names_its_topic_and_leaves_the_other_topics_replay_intact() {
    let server = Server::start_with(|c| c.storage.retention_events = 5).await;
    let a = publish_n(&server, "a", 1..=10).await;
    let b = publish_n(&server, "b", 1..=3).await;
    let ea = epoch_of(&a[0].id);
    let eb = epoch_of(&b[0].id);

    // `a` trimmed (requested 2, oldest 6); `b` resumes normally after 1.
    let cursor = multi("b", &[&a[1].id, &b[0].id]);
    let mut sub = server.resume("/events?topic=b&topic=a", &cursor).await;
    assert_reset(
        &sub.next().await,
        &multi("a", &[&pos(5, &ea), &b[0].id]),
        json!({"topic": "a", "reason": "trimmed", "requested": a[1].id, "oldest": a[5].id}),
    );
    let mut expected: Vec<Ev> = (6..=10)
        .map(|n| msg(&multi("a", &[&pos(n, &ea), &b[0].id]), &format!("a-{n}")))
        .collect();
    expected
        .extend((2..=3).map(|n| msg(&multi("b", &[&a[9].id, &pos(n, &eb)]), &format!("b-{n}"))));
    assert_eq!(sub.take(7).await, expected);

    // `a` resumes normally after 8; `b` is in another epoch.
    let stale = pos(2, other_epoch(&eb));
    let cursor = multi("a", &[&a[7].id, &stale]);
    let mut sub = server.resume("/events?topic=a&topic=b", &cursor).await;
    let mut replay = sub.take(2).await;
    assert_eq!(
        replay,
        vec![
            msg(&multi("a", &[&a[8].id, &stale]), "a-9"),
            msg(&multi("a", &[&a[9].id, &stale]), "a-10"),
        ]
    );
    assert_reset(
        &sub.next().await,
        &multi("b", &[&a[9].id, &pos(0, &eb)]),
        json!({"topic": "b", "reason": "epoch", "requested": stale, "oldest": b[0].id}),
    );
    replay = sub.take(3).await;
    assert_eq!(
        replay,
        (1..=3)
            .map(|n| msg(&multi("b", &[&a[9].id, &pos(n, &eb)]), &format!("b-{n}")))
            .collect::<Vec<_>>()
    );
    let a11 = server.publish_id("a", "a-11").await;
    assert_eq!(
        sub.next().await,
        msg(&multi("a", &[&a11, &pos(3, &eb)]), "a-11")
    );
    server.stop().await;
}

async fn resuming_from_a_reset_id_sends_no_second_reset_and_nothing_twice() {
    let server = Server::start_with(|c| c.storage.retention_events = 5).await;
    let all = publish_n(&server, "news", 1..=10).await;

    let mut first = server.resume("/topics/news", &all[1].id).await;
    let reset = first.next().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(first.take(5).await, all[5..10]);
    drop(first);

    // Dropped right after the reset: resuming from its id replays the
    // retained events, without another reset.
    let mut again = server.resume("/topics/news", &reset.id).await;
    assert_eq!(again.take(5).await, all[5..10]);

    // Dropped after the last replayed event: nothing is replayed again.
    let mut caught_up = server.resume("/topics/news", &all[9].id).await;

    let live = publish_n(&server, "news", 11..=11).await;
    assert_eq!(again.next().await, live[0]);
    assert_eq!(caught_up.next().await, live[0]);
    server.stop().await;
}

async fn resuming_from_a_multi_topic_reset_id_sends_no_second_reset_and_nothing_twice() {
    let server = Server::start_with(|c| c.storage.retention_events = 5).await;
    let a = publish_n(&server, "a", 1..=10).await;
    let b = publish_n(&server, "b", 1..=3).await;
    let eb = epoch_of(&b[0].id);

    let cursor = multi("a", &[&a[1].id, &b[0].id]);
    let mut first = server.resume("/events?topic=a&topic=b", &cursor).await;
    let reset = first.next().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(
        reset.id,
        multi("a", &[&pos(5, &epoch_of(&a[0].id)), &b[0].id])
    );
    drop(first);

    // The reset's id still carries b's requested position: b's missed events
    // come after a's retained ones, and no reset is repeated.
    let mut again = server.resume("/events?topic=a&topic=b", &reset.id).await;
    let mut expected: Vec<Ev> = (6..=10)
        .map(|n| msg(&multi("a", &[&a[n - 1].id, &b[0].id]), &format!("a-{n}")))
        .collect();
    expected
        .extend((2..=3).map(|n| msg(&multi("b", &[&a[9].id, &pos(n, &eb)]), &format!("b-{n}"))));
    let replay = again.take(7).await;
    assert_eq!(replay, expected);

    // From the last replayed id, nothing again.
    let mut caught_up = server
        .resume("/events?topic=a&topic=b", &replay[6].id)
        .await;
    let b4 = server.publish_id("b", "b-4").await;
    let live = msg(&multi("b", &[&a[9].id, &b4]), "b-4");
    assert_eq!(again.next().await, live);
    assert_eq!(caught_up.next().await, live);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Heartbeats and the stream's end
// ---------------------------------------------------------------------------

/// Reads `sub` until `n` more heartbeats have arrived, with no event
/// meanwhile.
async fn heartbeats(sub: &mut SseClient, n: usize) {
    let count = |sub: &SseClient| sub.raw_text().matches(": heartbeat\n\n").count();
    let want = count(sub) + n;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while count(sub) < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {n} heartbeats within {DEADLINE:?}"
        );
        sub.expect_quiet(Duration::from_millis(20)).await;
    }
}

/// Heartbeats in the silences between a replay and live events, and
/// between live events, change nothing of the sequence (on a compressed
/// stream they are the stream's own bytes between shared units, after which
/// it rejoins the topic's chain), and at shutdown the stream ends with a
/// proper end of body after its last event.
async fn heartbeats_between_replayed_and_live_events_then_a_clean_end_at_shutdown() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(50)).await;
    let old = publish_n(&server, "news", 1..=3).await;
    let mut sub = server.resume("/topics/news", &old[0].id).await;
    assert_eq!(sub.take(2).await, old[1..]);
    heartbeats(&mut sub, 2).await;
    let live = publish_n(&server, "news", 4..=6).await;
    assert_eq!(sub.take(3).await, live);
    heartbeats(&mut sub, 2).await;
    let live = publish_n(&server, "news", 7..=8).await;
    assert_eq!(sub.take(2).await, live);
    server.stop().await;
    assert_eq!(sub.until_end().await, vec![]);
}

// ---------------------------------------------------------------------------
// Long replays and multi-topic races
// ---------------------------------------------------------------------------

/// Publishes `TOPIC-N` for `N` in `seqs` to each topic in one batch, items
/// alternating between the topics, and returns each item's answer id, in
/// batch order, with its topic and data.
async fn publish_batch(
    server: &Server,
    topics: &[&str],
    seqs: RangeInclusive<u64>,
) -> Vec<(String, String, String)> {
    let mut items = Vec::new();
    for n in seqs {
        for topic in topics {
            items.push(json!({"topic": topic, "data": format!("{topic}-{n}")}));
        }
    }
    let answer = server
        .publish_to("/events", &Value::Array(items.clone()).to_string())
        .await;
    let events = answer["events"].as_array().expect("events").clone();
    assert_eq!(events.len(), items.len());
    items
        .iter()
        .zip(events)
        .map(|(item, stored)| {
            assert_eq!(stored["topic"], item["topic"]);
            (
                item["topic"].as_str().unwrap().to_owned(),
                stored["id"].as_str().unwrap().to_owned(),
                item["data"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn replay_longer_than_one_store_page_is_complete_and_in_order() {
    let server = Server::start().await;
    let all: Vec<Ev> = publish_batch(&server, &["news"], 1..=700)
        .await
        .iter()
        .map(|(_, id, data)| msg(id, data))
        .collect();

    let mut from_zero = server.resume("/topics/news", "0").await;
    assert_eq!(from_zero.take(700).await, all);
    let mut from_middle = server.resume("/topics/news", &all[99].id).await;
    assert_eq!(from_middle.take(600).await, all[100..]);
    let mut last = server.subscribe("/topics/news?last=300").await;
    assert_eq!(last.take(300).await, all[400..]);

    let live = publish_n(&server, "news", 701..=701).await;
    assert_eq!(from_zero.next().await, live[0]);
    assert_eq!(from_middle.next().await, live[0]);
    assert_eq!(last.next().await, live[0]);
    server.stop().await;
}

async fn multi_topic_replay_longer_than_one_store_page_sends_each_topic_in_turn() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start().await;
    let published = publish_batch(&server, &["bcv", "a"], 1..=300).await;
    let id_of = |topic: &str, n: usize| -> String {
        published
            .iter()
            .filter(|(t, _, _)| t == topic)
            .nth(n - 1)
            .unwrap()
            .1
            .clone()
    };

    let mut sub = server.resume("/events?topic=a&topic=bcv", "0,0").await;
    let mut expected: Vec<Ev> = (1..=300)
        .map(|n| msg(&multi("a", &[&id_of("a", n), "0"]), &format!("a-{n}")))
        .collect();
    expected.extend((1..=300).map(|n| {
        msg(
            &multi("bcv", &[&id_of("a", 300), &id_of("bcv", n)]),
            &format!("bcv-{n}"),
        )
    }));
    assert_eq!(sub.take(600).await, expected);
    server.stop().await;
}

/// Checks a multi-topic stream's events against what was published: each
/// topic's events in order with no gap or duplicate, and every id being the
/// event's topic followed by the running position of every topic.
#[track_caller]
fn assert_multi_topic_sequence(
    topics: &[&str],
    received: &[Ev],
    published: &[(String, String, String)],
) {
    let mut running: Vec<String> = topics.iter().map(|_| "0".to_owned()).collect();
    let mut next_of_topic = vec![0usize; topics.len()];
    for ev in received {
        let (topic, _) = ev.id.split_once('/').expect("TOPIC/ prefix");
        let t = topics
            .iter()
            .position(|x| *x == topic)
            .expect("known topic");
        let want = published
            .iter()
            .filter(|(pt, _, _)| pt == topic)
            .nth(next_of_topic[t])
            .unwrap_or_else(|| panic!("more events of {topic} than published: {ev:?}"));
        next_of_topic[t] += 1;
        running[t] = want.1.clone();
        let positions: Vec<&str> = running.iter().map(String::as_str).collect();
        assert_eq!(*ev, msg(&multi(topic, &positions), &want.2));
    }
    for (t, topic) in topics.iter().enumerate() {
        let count = published.iter().filter(|(pt, _, _)| pt == topic).count();
        assert_eq!(next_of_topic[t], count, "events of {topic} received");
    }
}

async fn multi_topic_reconnects_during_concurrent_publishing_lose_and_duplicate_nothing() {
    let server = Server::start().await;
    let mut sub = server.resume("/events?topic=a&topic=b", "0,0").await;
    let published_count = Arc::new(AtomicU64::new(0));
    let consumed = Arc::new(AtomicU64::new(0));
    // Publishes a-1, b-1, a-2, b-2, ... at most 20 events ahead of the
    // subscriber, so that its reconnects happen all along the publishing.
    let publisher = {
        let client = server.client.clone();
        let url = server.url("/topics/");
        let published_count = published_count.clone();
        let consumed = consumed.clone();
        tokio::spawn(async move {
            let mut published = Vec::new();
            for n in 1..=150 {
                for topic in ["a", "b"] {
                    let sent = published.len() as u64;
                    wait_for("the subscriber to keep up", || {
                        consumed.load(Ordering::SeqCst) + 20 >= sent
                    })
                    .await;
                    let data = format!("{topic}-{n}");
                    let response = client
                        .post(format!("{url}{topic}"))
                        .body(data.clone())
                        .send()
                        .await
                        .expect("publish request");
                    assert_eq!(response.status(), 201);
                    let answer: Value = response.json().await.expect("publish answer");
                    published.push((
                        topic.to_owned(),
                        answer["id"].as_str().unwrap().to_owned(),
                        data,
                    ));
                    published_count.store(published.len() as u64, Ordering::SeqCst);
                }
            }
            published
        })
    };

    let mut received: Vec<Ev> = Vec::new();
    let mut reconnects_while_publishing = 0;
    while received.len() < 300 {
        received.push(sub.next().await);
        consumed.store(received.len() as u64, Ordering::SeqCst);
        if received.len().is_multiple_of(9) && received.len() < 300 {
            drop(sub);
            if published_count.load(Ordering::SeqCst) < 300 {
                reconnects_while_publishing += 1;
            }
            sub = server
                .resume("/events?topic=a&topic=b", &received.last().unwrap().id)
                .await;
            assert_eq!(sub.status, 200);
        }
    }
    let published = publisher.await.expect("publisher");
    assert_multi_topic_sequence(&["a", "b"], &received, &published);
    assert!(
        reconnects_while_publishing >= 5,
        "only {reconnects_while_publishing} reconnects while publishing; the test raced too little"
    );
    server.stop().await;
}

/// docs/API.md, "Order": in a multi-topic stream "live events arrive in the
/// order they were published". This matters right after a replay too: what
/// was published during the replay waits in the live feeds, as here.
async fn live_events_of_several_topics_arrive_in_publish_order() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start().await;
    let mut sub = server.subscribe("/events?topic=a&topic=bcv").await;
    // One batch: every event is queued for the subscriber at once.
    let mut published = publish_batch(&server, &["a", "bcv"], 1..=20).await;
    if on_redis_store() {
        // Redis commits a batch topic by topic (one script per topic's hash
        // slot), so that is the order of publication there.
        published.sort_by_key(|(topic, _, _)| topic.clone());
    }
    let received = sub.take(40).await;
    let mut running = ["0".to_owned(), "0".to_owned()];
    let expected: Vec<Ev> = published
        .iter()
        .map(|(topic, id, data)| {
            running[usize::from(topic == "bcv")] = id.clone();
            msg(&multi(topic, &[&running[0], &running[1]]), data)
        })
        .collect();
    assert_eq!(received, expected);
    server.stop().await;
}

on_every_store_and_coding!(
    reconnect_with_last_event_id_header_replays_exactly_the_missed_events_then_live,
    reconnect_with_last_event_id_parameter_replays_exactly_the_missed_events_then_live,
    last_event_id_header_wins_over_the_parameter,
    last_event_id_zero_replays_every_retained_event,
    last_event_id_without_epoch_is_taken_in_the_current_epoch,
    a_leading_topic_prefix_in_last_event_id_is_ignored,
    last_event_id_zero_on_trimmed_history_sends_reset_trimmed_then_every_retained_event,
    duplicate_topics_are_merged_before_counting_positions,
    multi_topic_reconnect_replays_each_topics_missed_events_in_sorted_topic_order,
    multi_topic_last_event_id_parameter_resumes_each_topic_from_its_own_position,
    repeated_reconnects_during_concurrent_publishing_lose_and_duplicate_nothing,
    repeated_reconnects_during_concurrent_batch_publishing_lose_and_duplicate_nothing,
    fresh_subscriber_from_zero_during_concurrent_publishing_gets_every_event_once,
    fresh_subscriber_from_zero_during_concurrent_batch_publishing_gets_every_event_once,
    last_n_replays_the_n_most_recent_events_then_live,
    last_zero_gives_only_live_events,
    last_larger_than_history_replays_everything_without_reset,
    last_larger_than_trimmed_history_replays_what_is_retained_without_reset,
    last_event_id_wins_over_last_n,
    last_n_on_several_topics_applies_per_topic,
    resume_from_a_trimmed_position_sends_reset_trimmed_then_every_retained_event,
    resume_from_an_expired_position_sends_reset_trimmed_then_only_unexpired_events,
    topic_forgotten_after_expiry_restarts_at_seq_1_and_old_positions_get_reset_epoch,
    resume_from_a_future_position_sends_reset_ahead_then_every_retained_event,
    resume_from_a_position_past_any_number_sends_reset_ahead_then_every_retained_event,
    resume_from_a_position_past_any_number_on_a_topic_without_history_sends_reset_ahead,
    last_n_past_any_number_replays_every_retained_event,
    resume_on_a_topic_without_history_sends_reset_with_null_oldest_then_live_from_seq_1,
    resume_from_another_epoch_sends_reset_epoch_then_every_retained_event,
    multi_topic_reset_names_its_topic_and_leaves_the_other_topics_replay_intact,
    resuming_from_a_reset_id_sends_no_second_reset_and_nothing_twice,
    resuming_from_a_multi_topic_reset_id_sends_no_second_reset_and_nothing_twice,
    replay_longer_than_one_store_page_is_complete_and_in_order,
    multi_topic_replay_longer_than_one_store_page_sends_each_topic_in_turn,
    multi_topic_reconnects_during_concurrent_publishing_lose_and_duplicate_nothing,
    live_events_of_several_topics_arrive_in_publish_order,
    heartbeats_between_replayed_and_live_events_then_a_clean_end_at_shutdown,
);

/// Refused before any stream opens: no coding to check.
mod refused {
    use super::*;
    on_every_store!(last_event_id_with_the_wrong_number_of_positions_is_refused);
}
