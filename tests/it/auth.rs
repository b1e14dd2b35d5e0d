//! Access control through real HTTP: tokens signed here with real keys
//! (HMAC, EC P-256, Ed25519, a JWK set), grants, single-use tickets on the
//! embedded store and on Redis, origins and CORS, cookies, expiry and
//! `reauth`, what the real binary logs, and `crier token`.

use crate::common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::RequestBuilder;
use serde_json::{Value, json};

use common::auth::*;
use common::process::Process;
use common::redis::RedisServer;
use common::*;

/// What every stream starts with (default `--retry`).
/// The first bytes of a stream the hub started "now" at `start`.
fn preamble(start: &str) -> String {
    format!("retry: 1000\nid: {start}\n: crier stream open\n\n")
}
/// The last bytes of a stream whose credentials expired: no `id:` line.
const REAUTH: &str = "event: reauth\ndata: {\"reason\":\"token-expired\"}\n\n";
/// An origin no test hub lists.
const FOREIGN: &str = "https://evil.example";
/// The origin the listing hubs list.
const LISTED: &str = "https://app.example.com";

fn get(server: &Server, path: &str) -> RequestBuilder {
    server.client.get(server.url(path))
}

fn post(server: &Server, path: &str, body: &str) -> RequestBuilder {
    server.client.post(server.url(path)).body(body.to_owned())
}

fn post_json(server: &Server, path: &str, body: &Value) -> RequestBuilder {
    post(server, path, &body.to_string()).header("content-type", "application/json")
}

fn cookie(token: &str) -> String {
    format!("theme=dark; {COOKIE}={token}; lang=en")
}

/// The hub's own origin, as its page would send it.
fn own_origin(server: &Server) -> String {
    format!("http://{}", server.addr)
}

async fn send(request: RequestBuilder) -> reqwest::Response {
    tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("answer in time")
        .expect("request")
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Asserts a refusal about a token: its status, problem type and the
/// `invalid_token` challenge.
async fn assert_bad_token(response: reqwest::Response, kind: &str) -> Value {
    let challenge = header(&response, "www-authenticate");
    let body = assert_problem(response, 401, kind).await;
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer realm="crier", error="invalid_token""#)
    );
    body
}

/// Asserts 403 `forbidden-topic` naming `topic`.
async fn assert_forbidden(response: reqwest::Response, topic: &str) {
    let challenge = header(&response, "www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains(r#"error="insufficient_scope""#),
        "{challenge}"
    );
    let body = assert_problem(response, 403, "forbidden-topic").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("`{topic}`")), "{detail}");
}

/// Asserts 401 `unauthenticated` with the bare challenge.
async fn assert_unauthenticated(response: reqwest::Response) {
    let challenge = header(&response, "www-authenticate");
    assert_problem(response, 401, "unauthenticated").await;
    assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="crier""#));
}

/// Publishes with a bearer token; returns the event's id.
async fn publish_as(server: &Server, token: &str, topic: &str, data: &str) -> String {
    let response = send(post(server, &format!("/topics/{topic}"), data).bearer_auth(token)).await;
    assert_eq!(response.status(), 201, "publishing to {topic}");
    let answer: Value = response.json().await.unwrap();
    answer["id"].as_str().unwrap().to_owned()
}

/// Trades `token` for a ticket to `topics`, checking the answer's shape.
async fn mint_ticket(server: &Server, token: &str, topics: &[&str], ttl_secs: u64) -> String {
    let response =
        send(post_json(server, "/tickets", &json!({ "topics": topics })).bearer_auth(token)).await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        header(&response, "cache-control").as_deref(),
        Some("no-store")
    );
    let answer: Value = response.json().await.unwrap();
    let object = answer.as_object().unwrap();
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["expires_in", "ticket"], "{answer}");
    assert_eq!(answer["expires_in"], ttl_secs, "{answer}");
    let ticket = answer["ticket"].as_str().unwrap().to_owned();
    assert_eq!(ticket.len(), 64, "{ticket}");
    assert!(
        ticket.bytes().all(|b| b.is_ascii_hexdigit()),
        "a ticket is hex: {ticket}"
    );
    ticket
}

/// Checks that `token` is refused with `kind` to subscribe, publish and
/// mint a ticket (as a bearer token, and as the cookie where one counts),
/// and that the refusals never quote it.
async fn refused_everywhere(server: &Server, token: &str, kind: &str) {
    let ticket_request = || post_json(server, "/tickets", &json!({"topics": ["t"]}));
    for request in [
        get(server, "/topics/t").bearer_auth(token),
        get(server, "/events?topic=t").bearer_auth(token),
        post(server, "/topics/t", "x").bearer_auth(token),
        post_json(server, "/events", &json!([{"topic": "t", "data": "x"}])).bearer_auth(token),
        ticket_request().bearer_auth(token),
        get(server, "/topics/t").header("cookie", cookie(token)),
        ticket_request().header("cookie", cookie(token)),
    ] {
        let body = assert_bad_token(send(request).await, kind).await;
        assert!(!body.to_string().contains(token), "{body}");
    }
}

/// Checks that `token` (granting `*`) may subscribe and publish.
async fn accepted(server: &Server, token: &str) {
    let mut sub = SseClient::open(get(server, "/topics/t").bearer_auth(token)).await;
    assert_eq!(sub.status, 200);
    let id = publish_as(server, token, "t", "accepted").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "accepted"));
}

fn everything() -> Value {
    claims(&["*"], &["*"], now() + 3600)
}

// ---------------------------------------------------------------------------
// Tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_is_refused_unauthenticated_with_a_bearer_challenge() {
    let server = Server::start_with(with_secret).await;
    for request in [
        get(&server, "/topics/t"),
        get(&server, "/events?topic=t&topic=u"),
        post(&server, "/topics/t", "x"),
        post_json(&server, "/events", &json!([{"topic": "t", "data": "x"}])),
        post_json(&server, "/tickets", &json!({"topics": ["t"]})),
    ] {
        assert_unauthenticated(send(request).await).await;
    }
    // A token in the URL is no credential.
    let token = token(&["*"], &["*"]);
    for path in [
        format!("/topics/t?access_token={token}"),
        format!("/topics/t?token={token}"),
        format!("/topics/t?authorization=Bearer%20{token}"),
    ] {
        assert_unauthenticated(send(get(&server, &path)).await).await;
    }
    // Only the Bearer scheme carries a token.
    let basic = get(&server, "/topics/t").header("authorization", format!("Basic {token}"));
    assert_unauthenticated(send(basic).await).await;
    // Nothing was published by the refused requests.
    assert_eq!(seq_of(&publish_as(&server, &token, "t", "first").await), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unsigned_and_exp_less_tokens_are_invalid() {
    let server = Server::start_with(with_secret).await;
    refused_everywhere(&server, "not-a-jwt", "invalid-token").await;
    refused_everywhere(&server, "a.b.c", "invalid-token").await;
    // `alg: none` with no signature.
    refused_everywhere(&server, &unsigned(&everything()), "invalid-token").await;
    // The right signature over claims without `exp`.
    let mut no_exp = everything();
    no_exp.as_object_mut().unwrap().remove("exp");
    refused_everywhere(&server, &signed(&no_exp), "invalid-token").await;
    // `exp` that is not a number.
    let mut text_exp = everything();
    text_exp["exp"] = json!("tomorrow");
    refused_everywhere(&server, &signed(&text_exp), "invalid-token").await;
    // Grants of the wrong shape are not read as no grants silently.
    let mut bad_grants = everything();
    bad_grants["crier"] = json!({"publish": "news"});
    refused_everywhere(&server, &signed(&bad_grants), "invalid-token").await;
    accepted(&server, &signed(&everything())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_with_another_key_or_algorithm_are_invalid() {
    let server = Server::start_with(with_secret).await;
    let other = b"another secret, also at least 32 bytes long";
    let claims = everything();
    refused_everywhere(
        &server,
        &sign_hmac(&claims, other, Algorithm::HS256),
        "invalid-token",
    )
    .await;
    // The right secret, another algorithm than the configured one.
    for algorithm in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign_hmac(&claims, SECRET.as_bytes(), algorithm);
        refused_everywhere(&server, &token, "invalid-token").await;
    }
    // A signature tampered with (its first character changed).
    let token = signed(&claims);
    let (signed_part, signature) = token.rsplit_once('.').unwrap();
    let first = if signature.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed_part}.{first}{}", &signature[1..]);
    refused_everywhere(&server, &tampered, "invalid-token").await;
    // Claims changed under the original signature.
    let (header_part, _) = signed_part.split_once('.').unwrap();
    let mut more = claims.clone();
    more["exp"] = json!(now() + 7200);
    let escalated = base64url(more.to_string().as_bytes());
    let resigned = format!("{header_part}.{escalated}.{signature}");
    refused_everywhere(&server, &resigned, "invalid-token").await;
    accepted(&server, &token).await;

    // --jwt-algorithm chooses the one HMAC algorithm accepted.
    let hs384 = Server::start_with(|c| {
        with_secret(c);
        c.access.jwt.jwt_algorithm = Some(Algorithm::HS384);
    })
    .await;
    refused_everywhere(&hs384, &signed(&claims), "invalid-token").await;
    accepted(
        &hs384,
        &sign_hmac(&claims, SECRET.as_bytes(), Algorithm::HS384),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_token_expired_after_the_leeway() {
    let server = Server::start_with(with_secret).await;
    let expired = signed(&claims(&["*"], &["*"], now() - 60));
    refused_everywhere(&server, &expired, "token-expired").await;
    // Within the default leeway of 5 s an expired token still counts.
    accepted(&server, &signed(&claims(&["*"], &["*"], now() - 2))).await;

    let strict = Server::start_with(|c| {
        with_secret(c);
        c.access.jwt.jwt_leeway = Duration::ZERO;
    })
    .await;
    let just_expired = signed(&claims(&["*"], &["*"], now() - 2));
    refused_everywhere(&strict, &just_expired, "token-expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_expired_from_the_second_its_exp_names() {
    // As streams count it: one authorized by this token would end at once.
    let server = Server::start_with(strict).await;
    let token = signed(&claims(&["*"], &["*"], now()));
    refused_everywhere(&server, &token, "token-expired").await;
    accepted(&server, &signed(&claims(&["*"], &["*"], now() + 60))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_not_yet_valid_is_invalid() {
    let server = Server::start_with(with_secret).await;
    let mut early = everything();
    early["nbf"] = json!(now() + 60);
    refused_everywhere(&server, &signed(&early), "invalid-token").await;
    let mut valid = everything();
    valid["nbf"] = json!(now() - 1);
    accepted(&server, &signed(&valid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_checked_when_configured() {
    let server = Server::start_with(|c| {
        with_secret(c);
        c.access.jwt.jwt_issuer = Some("https://issuer.example".into());
        c.access.jwt.jwt_audience = Some("crier".into());
    })
    .await;
    let with = |iss: Option<&str>, aud: Option<Value>| {
        let mut claims = everything();
        if let Some(iss) = iss {
            claims["iss"] = json!(iss);
        }
        if let Some(aud) = aud {
            claims["aud"] = aud;
        }
        signed(&claims)
    };
    let right_aud = || Some(json!("crier"));
    let wrong = [
        with(Some("https://other.example"), right_aud()),
        with(None, right_aud()),
        with(Some("https://issuer.example"), Some(json!("other"))),
        with(Some("https://issuer.example"), None),
    ];
    for token in wrong {
        refused_everywhere(&server, &token, "invalid-token").await;
    }
    accepted(&server, &with(Some("https://issuer.example"), right_aud())).await;
    // `aud` may be a list that includes the hub.
    accepted(
        &server,
        &with(
            Some("https://issuer.example"),
            Some(json!(["other", "crier"])),
        ),
    )
    .await;

    // Without the settings, `iss` and `aud` are not looked at.
    let lax = Server::start_with(with_secret).await;
    accepted(&lax, &with(Some("https://any.example"), Some(json!("any")))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_and_ed25519_public_key_tokens_are_accepted_and_others_refused() {
    let keys = KeyDir::new();
    for (name, key, stranger) in [
        ("ec.pem", TestKey::ec(), TestKey::ec()),
        ("ed.pem", TestKey::ed25519(), TestKey::ed25519()),
    ] {
        let path = keys.write(name, &key.public_pem());
        let server = Server::start_with(|c| c.access.jwt.jwt_public_key = Some(path)).await;
        accepted(&server, &key.sign(&everything(), None)).await;
        // The same kind of key, not the configured one.
        refused_everywhere(
            &server,
            &stranger.sign(&everything(), None),
            "invalid-token",
        )
        .await;
        // The old HMAC secret means nothing to a hub with a public key.
        refused_everywhere(&server, &signed(&everything()), "invalid-token").await;
        let expired = key.sign(&claims(&["*"], &["*"], now() - 60), None);
        refused_everywhere(&server, &expired, "token-expired").await;
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hmac_token_keyed_with_the_public_key_is_refused() {
    // Algorithm confusion: the public key is public, so a verifier that let
    // the token pick HS256 would check an HMAC keyed with its PEM bytes.
    let keys = KeyDir::new();
    for (name, key) in [("ec.pem", TestKey::ec()), ("ed.pem", TestKey::ed25519())] {
        let pem = key.public_pem();
        let path = keys.write(name, &pem);
        let server = Server::start_with(|c| c.access.jwt.jwt_public_key = Some(path)).await;
        for algorithm in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let forged = sign_hmac(&everything(), pem.as_bytes(), algorithm);
            refused_everywhere(&server, &forged, "invalid-token").await;
            let trimmed = sign_hmac(&everything(), pem.trim().as_bytes(), algorithm);
            refused_everywhere(&server, &trimmed, "invalid-token").await;
        }
        accepted(&server, &key.sign(&everything(), None)).await;
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_jwk_set_the_kid_chooses_the_key() {
    let keys = KeyDir::new();
    let (first, second, ed) = (TestKey::ec(), TestKey::ec(), TestKey::ed25519());
    let set = json!({ "keys": [first.jwk("first"), second.jwk("second"), ed.jwk("ed")] });
    let path = keys.write("jwks.json", &set.to_string());
    let server = Server::start_with(|c| c.access.jwt.jwks_file = Some(path)).await;
    accepted(&server, &first.sign(&everything(), Some("first"))).await;
    accepted(&server, &second.sign(&everything(), Some("second"))).await;
    accepted(&server, &ed.sign(&everything(), Some("ed"))).await;
    // A key of the set under another key's name, an unknown name, no name.
    refused_everywhere(
        &server,
        &second.sign(&everything(), Some("first")),
        "invalid-token",
    )
    .await;
    refused_everywhere(
        &server,
        &first.sign(&everything(), Some("third")),
        "invalid-token",
    )
    .await;
    refused_everywhere(&server, &first.sign(&everything(), None), "invalid-token").await;
    // A key outside the set under a name in it.
    refused_everywhere(
        &server,
        &TestKey::ec().sign(&everything(), Some("first")),
        "invalid-token",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_comes_from_a_file_and_must_be_32_bytes() {
    let keys = KeyDir::new();
    let path = keys.write("secret", &format!("  {SECRET}\n"));
    let server = Server::start_with(|c| c.access.jwt.jwt_secret_file = Some(path)).await;
    accepted(&server, &signed(&everything())).await;

    let short = "31 bytes is not enough, really.";
    assert_eq!(short.len(), 31);
    let mut config = Config::default();
    config.access.jwt.jwt_secret = Some(short.parse().unwrap());
    let error = crier::state(config, tokio_util::sync::CancellationToken::new())
        .err()
        .expect("a short secret is refused at start-up");
    assert!(error.to_string().contains("32 bytes"), "{error}");
    let mut config = Config::default();
    config.access.jwt.jwt_secret_file = Some(keys.write("short", short));
    assert!(
        crier::state(config, tokio_util::sync::CancellationToken::new()).is_err(),
        "a short secret file is refused at start-up"
    );
}

// ---------------------------------------------------------------------------
// Grants

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_needs_a_grant_for_the_topic() {
    let server = Server::start_with(with_secret).await;
    let publisher = token(&["news", "scores.*"], &[]);
    assert_eq!(
        seq_of(&publish_as(&server, &publisher, "news", "a").await),
        1
    );
    assert_eq!(
        seq_of(&publish_as(&server, &publisher, "scores.nba", "b").await),
        1
    );
    for topic in ["sport", "scores", "news2", "newsx"] {
        let response =
            send(post(&server, &format!("/topics/{topic}"), "x").bearer_auth(&publisher)).await;
        assert_forbidden(response, topic).await;
    }
    // Subscribe grants do not let one publish.
    let reader = token(&[], &["*"]);
    let response = send(post(&server, "/topics/news", "x").bearer_auth(&reader)).await;
    assert_forbidden(response, "news").await;
    // Nothing was stored by the refusals.
    let all = token(&["*"], &[]);
    assert_eq!(seq_of(&publish_as(&server, &all, "news", "c").await), 2);
    assert_eq!(seq_of(&publish_as(&server, &all, "sport", "d").await), 1);
}

async fn a_batch_with_one_ungranted_topic_stores_nothing() {
    // The batch's topics share one Redis Cluster partition, where a batch
    // is atomic only within one (see `batch-spans-partitions`).
    let server = Server::start_with(with_secret).await;
    let publisher = token(&["news", "scores.*"], &["*"]);
    let batch = json!([
        {"topic": "news", "data": "n"},
        {"topic": "scores.bt", "data": "s"},
        {"topic": "sport", "data": "x"},
        {"topic": "weather", "data": "w"},
    ]);
    let response = send(post_json(&server, "/events", &batch).bearer_auth(&publisher)).await;
    assert_forbidden(response, "sport").await;

    // Numbering continues densely at 1 on every topic of the batch.
    let granted = json!([
        {"topic": "news", "data": "n1"},
        {"topic": "scores.bt", "data": "s1"},
    ]);
    let response = send(post_json(&server, "/events", &granted).bearer_auth(&publisher)).await;
    assert_eq!(response.status(), 201);
    let answer: Value = response.json().await.unwrap();
    let seqs: Vec<(&str, u64)> = answer["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["topic"].as_str().unwrap(), e["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(seqs, [("news", 1), ("scores.bt", 1)]);
    let n1 = answer["events"][0]["id"].as_str().unwrap().to_owned();
    let all = token(&["*"], &["*"]);
    assert_eq!(seq_of(&publish_as(&server, &all, "sport", "x1").await), 1);
    assert_eq!(seq_of(&publish_as(&server, &all, "weather", "w1").await), 1);

    // Reading the history back: the granted event is the first and only one
    // before what comes next.
    let mut sub =
        SseClient::open(get(&server, "/topics/news?last=10").bearer_auth(&publisher)).await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.next().await, Ev::new(&n1, "message", "n1"));
    let n2 = publish_as(&server, &all, "news", "n2").await;
    assert_eq!(seq_of(&n2), 2);
    assert_eq!(sub.next().await, Ev::new(&n2, "message", "n2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_with_one_ungranted_topic_is_refused_naming_it() {
    let server = Server::start_with(with_secret).await;
    let reader = token(&[], &["news", "scores.*"]);
    for (path, refused) in [
        ("/topics/secret", "secret"),
        ("/topics/scores", "scores"),
        ("/events?topic=news&topic=secret", "secret"),
        ("/events?topic=secret&topic=scores.nba&topic=news", "secret"),
    ] {
        let response = send(get(&server, path).bearer_auth(&reader)).await;
        assert_forbidden(response, refused).await;
    }
    // Publish grants do not let one read.
    let writer = token(&["*"], &[]);
    assert_forbidden(
        send(get(&server, "/topics/news").bearer_auth(&writer)).await,
        "news",
    )
    .await;

    let mut sub =
        SseClient::open(get(&server, "/events?topic=news&topic=scores.nba").bearer_auth(&reader))
            .await;
    assert_eq!(sub.status, 200);
    let id = publish_as(&server, &writer, "scores.nba", "goal").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&format!("scores.nba/0,{id}"), "message", "goal")
    );
}

async fn public_topics_need_no_token_to_read_only() {
    let server = Server::start_with(|c| {
        with_secret(c);
        c.access.public_topics = vec!["lobby".into(), "open.*".into()];
    })
    .await;
    let writer = token(&["*"], &[]);
    let mut single = SseClient::open(get(&server, "/topics/open.a")).await;
    assert_eq!(single.status, 200);
    let mut multi = SseClient::open(get(&server, "/events?topic=open.a&topic=lobby")).await;
    assert_eq!(multi.status, 200);
    // A token that would be refused is not looked at for public topics.
    let expired = signed(&claims(&[], &[], now() - 3600));
    let mut with_expired =
        SseClient::open(get(&server, "/topics/lobby").bearer_auth(&expired)).await;
    assert_eq!(with_expired.status, 200);

    let a = publish_as(&server, &writer, "open.a", "to a").await;
    let l = publish_as(&server, &writer, "lobby", "to lobby").await;
    assert_eq!(single.next().await, Ev::new(&a, "message", "to a"));
    assert_eq!(
        multi.take(2).await,
        [
            Ev::new(&format!("open.a/0,{a}"), "message", "to a"),
            Ev::new(&format!("lobby/{l},{a}"), "message", "to lobby"),
        ]
    );
    assert_eq!(
        with_expired.next().await,
        Ev::new(&l, "message", "to lobby")
    );

    // One topic that is not public needs a credential for the whole.
    let mixed = "/events?topic=open.a&topic=private";
    assert_unauthenticated(send(get(&server, mixed)).await).await;
    let reader = token(&[], &["private"]);
    let mut sub = SseClient::open(get(&server, mixed).bearer_auth(&reader)).await;
    assert_eq!(sub.status, 200);
    // "open" is not "open.*", and public topics are not publicly writable.
    assert_unauthenticated(send(get(&server, "/topics/open")).await).await;
    assert_unauthenticated(send(post(&server, "/topics/lobby", "x")).await).await;
    let p = publish_as(&server, &writer, "private", "p").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&format!("private/{a},{p}"), "message", "p")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_the_hub_is_open_and_tickets_are_disabled() {
    let server = Server::start().await;
    let mut sub = server.subscribe("/topics/t").await;
    assert_eq!(sub.status, 200);
    let id = server.publish_id("t", "open").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "open"));
    // A token, even a bogus one, changes nothing.
    let response = send(post(&server, "/topics/t", "x").bearer_auth("bogus")).await;
    assert_eq!(response.status(), 201);
    for request in [
        post_json(&server, "/tickets", &json!({"topics": ["t"]})),
        post_json(&server, "/tickets", &json!({"topics": ["t"]}))
            .bearer_auth(token(&["*"], &["*"])),
    ] {
        assert_problem(send(request).await, 404, "tickets-disabled").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_and_reset_are_reserved_event_names() {
    let server = Server::start_with(with_secret).await;
    let writer = token(&["*"], &[]);
    for name in ["reauth", "reset"] {
        let response =
            send(post(&server, &format!("/topics/t?event={name}"), "x").bearer_auth(&writer)).await;
        assert_problem(response, 400, "invalid-event-name").await;
        let batch = json!([{"topic": "t", "data": "x", "event": name}]);
        let response = send(post_json(&server, "/events", &batch).bearer_auth(&writer)).await;
        assert_problem(response, 400, "malformed-batch").await;
    }
    assert_eq!(seq_of(&publish_as(&server, &writer, "t", "first").await), 1);
}

// ---------------------------------------------------------------------------
// Tickets

async fn a_ticket_opens_its_topic_once() {
    let server = Server::start_with(with_secret).await;
    let reader = token(&[], &["t"]);
    let writer = token(&["*"], &[]);
    let ticket = mint_ticket(&server, &reader, &["t"], 30).await;
    assert_ne!(ticket, mint_ticket(&server, &reader, &["t"], 30).await);
    let path = format!("/topics/t?ticket={ticket}");
    let mut sub = SseClient::open(get(&server, &path)).await;
    assert_eq!(sub.status, 200);
    let id = publish_as(&server, &writer, "t", "by ticket").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "by ticket"));
    // Twice is once too many, with or without the stream still open.
    let body = assert_problem(send(get(&server, &path)).await, 401, "invalid-ticket").await;
    assert!(!body.to_string().contains(&ticket), "{body}");
    drop(sub);
    assert_problem(send(get(&server, &path)).await, 401, "invalid-ticket").await;
    // A ticket nobody minted, and one that is not even a ticket.
    for bogus in ["0".repeat(64), "not-a-ticket".into()] {
        let response = send(get(&server, &format!("/topics/t?ticket={bogus}"))).await;
        assert_problem(response, 401, "invalid-ticket").await;
    }
}

async fn a_ticket_is_refused_after_its_ttl() {
    let server = Server::start_with(|c| {
        with_secret(c);
        c.access.ticket_ttl = Duration::from_secs(1);
    })
    .await;
    let reader = token(&[], &["t"]);
    let ticket = mint_ticket(&server, &reader, &["t"], 1).await;
    // Trying it would use it up: the only way to see it expire is to wait.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let response = send(get(&server, &format!("/topics/t?ticket={ticket}"))).await;
    assert_problem(response, 401, "invalid-ticket").await;
    // A fresh one works.
    let ticket = mint_ticket(&server, &reader, &["t"], 1).await;
    let sub = SseClient::open(get(&server, &format!("/topics/t?ticket={ticket}"))).await;
    assert_eq!(sub.status, 200);
}

async fn a_ticket_opens_only_the_topics_it_names() {
    let server = Server::start_with(with_secret).await;
    let reader = token(&[], &["*"]);
    let ticket = mint_ticket(&server, &reader, &["a"], 30).await;
    let response = send(get(&server, &format!("/topics/b?ticket={ticket}"))).await;
    let body = assert_problem(response, 401, "invalid-ticket").await;
    assert!(body["detail"].as_str().unwrap().contains("`b`"), "{body}");
    let ticket = mint_ticket(&server, &reader, &["a"], 30).await;
    let response = send(get(
        &server,
        &format!("/events?topic=a&topic=b&ticket={ticket}"),
    ))
    .await;
    assert_problem(response, 401, "invalid-ticket").await;
}

async fn a_multi_topic_ticket_opens_events() {
    let server = Server::start_with(with_secret).await;
    let reader = token(&[], &["a", "b"]);
    let writer = token(&["*"], &[]);
    let ticket = mint_ticket(&server, &reader, &["b", "a"], 30).await;
    let path = format!("/events?topic=a&topic=b&ticket={ticket}");
    let mut sub = SseClient::open(get(&server, &path)).await;
    assert_eq!(sub.status, 200);
    let a = publish_as(&server, &writer, "a", "one").await;
    let b = publish_as(&server, &writer, "b", "two").await;
    assert_eq!(
        sub.take(2).await,
        [
            Ev::new(&format!("a/{a},0"), "message", "one"),
            Ev::new(&format!("b/{a},{b}"), "message", "two"),
        ]
    );
    assert_problem(send(get(&server, &path)).await, 401, "invalid-ticket").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_needs_subscribe_grants_and_a_well_formed_request() {
    let server = Server::start_with(with_secret).await;
    let reader = token(&[], &["a"]);
    let response =
        send(post_json(&server, "/tickets", &json!({"topics": ["a", "b"]})).bearer_auth(&reader))
            .await;
    assert_forbidden(response, "b").await;
    let writer = token(&["*"], &[]);
    let response =
        send(post_json(&server, "/tickets", &json!({"topics": ["a"]})).bearer_auth(&writer)).await;
    assert_forbidden(response, "a").await;
    for body in [
        "not json",
        r#"{"topic": ["a"]}"#,
        r#"{"topics": "a"}"#,
        r#"{"topics": ["a"], "ttl": 3600}"#,
    ] {
        let request = post(&server, "/tickets", body)
            .header("content-type", "application/json")
            .bearer_auth(&reader);
        assert_problem(send(request).await, 400, "malformed-ticket-request").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_minted_on_one_node_is_redeemed_once_on_any_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    let node = |url: String| {
        Server::start_with(move |c| {
            with_secret(c);
            c.redis.url = Some(url);
        })
    };
    let a = node(url.clone()).await;
    let b = node(url).await;
    let reader = token(&[], &["t"]);
    let writer = token(&["t"], &[]);
    let ticket = mint_ticket(&a, &reader, &["t"], 30).await;
    let path = format!("/topics/t?ticket={ticket}");
    let mut sub = SseClient::open(get(&b, &path)).await;
    assert_eq!(sub.status, 200);
    let id = publish_as(&a, &writer, "t", "from node a").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "from node a"));
    assert_problem(send(get(&a, &path)).await, 401, "invalid-ticket").await;
    assert_problem(send(get(&b, &path)).await, 401, "invalid-ticket").await;
    // Tickets are kept under their digest, never as themselves.
    let keys = redis.cli(&["--scan", "--pattern", "*"]);
    assert!(!keys.contains(&ticket), "{keys}");

    // Redeemed by many at once on both nodes: exactly one gets the stream.
    let ticket = mint_ticket(&b, &reader, &["t"], 30).await;
    let path = format!("/topics/t?ticket={ticket}");
    let attempts = (0..8).map(|i| send(get(if i % 2 == 0 { &a } else { &b }, &path)));
    let answers = futures_util::future::join_all(attempts).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 401, 401, 401, 401, 401, 401, 401]);
}

// ---------------------------------------------------------------------------
// Origins and CORS

fn listing(config: &mut Config) {
    with_secret(config);
    config.access.allowed_origins = vec![LISTED.into(), "https://*.partner.example".into()];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_off_the_list_is_refused_on_every_endpoint_before_any_work() {
    let server = Server::start_with(listing).await;
    let all = token(&["*"], &["*"]);
    let requests = |origin: Option<&str>| {
        let with = |request: RequestBuilder| match origin {
            Some(origin) => request.header("origin", origin),
            None => request,
        };
        [
            with(get(&server, "/topics/t")),
            with(get(&server, "/events?topic=t&topic=u")),
            with(post(&server, "/topics/t", "x")),
            with(post_json(
                &server,
                "/events",
                &json!([{"topic": "u", "data": "y"}]),
            )),
            with(post_json(&server, "/tickets", &json!({"topics": ["t"]}))),
        ]
    };
    let other_port = format!("http://127.0.0.1:{}", server.addr.port() ^ 1);
    let other_name = format!("http://localhost:{}", server.addr.port());
    for origin in [
        FOREIGN,
        "null",
        "https://partner.example",
        "http://app.example.com",
        &other_port,
        &other_name,
    ] {
        for request in requests(Some(origin)) {
            // With a valid token or without: the origin decides first.
            let response = send(request.try_clone().unwrap().bearer_auth(&all)).await;
            assert_eq!(header(&response, "access-control-allow-origin"), None);
            assert_problem(response, 403, "origin-not-allowed").await;
            assert_problem(send(request).await, 403, "origin-not-allowed").await;
        }
    }
    // The same requests without Origin, from a listed origin and from the
    // hub's own page are served; nothing the refused ones carried was stored.
    let own = own_origin(&server);
    for (round, origin) in [
        None,
        Some(LISTED),
        Some("https://a.partner.example"),
        Some(own.as_str()),
    ]
    .into_iter()
    .enumerate()
    {
        let [sub_one, sub_many, publish, batch, ticket] =
            requests(origin).map(|request| request.bearer_auth(&all));
        assert_eq!(send(sub_one).await.status(), 200, "{origin:?}");
        assert_eq!(send(sub_many).await.status(), 200, "{origin:?}");
        let answer: Value = send(publish).await.json().await.unwrap();
        assert_eq!(answer["seq"], round + 1, "{origin:?}: {answer}");
        let answer: Value = send(batch).await.json().await.unwrap();
        assert_eq!(
            answer["events"][0]["seq"],
            round + 1,
            "{origin:?}: {answer}"
        );
        assert_eq!(send(ticket).await.status(), 201, "{origin:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_origin_gets_cors_with_credentials() {
    let server = Server::start_with(listing).await;
    let all = token(&["*"], &["*"]);
    for origin in [LISTED, "https://a.partner.example"] {
        for request in [
            get(&server, "/topics/t").bearer_auth(&all),
            post(&server, "/topics/t", "x").bearer_auth(&all),
        ] {
            let response = send(request.header("origin", origin)).await;
            assert!(response.status().is_success(), "{}", response.status());
            assert_eq!(
                header(&response, "access-control-allow-origin").as_deref(),
                Some(origin)
            );
            assert_eq!(
                header(&response, "access-control-allow-credentials").as_deref(),
                Some("true")
            );
        }
        // The preflight of a publish with a token.
        let preflight = server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/topics/t"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            );
        let response = send(preflight).await;
        assert!(response.status().is_success(), "{}", response.status());
        assert_eq!(
            header(&response, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
        assert_eq!(
            header(&response, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
        let allowed = header(&response, "access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert!(allowed.contains("authorization"), "{allowed}");
    }
    // A foreign origin's preflight is refused like its requests.
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/topics/t"))
        .header("origin", FOREIGN)
        .header("access-control-request-method", "POST");
    let response = send(preflight).await;
    assert_eq!(header(&response, "access-control-allow-origin"), None);
    assert_problem(response, 403, "origin-not-allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_origin_gets_cors_without_credentials_by_default() {
    let server = Server::start_with(with_secret).await;
    let all = token(&["*"], &["*"]);
    for request in [
        get(&server, "/topics/t"),
        post(&server, "/topics/t", "x"),
        post_json(&server, "/tickets", &json!({"topics": ["t"]})),
    ] {
        let response = send(request.bearer_auth(&all).header("origin", FOREIGN)).await;
        assert!(response.status().is_success(), "{}", response.status());
        assert_eq!(
            header(&response, "access-control-allow-origin").as_deref(),
            Some("*")
        );
        assert_eq!(header(&response, "access-control-allow-credentials"), None);
    }
}

// ---------------------------------------------------------------------------
// Cookies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_counts_without_origin_and_from_listed_origins_only() {
    let listed = Server::start_with(listing).await;
    let any = Server::start_with(with_secret).await;
    let reader = token(&[], &["*"]);
    let writer = token(&["*"], &[]);

    // No Origin, a listed one, the hub's own: the cookie counts.
    for origin in [None, Some(LISTED.to_owned()), Some(own_origin(&listed))] {
        let with = |request: RequestBuilder| {
            let request = request.header("cookie", cookie(&reader));
            match &origin {
                Some(origin) => request.header("origin", origin),
                None => request,
            }
        };
        let mut sub = SseClient::open(with(get(&listed, "/topics/c"))).await;
        assert_eq!(sub.status, 200, "{origin:?}");
        let id = publish_as(&listed, &writer, "c", "cookie").await;
        assert_eq!(sub.next().await, Ev::new(&id, "message", "cookie"));
        let request = with(post_json(&listed, "/tickets", &json!({"topics": ["c"]})));
        assert_eq!(send(request).await.status(), 201, "{origin:?}");
    }
    let no_origin = send(get(&any, "/topics/c").header("cookie", cookie(&reader))).await;
    assert_eq!(no_origin.status(), 200);

    // An origin allowed only through `*` may not ride on the cookie...
    for request in [
        get(&any, "/topics/c"),
        get(&any, "/events?topic=c"),
        post_json(&any, "/tickets", &json!({"topics": ["c"]})),
    ] {
        let request = request
            .header("cookie", cookie(&reader))
            .header("origin", FOREIGN);
        assert_unauthenticated(send(request).await).await;
    }
    // ...but a bearer token from it counts.
    let response = send(
        get(&any, "/topics/c")
            .bearer_auth(&reader)
            .header("origin", FOREIGN),
    )
    .await;
    assert_eq!(response.status(), 200);

    // Another cookie name is not the auth cookie; the name is a setting.
    let renamed = Server::start_with(|c| {
        with_secret(c);
        c.access.auth_cookie = "session".into();
    })
    .await;
    let response = send(get(&renamed, "/topics/c").header("cookie", cookie(&reader))).await;
    assert_unauthenticated(response).await;
    let response =
        send(get(&renamed, "/topics/c").header("cookie", format!("session={reader}"))).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_counts_a_cookie_only_from_the_hubs_own_or_a_listed_origin() {
    let listed = Server::start_with(listing).await;
    let any = Server::start_with(with_secret).await;
    let writer = token(&["*"], &[]);
    let by_cookie =
        |server: &Server, path: &str| post(server, path, "x").header("cookie", cookie(&writer));
    let batch = |server: &Server| {
        post_json(server, "/events", &json!([{"topic": "p", "data": "x"}]))
            .header("cookie", cookie(&writer))
    };

    // No Origin: a cookie alone proves nothing about who asked.
    assert_unauthenticated(send(by_cookie(&listed, "/topics/p")).await).await;
    assert_unauthenticated(send(batch(&listed)).await).await;
    // An origin allowed only through `*`.
    let foreign = by_cookie(&any, "/topics/p").header("origin", FOREIGN);
    assert_unauthenticated(send(foreign).await).await;

    // The hub's own page and a listed origin may.
    let own = by_cookie(&listed, "/topics/p").header("origin", own_origin(&listed));
    let answer: Value = send(own).await.json().await.unwrap();
    assert_eq!(answer["seq"], 1, "{answer}");
    let listed_origin = batch(&listed).header("origin", LISTED);
    let answer: Value = send(listed_origin).await.json().await.unwrap();
    assert_eq!(answer["events"][0]["seq"], 2, "{answer}");
    let own_any = by_cookie(&any, "/topics/p").header("origin", own_origin(&any));
    assert_eq!(send(own_any).await.status(), 201);
}

// ---------------------------------------------------------------------------
// Expiry

/// A hub that ends streams exactly at `exp`.
fn strict(config: &mut Config) {
    with_secret(config);
    config.access.jwt.jwt_leeway = Duration::ZERO;
}

/// Asserts that the wall clock has reached `at` (allowing for the
/// difference between the monotonic and the wall clock).
fn assert_reached(at: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert!(
        now + Duration::from_millis(50) >= Duration::from_secs(at),
        "ended {:?} before {at}",
        Duration::from_secs(at) - now
    );
}

async fn a_stream_ends_with_reauth_at_expiry_and_a_fresh_cookie_resumes_it_exactly() {
    let server = Server::start_with(strict).await;
    let writer = token(&["*"], &[]);
    // Whole seconds: at least 4 s, time for the first event on a loaded
    // machine (with --redis-wait-replicas on Sentinel, two round trips).
    let exp = now() + 5;
    let short = signed(&claims(&[], &["news"], exp));
    let mut sub =
        SseClient::open(get(&server, "/topics/news").header("cookie", cookie(&short))).await;
    assert_eq!(sub.status, 200);
    let first = publish_as(&server, &writer, "news", "before expiry").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&first, "message", "before expiry")
    );

    let rest = sub.until_end().await;
    assert_reached(exp);
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(
        (rest[0].event.as_str(), rest[0].data.as_str()),
        ("reauth", r#"{"reason":"token-expired"}"#)
    );
    // The raw bytes: no `id:` line, so Last-Event-ID stays at the last event.
    assert_eq!(
        sub.raw_text(),
        format!(
            "{}id: {first}\ndata: before expiry\n\n{REAUTH}",
            preamble("0")
        )
    );
    // From the moment the stream ends, the token is refused.
    let response = send(get(&server, "/topics/news").header("cookie", cookie(&short))).await;
    assert_bad_token(response, "token-expired").await;

    // Published while the client is away.
    let missed = [
        publish_as(&server, &writer, "news", "missed 1").await,
        publish_as(&server, &writer, "news", "missed 2").await,
    ];
    let fresh = signed(&claims(&[], &["news"], now() + 3600));
    let mut again = SseClient::open(
        get(&server, "/topics/news")
            .header("cookie", cookie(&fresh))
            .header("last-event-id", &first),
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(
        again.take(2).await,
        [
            Ev::new(&missed[0], "message", "missed 1"),
            Ev::new(&missed[1], "message", "missed 2"),
        ]
    );
    let live = publish_as(&server, &writer, "news", "live").await;
    assert_eq!(again.next().await, Ev::new(&live, "message", "live"));
    assert_eq!(
        [&first, &missed[0], &missed[1], &live].map(|id| seq_of(id)),
        [1, 2, 3, 4]
    );
}

async fn a_ticket_stream_ends_with_reauth_when_its_minting_token_expires() {
    let server = Server::start_with(strict).await;
    let writer = token(&["*"], &[]);
    // At least 4 s: a ticket is minted and an event sent before it expires.
    let exp = now() + 5;
    let short = signed(&claims(&[], &["a", "b"], exp));
    let ticket = mint_ticket(&server, &short, &["a", "b"], 30).await;
    let mut sub = SseClient::open(get(
        &server,
        &format!("/events?topic=a&topic=b&ticket={ticket}"),
    ))
    .await;
    assert_eq!(sub.status, 200);
    let a = publish_as(&server, &writer, "a", "one").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&format!("a/{a},0"), "message", "one")
    );
    let rest = sub.until_end().await;
    assert_reached(exp);
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].event, "reauth");
    let last_id = format!("a/{a},0");
    assert_eq!(
        sub.raw_text(),
        format!("{}id: {last_id}\ndata: one\n\n{REAUTH}", preamble("0,0"))
    );
    // The minting token can mint no more.
    let refused =
        post_json(&server, "/tickets", &json!({"topics": ["a", "b"]})).bearer_auth(&short);
    assert_bad_token(send(refused).await, "token-expired").await;

    // A page reopens with a ticket from a fresh token and the last id it
    // saw (EventSource cannot send Last-Event-ID on a new URL).
    let b1 = publish_as(&server, &writer, "b", "missed").await;
    let a2 = publish_as(&server, &writer, "a", "missed too").await;
    let fresh = signed(&claims(&[], &["a", "b"], now() + 3600));
    let ticket = mint_ticket(&server, &fresh, &["a", "b"], 30).await;
    let mut again = SseClient::open(get(
        &server,
        &format!("/events?topic=a&topic=b&ticket={ticket}&lastEventId={last_id}"),
    ))
    .await;
    assert_eq!(again.status, 200);
    // (A replay goes topic by topic.)
    assert_eq!(
        again.take(2).await,
        [
            Ev::new(&format!("a/{a2},0"), "message", "missed too"),
            Ev::new(&format!("b/{a2},{b1}"), "message", "missed"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_exp_by_the_leeway() {
    let server = Server::start_with(|c| {
        with_secret(c);
        c.access.jwt.jwt_leeway = Duration::from_secs(2);
    })
    .await;
    let writer = token(&["*"], &[]);
    let exp = now() + 1;
    let short = signed(&claims(&[], &["t"], exp));
    let mut sub = SseClient::open(get(&server, "/topics/t").bearer_auth(&short)).await;
    assert_eq!(sub.status, 200);
    // Past `exp` (a wait on the wall clock, which is what `exp` is about)...
    let past_exp = UNIX_EPOCH + Duration::from_secs(exp) + Duration::from_millis(200);
    if let Ok(left) = past_exp.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    // ...the stream still delivers, and the token still opens another.
    let id = publish_as(&server, &writer, "t", "within the leeway").await;
    assert_eq!(
        sub.next().await,
        Ev::new(&id, "message", "within the leeway")
    );
    let response = send(get(&server, "/topics/t").bearer_auth(&short)).await;
    assert_eq!(response.status(), 200);
    drop(response);
    let rest = sub.until_end().await;
    assert_reached(exp + 2);
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].event, "reauth");
    assert!(
        sub.raw_text()
            .ends_with(&format!("data: within the leeway\n\n{REAUTH}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_stream_ends_with_reauth_too() {
    let server = Server::start_with(strict).await;
    let writer = token(&["*"], &[]);
    let exp = now() + 3;
    let short = signed(&claims(&[], &["z"], exp));
    let mut streams = Vec::new();
    for coding in ["zstd", "br", "gzip"] {
        let request = get(&server, "/topics/z")
            .bearer_auth(&short)
            .header("accept-encoding", coding);
        let response = send(request).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "content-encoding").as_deref(),
            Some(coding)
        );
        streams.push((coding, response));
    }
    let id = publish_as(&server, &writer, "z", "squeezed").await;
    for (coding, response) in streams {
        // The whole body, to its clean end.
        let wire = tokio::time::timeout(DEADLINE, response.bytes())
            .await
            .expect("the stream ends in time")
            .expect("the stream ends cleanly");
        let mut decoder = crier::compress::Decompressor::new(coding.parse().unwrap()).unwrap();
        let text = String::from_utf8(decoder.decompress(&wire).unwrap()).unwrap();
        assert_eq!(
            text,
            format!("{}id: {id}\ndata: squeezed\n\n{REAUTH}", preamble("0")),
            "{coding}"
        );
        // Complete: a gzip member whose trailer's CRC-32 and length are
        // right, whole zstd frames.
        let strict = match coding {
            "gzip" => {
                let mut plain = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(&wire[..]),
                    &mut plain,
                )
                .expect("a complete gzip member");
                Some(plain)
            }
            "zstd" => Some(zstd::stream::decode_all(&wire[..]).expect("complete zstd frames")),
            _ => None,
        };
        if let Some(strict) = strict {
            assert_eq!(strict, text.as_bytes(), "{coding}");
        }
    }
    assert_reached(exp);
}

// ---------------------------------------------------------------------------
// The real binary: logs and `crier token`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_or_ticket_appears_in_the_log_or_in_an_error_body() {
    let mut crier = tokio::task::block_in_place(|| {
        Process::start_with_env(
            &["--allowed-origins", LISTED],
            &[("CRIER_JWT_SECRET", SECRET), ("RUST_LOG", "debug")],
        )
    });
    let base = crier.base.clone();
    let url = |path: &str| format!("{base}{path}");
    let client = common::client();
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();

    let reader = token(&[], &["a", "b"]);
    let writer = token(&["a", "b"], &[]);
    let expired = signed(&claims(&["*"], &["*"], now() - 3600));
    let forged = sign_hmac(
        &everything(),
        b"not the hub's secret, 32 bytes or more",
        Algorithm::HS256,
    );
    let mut secrets = vec![
        reader.clone(),
        writer.clone(),
        expired.clone(),
        forged.clone(),
    ];

    // Served: a bearer subscription, a cookie subscription, a publish.
    let mut by_bearer = SseClient::open(client.get(url("/topics/a")).bearer_auth(&reader)).await;
    let mut by_cookie = SseClient::open(
        client
            .get(url("/topics/a"))
            .header("cookie", cookie(&reader)),
    )
    .await;
    assert_eq!(
        (by_bearer.status.as_u16(), by_cookie.status.as_u16()),
        (200, 200)
    );
    let answer: Value = send(
        client
            .post(url("/topics/a"))
            .bearer_auth(&writer)
            .body("hi"),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = answer["id"].as_str().unwrap();
    assert_eq!(by_bearer.next().await, Ev::new(id, "message", "hi"));
    assert_eq!(by_cookie.next().await, Ev::new(id, "message", "hi"));

    // Tickets: minted, used (HTTP/1.1 and h2c), used again, used for another topic.
    let mut tickets = Vec::new();
    for _ in 0..4 {
        let response = send(
            client
                .post(url("/tickets"))
                .bearer_auth(&reader)
                .header("content-type", "application/json")
                .body(r#"{"topics":["a","b"]}"#),
        )
        .await;
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.unwrap();
        tickets.push(answer["ticket"].as_str().unwrap().to_owned());
    }
    secrets.extend(tickets.iter().cloned());
    let once = SseClient::open(client.get(url(&format!("/topics/a?ticket={}", tickets[0])))).await;
    assert_eq!(once.status, 200);
    let multi = SseClient::open(client.get(url(&format!(
        "/events?topic=a&topic=b&ticket={}",
        tickets[1]
    ))))
    .await;
    assert_eq!(multi.status, 200);
    let over_h2 = SseClient::open(h2c.get(url(&format!("/topics/b?ticket={}", tickets[2])))).await;
    assert_eq!(over_h2.status, 200);
    assert_eq!(
        over_h2.headers.get("content-type").unwrap(),
        "text/event-stream"
    );

    // Refused, each answer checked for the credential it carried.
    let refusals: Vec<(RequestBuilder, &str, u16, &str)> = vec![
        (
            client.get(url(&format!("/topics/a?ticket={}", tickets[0]))),
            &tickets[0],
            401,
            "invalid-ticket",
        ),
        (
            h2c.get(url(&format!("/topics/a?ticket={}", tickets[0]))),
            &tickets[0],
            401,
            "invalid-ticket",
        ),
        (
            client.get(url(&format!("/topics/c?ticket={}", tickets[3]))),
            &tickets[3],
            401,
            "invalid-ticket",
        ),
        (
            client.get(url("/topics/a")).bearer_auth(&expired),
            &expired,
            401,
            "token-expired",
        ),
        (
            client
                .get(url("/topics/a"))
                .header("cookie", cookie(&forged)),
            &forged,
            401,
            "invalid-token",
        ),
        (
            client.post(url("/topics/a")).bearer_auth(&forged).body("x"),
            &forged,
            401,
            "invalid-token",
        ),
        (
            client.get(url("/topics/c")).bearer_auth(&reader),
            &reader,
            403,
            "forbidden-topic",
        ),
        (
            client.post(url("/topics/c")).bearer_auth(&writer).body("x"),
            &writer,
            403,
            "forbidden-topic",
        ),
        (
            client.get(url(&format!("/topics/a?access_token={reader}"))),
            &reader,
            401,
            "unauthenticated",
        ),
        (
            client.get(url(&format!("/nowhere?access_token={reader}"))),
            &reader,
            404,
            "not-found",
        ),
        (
            client
                .get(url(&format!("/topics/a?ticket={}", tickets[1])))
                .header("origin", FOREIGN),
            &tickets[1],
            403,
            "origin-not-allowed",
        ),
    ];
    for (request, credential, status, kind) in refusals {
        let body = assert_problem(send(request).await, status, kind).await;
        assert!(!body.to_string().contains(credential), "{body}");
    }
    drop((by_bearer, by_cookie, once, multi, over_h2));

    crier.terminate();
    let status = tokio::task::block_in_place(|| crier.wait_exit(DEADLINE));
    assert!(status.success(), "{status:?}");
    let log = crier.full_log();
    // The log is the one asked for, and it does name the requests.
    assert!(log.iter().any(|l| l.contains("DEBUG")), "{log:#?}");
    for path in ["/topics/a", "/events", "/tickets", "/nowhere"] {
        assert!(
            log.iter().any(|l| l.contains(&format!("path={path}"))),
            "no request to {path} logged: {log:#?}"
        );
    }
    for secret in &secrets {
        // The whole credential, and each part of a JWT.
        for part in
            std::iter::once(secret.as_str()).chain(secret.split('.').filter(|p| p.len() >= 16))
        {
            if let Some(line) = log.iter().find(|l| l.contains(part)) {
                panic!("a credential in the log: {line}");
            }
        }
    }
    for query in ["ticket=", "access_token="] {
        if let Some(line) = log.iter().find(|l| l.contains(query)) {
            panic!("a query string in the log: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_origins_is_another_name_for_allowed_origins() {
    let by_flag = ["--cors-origins", LISTED];
    let env = [("CRIER_JWT_SECRET", SECRET)];
    let by_former_env = [("CRIER_JWT_SECRET", SECRET), ("CRIER_CORS_ORIGINS", LISTED)];
    let hubs = tokio::task::block_in_place(|| {
        [
            Process::start_with_env(&by_flag, &env),
            Process::start_with_env(&[], &by_former_env),
        ]
    });
    let client = common::client();
    let reader = token(&[], &["*"]);
    for hub in &hubs {
        let request = |origin: &str| {
            client
                .get(format!("{}/topics/t", hub.base))
                .bearer_auth(&reader)
                .header("origin", origin)
        };
        assert_problem(send(request(FOREIGN)).await, 403, "origin-not-allowed").await;
        let response = send(request(LISTED)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "access-control-allow-origin").as_deref(),
            Some(LISTED)
        );
        assert_eq!(
            header(&response, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crier_token_prints_a_jwt_the_hub_accepts_with_its_grants_and_subject() {
    let run = |args: &[&str], secret: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_crier"));
        command
            .arg("token")
            .args(args)
            .env_remove("CRIER_JWT_SECRET");
        if let Some(secret) = secret {
            command.env("CRIER_JWT_SECRET", secret);
        }
        command.output().expect("run crier token")
    };
    let by_env = run(
        &[
            "--publish",
            "news",
            "--subscribe",
            "*",
            "--ttl",
            "1h",
            "--subject",
            "svc-1",
        ],
        Some(SECRET),
    );
    let by_flag = run(
        &[
            "--jwt-secret",
            SECRET,
            "--publish",
            "news,scores.*",
            "--publish",
            "alerts",
            "--ttl",
            "15m",
        ],
        None,
    );
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_aud = false;
    validation.set_required_spec_claims(&["exp"]);
    let key = DecodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let mut tokens = Vec::new();
    for (output, grants, sub, ttl) in [
        (
            &by_env,
            json!({"publish": ["news"], "subscribe": ["*"]}),
            json!("svc-1"),
            3600,
        ),
        (
            &by_flag,
            json!({"publish": ["news", "scores.*", "alerts"]}),
            Value::Null,
            900,
        ),
    ] {
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout.clone()).unwrap();
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        let token = stdout.trim().to_owned();
        let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation)
            .expect("the token verifies with the secret")
            .claims;
        assert_eq!(claims["crier"], grants, "{claims}");
        assert_eq!(claims["sub"], sub, "{claims}");
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp.abs_diff(now() + ttl) <= 5, "exp {exp}, ttl {ttl}");
        tokens.push(token);
    }
    // With --jwt-issuer and --jwt-audience the token names them, and a hub
    // that checks them accepts it.
    let for_issuer = run(
        &[
            "--subscribe",
            "*",
            "--jwt-issuer",
            "https://issuer.example",
            "--jwt-audience",
            "crier",
        ],
        Some(SECRET),
    );
    assert!(for_issuer.status.success(), "{for_issuer:?}");
    let for_issuer = String::from_utf8(for_issuer.stdout)
        .unwrap()
        .trim()
        .to_owned();
    let claims = jsonwebtoken::decode::<Value>(&for_issuer, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(
        (&claims["iss"], &claims["aud"]),
        (&json!("https://issuer.example"), &json!("crier"))
    );
    let checking = Server::start_with(|c| {
        with_secret(c);
        c.access.jwt.jwt_issuer = Some("https://issuer.example".into());
        c.access.jwt.jwt_audience = Some("crier".into());
    })
    .await;
    let response = send(get(&checking, "/topics/t").bearer_auth(&for_issuer)).await;
    assert_eq!(response.status(), 200);
    drop(response);
    // Without a secret there is nothing to sign with.
    let refused = run(&["--publish", "news"], None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("secret"),
        "{refused:?}"
    );

    // The hub with the same secret honours exactly those grants.
    let server = Server::start_with(with_secret).await;
    let [by_env, by_flag] = [&tokens[0], &tokens[1]];
    let mut sub = SseClient::open(get(&server, "/topics/alerts").bearer_auth(by_env)).await;
    assert_eq!(sub.status, 200);
    assert_forbidden(
        send(post(&server, "/topics/alerts", "x").bearer_auth(by_env)).await,
        "alerts",
    )
    .await;
    assert_eq!(
        send(post(&server, "/topics/news", "x").bearer_auth(by_env))
            .await
            .status(),
        201
    );
    let id = publish_as(&server, by_flag, "alerts", "x").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "x"));
    // Tokens from `crier token --publish` alone read nothing.
    assert_forbidden(
        send(get(&server, "/topics/alerts").bearer_auth(by_flag)).await,
        "alerts",
    )
    .await;
}

on_every_store!(
    a_batch_with_one_ungranted_topic_stores_nothing,
    public_topics_need_no_token_to_read_only,
    a_ticket_opens_its_topic_once,
    a_ticket_is_refused_after_its_ttl,
    a_ticket_opens_only_the_topics_it_names,
    a_multi_topic_ticket_opens_events,
    a_stream_ends_with_reauth_at_expiry_and_a_fresh_cookie_resumes_it_exactly,
    a_ticket_stream_ends_with_reauth_when_its_minting_token_expires,
);

/// `crier token` with nothing to grant stops with a message, rather than
/// print a token every request would refuse; without the secret it stops
/// too, so `TOKEN=$(crier token …)` never quietly yields a useless token.
#[test]
fn crier_token_refuses_a_token_that_grants_nothing_or_has_no_secret() {
    let run = |args: &[&str], secret: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_crier"));
        command
            .arg("token")
            .args(args)
            .env_remove("CRIER_JWT_SECRET")
            .env_remove("CRIER_JWT_SECRET_FILE");
        if let Some(secret) = secret {
            command.env("CRIER_JWT_SECRET", secret);
        }
        command.output().expect("run crier token")
    };
    let no_grant = run(&["--ttl", "1h"], Some(SECRET));
    assert!(!no_grant.status.success(), "{no_grant:?}");
    assert!(no_grant.stdout.is_empty(), "{no_grant:?}");
    assert_eq!(
        String::from_utf8_lossy(&no_grant.stderr).trim(),
        "crier token: the token would grant nothing: give --publish PATTERN, --subscribe PATTERN or --metrics"
    );
    let no_secret = run(&["--publish", "news"], None);
    assert!(!no_secret.status.success(), "{no_secret:?}");
    assert!(no_secret.stdout.is_empty(), "{no_secret:?}");
    assert!(
        String::from_utf8_lossy(&no_secret.stderr).contains("minting needs the HMAC secret"),
        "{no_secret:?}"
    );
}

/// A token sent without its `Bearer ` scheme is refused with a detail that
/// says so, not as if no credential had been sent.
#[tokio::test]
async fn a_token_without_the_bearer_prefix_is_refused_saying_so() {
    let server = Server::start_with(with_secret).await;
    let response = server
        .client
        .post(server.url("/topics/news"))
        .header("authorization", token(&["news"], &[]))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["type"], "urn:crier:problem:invalid-token",
        "{problem}"
    );
    assert_eq!(
        problem["detail"],
        "the Authorization header must read `Bearer TOKEN`: the `Bearer ` prefix is missing"
    );
    // With the prefix the same token publishes.
    let response = server
        .client
        .post(server.url("/topics/news"))
        .bearer_auth(token(&["news"], &[]))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    server.stop().await;
}
