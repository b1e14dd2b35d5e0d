//! Publishing exactly once with `Idempotency-Key`: a publisher that retries
//! every failure never creates a duplicate. Every test runs on every store.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// The header that marks an answer as a replay.
const REPLAYED: &str = "idempotent-replayed";

/// What a publish was answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    replayed: bool,
    body: Value,
}

impl Answer {
    async fn of(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let replayed = match response.headers().get(REPLAYED) {
            None => false,
            Some(value) => {
                assert_eq!(value, "true", "the replay header says true or is absent");
                true
            }
        };
        let body = response.json().await.expect("a JSON answer");
        Answer {
            status,
            replayed,
            body,
        }
    }

    fn id(&self) -> &str {
        self.body["id"].as_str().expect("an id")
    }
}

/// Publishes `data` to `topic` with `key` as its `Idempotency-Key`.
async fn publish_keyed(server: &Server, topic: &str, key: &str, data: &str) -> Answer {
    publish_keyed_with(server, topic, key, data, |r| r).await
}

async fn publish_keyed_with(
    server: &Server,
    topic: &str,
    key: &str,
    data: &str,
    adjust: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> Answer {
    let request = server
        .client
        .post(server.url(&format!("/topics/{topic}")))
        .header("idempotency-key", key)
        .body(data.to_owned());
    Answer::of(adjust(request).send().await.expect("publish request")).await
}

async fn publish_batch(server: &Server, items: Value) -> Answer {
    let response = server
        .client
        .post(server.url("/events"))
        .json(&items)
        .send()
        .await
        .expect("batch request");
    Answer::of(response).await
}

/// Asserts a first, stored answer for `topic` with number `seq`.
fn assert_stored(answer: &Answer, topic: &str, seq: u64) {
    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(!answer.replayed, "{answer:?}");
    assert_eq!(answer.body["topic"], topic, "{answer:?}");
    assert_eq!(answer.body["seq"], seq, "{answer:?}");
}

/// Asserts a replay: 201, marked, with exactly the first answer's body.
fn assert_replay_of(answer: &Answer, first: &Answer) {
    assert_eq!(answer.status, 201, "{answer:?}");
    assert!(answer.replayed, "not marked as a replay: {answer:?}");
    assert_eq!(answer.body, first.body);
}

/// A `crier_idempotency_total` value from the node's metrics.
async fn idempotency_count(server: &Server, outcome: &str) -> f64 {
    let text = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("scrape text");
    let series = format!("crier_idempotency_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

/// Sends a keyed publish on a connection of its own, never reading the
/// answer; the connection is cut when `cut` is ready.
async fn publish_unanswered(server: &Server, key: &str, data: &str, cut: impl Future<Output = ()>) {
    let mut socket = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let request = format!(
        "POST /topics/orders HTTP/1.1\r\nhost: crier\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{data}",
        data.len()
    );
    socket.write_all(request.as_bytes()).await.expect("send");
    cut.await;
    drop(socket);
}

async fn a_publish_whose_answer_is_lost_is_stored_once_when_retried() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/orders").await;
    // The hub stores the event, and the connection is cut before its
    // answer is read (a publisher's timeout, a proxy dropping it).
    let data = "order 1 paid";
    let mut stored = None;
    publish_unanswered(&server, "order-1", data, async {
        stored = Some(sub.next().await);
    })
    .await;
    let stored = stored.unwrap();
    assert_eq!((stored.seq(), stored.data.as_str()), (1, data));
    // The publisher, which never saw an answer, retries: nothing is
    // stored, and it learns where its event went.
    let retry = publish_keyed(&server, "orders", "order-1", data).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.replayed, "{retry:?}");
    assert_eq!(retry.id(), stored.id);
    assert_replay_of(
        &publish_keyed(&server, "orders", "order-1", data).await,
        &retry,
    );

    // Cut at once, the request may or may not have been stored; its retry
    // makes sure it is, once.
    publish_unanswered(&server, "order-2", "order 2 paid", async {}).await;
    let retry = publish_keyed(&server, "orders", "order-2", "order 2 paid").await;
    assert_eq!(
        (retry.status, retry.body["seq"].as_u64()),
        (201, Some(2)),
        "{retry:?}"
    );
    let next = server.publish_id("orders", "order 3 paid").await;
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(retry.id(), "message", "order 2 paid"),
            Ev::new(&next, "message", "order 3 paid")
        ]
    );
    assert_eq!(seq_of(&next), 3, "each event stored once");
}

async fn concurrent_publishes_with_one_key_store_one_event_and_share_its_answer() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/pay").await;
    let answers = futures_util::future::join_all(
        (0..20).map(|_| publish_keyed(&server, "pay", "payment-77", "paid 77")),
    )
    .await;
    let first = answers.iter().filter(|a| !a.replayed).collect::<Vec<_>>();
    assert_eq!(first.len(), 1, "exactly one stored: {answers:?}");
    assert_stored(first[0], "pay", 1);
    for answer in &answers {
        assert_eq!(answer.status, 201, "{answer:?}");
        assert_eq!(
            answer.body, first[0].body,
            "every answer names the one event"
        );
    }
    let next = server.publish_id("pay", "after").await;
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(first[0].id(), "message", "paid 77"),
            Ev::new(&next, "message", "after")
        ]
    );
    assert_eq!(idempotency_count(&server, "replayed").await, 19.0);
    assert_eq!(idempotency_count(&server, "mismatch").await, 0.0);
}

async fn a_key_is_forgotten_after_the_idempotency_window() {
    let window = Duration::from_millis(400);
    let server = Server::start_with(|c| c.storage.idempotency_window = window).await;
    let mut sub = server.subscribe("/topics/w").await;
    let started = tokio::time::Instant::now();
    let first = publish_keyed(&server, "w", "k", "tick").await;
    assert_stored(&first, "w", 1);
    // Within the window every retry is a replay; once it has passed, the
    // key is new again and the same publish is stored anew.
    let deadline = started + DEADLINE;
    let second = loop {
        let answer = publish_keyed(&server, "w", "k", "tick").await;
        if !answer.replayed {
            break answer;
        }
        assert_replay_of(&answer, &first);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(
        started.elapsed() >= window,
        "stored again after {:?}, within the window",
        started.elapsed()
    );
    assert_stored(&second, "w", 2);
    assert_replay_of(&publish_keyed(&server, "w", "k", "tick").await, &second);
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(first.id(), "message", "tick"),
            Ev::new(second.id(), "message", "tick")
        ]
    );
}

async fn a_zero_window_checks_keys_but_remembers_none() {
    let server = Server::start_with(|c| c.storage.idempotency_window = Duration::ZERO).await;
    assert_stored(&publish_keyed(&server, "z", "k", "same").await, "z", 1);
    assert_stored(&publish_keyed(&server, "z", "k", "same").await, "z", 2);
    let bad = server
        .client
        .post(server.url("/topics/z"))
        .header("idempotency-key", "not ok")
        .body("same")
        .send()
        .await
        .unwrap();
    assert_problem(bad, 400, "invalid-idempotency-key").await;
}

async fn a_key_reused_for_another_event_is_refused_and_nothing_is_stored() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/a").await;
    let mut other = server.subscribe("/topics/bcv").await;
    let first = publish_keyed(&server, "a", "k-42", "hello").await;
    assert_stored(&first, "a", 1);

    let other_data = server
        .client
        .post(server.url("/topics/a"))
        .header("idempotency-key", "k-42")
        .body("goodbye")
        .send()
        .await
        .unwrap();
    let body = assert_problem(other_data, 422, "idempotency-key-reused").await;
    assert!(!body["detail"].as_str().unwrap().contains("k-42"), "{body}");
    let other_topic = server
        .client
        .post(server.url("/topics/bcv"))
        .header("idempotency-key", "k-42")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_problem(other_topic, 422, "idempotency-key-reused").await;
    let other_name = server
        .client
        .post(server.url("/topics/a?event=greeting"))
        .header("idempotency-key", "k-42")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_problem(other_name, 422, "idempotency-key-reused").await;
    assert_eq!(idempotency_count(&server, "mismatch").await, 3.0);

    // The first event is still what the key answers.
    assert_replay_of(&publish_keyed(&server, "a", "k-42", "hello").await, &first);
    let next_a = server.publish_id("a", "next").await;
    let first_b = server.publish_id("bcv", "first of b").await;
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(first.id(), "message", "hello"),
            Ev::new(&next_a, "message", "next")
        ]
    );
    assert_eq!(seq_of(&first_b), 1, "nothing was stored on bcv");
    assert_eq!(
        other.next().await,
        Ev::new(&first_b, "message", "first of b")
    );
}

async fn a_malformed_idempotency_key_is_refused_without_quoting_it() {
    let server = Server::start().await;
    let long = "x".repeat(129);
    let bad: [&[u8]; 5] = [
        b"",
        long.as_bytes(),
        b"two words",
        b"caf\xc3\xa9",
        b"tab\there",
    ];
    for key in bad {
        let response = server
            .client
            .post(server.url("/topics/t"))
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(key).unwrap(),
            )
            .body("data")
            .send()
            .await
            .unwrap();
        let body = assert_problem(response, 400, "invalid-idempotency-key").await;
        if key.len() > 2 {
            let detail = body["detail"].as_str().unwrap().as_bytes();
            assert!(!detail.windows(key.len()).any(|w| w == key), "{body}");
        }
    }
    let twice = server
        .client
        .post(server.url("/topics/t"))
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body("data")
        .send()
        .await
        .unwrap();
    assert_problem(twice, 400, "invalid-idempotency-key").await;
    let in_batch = server
        .client
        .post(server.url("/events"))
        .json(&json!([
            {"topic": "t", "data": "ok", "idempotency_key": "fine"},
            {"topic": "t", "data": "bad", "idempotency_key": "not fine"},
        ]))
        .send()
        .await
        .unwrap();
    let body = assert_problem(in_batch, 400, "invalid-idempotency-key").await;
    assert!(
        body["detail"].as_str().unwrap().contains("item 1"),
        "{body}"
    );
    // 128 visible characters are a key; nothing above was stored.
    let longest = "~".repeat(128);
    assert_stored(&publish_keyed(&server, "t", &longest, "data").await, "t", 1);
}

async fn batches_store_new_keyed_items_and_answer_seen_ones_with_their_receipts() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start().await;
    let mut on_t = server.subscribe("/topics/t").await;
    let mut on_u = server.subscribe("/topics/umu").await;
    let batch = json!([
        {"topic": "t", "data": "a", "idempotency_key": "k-a"},
        {"topic": "t", "data": "b", "idempotency_key": "k-b"},
        {"topic": "umu", "data": "c", "idempotency_key": "k-c"},
    ]);
    let first = publish_batch(&server, batch.clone()).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert!(!first.replayed);
    let ids: Vec<String> = (0..3)
        .map(|i| first.body["events"][i]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids.iter().map(|id| seq_of(id)).collect::<Vec<_>>(),
        [1, 2, 1]
    );
    assert!(
        first.body["events"][0].get("replayed").is_none(),
        "{first:?}"
    );

    // The whole batch again: every item replayed, nothing stored.
    let retry = publish_batch(&server, batch).await;
    assert_eq!(retry.status, 201);
    assert!(
        retry.replayed,
        "a batch replayed whole is marked: {retry:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(retry.body["events"][i]["id"], id.as_str());
        assert_eq!(retry.body["events"][i]["replayed"], true);
    }

    // Seen keys replayed, the rest stored, in one answer; a key twice in one
    // batch with the same event is stored once.
    let mixed = publish_batch(
        &server,
        json!([
            {"topic": "t", "data": "b", "idempotency_key": "k-b"},
            {"topic": "t", "data": "d"},
            {"topic": "umu", "data": "e", "idempotency_key": "k-e"},
            {"topic": "umu", "data": "e", "idempotency_key": "k-e"},
        ]),
    )
    .await;
    assert_eq!(mixed.status, 201, "{mixed:?}");
    assert!(!mixed.replayed, "{mixed:?}");
    let items = mixed.body["events"].as_array().unwrap();
    assert_eq!(items[0]["id"], ids[1].as_str());
    assert_eq!(items[0]["replayed"], true);
    assert_eq!(
        (items[1]["seq"].as_u64(), items[1].get("replayed")),
        (Some(3), None)
    );
    assert_eq!(
        (items[2]["seq"].as_u64(), items[2].get("replayed")),
        (Some(2), None)
    );
    assert_eq!(items[3]["id"], items[2]["id"]);
    assert_eq!(items[3]["replayed"], true);

    // A seen key with another event refuses the whole batch, on every
    // topic it names; so does one key for two events within a batch.
    for refused in [
        json!([
            {"topic": "t", "data": "f", "idempotency_key": "k-f"},
            {"topic": "umu", "data": "not c", "idempotency_key": "k-c"},
        ]),
        json!([
            {"topic": "umu", "data": "g", "idempotency_key": "k-g"},
            {"topic": "t", "data": "g", "idempotency_key": "k-g"},
        ]),
    ] {
        let response = server
            .client
            .post(server.url("/events"))
            .json(&refused)
            .send()
            .await
            .unwrap();
        let body = assert_problem(response, 422, "idempotency-key-reused").await;
        assert!(
            body["detail"].as_str().unwrap().contains("item 1"),
            "{body}"
        );
    }
    // Nothing of them was stored, and their new keys were not kept.
    let f = publish_keyed(&server, "t", "k-f", "f").await;
    assert_stored(&f, "t", 4);
    let g = publish_keyed(&server, "t", "k-g", "g").await;
    assert_stored(&g, "t", 5);

    let seen_t: Vec<(u64, String)> = on_t
        .take(5)
        .await
        .into_iter()
        .map(|e| (e.seq(), e.data))
        .collect();
    assert_eq!(
        seen_t,
        [1, 2, 3, 4, 5]
            .into_iter()
            .zip(["a", "b", "d", "f", "g"].map(String::from))
            .collect::<Vec<_>>()
    );
    let seen_u: Vec<(u64, String)> = on_u
        .take(2)
        .await
        .into_iter()
        .map(|e| (e.seq(), e.data))
        .collect();
    assert_eq!(seen_u, [(1, "c".to_owned()), (2, "e".to_owned())]);
    let last_u = server.publish_id("umu", "h").await;
    assert_eq!(on_u.next().await, Ev::new(&last_u, "message", "h"));
    assert_eq!(seq_of(&last_u), 3);
}

async fn keys_belong_to_their_token_subject() {
    let server = Server::start_with(auth::with_secret).await;
    let token_of = |subject: &str| {
        let mut claims = auth::claims(&["*"], &["*"], auth::now() + 3600);
        claims["sub"] = json!(subject);
        auth::signed(&claims)
    };
    let (alice, bob) = (token_of("alice"), token_of("bob"));
    let mut sub = SseClient::open(
        server
            .client
            .get(server.url("/topics/t"))
            .bearer_auth(&alice),
    )
    .await;
    let as_alice = |r: reqwest::RequestBuilder| r.bearer_auth(&alice);
    let as_bob = |r: reqwest::RequestBuilder| r.bearer_auth(&bob);
    let a = publish_keyed_with(&server, "t", "same", "from alice", as_alice).await;
    assert_stored(&a, "t", 1);
    // Bob's key of the same name is his own: no 422, no replay of Alice's.
    let b = publish_keyed_with(&server, "t", "same", "from bob", as_bob).await;
    assert_stored(&b, "t", 2);
    let a_again = publish_keyed_with(&server, "t", "same", "from alice", as_alice).await;
    assert_replay_of(&a_again, &a);
    let b_again = publish_keyed_with(&server, "t", "same", "from bob", as_bob).await;
    assert_replay_of(&b_again, &b);
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(a.id(), "message", "from alice"),
            Ev::new(b.id(), "message", "from bob")
        ]
    );
}

async fn a_browser_may_send_a_key_and_read_the_replay_header() {
    let server = Server::start().await;
    let origin = "https://app.example.com";
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/topics/t"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "idempotency-key")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("idempotency-key"), "{allowed}");
    let with_origin = |r: reqwest::RequestBuilder| r.header("origin", origin);
    let first = publish_keyed_with(&server, "t", "k", "x", with_origin).await;
    assert_stored(&first, "t", 1);
    let response = server
        .client
        .post(server.url("/topics/t"))
        .header("origin", origin)
        .header("idempotency-key", "k")
        .body("x")
        .send()
        .await
        .unwrap();
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains(REPLAYED), "{exposed}");
    assert_replay_of(&Answer::of(response).await, &first);
}

on_every_store!(
    a_browser_may_send_a_key_and_read_the_replay_header,
    a_publish_whose_answer_is_lost_is_stored_once_when_retried,
    concurrent_publishes_with_one_key_store_one_event_and_share_its_answer,
    a_key_is_forgotten_after_the_idempotency_window,
    a_zero_window_checks_keys_but_remembers_none,
    a_key_reused_for_another_event_is_refused_and_nothing_is_stored,
    a_malformed_idempotency_key_is_refused_without_quoting_it,
    batches_store_new_keyed_items_and_answer_seen_ones_with_their_receipts,
    keys_belong_to_their_token_subject,
);
