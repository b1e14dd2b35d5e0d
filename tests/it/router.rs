//! The fast tier: the router answered through `oneshot`, with no socket,
//! server or store process, for what needs none — problem+json for bad
//! input, status codes, headers, 404 and 405. The same `crier::app` the
//! server serves (one wiring); what needs a connection (streams, limits
//! per connection, TLS, restarts) is the other suites'. Run it alone with
//! `cargo test --test it router::`.

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::common::Config;

/// One request through a fresh router (memory store, open hub), as if from
/// a loopback client; the answer, its body read whole.
async fn answer(request: Request<Body>) -> (Response<()>, Vec<u8>) {
    let stop = CancellationToken::new();
    let state = crier::state(Config::default(), stop.clone()).expect("state");
    let mut request = request;
    request
        .extensions_mut()
        .insert(crier::server::connection::Peer(
            "127.0.0.1:40000".parse().unwrap(),
        ));
    let response = crier::app(state)
        .oneshot(request)
        .await
        .expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes().to_vec();
    stop.cancel();
    (Response::from_parts(parts, ()), bytes)
}

fn request(method: Method, path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(body.into())
        .unwrap()
}

/// Asserts an RFC 9457 answer: `status`, `application/problem+json`, and
/// a body whose `type` is `urn:crier:problem:KIND` and whose `status`
/// repeats the answer's.
fn assert_problem(response: &Response<()>, body: &[u8], status: u16, kind: &str) -> Value {
    assert_eq!(
        response.status(),
        status,
        "{}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = serde_json::from_slice(body).expect("a JSON problem");
    assert_eq!(problem["type"], format!("urn:crier:problem:{kind}"));
    assert_eq!(problem["status"], status);
    assert!(problem["title"].is_string() && problem["detail"].is_string());
    problem
}

#[tokio::test]
async fn an_unknown_path_is_a_404_problem() {
    let (response, body) = answer(request(Method::GET, "/nowhere", Body::empty())).await;
    assert_problem(&response, &body, 404, "not-found");
    // A `/` in a topic is a path separator: no route.
    let (response, body) = answer(request(Method::POST, "/topics/a/b", "x")).await;
    assert_problem(&response, &body, 404, "not-found");
}

#[tokio::test]
async fn a_wrong_method_is_a_405_problem_naming_the_allowed_ones() {
    for path in ["/topics/t", "/events"] {
        for method in [Method::PUT, Method::DELETE, Method::PATCH] {
            let (response, body) = answer(request(method, path, "x")).await;
            assert_problem(&response, &body, 405, "method-not-allowed");
            assert_eq!(response.headers()["allow"], "GET, POST", "{path}");
        }
    }
}

#[tokio::test]
async fn an_invalid_topic_is_a_400_problem_to_publisher_and_subscriber() {
    for path in ["/topics/a%20b", "/topics/%00", "/topics/a,b"] {
        let (response, body) = answer(request(Method::POST, path, "x")).await;
        assert_problem(&response, &body, 400, "invalid-topic");
        let (response, body) = answer(request(Method::GET, path, Body::empty())).await;
        assert_problem(&response, &body, 400, "invalid-topic");
    }
}

#[tokio::test]
async fn event_data_that_is_not_utf8_is_a_400_problem() {
    let (response, body) = answer(request(Method::POST, "/topics/t", vec![0xff, 0xfe])).await;
    assert_problem(&response, &body, 400, "not-utf8");
}

#[tokio::test]
async fn a_malformed_position_is_a_400_problem() {
    let mut get = request(Method::GET, "/topics/t", Body::empty());
    get.headers_mut()
        .insert("last-event-id", "1.NOT-AN-EPOCH!".parse().unwrap());
    let (response, body) = answer(get).await;
    assert_problem(&response, &body, 400, "invalid-last-event-id");
}

#[tokio::test]
async fn a_publish_answers_201_with_the_first_id_of_a_new_topic() {
    let (response, body) = answer(request(Method::POST, "/topics/t", "hello")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["content-type"], "application/json");
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["seq"], 1);
    let id = answer["id"].as_str().unwrap();
    assert!(id.starts_with("1."), "{id}");
}

#[tokio::test]
async fn healthz_answers_200() {
    let (response, _) = answer(request(Method::GET, "/healthz", Body::empty())).await;
    assert_eq!(response.status(), StatusCode::OK);
}
