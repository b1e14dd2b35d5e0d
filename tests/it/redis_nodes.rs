//! Several crier nodes on one Redis, and the faults they must survive: Redis
//! stopping, a node killed, one node's connection cut, history vanishing.
//! Every test starts its own `redis-server` on a free loopback port.

use crate::common;

use std::time::Duration;

use common::process::Process;
use common::redis::{
    ACL_PASSWORD, ACL_USER, ClusterGroup, MASTER, Proxy, RedisServer, SentinelGroup, Tls,
};
use common::*;
use serde_json::Value;

/// A node on `url`, with short timeouts so faults show quickly.
async fn node(url: &str) -> Server {
    let url = url.to_owned();
    Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.redis.timeout = Duration::from_millis(500);
        c.transports.heartbeat = Duration::from_millis(100);
    })
    .await
}

/// Publishes `data` and returns the answer's status and body.
async fn try_publish(server: &Server, topic: &str, data: &str) -> (u16, Value) {
    let response = server
        .client
        .post(server.url(&format!("/topics/{topic}")))
        .body(data.to_owned())
        .send()
        .await
        .expect("publish request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: Value = response.json().await.expect("JSON answer");
    if status != 201 {
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{body}"
        );
    }
    (status, body)
}

async fn ready(server: &Server) -> u16 {
    server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Waits until `/readyz` answers `status`.
async fn wait_ready(server: &Server, status: u16) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while ready(server).await != status {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `PREFIX n` to `topic` for each `n` in `numbers`; returns the
/// events as a subscriber sees them.
async fn publish_numbered(
    server: &Server,
    topic: &str,
    prefix: &str,
    numbers: std::ops::RangeInclusive<usize>,
) -> Vec<Ev> {
    let mut events = Vec::new();
    for n in numbers {
        let data = format!("{prefix} {n}");
        events.push(Ev::new(
            &server.publish_id(topic, &data).await,
            "message",
            &data,
        ));
    }
    events
}

fn heartbeats(sub: &SseClient) -> usize {
    sub.raw_text().matches(": heartbeat\n\n").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_on_one_node_watch_on_another_and_resume_on_a_third() {
    let redis = RedisServer::start();
    let (a, b, c) = (
        node(&redis.url()).await,
        node(&redis.url()).await,
        node(&redis.url()).await,
    );
    let mut on_b = b.subscribe("/topics/news").await;
    let first = publish_numbered(&a, "news", "event", 1..=3).await;
    assert_eq!(on_b.take(3).await, first);
    drop(on_b);

    let missed = publish_numbered(&a, "news", "event", 4..=6).await;
    let mut on_c = c.resume("/topics/news", &first[2].id).await;
    assert_eq!(on_c.take(3).await, missed);
    let id = b.publish_id("news", "event 7").await;
    assert_eq!(on_c.next().await, Ev::new(&id, "message", "event 7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_different_nodes_make_one_dense_sequence() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    let mut sub = a.subscribe("/topics/shared").await;
    let publish_100 = |server: &Server, who: &'static str| {
        let client = server.client.clone();
        let url = server.url("/topics/shared");
        async move {
            let mut seqs = Vec::new();
            for n in 0..100 {
                let answer: Value = client
                    .post(&url)
                    .body(format!("{who}-{n}"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                seqs.push(answer["seq"].as_u64().unwrap());
            }
            seqs
        }
    };
    let (from_a, from_b) = tokio::join!(publish_100(&a, "a"), publish_100(&b, "b"));
    let mut all: Vec<u64> = from_a.iter().chain(&from_b).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>());
    let received = sub.take(200).await;
    let seqs: Vec<u64> = received.iter().map(Ev::seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_refuses_publishes_keeps_streams_open_and_loses_nothing() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    let mut on_a = a.subscribe("/topics/t").await;
    let mut on_b = b.subscribe("/topics/t").await;
    let mut stored = Vec::new();
    for n in 1..=5 {
        let data = format!("before {n}");
        stored.push(Ev::new(&a.publish_id("t", &data).await, "message", &data));
    }
    assert_eq!(on_a.take(5).await, stored);
    assert_eq!(on_b.take(5).await, stored);
    wait_ready(&a, 200).await;

    redis.stop();
    // Publishing keeps failing with 503 while Redis is down: never a 201 for
    // an event that was not stored.
    for n in 1..=5 {
        let (status, body) = try_publish(&b, "t", &format!("lost {n}")).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["type"], "urn:crier:problem:store-unavailable");
    }
    wait_ready(&a, 503).await;
    wait_ready(&b, 503).await;
    // The streams stay open: heartbeats keep coming.
    let (beats_a, beats_b) = (heartbeats(&on_a), heartbeats(&on_b));
    on_a.expect_quiet(Duration::from_millis(350)).await;
    on_b.expect_quiet(Duration::from_millis(350)).await;
    assert!(heartbeats(&on_a) > beats_a, "node a stream went silent");
    assert!(heartbeats(&on_b) > beats_b, "node b stream went silent");

    redis.restart();
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    let mut after = Vec::new();
    for n in 1..=5 {
        let data = format!("after {n}");
        let server = if n % 2 == 0 { &a } else { &b };
        after.push(Ev::new(
            &server.publish_id("t", &data).await,
            "message",
            &data,
        ));
    }
    assert_eq!(after[0].seq(), 6, "numbering continues densely");
    // Counted where it happened: the first publish after the restart, on b.
    b.wait_for_metric(r#"crier_redis_epoch_renewals_total{cause="replication"} 1"#)
        .await;
    // A restarted Redis may have come back from an older snapshot, and
    // nothing proves it did not: the first publish after it starts a new
    // epoch. Subscribers are told, and get everything retained under it.
    let epoch = epoch_of(&after[0].id);
    assert_ne!(epoch, epoch_of(&stored[0].id));
    for on in [&mut on_a, &mut on_b] {
        assert_epoch_reset(&on.next().await, &stored[4].id);
        let got = on.take(10).await;
        let expected: Vec<Ev> = stored
            .iter()
            .chain(&after)
            .enumerate()
            .map(|(i, ev)| Ev::new(&format!("{}.{epoch}", i + 1), "message", &ev.data))
            .collect();
        assert_eq!(got, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_redis_connection_is_cut_catches_up_without_loss_or_repeat() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let cut_off = node(&proxy.url()).await;
    let healthy = node(&redis.url()).await;
    let mut behind_cut = cut_off.subscribe("/topics/t").await;
    let mut direct = healthy.subscribe("/topics/t").await;

    let mut all = Vec::new();
    let publish = async |n: usize| {
        let data = format!("event {n}");
        Ev::new(&healthy.publish_id("t", &data).await, "message", &data)
    };
    for n in 1..=5 {
        all.push(publish(n).await);
    }
    assert_eq!(behind_cut.take(5).await, all[..5]);

    proxy.cut();
    wait_ready(&cut_off, 503).await;
    for n in 6..=10 {
        all.push(publish(n).await);
    }
    // The healthy node's subscriber is unaffected.
    assert_eq!(direct.take(10).await, all[..10]);

    proxy.restore();
    wait_ready(&cut_off, 200).await;
    // What was published during the cut arrives without waiting for the
    // next event to reveal the hole.
    assert_eq!(behind_cut.take(5).await, all[5..10]);
    for n in 11..=15 {
        all.push(publish(n).await);
    }
    // Then live again: exactly 11..=15, nothing lost, nothing twice.
    assert_eq!(behind_cut.take(5).await, all[10..15]);
    behind_cut.expect_quiet(Duration::from_millis(200)).await;
    assert_eq!(direct.take(5).await, all[10..15]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_on_another_without_loss() {
    let redis = RedisServer::start();
    let mut doomed = Process::start(&["--redis", &redis.url()]);
    let survivor = node(&redis.url()).await;
    let client = common::client();
    let mut sub = SseClient::connect(&client, &format!("{}/topics/t", doomed.base), None).await;
    let mut all = Vec::new();
    for n in 1..=5 {
        let data = format!("event {n}");
        all.push(Ev::new(
            &survivor.publish_id("t", &data).await,
            "message",
            &data,
        ));
    }
    assert_eq!(sub.take(5).await, all);

    doomed.kill();
    for n in 6..=10 {
        let data = format!("event {n}");
        all.push(Ev::new(
            &survivor.publish_id("t", &data).await,
            "message",
            &data,
        ));
    }
    // The browser would reconnect with its Last-Event-ID to any node.
    let mut resumed = survivor.resume("/topics/t", &all[4].id).await;
    assert_eq!(resumed.take(5).await, all[5..]);
    let id = survivor.publish_id("t", "live").await;
    assert_eq!(resumed.next().await, Ev::new(&id, "message", "live"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_in_redis_is_announced_as_reset_live_and_on_reconnect() {
    let mut redis = RedisServer::start_volatile();
    let server = node(&redis.url()).await;
    let mut sub = server.subscribe("/topics/t").await;
    let mut old = Vec::new();
    for n in 1..=3 {
        let data = format!("old {n}");
        old.push(Ev::new(
            &server.publish_id("t", &data).await,
            "message",
            &data,
        ));
    }
    assert_eq!(sub.take(3).await, old);

    // Redis restarts without persistence: the topic's history is gone.
    redis.restart();
    wait_ready(&server, 200).await;
    // The live subscriber is told at once (no publish needed): its position
    // points into a history that no longer exists.
    let reset = sub.next().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.id, "0");
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"topic": "t", "reason": "epoch", "requested": old[2].id, "oldest": null})
    );
    // New events start at 1 in a new epoch, and reach the subscriber.
    let new_id = server.publish_id("t", "new 1").await;
    assert_eq!(seq_of(&new_id), 1);
    assert_ne!(new_id.split('.').nth(1), old[0].id.split('.').nth(1));
    assert_eq!(sub.next().await, Ev::new(&new_id, "message", "new 1"));

    // A client coming back with an old id is told too, then gets the new
    // history.
    let mut late = server.resume("/topics/t", &old[1].id).await;
    let reset = late.next().await;
    assert_eq!(reset.event, "reset");
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(data["reason"], "epoch");
    assert_eq!(data["oldest"], new_id.as_str());
    assert_eq!(late.next().await, Ev::new(&new_id, "message", "new 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_by_hand_starts_a_new_epoch_and_subscribers_are_told() {
    let redis = RedisServer::start();
    let server = node(&redis.url()).await;
    let mut sub = server.subscribe("/topics/t").await;
    let first = server.publish_id("t", "one").await;
    assert_eq!(sub.next().await, Ev::new(&first, "message", "one"));

    assert_eq!(
        redis.cli(&["DEL", "crier:{t}:meta", "crier:{t}:events"]),
        "2"
    );
    let again = server.publish_id("t", "two").await;
    assert_eq!(seq_of(&again), 1);
    let reset = sub.next().await;
    assert_eq!(reset.event, "reset");
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(data["reason"], "epoch");
    assert_eq!(data["requested"], first.as_str());
    assert_eq!(data["oldest"], again.as_str());
    assert_eq!(sub.next().await, Ev::new(&again, "message", "two"));
}

/// A topic whose number in Redis was overwritten by hand cannot be read or
/// numbered until someone fixes it: asking again cannot help, so publishes
/// get a 500 (not 503: retrying is useless), nothing is half-stored, and a
/// stream that must read it ends at once instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_whose_keys_were_overwritten_by_hand_is_refused_not_retried_forever() {
    let redis = RedisServer::start();
    let server = node(&redis.url()).await;
    let first = server.publish_id("t", "one").await;
    server.publish_id("t", "two").await;
    assert_eq!(redis.cli(&["HSET", "crier:{t}:meta", "seq", "two"]), "0");

    let (status, problem) = try_publish(&server, "t", "three").await;
    assert_eq!(status, 500, "{problem}");
    assert_eq!(problem["type"], "urn:crier:problem:store-error");
    let response = server
        .client
        .post(server.url("/events"))
        .body(r#"[{"topic":"t","data":"t3"},{"topic":"t","data":"t4"}]"#)
        .send()
        .await
        .expect("batch request");
    assert_problem(response, 500, "store-error").await;
    assert_eq!(redis.cli(&["XLEN", "crier:{t}:events"]), "2");
    // A batch over several topics is refused whole, whichever topic comes
    // first: the sound topics store nothing either.
    for body in [
        r#"[{"topic":"sound","data":"s1"},{"topic":"t","data":"t3"}]"#,
        r#"[{"topic":"t","data":"t3"},{"topic":"sound","data":"s1"}]"#,
    ] {
        let response = server
            .client
            .post(server.url("/events"))
            .body(body)
            .send()
            .await
            .expect("batch request");
        assert_problem(response, 500, "store-error").await;
    }
    assert_eq!(redis.cli(&["EXISTS", "crier:{sound}:events"]), "0");
    assert_eq!(redis.cli(&["EXISTS", "crier:{sound}:meta"]), "0");
    // An events key of the wrong type is refused the same way.
    server.publish_id("wrong", "w0").await;
    assert_eq!(redis.cli(&["SET", "crier:{wrong}:events", "x"]), "OK");
    let response = server
        .client
        .post(server.url("/events"))
        .body(r#"[{"topic":"sound","data":"s1"},{"topic":"wrong","data":"w1"}]"#)
        .send()
        .await
        .expect("batch request");
    assert_problem(response, 500, "store-error").await;
    assert_eq!(redis.cli(&["EXISTS", "crier:{sound}:events"]), "0");

    // A stream that starts by reading the topic is refused outright...
    let response = server
        .client
        .get(server.url("/topics/t"))
        .send()
        .await
        .expect("subscribe request");
    assert_problem(response, 500, "store-error").await;
    // ...and one that reads it after answering ends, without an event.
    let mut resumed = server.resume("/topics/t", &first).await;
    assert_eq!(resumed.status, 200);
    assert_eq!(resumed.until_end().await, Vec::<Ev>::new());
    assert_eq!(
        server
            .client
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );

    // Put right by hand, the topic goes on where it was.
    assert_eq!(redis.cli(&["HSET", "crier:{t}:meta", "seq", "2"]), "0");
    let mut resumed = server.resume("/topics/t", &first).await;
    let third = server.publish_id("t", "three").await;
    assert_eq!(seq_of(&third), 3);
    let events = resumed.take(2).await;
    assert_eq!(events[0].data, "two");
    assert_eq!(events[1], Ev::new(&third, "message", "three"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_follow_the_prefix_and_database_of_the_url() {
    let redis = RedisServer::start();
    let url = format!("{}/3", redis.url());
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.redis.prefix = "hub1:".into();
    })
    .await;
    server.publish("news", "x").await;
    assert_eq!(
        redis.cli(&["-n", "3", "HGET", "hub1:{news}:meta", "seq"]),
        "1"
    );
    assert_eq!(redis.cli(&["-n", "0", "DBSIZE"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_or_acl_user_in_the_url_is_used() {
    let redis = RedisServer::start();
    redis.cli(&[
        "ACL", "SETUSER", "hub", "on", ">s3cret", "~*", "&*", "+@all",
    ]);
    redis.cli(&["CONFIG", "SET", "requirepass", "adminpass"]);
    let with_user = format!("redis://hub:s3cret@{}", redis.addr());
    let with_password = format!("redis://:adminpass@{}", redis.addr());
    for url in [with_user, with_password] {
        let server = node(&url).await;
        wait_ready(&server, 200).await;
        let mut sub = server.subscribe("/topics/auth").await;
        let id = server.publish_id("auth", "ok").await;
        assert_eq!(sub.next().await, Ev::new(&id, "message", "ok"));
    }
    let wrong = node(&format!("redis://:wrong@{}", redis.addr())).await;
    wait_ready(&wrong, 503).await;
    let (status, _) = try_publish(&wrong, "auth", "refused").await;
    assert_eq!(status, 503);
}

/// A Sentinel group and a cluster whose servers (and sentinels) speak only
/// TLS and require passwords: crier reaches them with `rediss://` URLs, the
/// private CA, and the ACL user in its URLs, the sentinels' credentials and
/// TLS serving for the primary too; without the user it is not ready and
/// refuses publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_and_cluster_are_reached_over_tls_with_the_acl_user_of_their_urls() {
    let certs = common::tls::TestCerts::new();
    let tls = Tls::of(&certs);
    let (sentinel, cluster) = tokio::task::spawn_blocking(move || {
        (
            SentinelGroup::start_secured(&tls),
            ClusterGroup::start_secured(&tls),
        )
    })
    .await
    .expect("secured groups");
    let ca = certs.ca_cert.clone();
    let through_sentinels = |urls: Vec<String>| {
        let ca = ca.clone();
        Server::start_with(move |c| {
            c.redis.sentinel = urls;
            c.redis.master = Some(MASTER.to_owned());
            c.redis.ca_cert = Some(ca);
            c.redis.timeout = Duration::from_millis(500);
        })
    };
    let through_cluster = |urls: Vec<String>| {
        let ca = ca.clone();
        Server::start_with(move |c| {
            c.redis.cluster = urls;
            c.redis.ca_cert = Some(ca);
            c.redis.timeout = Duration::from_millis(500);
        })
    };
    let urls: Vec<String> = sentinel.urls().into_iter().chain(cluster.urls()).collect();
    assert!(urls.iter().all(|u| u.starts_with("rediss://")), "{urls:?}");
    for server in [
        through_sentinels(sentinel.urls()).await,
        through_cluster(cluster.urls()).await,
    ] {
        wait_ready(&server, 200).await;
        let first = server.publish_id("auth", "one").await;
        let mut sub = server.resume("/topics/auth", &first).await;
        let second = server.publish_id("auth", "two").await;
        assert_eq!(sub.next().await, Ev::new(&second, "message", "two"));
        server.stop().await;
    }
    let without = |urls: Vec<String>| -> Vec<String> {
        urls.iter()
            .map(|u| u.replace(&format!("{ACL_USER}:{ACL_PASSWORD}@"), ""))
            .collect()
    };
    for server in [
        through_sentinels(without(sentinel.urls())).await,
        through_cluster(without(cluster.urls())).await,
    ] {
        wait_ready(&server, 503).await;
        let (status, problem) = try_publish(&server, "auth", "refused").await;
        assert_eq!(status, 503, "{problem}");
        server.stop().await;
    }
    tokio::task::spawn_blocking(move || drop((sentinel, cluster)))
        .await
        .expect("stop the groups");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls_and_verify_the_server_certificate() {
    let certs = common::tls::TestCerts::new();
    let redis = RedisServer::start_tls(&Tls::of(&certs));
    let url = format!("rediss://{}", redis.addr());

    let ca = certs.ca_cert.clone();
    let trusted_url = url.clone();
    let server = Server::start_with(move |c| {
        c.redis.url = Some(trusted_url);
        c.redis.ca_cert = Some(ca);
        c.redis.timeout = Duration::from_millis(500);
    })
    .await;
    wait_ready(&server, 200).await;
    let mut sub = server.subscribe("/topics/secure").await;
    let id = server.publish_id("secure", "over tls").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "over tls"));

    // Without the private CA, the certificate is not trusted.
    let untrusted = node(&url).await;
    wait_ready(&untrusted, 503).await;
    let (status, _) = try_publish(&untrusted, "secure", "refused").await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_redis_url_stops_the_binary_with_a_clear_message() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["--listen", "127.0.0.1:0", "--redis", "http://not-redis"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("bad Redis URL"), "{log}");
}

/// The data of `events`, in order.
fn data_of(events: &[Ev]) -> Vec<&str> {
    events.iter().map(|e| e.data.as_str()).collect()
}

/// Asserts that `ev` is a `reset` with reason `epoch` from `requested`, and
/// returns its data.
fn assert_epoch_reset(ev: &Ev, requested: &str) -> Value {
    assert_eq!(ev.event, "reset", "{ev:?}");
    let data: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(data["reason"], "epoch", "{data}");
    assert_eq!(data["requested"], requested, "{data}");
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restored_from_an_older_snapshot_starts_a_new_epoch_and_loses_nothing_silently() {
    let mut redis = RedisServer::start_volatile();
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    let mut on_b = b.subscribe("/topics/t").await;
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(a.publish_id("t", &format!("old {n}")).await);
        if n == 3 {
            // A snapshot with events 1-3; 4 and 5 will be lost.
            assert_eq!(redis.cli(&["SAVE"]), "OK");
        }
    }
    let seen = on_b.take(5).await;
    assert_eq!(
        data_of(&seen),
        ["old 1", "old 2", "old 3", "old 4", "old 5"]
    );

    // Redis comes back from the snapshot: the topic is at 3, in the same
    // epoch, and would hand out 4 and 5 again.
    redis.restart();
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    assert_eq!(redis.cli(&["HGET", "crier:{t}:meta", "seq"]), "3");
    // The node that saw 5 notices and says so; what is retained follows,
    // under the new epoch.
    let data = assert_epoch_reset(&on_b.next().await, &ids[4]);
    let replay = on_b.take(3).await;
    assert_eq!(data_of(&replay), ["old 1", "old 2", "old 3"]);
    let new_epoch = epoch_of(&replay[0].id);
    assert_ne!(new_epoch, epoch_of(&ids[0]));
    assert_eq!(data["oldest"], replay[0].id.as_str());
    assert_eq!(
        replay.iter().map(Ev::seq).collect::<Vec<_>>(),
        [1, 2, 3],
        "numbering goes on, only the epoch changes"
    );

    // New events are numbered on in the new epoch.
    let new = a.publish_id("t", "new 4").await;
    assert_eq!(new, format!("4.{new_epoch}"));
    assert_eq!(on_b.next().await, Ev::new(&new, "message", "new 4"));

    // A client that saw the lost events is told too, on any node.
    let mut late = a.resume("/topics/t", &ids[4]).await;
    assert_epoch_reset(&late.next().await, &ids[4]);
    assert_eq!(
        data_of(&late.take(4).await),
        ["old 1", "old 2", "old 3", "new 4"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_that_goes_back_without_a_restart_is_caught_by_publishers_and_watchers() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    let mut on_b = b.subscribe("/topics/t").await;
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(b.publish_id("t", &format!("old {n}")).await);
    }
    assert_eq!(on_b.take(5).await.len(), 5);
    // What a failover to a replica that lags behind looks like: the
    // topic's counter and stream as they were a few events ago.
    let go_back_to_3 = |drop: &[&str]| {
        assert_eq!(redis.cli(&["HSET", "crier:{t}:meta", "seq", "3"]), "0");
        let mut xdel = vec!["XDEL", "crier:{t}:events"];
        xdel.extend_from_slice(drop);
        assert_eq!(redis.cli(&xdel), drop.len().to_string());
        assert_eq!(redis.cli(&["XSETID", "crier:{t}:events", "3-0"]), "OK");
    };

    // A node that saw 5 publishes: the script sees the number went back
    // and starts a new epoch before numbering.
    go_back_to_3(&["4-0", "5-0"]);
    let new = b.publish_id("t", "new 4").await;
    assert_eq!(seq_of(&new), 4);
    assert_ne!(epoch_of(&new), epoch_of(&ids[0]));
    assert_epoch_reset(&on_b.next().await, &ids[4]);
    let replay = on_b.take(4).await;
    assert_eq!(data_of(&replay), ["old 1", "old 2", "old 3", "new 4"]);
    assert_eq!(replay[3].id, new);

    // A node that saw nothing publishes: it hands out 4 again, and the
    // watching node, which saw 4 go by live already, starts a new epoch.
    go_back_to_3(&["4-0"]);
    let reused = a.publish_id("t", "newer 4").await;
    assert_eq!(reused, new, "the lagging history hands out the same id");
    assert_epoch_reset(&on_b.next().await, &new);
    let replay = on_b.take(4).await;
    assert_eq!(data_of(&replay), ["old 1", "old 2", "old 3", "newer 4"]);
    assert_ne!(epoch_of(&replay[0].id), epoch_of(&new));
}

/// Calls of Lua scripts (`EVAL`, `EVALSHA`) since the last `CONFIG RESETSTAT`.
fn script_calls(redis: &RedisServer) -> u64 {
    command_calls(redis, "eval") + command_calls(redis, "evalsha")
}

/// Calls of one command since the last `CONFIG RESETSTAT`, those a script
/// made included.
fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let prefix = format!("cmdstat_{command}:");
    redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Publishes that queue while Redis is busy go as one script call (not one
/// each), and each is still answered for itself: a topic whose keys are
/// corrupt is refused alone, the others in the same call are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_publishes_share_one_script_call_and_are_answered_each_for_itself() {
    const PUBLISHES: usize = 60;
    let redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.redis.timeout = Duration::from_secs(10);
    })
    .await;
    for topic in ["bad", "good-0", "good-1", "good-2"] {
        server.publish_id(topic, "first").await;
    }
    assert_eq!(redis.cli(&["HSET", "crier:{bad}:meta", "seq", "x"]), "0");
    let calls_before = script_calls(&redis);
    let fds = server.metric("crier_process_open_fds").await;
    let answers = {
        // While Redis is frozen, the publishes queue in the outbox.
        let _paused = redis.pause();
        let publishes: Vec<_> = (0..PUBLISHES)
            .map(|i| {
                let topic = if i % 10 == 5 {
                    "bad".to_owned()
                } else {
                    format!("good-{}", i % 3)
                };
                let client = server.client.clone();
                let url = server.url(&format!("/topics/{topic}"));
                tokio::spawn(async move {
                    let response = client.post(url).body(format!("e{i}")).send().await;
                    (topic, response.expect("an answer").status().as_u16())
                })
            })
            .collect();
        // Every request is in (its connection accepted) before Redis goes on.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while server.metric("crier_process_open_fds").await < fds + PUBLISHES as f64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the publishes never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        publishes
    };
    let mut stored = [0usize; 3];
    for publish in answers {
        let (topic, status) = publish.await.expect("the publish");
        if topic == "bad" {
            assert_eq!(status, 500, "the corrupt topic is refused");
        } else {
            assert_eq!(status, 201, "{topic} is stored");
            stored[topic["good-".len()..].parse::<usize>().unwrap()] += 1;
        }
    }
    for (i, count) in stored.iter().enumerate() {
        let numbered = redis.cli(&["HGET", &format!("crier:{{good-{i}}}:meta"), "seq"]);
        assert_eq!(
            numbered,
            (count + 1).to_string(),
            "good-{i}: dense, each once"
        );
    }
    let calls = script_calls(&redis) - calls_before;
    assert!(
        calls <= 8,
        "{PUBLISHES} queued publishes took {calls} script calls"
    );
}

/// Publishers whose clients leave while their calls are in flight (the
/// server drops their requests) do not take the outbox down with them:
/// their calls, which Redis has, still finish, and a publish queued behind
/// them is sent and answered, numbered after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_that_leave_mid_call_do_not_stall_those_queued_behind() {
    let redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.redis.timeout = Duration::from_secs(10);
    })
    .await;
    let warm = server.publish_id("t", "warm").await;
    let fds = server.metric("crier_process_open_fds").await;
    let open_fds = || server.metric("crier_process_open_fds");
    let queued = {
        let _paused = redis.pause();
        // As many as may be in flight at once: each publisher sends its
        // call itself, then its client gives up and the server drops it.
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        for n in 1..=2 {
            let answer = impatient
                .post(server.url("/topics/t"))
                .body(format!("gone {n}"))
                .send()
                .await;
            assert!(answer.is_err(), "answered while Redis was frozen");
        }
        eventually("the server closing the abandoned connections", || async {
            let open = open_fds().await;
            (open <= fds).then_some(()).ok_or(open)
        })
        .await;
        // A publish that queues behind the two calls in flight.
        let client = server.client.clone();
        let url = server.url("/topics/t");
        let queued = tokio::spawn(async move {
            let response = client.post(url).body("queued").send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        });
        eventually("the queued publish arriving", || async {
            let open = open_fds().await;
            (open >= fds + 1.0).then_some(()).ok_or(open)
        })
        .await;
        queued
    };
    let (status, body) = queued.await.unwrap();
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap();
    assert_eq!(id, format!("4.{}", epoch_of(&warm)), "after the two calls");
    let mut replay = server.resume("/topics/t", &warm).await;
    assert_eq!(
        data_of(&replay.take(3).await),
        ["gone 1", "gone 2", "queued"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_a_node_catches_up_once_per_topic_not_once_per_subscriber() {
    const SUBSCRIBERS: usize = 40;
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let cut_off = node(&proxy.url()).await;
    let healthy = node(&redis.url()).await;
    let mut subs = Vec::new();
    for _ in 0..SUBSCRIBERS {
        subs.push(cut_off.subscribe("/topics/t").await);
    }
    let before = healthy.publish_id("t", "before").await;
    for sub in &mut subs {
        assert_eq!(sub.next().await, Ev::new(&before, "message", "before"));
    }

    proxy.cut();
    wait_ready(&cut_off, 503).await;
    let missed = publish_numbered(&healthy, "t", "during", 1..=3).await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    proxy.restore();
    wait_ready(&cut_off, 200).await;
    for sub in &mut subs {
        assert_eq!(sub.take(3).await, missed);
    }
    let calls = script_calls(&redis);
    assert!(
        calls <= 2,
        "{calls} Redis reads to catch up {SUBSCRIBERS} subscribers of one topic"
    );
    // And live again, exactly once each.
    let after = healthy.publish_id("t", "after").await;
    for sub in &mut subs {
        assert_eq!(sub.next().await, Ev::new(&after, "message", "after"));
        sub.expect_quiet(Duration::from_millis(20)).await;
    }
}

/// Housekeeping takes a node off the channels of topics nobody on it
/// watches any more, in slices of the topic list, and a topic watched again
/// is subscribed again: live events reach the new subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_nobody_watches_are_unsubscribed_and_watched_ones_come_back() {
    let redis = RedisServer::start();
    let url = redis.url();
    // Housekeeping every retention-age / 3: 100 ms.
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.storage.retention_age = Duration::from_millis(300);
    })
    .await;
    // More topics than one slice of housekeeping.
    let topics: Vec<String> = (0..300).map(|i| format!("hk-{i}")).collect();
    let path = |ts: &[String]| {
        let query: Vec<String> = ts.iter().map(|t| format!("topic={t}")).collect();
        format!("/events?{}", query.join("&"))
    };
    let mut subscribers = Vec::new();
    for group in topics.chunks(30) {
        subscribers.push(server.subscribe(&path(group)).await);
    }
    let channels = || -> usize {
        redis
            .cli(&["PUBSUB", "CHANNELS", "crier:{hk-*"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    assert_eq!(channels(), 300, "every watched topic is subscribed");
    drop(subscribers);
    wait_for("the idle topics to be unsubscribed", || channels() == 0).await;

    let mut again = server.subscribe("/topics/hk-7").await;
    assert_eq!(channels(), 1);
    let id = server.publish_id("hk-7", "back").await;
    assert_eq!(again.next().await, Ev::new(&id, "message", "back"));
    server.stop().await;
}

/// A publish of `data` to `topic` with an `Idempotency-Key`: the answer's
/// status, whether it is marked as a replay, and its body.
async fn publish_keyed(server: &Server, topic: &str, key: &str, data: &str) -> (u16, bool, Value) {
    let response = server
        .client
        .post(server.url(&format!("/topics/{topic}")))
        .header("idempotency-key", key)
        .body(data.to_owned())
        .send()
        .await
        .expect("publish request");
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (
        status,
        replayed,
        response.json().await.expect("JSON answer"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_answered_503_because_redis_was_slow_is_stored_once_when_retried() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    let mut on_b = b.subscribe("/topics/t").await;
    let warm = a.publish_id("t", "before").await;
    let data = "invoice 9 sent";
    // Redis freezes for longer than --redis-timeout: the publish has
    // reached it, and the publisher is told 503.
    let (status, _, body) = {
        let _paused = redis.pause();
        publish_keyed(&a, "t", "invoice-9", data).await
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:crier:problem:store-unavailable");
    // Redis goes on and runs what it had received: the event is stored,
    // though its publisher was told otherwise (a blind retry would store
    // it twice).
    wait_for("Redis to store the unanswered publish", || {
        redis.cli(&["XLEN", "crier:{t}:events"]) == "2"
    })
    .await;

    // The publisher retries until it is answered: a replay of that event.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (replayed, retry) = loop {
        let (status, replayed, body) = publish_keyed(&a, "t", "invoice-9", data).await;
        if status == 201 {
            break (replayed, body);
        }
        assert_eq!(status, 503, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "never answered 201");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        replayed,
        "the retry is answered from the key's record: {retry}"
    );
    let id = retry["id"].as_str().unwrap();
    assert_eq!(seq_of(id), 2);
    let after = b.publish_id("t", "after").await;
    assert_eq!(
        on_b.take(3).await,
        [
            Ev::new(&warm, "message", "before"),
            Ev::new(id, "message", data),
            Ev::new(&after, "message", "after"),
        ]
    );
    assert_eq!(seq_of(&after), 3, "stored once");
}

/// With `--redis-wait-replicas 1`, an event its replica has not confirmed
/// is stored but neither read nor sent live (a failover could lose it), and
/// goes out, in order, once a later write is confirmed: here the retry with
/// its idempotency key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_replicas_an_unconfirmed_event_is_neither_read_nor_sent_until_confirmed() {
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(primary.addr().port(), false);
    wait_for("the replica to follow the primary", || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    })
    .await;
    let start = |url: String| {
        Server::start_with(move |c| {
            c.redis.url = Some(url);
            // Long enough for WAIT on a loaded machine; the paused replica makes
            // the one unconfirmed publish wait it out.
            c.redis.timeout = Duration::from_secs(2);
            c.redis.wait_replicas = 1;
            c.transports.poll_timeout = Duration::from_millis(300);
        })
    };
    let (a, b) = (start(primary.url()).await, start(primary.url()).await);
    let mut on_b = b.subscribe("/topics/t").await;
    let first = a.publish_id("t", "confirmed").await;
    let (status, _, body) = {
        let _paused = replica.pause();
        let answer = publish_keyed(&a, "t", "k-1", "unconfirmed").await;
        // The publisher may be answered just before WAIT gives up: the
        // replica goes on only once it has, or it would confirm the event.
        wait_for("the WAIT to give up", || {
            primary
                .cli(&["INFO", "clients"])
                .contains("blocked_clients:0")
        })
        .await;
        answer
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["type"], "urn:crier:problem:store-unavailable");
    // Stored, and replicated once the replica went on, but nothing since
    // has been confirmed: a poll after the first event finds none.
    assert_eq!(primary.cli(&["HGET", "crier:{t}:meta", "seq"]), "2");
    let poll: Value = a
        .client
        .get(a.url(&format!("/topics/t?poll=1&lastEventId={first}")))
        .send()
        .await
        .expect("a poll")
        .json()
        .await
        .expect("JSON");
    assert_eq!(poll["events"], serde_json::json!([]), "{poll}");
    // The retry is confirmed: its replayed event goes live, then the next.
    let (status, replayed, body) = publish_keyed(&a, "t", "k-1", "unconfirmed").await;
    assert_eq!((status, replayed), (201, true), "{body}");
    let id = body["id"].as_str().expect("an id");
    assert_eq!(seq_of(id), 2);
    let after = b.publish_id("t", "after").await;
    assert_eq!(
        on_b.take(3).await,
        [
            Ev::new(&first, "message", "confirmed"),
            Ev::new(id, "message", "unconfirmed"),
            Ev::new(&after, "message", "after"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_on_one_node_is_replayed_on_another() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis.url()).await, node(&redis.url()).await);
    let mut on_a = a.subscribe("/topics/t").await;
    let (status, replayed, first) = publish_keyed(&a, "t", "k-1", "once").await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let (status, replayed, again) = publish_keyed(&b, "t", "k-1", "once").await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(again, first, "node b answers with node a's receipt");
    let (status, _, refused) = publish_keyed(&b, "t", "k-1", "twice").await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["type"], "urn:crier:problem:idempotency-key-reused");
    // The record lives in Redis, under the prefix, expiring with the window.
    let records = redis.cli(&["KEYS", "crier:once:*"]);
    assert_eq!(records.lines().count(), 1, "{records}");
    let ttl: u64 = redis.cli(&["PTTL", records.trim()]).parse().unwrap();
    assert!((1..=300_000).contains(&ttl), "{ttl}");
    let next = b.publish_id("t", "next").await;
    assert_eq!(
        on_a.take(2).await,
        [
            Ev::new(first["id"].as_str().unwrap(), "message", "once"),
            Ev::new(&next, "message", "next"),
        ]
    );
}

/// `POST /events` with `items`; returns the ids of the answer.
async fn publish_batch(server: &Server, items: &Value) -> Vec<String> {
    let response = server
        .client
        .post(server.url("/events"))
        .json(items)
        .send()
        .await
        .expect("batch request");
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.expect("JSON answer");
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

/// A batch to one topic costs Redis one script call, whose appends trim
/// the stream by count once: 100 events, 100 `XADD`s, one call, and the
/// stream holds the newest of them up to the retention count, numbered
/// densely, delivered live and replayed exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_to_one_topic_is_one_script_call_trimmed_by_count_once() {
    let redis = RedisServer::start_volatile();
    let url = redis.url();
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.storage.retention_events = 40;
    })
    .await;
    let mut live = server.subscribe("/topics/t").await;
    // Once the subscriber has an event, its own reads are done.
    let warm = server.publish_id("t", "warm").await;
    assert_eq!(live.next().await, Ev::new(&warm, "message", "warm"));
    let items: Vec<Value> = (1..=100)
        .map(|n| serde_json::json!({"topic": "t", "data": format!("e {n}")}))
        .collect();
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    let ids = publish_batch(&server, &Value::Array(items)).await;
    assert_eq!(script_calls(&redis), 1, "one script call for the batch");
    assert_eq!(command_calls(&redis, "xadd"), 100);
    assert_eq!(command_calls(&redis, "xrange"), 0, "nothing expired");
    assert_eq!(redis.cli(&["XLEN", "crier:{t}:events"]), "40");

    let epoch = epoch_of(&warm).to_owned();
    let expected: Vec<Ev> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            assert_eq!(id, &format!("{}.{epoch}", i + 2), "dense numbering");
            Ev::new(id, "message", &format!("e {}", i + 1))
        })
        .collect();
    assert_eq!(live.take(100).await, expected);
    let mut replay = server.resume("/topics/t", &ids[59]).await;
    assert_eq!(replay.take(40).await, expected[60..]);
    server.stop().await;
}

/// Single publishes trim the stream by count every 16 events, so it holds
/// at most 15 beyond the retention count, and readers never see those: a
/// resume from before the retained ones is told `reset` with the oldest
/// retained, then gets exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_publishes_trim_every_16_events_and_readers_see_only_the_retained() {
    let redis = RedisServer::start_volatile();
    let url = redis.url();
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.storage.retention_events = 5;
    })
    .await;
    let all = publish_numbered(&server, "t", "e", 1..=20).await;
    // Trimmed to 5 at the 16th (12 to 16), then 17 to 20 appended.
    assert_eq!(redis.cli(&["XLEN", "crier:{t}:events"]), "9");
    let epoch = epoch_of(&all[0].id);
    let mut replay = server.subscribe("/topics/t?lastEventId=0").await;
    let reset = replay.next().await;
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(reset.id, pos(15, &epoch));
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(
        data,
        serde_json::json!({"topic": "t", "reason": "trimmed", "requested": "0", "oldest": all[15].id})
    );
    assert_eq!(replay.take(5).await, all[15..]);
    // From just before the oldest retained one: exact, no reset.
    let mut exact = server.resume("/topics/t", &all[14].id).await;
    assert_eq!(exact.take(5).await, all[15..]);
    server.stop().await;
}

/// The common publish (one event, no key, nothing expired) never reads the
/// stream: the topic's meta remembers when its oldest event expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_publishes_that_expire_nothing_do_not_read_the_stream() {
    let redis = RedisServer::start_volatile();
    let server = node(&redis.url()).await;
    let first = server.publish_id("t", "first").await;
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]), "OK");
    let rest = publish_numbered(&server, "t", "e", 1..=20).await;
    assert_eq!(script_calls(&redis), 20);
    assert_eq!(command_calls(&redis, "xadd"), 20);
    assert_eq!(command_calls(&redis, "xrange"), 0, "no read of the stream");
    let mut replay = server.resume("/topics/t", &first).await;
    assert_eq!(replay.take(20).await, rest);
    server.stop().await;
}

/// Age trimming is exact: a publish after some events expired drops those
/// (and only those) from the stream, and a subscriber resuming just before
/// the first one kept gets the rest with no reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_trims_exactly_the_expired_events_and_keeps_the_rest() {
    let redis = RedisServer::start_volatile();
    let url = redis.url();
    let server = Server::start_with(move |c| {
        c.redis.url = Some(url);
        c.storage.retention_age = Duration::from_secs(3);
    })
    .await;
    let old = publish_numbered(&server, "t", "old", 1..=3).await;
    let published = tokio::time::Instant::now();
    // Lets time pass so the two groups expire at different times.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = publish_numbered(&server, "t", "kept", 1..=2).await;
    assert_eq!(redis.cli(&["XLEN", "crier:{t}:events"]), "5");
    // Until the old ones expire, nothing is trimmed.
    let deadline = published + Duration::from_millis(3100);
    tokio::time::sleep_until(deadline).await;
    let last = publish_numbered(&server, "t", "last", 1..=1).await;
    assert!(
        published.elapsed() < Duration::from_millis(4300),
        "the machine was too slow for the kept events to be still retained"
    );
    assert_eq!(redis.cli(&["XLEN", "crier:{t}:events"]), "3");
    let first_kept = format!("{}-0", seq_of(&kept[0].id));
    assert_eq!(
        redis
            .cli(&["XRANGE", "crier:{t}:events", "-", "+", "COUNT", "1"])
            .lines()
            .next(),
        Some(first_kept.as_str())
    );
    let mut resumed = server.resume("/topics/t", &old[2].id).await;
    assert_eq!(resumed.take(3).await, [&kept[..], &last[..]].concat());
    server.stop().await;
}

/// Concurrent publishes to many topics go to Redis in shared pipelines;
/// when Redis has forgotten the publish script (`SCRIPT FLUSH`, a restart)
/// each call refused for that is sent again once the script is loaded, and
/// only those: every event is stored once, each answer names its own event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_after_a_script_flush_are_each_stored_once() {
    let redis = RedisServer::start_volatile();
    let server = node(&redis.url()).await;
    let warm = server.publish_id("t-0", "warm").await;
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    let publishes = (0..64).map(|n| {
        let client = server.client.clone();
        let url = server.url(&format!("/topics/t-{}", n % 8));
        async move {
            let answer: Value = client
                .post(&url)
                .body(format!("e {n}"))
                .send()
                .await
                .expect("publish")
                .json()
                .await
                .expect("JSON answer");
            (n, answer["id"].as_str().expect("id").to_owned())
        }
    });
    let answers = futures_util::future::join_all(publishes).await;
    for topic in 0..8 {
        let mine: Vec<&(usize, String)> = answers.iter().filter(|(n, _)| n % 8 == topic).collect();
        let stored = if topic == 0 { 9 } else { 8 };
        assert_eq!(
            redis.cli(&["XLEN", &format!("crier:{{t-{topic}}}:events")]),
            stored.to_string(),
            "topic t-{topic} holds each of its events once"
        );
        // Each answer's id replays the event it was given for.
        let from = if topic == 0 {
            warm.clone()
        } else {
            format!("0.{}", epoch_of(&mine[0].1))
        };
        let mut replay = server.resume(&format!("/topics/t-{topic}"), &from).await;
        let mut expected: Vec<Ev> = mine
            .iter()
            .map(|(n, id)| Ev::new(id, "message", &format!("e {n}")))
            .collect();
        expected.sort_by_key(Ev::seq);
        assert_eq!(replay.take(8).await, expected);
    }
    server.stop().await;
}

/// On a Redis Cluster a batch is atomic within one partition: one whose
/// topics span partitions is refused whole, and one within a partition is
/// stored whole (API.md, "Several nodes (Redis)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_batch_spanning_partitions_is_refused_whole_and_one_within_is_stored() {
    on_cluster(async {
        let server = Server::start().await;
        // `a` and `t` are in different partitions; `a` and `bcv` in one.
        let spanning = serde_json::json!([
            {"topic": "a", "data": "a-1"},
            {"topic": "t", "data": "t-1"},
        ]);
        let response = server
            .client
            .post(server.url("/events"))
            .json(&spanning)
            .send()
            .await
            .unwrap();
        let body = assert_problem(response, 422, "batch-spans-partitions").await;
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("separate requests"),
            "{body}"
        );
        // Nothing of it was stored: each topic starts at 1.
        assert_eq!(seq_of(&server.publish_id("a", "a-first").await), 1);
        assert_eq!(seq_of(&server.publish_id("t", "t-first").await), 1);
        let within = serde_json::json!([
            {"topic": "a", "data": "a-2"},
            {"topic": "bcv", "data": "bcv-1"},
        ]);
        let ids = publish_batch(&server, &within).await;
        assert_eq!(ids.len(), 2);
        assert_eq!(seq_of(&ids[0]), 2);
        assert_eq!(seq_of(&ids[1]), 1);
        server.stop().await;
    })
    .await;
}
