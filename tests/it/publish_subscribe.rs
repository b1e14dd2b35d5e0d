//! Publishing and subscribing: the basic contract of docs/API.md.
//!
//! What depends on the store (numbering, what it keeps of names and
//! payloads, batches, live delivery, resuming) runs on every store
//! (`on_every_store!`); the HTTP face (headers, preamble, other routes) on
//! the embedded one.

use crate::common;

use std::time::Duration;

use common::*;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The exact first bytes of every stream with the default `retry` of 1 s.
/// The first bytes of a stream the hub started "now" on a topic with no
/// events yet.
const PREAMBLE: &str = "retry: 1000\nid: 0\n: crier stream open\n\n";

fn id_of(answer: &Value) -> String {
    answer["id"].as_str().expect("id is a string").to_owned()
}

/// Asserts a publish answer is exactly `{"topic","id","seq"}` with these
/// values, and returns its id.
fn assert_published(answer: &Value, topic: &str, seq: u64) -> String {
    let object = answer.as_object().expect("answer is an object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["id", "seq", "topic"], "{answer}");
    assert_eq!(answer["topic"], topic, "{answer}");
    assert_eq!(answer["seq"], seq, "{answer}");
    let id = id_of(answer);
    assert_eq!(seq_of(&id), seq, "{answer}");
    epoch_of(&id);
    id
}

/// POSTs a batch body and returns the answer's JSON after checking `201`.
async fn publish_batch(server: &Server, body: &str) -> Value {
    let response = server
        .client
        .post(server.url("/events"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("batch request");
    assert_eq!(response.status(), 201, "batch {body}");
    response.json().await.expect("batch answer is JSON")
}

/// Reads from a raw socket until `buf` contains `needle`, with the deadline.
async fn read_until(socket: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &str) {
    let found = async {
        while !String::from_utf8_lossy(buf).contains(needle) {
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.expect("read from socket");
            assert!(n > 0, "connection closed before {needle:?} arrived");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(DEADLINE, found)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{needle:?} did not arrive within {DEADLINE:?}; got {:?}",
                String::from_utf8_lossy(buf)
            )
        });
}

async fn published_event_reaches_a_live_subscriber() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/news").await;
    assert_eq!(sub.status, 200);
    let published = server.publish("news", "hello").await;
    assert_eq!(published["topic"], "news");
    assert_eq!(published["seq"], 1);
    let id = published["id"].as_str().unwrap();
    assert_eq!(sub.next().await, Ev::new(id, "message", "hello"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_send_sse_headers_and_open_with_retry_and_a_comment() {
    let server = Server::start().await;
    for path in ["/topics/head", "/events?topic=head"] {
        let sub = server.subscribe(path).await;
        assert_eq!(sub.status, 200, "{path}");
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
        ] {
            assert_eq!(
                sub.headers.get(name).map(|v| v.to_str().unwrap()),
                Some(value),
                "{name} of {path}"
            );
        }
    }

    let mut single = server.subscribe("/topics/head").await;
    let mut multi = server.subscribe("/events?topic=head").await;
    let id = server.publish_id("head", "hello").await;
    assert_eq!(single.next().await, Ev::new(&id, "message", "hello"));
    assert_eq!(
        multi.next().await,
        Ev::new(&format!("head/{id}"), "message", "hello")
    );
    // Receiving the event means every byte before it has been read too.
    assert_eq!(
        single.raw_text(),
        format!("{PREAMBLE}id: {id}\ndata: hello\n\n")
    );
    assert_eq!(
        multi.raw_text(),
        format!("{PREAMBLE}id: head/{id}\ndata: hello\n\n")
    );
    server.stop().await;
}

/// A stream that starts "now" names its start in an id-only block (no
/// event is dispatched, but EventSource's last event id is set), so a client
/// that loses the stream before the first event resumes from there and
/// misses nothing published while it was away. One topic and several.
async fn a_client_that_leaves_before_the_first_event_resumes_from_its_start() {
    let server = Server::start().await;
    let old = server.publish_id("early", "before").await;
    // Reads a stream's first block, its preamble, then leaves.
    let start_of = async |path: &str| {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        let mut body = response.bytes_stream();
        let mut text = String::new();
        while !text.contains("\n\n") {
            let chunk = tokio::time::timeout(DEADLINE, body.next())
                .await
                .expect("the preamble in time")
                .expect("a preamble")
                .unwrap();
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        text.lines()
            .find_map(|l| l.strip_prefix("id: "))
            .map(str::to_owned)
            .expect("an id in the preamble")
    };
    let single_start = start_of("/topics/early").await;
    let multi_start = start_of("/events?topic=early&topic=quiet").await;
    assert_eq!(single_start, old, "the start is the newest event");
    assert_eq!(multi_start, format!("{old},0"));

    let missed = server.publish_id("early", "while away").await;
    let mut single = server.resume("/topics/early", &single_start).await;
    assert_eq!(
        single.next().await,
        Ev::new(&missed, "message", "while away")
    );
    let mut multi = server
        .resume("/events?topic=early&topic=quiet", &multi_start)
        .await;
    assert_eq!(
        multi.next().await,
        Ev::new(&format!("early/{missed},0"), "message", "while away")
    );
    // A resumed stream does not announce the start its client gave.
    assert!(
        single
            .raw_text()
            .starts_with("retry: 1000\n: crier stream open\n\n"),
        "{}",
        single.raw_text()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preamble_carries_the_configured_retry_in_milliseconds() {
    let server = Server::start_with(|c| c.transports.retry = Duration::from_millis(2500)).await;
    let mut sub = server.subscribe("/topics/r").await;
    let id = server.publish_id("r", "x").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "x"));
    assert_eq!(
        sub.raw_text(),
        format!("retry: 2500\nid: 0\n: crier stream open\n\nid: {id}\ndata: x\n\n")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_without_an_event_stream_accept_header_gets_the_stream() {
    let server = Server::start().await;

    // reqwest, like curl, sends only `Accept: */*` unless told otherwise.
    let response = server
        .client
        .get(server.url("/topics/plain"))
        .send()
        .await
        .expect("subscribe request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut events = response.bytes_stream().eventsource();

    // A raw HTTP/1.1 request with no Accept header at all.
    let mut socket = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    socket
        .write_all(b"GET /topics/plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write request");
    let mut raw = Vec::new();
    read_until(&mut socket, &mut raw, PREAMBLE).await;
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/event-stream\r\n"),
        "{head}"
    );

    let id = server.publish_id("plain", "no accept").await;
    let event = tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("event in time")
        .expect("stream still open")
        .expect("well-formed event");
    assert_eq!(
        (event.id.as_str(), event.event.as_str(), event.data.as_str()),
        (id.as_str(), "message", "no accept")
    );
    read_until(
        &mut socket,
        &mut raw,
        &format!("id: {id}\ndata: no accept\n\n"),
    )
    .await;
    server.stop().await;
}

async fn payloads_round_trip_exactly_with_cr_and_crlf_arriving_as_lf() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/payloads").await;

    // Exactly at the default limit of 64 KiB once encoded (the limit counts
    // `data:` lines: a payload of 65,536 bytes on one line fits): 936 lines
    // of 63 characters, each `data: …\n` (70 bytes), the last 23 longer.
    let mut lines: Vec<String> = (0..936)
        .map(|i| format!("{i:04}{}", "y".repeat(59)))
        .collect();
    lines.last_mut().unwrap().push_str(&"z".repeat(23));
    let at_limit = lines.join("\n");
    let encoded: usize = lines.iter().map(|l| "data: ".len() + l.len() + 1).sum();
    assert_eq!(encoded, 64 * 1024 + 7);

    let unicode = "emoji 😀👩‍👩‍👧🇫🇷 | CJK 中文 日本語 한국어 | combining e\u{301} a\u{308} n\u{303} | RTL עברית العربية \u{200f}x\u{200e} | NBSP\u{a0}end";
    let json_text = r#"{"user":{"id":7,"name":"Zoë"},"tags":["a","b"],"ok":true,"n":null}"#;
    let cases: Vec<(&str, String, String)> = vec![
        ("single line", "hello".into(), "hello".into()),
        ("multi-line", "a\nb\n\nc".into(), "a\nb\n\nc".into()),
        ("CRLF and lone CR", "a\r\nb\rc".into(), "a\nb\nc".into()),
        ("trailing CRLF", "a\r\n".into(), "a\n".into()),
        ("trailing newline", "line\n".into(), "line\n".into()),
        ("only newlines", "\n\n".into(), "\n\n".into()),
        (
            "leading spaces",
            "   three spaces".into(),
            "   three spaces".into(),
        ),
        (
            "leading space on a later line",
            "x\n y".into(),
            "x\n y".into(),
        ),
        (
            "colon and field-like text",
            "data: x\nid: 9".into(),
            "data: x\nid: 9".into(),
        ),
        ("empty body", String::new(), String::new()),
        ("unicode", unicode.into(), unicode.into()),
        ("json text", json_text.into(), json_text.into()),
        ("at the limit once encoded", at_limit.clone(), at_limit),
    ];
    for (seq, (what, sent, expected)) in (1u64..).zip(cases) {
        let answer = server.publish("payloads", &sent).await;
        let id = assert_published(&answer, "payloads", seq);
        let got = sub.next().await;
        assert_eq!(got.id, id, "{what}");
        assert_eq!(got.event, "message", "{what}");
        assert_eq!(got.data, expected, "{what}");
    }
    server.stop().await;
}

async fn event_parameter_sets_the_event_type_and_its_absence_means_message() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/typed").await;
    let named = id_of(&server.publish_to("/topics/typed?event=headline", "a").await);
    let plain = id_of(&server.publish_to("/topics/typed", "b").await);
    let odd = id_of(
        &server
            .publish_to("/topics/typed?event=ns:user.updated_v2-x&cachebust=1", "c")
            .await,
    );
    assert_eq!(
        sub.take(3).await,
        [
            Ev::new(&named, "headline", "a"),
            Ev::new(&plain, "message", "b"),
            Ev::new(&odd, "ns:user.updated_v2-x", "c"),
        ]
    );
    // `event:` is written only when the publisher named the event.
    assert_eq!(
        sub.raw_text(),
        format!(
            "{PREAMBLE}id: {named}\nevent: headline\ndata: a\n\n\
             id: {plain}\ndata: b\n\n\
             id: {odd}\nevent: ns:user.updated_v2-x\ndata: c\n\n"
        )
    );
    server.stop().await;
}

async fn publish_answers_topic_id_and_dense_seq_per_topic_matching_stream_ids() {
    let server = Server::start().await;
    let mut sub_a = server.subscribe("/topics/alpha").await;
    let mut sub_b = server.subscribe("/topics/beta").await;

    let response = server
        .client
        .post(server.url("/topics/alpha"))
        .body("a1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let first: Value = response.json().await.unwrap();
    let a1 = assert_published(&first, "alpha", 1);

    let b1 = assert_published(&server.publish("beta", "b1").await, "beta", 1);
    let a2 = assert_published(&server.publish("alpha", "a2").await, "alpha", 2);
    let a3 = assert_published(&server.publish("alpha", "a3").await, "alpha", 3);
    let b2 = assert_published(&server.publish("beta", "b2").await, "beta", 2);

    // One epoch per topic for all its ids.
    assert_eq!(epoch_of(&a1), epoch_of(&a2));
    assert_eq!(epoch_of(&a1), epoch_of(&a3));
    assert_eq!(epoch_of(&b1), epoch_of(&b2));

    assert_eq!(
        sub_a.take(3).await,
        [
            Ev::new(&a1, "message", "a1"),
            Ev::new(&a2, "message", "a2"),
            Ev::new(&a3, "message", "a3"),
        ]
    );
    assert_eq!(
        sub_b.take(2).await,
        [Ev::new(&b1, "message", "b1"), Ev::new(&b2, "message", "b2")]
    );
    server.stop().await;
}

async fn batch_sends_strings_as_is_and_other_json_as_compact_text_in_order() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start().await;
    let mut sub_a = server.subscribe("/topics/ba").await;
    let mut sub_b = server.subscribe("/topics/bbd").await;
    // A single publish first: batch numbering continues it densely.
    let a1 = assert_published(&server.publish("ba", "before").await, "ba", 1);

    let body = r#"[
        {"topic": "ba", "data": "plain \"quoted\"\nsecond line"},
        {"topic": "bbd", "data": { "b" : 1, "a" : [1, 2.5, "x"] }, "event": "obj"},
        {"topic": "ba", "data": [3, {"z": null, "y": true}, "s"]},
        {"topic": "ba", "data": 42},
        {"topic": "bbd", "data": false},
        {"topic": "ba", "data": null, "event": "nothing"},
        {"topic": "bbd", "data": "{\"not\": \"parsed\"}"},
        {"topic": "ba", "data": ""}
    ]"#;
    let answer = publish_batch(&server, body).await;
    let object = answer.as_object().expect("batch answer is an object");
    assert_eq!(object.keys().collect::<Vec<_>>(), ["events"], "{answer}");
    let events = answer["events"].as_array().expect("events array");
    let expected_order = [
        ("ba", 2),
        ("bbd", 1),
        ("ba", 3),
        ("ba", 4),
        ("bbd", 2),
        ("ba", 5),
        ("bbd", 3),
        ("ba", 6),
    ];
    assert_eq!(events.len(), expected_order.len(), "{answer}");
    let ids: Vec<String> = events
        .iter()
        .zip(expected_order)
        .map(|(event, (topic, seq))| assert_published(event, topic, seq))
        .collect();
    assert_eq!(epoch_of(&ids[0]), epoch_of(&a1));

    assert_eq!(
        sub_a.take(6).await,
        [
            Ev::new(&a1, "message", "before"),
            Ev::new(&ids[0], "message", "plain \"quoted\"\nsecond line"),
            Ev::new(&ids[2], "message", r#"[3,{"z":null,"y":true},"s"]"#),
            Ev::new(&ids[3], "message", "42"),
            Ev::new(&ids[5], "nothing", "null"),
            Ev::new(&ids[7], "message", ""),
        ]
    );
    assert_eq!(
        sub_b.take(3).await,
        [
            Ev::new(&ids[1], "obj", r#"{"b":1,"a":[1,2.5,"x"]}"#),
            Ev::new(&ids[4], "message", "false"),
            Ev::new(&ids[6], "message", r#"{"not": "parsed"}"#),
        ]
    );

    // Numbering goes on densely after the batch.
    assert_published(&server.publish("ba", "after").await, "ba", 7);
    server.stop().await;
}

async fn batch_events_reach_multi_topic_subscribers_in_batch_order() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start().await;
    let mut multi = server.subscribe("/events?topic=m1&topic=mbk").await;
    let answer = publish_batch(
        &server,
        r#"[{"topic":"mbk","data":"1"},{"topic":"m1","data":"2"},{"topic":"mbk","data":"3"},{"topic":"m1","data":"4","event":"e"}]"#,
    )
    .await;
    let ids: Vec<String> = answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .zip([("mbk", 1), ("m1", 1), ("mbk", 2), ("m1", 2)])
        .map(|(event, (topic, seq))| assert_published(event, topic, seq))
        .collect();
    let got = multi.take(4).await;
    // Per topic, batch order is kept.
    let m1: Vec<&Ev> = got.iter().filter(|e| e.id.starts_with("m1/")).collect();
    let m2: Vec<&Ev> = got.iter().filter(|e| e.id.starts_with("mbk/")).collect();
    assert_eq!(
        m1.iter()
            .map(|e| (e.event.as_str(), e.data.as_str()))
            .collect::<Vec<_>>(),
        [("message", "2"), ("e", "4")]
    );
    assert_eq!(
        m2.iter()
            .map(|e| (e.event.as_str(), e.data.as_str()))
            .collect::<Vec<_>>(),
        [("message", "1"), ("message", "3")]
    );
    // Each multi-topic id ends with this topic's own position in it.
    let position_in = |ev: &Ev, topic_index: usize| -> String {
        let (_, list) = ev.id.split_once('/').unwrap();
        list.split(',').nth(topic_index).unwrap().to_owned()
    };
    assert_eq!(position_in(m1[0], 0), ids[1]);
    assert_eq!(position_in(m1[1], 0), ids[3]);
    assert_eq!(position_in(m2[0], 1), ids[0]);
    assert_eq!(position_in(m2[1], 1), ids[2]);
    server.stop().await;
}

async fn empty_batch_answers_201_with_no_events() {
    let server = Server::start().await;
    let answer = publish_batch(&server, "[]").await;
    assert_eq!(answer, json!({"events": []}));
    server.stop().await;
}

async fn multi_topic_stream_ids_name_the_topic_and_data_matches_single_topic_streams() {
    let server = Server::start().await;
    let mut sx = server.subscribe("/topics/x").await;
    let mut sy = server.subscribe("/topics/y").await;
    // Unsorted on purpose: positions in ids follow sorted topic order.
    let mut multi = server.subscribe("/events?topic=y&topic=x").await;

    // Each event is read before the next publish, so the ids are exact.
    let x1 = id_of(&server.publish_to("/topics/x?event=tick", "one").await);
    let m1 = multi.next().await;
    let y1 = id_of(&server.publish("y", "two\nlines").await);
    let m2 = multi.next().await;
    let x2 = id_of(&server.publish("x", "").await);
    let m3 = multi.next().await;
    let y2 = id_of(&server.publish_to("/topics/y?event=tock", " four").await);
    let m4 = multi.next().await;
    let got = [m1, m2, m3, m4];
    assert_eq!(
        got,
        [
            Ev::new(&format!("x/{x1},0"), "tick", "one"),
            Ev::new(&format!("y/{x1},{y1}"), "message", "two\nlines"),
            Ev::new(&format!("x/{x2},{y1}"), "message", ""),
            Ev::new(&format!("y/{x2},{y2}"), "tock", " four"),
        ]
    );

    let singles_x = sx.take(2).await;
    let singles_y = sy.take(2).await;
    assert_eq!(
        singles_x,
        [Ev::new(&x1, "tick", "one"), Ev::new(&x2, "message", "")]
    );
    assert_eq!(
        singles_y,
        [
            Ev::new(&y1, "message", "two\nlines"),
            Ev::new(&y2, "tock", " four")
        ]
    );
    for (multi_ev, single_ev) in got
        .iter()
        .filter(|e| e.id.starts_with("x/"))
        .zip(&singles_x)
        .chain(
            got.iter()
                .filter(|e| e.id.starts_with("y/"))
                .zip(&singles_y),
        )
    {
        assert_eq!(
            (&multi_ev.event, &multi_ev.data),
            (&single_ev.event, &single_ev.data)
        );
    }
    server.stop().await;
}

async fn multi_topic_live_events_arrive_in_the_order_they_were_published() {
    let server = Server::start().await;
    // Topics of one Redis Cluster partition: across partitions, live events
    // travel on different shards' channels, in no common order.
    let mut multi = server.subscribe("/events?topic=oa&topic=onf").await;
    // Large events and a subscriber that reads only after the last publish:
    // the stream backs up, so several topics have events waiting at once.
    const EVENTS: usize = 120;
    let filler = "z".repeat(60 * 1024);
    let mut expected = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let topic = if i % 3 == 1 { "onf" } else { "oa" };
        let data = format!("{i:04} {filler}");
        server.publish(topic, &data).await;
        expected.push((topic.to_owned(), data));
    }
    let got: Vec<(String, String)> = multi
        .take(EVENTS)
        .await
        .into_iter()
        .map(|e| (e.id.split_once('/').unwrap().0.to_owned(), e.data))
        .collect();
    let label = |events: &[(String, String)]| -> Vec<String> {
        events
            .iter()
            .map(|(topic, data)| format!("{topic}:{}", &data[..4]))
            .collect()
    };
    let (got_labels, expected_labels) = (label(&got), label(&expected));
    if let Some(i) = (0..EVENTS).find(|&i| got_labels[i] != expected_labels[i]) {
        let window = i..(i + 6).min(EVENTS);
        panic!(
            "live events out of publish order from position {i}: received {:?}, published {:?}",
            &got_labels[window.clone()],
            &expected_labels[window]
        );
    }
    assert!(got == expected, "payloads differ");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_topic_parameters_are_merged_into_one_topic() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/events?topic=dup&topic=dup").await;
    assert_eq!(sub.status, 200);
    let first = id_of(&server.publish("dup", "a").await);
    let second = id_of(&server.publish("dup", "b").await);
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(&format!("dup/{first}"), "message", "a"),
            Ev::new(&format!("dup/{second}"), "message", "b"),
        ]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_ok_and_root_serves_the_demo_page() {
    let server = Server::start().await;
    let health = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );

    let index = server.client.get(server.url("/")).send().await.unwrap();
    assert_eq!(index.status(), 200);
    let content_type = index.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let body = index.text().await.unwrap();
    assert!(
        body.trim_start()
            .to_ascii_lowercase()
            .starts_with("<!doctype html>"),
        "{body}"
    );
    assert!(body.contains("</html>"));
    assert!(body.contains("EventSource"));
    server.stop().await;
}

async fn two_subscribers_of_one_topic_receive_identical_sequences() {
    let server = Server::start().await;
    let mut first = server.subscribe("/topics/shared").await;
    let mut second = server.subscribe("/topics/shared").await;
    let mut expected = Vec::new();
    for i in 0..30 {
        let (path, event) = if i % 3 == 0 {
            ("/topics/shared?event=third".to_owned(), "third")
        } else {
            ("/topics/shared".to_owned(), "message")
        };
        let data = format!("event {i}\nline two");
        let answer = server.publish_to(&path, &data).await;
        let id = assert_published(&answer, "shared", i + 1);
        expected.push(Ev::new(&id, event, &data));
    }
    assert_eq!(first.take(30).await, expected);
    assert_eq!(second.take(30).await, expected);
    server.stop().await;
}

on_every_store!(
    published_event_reaches_a_live_subscriber,
    a_client_that_leaves_before_the_first_event_resumes_from_its_start,
    payloads_round_trip_exactly_with_cr_and_crlf_arriving_as_lf,
    event_parameter_sets_the_event_type_and_its_absence_means_message,
    publish_answers_topic_id_and_dense_seq_per_topic_matching_stream_ids,
    batch_sends_strings_as_is_and_other_json_as_compact_text_in_order,
    batch_events_reach_multi_topic_subscribers_in_batch_order,
    empty_batch_answers_201_with_no_events,
    multi_topic_stream_ids_name_the_topic_and_data_matches_single_topic_streams,
    multi_topic_live_events_arrive_in_the_order_they_were_published,
    two_subscribers_of_one_topic_receive_identical_sequences,
);
