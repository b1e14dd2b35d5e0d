//! Long-polling: `?poll=1` or `Accept: application/json` on the subscribe
//! URLs answers the events after a position as soon as there is one, or
//! none after `--poll-timeout`, with the id to ask from next.

use crate::common;

use std::time::{Duration, Instant};

use common::auth::with_secret;
use common::transport::poll_once;
use common::{Server, assert_problem};
use serde_json::json;

#[tokio::test]
async fn an_idle_poll_answers_no_events_after_the_timeout_with_where_to_ask_from() {
    let server =
        Server::start_with(|c| c.transports.poll_timeout = Duration::from_millis(300)).await;
    let first = server.publish_id("news", "a").await;
    let second = server.publish_id("news", "b").await;
    let url = server.url("/topics/news");

    let started = Instant::now();
    let answer = poll_once(&server.client, &url, Some(&second)).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(answer, json!({"events": [], "next": second}));

    // Without a position: from now, and `next` says where now is.
    let answer = poll_once(&server.client, &url, None).await;
    assert_eq!(answer, json!({"events": [], "next": second}));

    // From the first: the second at once.
    let answer = poll_once(&server.client, &url, Some(&first)).await;
    assert_eq!(
        answer,
        json!({"events": [{"id": second, "type": "event", "topic": "news", "seq": 2, "data": "b"}], "next": second})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_waiting_poll_answers_as_soon_as_an_event_is_published() {
    let server = Server::start_with(|c| c.transports.poll_timeout = Duration::from_secs(20)).await;
    let first = server.publish_id("news", "a").await;
    let poll = {
        let client = server.client.clone();
        let url = server.url("/topics/news");
        let first = first.clone();
        tokio::spawn(async move { poll_once(&client, &url, Some(&first)).await })
    };
    // The poll is waiting in the hub before the event comes.
    server
        .wait_for_metric("crier_open_streams{transport=\"longpoll\"} 1")
        .await;
    let started = Instant::now();
    let second = server.publish_id("news", "b").await;
    let answer = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the poll answers at once")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(answer["events"][0]["id"], second);
    assert_eq!(answer["next"], second);
    server.stop().await;
}

#[tokio::test]
async fn accept_application_json_is_a_long_poll_and_event_stream_wins() {
    let server =
        Server::start_with(|c| c.transports.poll_timeout = Duration::from_millis(300)).await;
    let id = server.publish_id("news", "a").await;
    let response = server
        .client
        .get(server.url("/topics/news?lastEventId=0"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["events"][0]["data"], "a");
    assert_eq!(answer["next"], id);

    let response = server
        .client
        .get(server.url("/topics/news?lastEventId=0"))
        .header("accept", "application/json, text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    server.stop().await;
}

#[tokio::test]
async fn a_poll_is_authorized_like_a_stream() {
    let server = Server::start_with(with_secret).await;
    let response = server
        .client
        .get(server.url("/topics/news?poll=1"))
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "unauthenticated").await;
    let response = server
        .client
        .get(server.url("/topics/news?poll=1&lastEventId=x.y.z"))
        .header(
            "authorization",
            format!("Bearer {}", common::auth::token(&[], &["news"])),
        )
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "invalid-last-event-id").await;
    server.stop().await;
}
