//! `crier bench`: the real binary measuring an in-process hub, whose
//! process is this test's own.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `crier bench ARGS…` against `server` and returns its JSON result.
async fn bench(server: &Server, args: &[&str]) -> Value {
    let url = format!("http://{}", server.addr);
    bench_at(&url, std::process::id(), args).await
}

/// Runs `crier bench ARGS…` against the hub at `url` whose process is
/// `pid`, and returns its JSON result.
async fn bench_at(url: &str, pid: u32, args: &[&str]) -> Value {
    let pid = pid.to_string();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .arg("bench")
        .args(args)
        .args(["--url", url, "--pid", &pid])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the bench finishes in time")
        .expect("run crier bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "crier bench failed:\n{stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("the result is not JSON ({e}):\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_counts_every_delivery_exactly_and_measures_the_hub() {
    let server = Server::start().await;
    let result = bench(
        &server,
        &[
            "fanout",
            "--subscribers",
            "50",
            "--rate",
            "50",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert_eq!(result["scenario"], "fanout", "{result}");
    assert_every_event_once(&result, 50, 50);
    assert_eq!(result["publish_errors"], 0, "{result}");
    let p50 = result["latency_ms"]["p50"].as_f64().expect("p50");
    assert!(p50 > 0.0, "{result}");
    assert!(
        result["latency_ms"]["max"].as_f64() >= Some(p50),
        "{result}"
    );
    let server_cpu = result["server"]["cpu_s"].as_f64().expect("server cpu");
    assert!(server_cpu > 0.0, "{result}");
    assert!(
        result["server"]["peak_rss_bytes"].as_u64() > Some(0),
        "{result}"
    );
    assert!(result["tool"]["cpu_s"].as_f64().is_some(), "{result}");
    server.stop().await;
}

/// `bench fanout` with 20 subscribers asking for `accept_encoding`, 50
/// metric events in a second; checks that every event was counted.
async fn fanout_with(server: &Server, topic: &str, accept_encoding: Option<&str>) -> Value {
    let mut args = vec![
        "fanout",
        "--topic",
        topic,
        "--subscribers",
        "20",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--payload",
        "metrics",
    ];
    if let Some(value) = accept_encoding {
        args.extend(["--accept-encoding", value]);
    }
    let result = bench(server, &args).await;
    assert_every_event_once(&result, 20, 50);
    assert_eq!(result["payload"], "metrics", "{result}");
    result
}

/// Subscribers that ask for a coding get it, decode it read by read as a
/// browser does, and still count every event exactly; what came over the
/// wire per event is smaller than identity's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_decodes_each_coding_and_counts_every_event() {
    let server = Server::start().await;
    let identity = fanout_with(&server, "plain", None).await;
    assert_eq!(identity["content_encoding"], "identity", "{identity}");
    assert_eq!(identity["accept_encoding"], Value::Null, "{identity}");
    let plain_bytes = identity["wire"]["bytes_per_event"].as_f64().expect("bytes");
    // An event of 200 bytes of data, with its id line and chunk framing.
    assert!(plain_bytes > 200.0, "{identity}");
    // Each of the 20 subscribers read its head, its preamble and 50 events.
    let per_subscriber = identity["wire"]["bytes_per_subscriber"].as_f64();
    assert!(per_subscriber > Some(50.0 * plain_bytes), "{identity}");
    assert!(
        identity["wire"]["opening_bytes_per_subscriber"].as_f64() > Some(0.0),
        "{identity}"
    );
    for coding in ["zstd", "br", "gzip"] {
        let result = fanout_with(&server, coding, Some(coding)).await;
        assert_eq!(result["accept_encoding"], coding, "{result}");
        assert_eq!(result["content_encoding"], coding, "{result}");
        assert_eq!(result["content_encodings"][coding], 20, "{result}");
        let bytes = result["wire"]["bytes_per_event"].as_f64().expect("bytes");
        assert!(0.0 < bytes && bytes < plain_bytes, "{coding}: {result}");
        assert!(
            result["server"]["rss_after_bytes"].as_u64() > Some(0),
            "{result}"
        );
    }
    // A browser's whole header: the hub picks its own first choice.
    let browser = fanout_with(&server, "browser", Some("gzip, deflate, br, zstd")).await;
    assert_eq!(browser["content_encoding"], "zstd", "{browser}");
    server.stop().await;
}

/// A hub that does not compress answers identity, whatever is asked, and
/// the result says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reports_identity_from_a_hub_without_compression() {
    let server = Server::start_with(|config| config.transports.compression = vec![None]).await;
    let result = fanout_with(&server, "none", Some("zstd")).await;
    assert_eq!(result["accept_encoding"], "zstd", "{result}");
    assert_eq!(result["content_encoding"], "identity", "{result}");
    assert_eq!(result["content_encodings"]["identity"], 20, "{result}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_holds_compressed_streams() {
    let server = Server::start().await;
    let result = bench(
        &server,
        &[
            "idle",
            "--subscribers",
            "50",
            "--hold",
            "200ms",
            "--accept-encoding",
            "gzip",
        ],
    )
    .await;
    assert_eq!(result["connected"], 50, "{result}");
    assert_eq!(result["still_connected"], 50, "{result}");
    assert_eq!(result["content_encoding"], "gzip", "{result}");
    assert_eq!(result["content_encodings"]["gzip"], 50, "{result}");
    assert!(
        result["wire_bytes_per_subscriber"].as_u64() > Some(0),
        "{result}"
    );
    server.stop().await;
}

/// `--transport ws` and `ws-deflate`: the same fanout over WebSockets,
/// plain and with permessage-deflate (each message inflated), every
/// delivery counted exactly, the compressed frames the smaller; and idle
/// sockets held (their pings answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_and_idle_over_websockets_count_every_delivery_exactly() {
    let server = Server::start_with(|c| c.transports.heartbeat = Duration::from_millis(100)).await;
    let mut bytes_per_event = Vec::new();
    for transport in ["ws", "ws-deflate"] {
        let result = bench(
            &server,
            &[
                "fanout",
                "--transport",
                transport,
                "--subscribers",
                "50",
                "--rate",
                "50",
                "--duration",
                "1s",
            ],
        )
        .await;
        assert_every_event_once(&result, 50, 50);
        bytes_per_event.push(result["wire"]["bytes_per_event"].as_f64().unwrap());
    }
    assert!(
        bytes_per_event[1] < bytes_per_event[0],
        "{bytes_per_event:?}"
    );
    let result = bench(
        &server,
        &[
            "idle",
            "--transport",
            "ws",
            "--subscribers",
            "50",
            "--hold",
            "500ms",
        ],
    )
    .await;
    assert_eq!(result["connected"], 50, "{result}");
    // Pinged every 100ms and answering: none was closed.
    assert_eq!(result["still_connected"], 50, "{result}");
    server.stop().await;
}

/// `--transport grpc`: the same fanout over `Subscribe` calls, each on an
/// h2c connection of its own, every delivery counted exactly; idle calls
/// held; and a storm of calls coming back with their last id, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_idle_and_storm_over_grpc_count_every_delivery_exactly() {
    let server = Server::start().await;
    let fanout = [
        "fanout",
        "--transport",
        "grpc",
        "--subscribers",
        "50",
        "--rate",
        "50",
        "--duration",
        "1s",
    ];
    let result = bench(&server, &fanout).await;
    assert_every_event_once(&result, 50, 50);
    assert!(
        result["wire"]["bytes_per_event"].as_f64() > Some(200.0),
        "the 200-byte payload and its message: {result}"
    );
    let idle = [
        "idle",
        "--transport",
        "grpc",
        "--subscribers",
        "50",
        "--hold",
        "300ms",
    ];
    let result = bench(&server, &idle).await;
    assert_eq!(result["connected"], 50, "{result}");
    assert_eq!(result["still_connected"], 50, "{result}");
    let storm = [
        "storm",
        "--transport",
        "grpc",
        "--topic",
        "storm",
        "--subscribers",
        "50",
        "--rate",
        "50",
        "--behind",
        "30",
        "--warmup",
        "3",
        "--catch-up-timeout",
        "5s",
    ];
    let result = bench(&server, &storm).await;
    assert_eq!(result["reconnected"], 50, "{result}");
    assert_eq!(result["caught_up"], 50, "{result}");
    assert_eq!(result["lost"], 0, "{result}");
    assert_eq!(result["duplicated"], 0, "{result}");
    assert_eq!(result["resets"], 0, "{result}");
    assert_eq!(result["exact"], true, "{result}");
    server.stop().await;
}

/// `--calls-per-connection`: gRPC calls share connections, as a service's
/// calls share its channel; the hub serves 50 calls on two connections,
/// each call still gets every event exactly, and the flag is refused for a
/// transport without calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_share_connections_and_each_gets_every_event_exactly() {
    let server = Server::start().await;
    let shared = ["--transport", "grpc", "--calls-per-connection", "25"];
    let idle = [
        &["idle"][..],
        &shared,
        &["--subscribers", "50", "--hold", "3s"],
    ]
    .concat();
    let (result, ()) = tokio::join!(
        bench(&server, &idle),
        server.wait_for_metric(r#"crier_open_connections{protocol="h2",tls="no"} 2"#)
    );
    assert_eq!(result["calls_per_connection"], 25, "{result}");
    assert_eq!(result["still_connected"], 50, "{result}");
    let fanout = [
        &["fanout"][..],
        &shared,
        &["--subscribers", "50", "--rate", "50", "--duration", "1s"],
    ]
    .concat();
    let result = bench(&server, &fanout).await;
    assert_every_event_once(&result, 50, 50);
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["bench", "idle", "--calls-per-connection", "2"])
        .args(["--url", &format!("http://{}", server.addr)])
        .output()
        .await
        .expect("run crier bench");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("--calls-per-connection is for --transport grpc"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reports_the_hubs_memory_per_connection() {
    let server = Server::start().await;
    let result = bench(
        &server,
        &["idle", "--subscribers", "100", "--hold", "200ms"],
    )
    .await;
    assert_eq!(result["scenario"], "idle", "{result}");
    assert_eq!(result["connected"], 100, "{result}");
    assert_eq!(result["still_connected"], 100, "{result}");
    assert!(result["rss_before_bytes"].as_u64() > Some(0), "{result}");
    assert!(result["rss_after_bytes"].as_u64() > Some(0), "{result}");
    assert!(result["bytes_per_connection"].is_i64(), "{result}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_brings_every_subscriber_back_exactly_with_last_event_id() {
    let server = Server::start().await;
    let result = bench(
        &server,
        &[
            "storm",
            "--subscribers",
            "200",
            "--rate",
            "50",
            "--behind",
            "100",
            "--warmup",
            "3",
            "--catch-up-timeout",
            "5s",
        ],
    )
    .await;
    assert_eq!(result["scenario"], "storm", "{result}");
    assert_eq!(result["connected"], 200, "{result}");
    assert_eq!(result["left"], 200, "{result}");
    assert_eq!(result["reconnected"], 200, "{result}");
    assert_eq!(result["caught_up"], 200, "{result}");
    assert_eq!(result["publish_errors"], 0, "{result}");
    assert!(
        result["missed_per_subscriber"]["min"].as_u64() >= Some(100),
        "{result}"
    );
    assert_eq!(result["lost"], 0, "{result}");
    assert_eq!(result["duplicated"], 0, "{result}");
    assert_eq!(result["out_of_order"], 0, "{result}");
    assert_eq!(result["resets"], 0, "{result}");
    assert_eq!(result["exact"], true, "{result}");
    let all = result["all_caught_up_ms"].as_f64().expect("all caught up");
    assert!(all.is_finite() && all > 0.0, "{result}");
    assert!(
        result["catch_up_ms"]["p50"].as_f64() <= Some(all),
        "{result}"
    );
    assert!(result["server"]["cpu_s"].as_f64().is_some(), "{result}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resumes_one_subscriber_exactly() {
    let server = Server::start().await;
    let result = bench(
        &server,
        &["replay", "--warmup", "5", "--missed", "100", "--live", "10"],
    )
    .await;
    assert_eq!(result["scenario"], "replay", "{result}");
    assert_eq!(result["passed"], true, "{result}");
    assert_eq!(result["exact_sequence"], true, "{result}");
    assert_eq!(result["received_before_drop"], 5, "{result}");
    assert_eq!(result["replayed"], 100, "{result}");
    assert_eq!(result["live_received"], 10, "{result}");
    assert_eq!(result["lost"], 0, "{result}");
    assert_eq!(result["duplicated"], 0, "{result}");
    assert_eq!(result["resets"], 0, "{result}");
    let first = result["first_replayed_ms"]
        .as_f64()
        .expect("first replayed");
    let last = result["last_replayed_ms"].as_f64().expect("last replayed");
    assert!(0.0 <= first && first <= last, "{result}");
    server.stop().await;
}

/// The one subscriber reconnects with a fresh decoder: a compressed stream
/// resumes exactly too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resumes_a_compressed_stream_exactly() {
    let server = Server::start().await;
    let result = bench(
        &server,
        &[
            "replay",
            "--warmup",
            "5",
            "--missed",
            "50",
            "--live",
            "10",
            "--accept-encoding",
            "br",
        ],
    )
    .await;
    assert_eq!(result["content_encoding"], "br", "{result}");
    assert_eq!(result["passed"], true, "{result}");
    assert_eq!(result["replayed"], 50, "{result}");
    assert_eq!(result["lost"], 0, "{result}");
    server.stop().await;
}

/// The bench must see what the hub says when it cannot resume: with only 10
/// events retained, a subscriber 100 behind gets a `reset` and misses some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_fails_and_reports_the_reset_when_retention_is_short() {
    let server = Server::start_with(|config| config.storage.retention_events = 10).await;
    let result = bench(
        &server,
        &[
            "replay",
            "--missed",
            "100",
            "--live",
            "5",
            "--timeout",
            "1s",
        ],
    )
    .await;
    assert_eq!(result["passed"], false, "{result}");
    assert_eq!(result["resets"], 1, "{result}");
    assert!(result["lost"].as_u64() > Some(0), "{result}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_counts_the_hubs_refusals_and_measures_its_descriptors() {
    let server =
        Server::start_with(|config| config.limits.body_timeout = Duration::from_millis(300)).await;
    let result = bench(
        &server,
        &[
            "attack",
            "--kind",
            "dribble",
            "--connections",
            "4",
            "--sources",
            "127.0.1.1-127.0.1.2",
            "--duration",
            "1s",
            "--retry",
            "100ms",
            "--settle",
            "100ms",
        ],
    )
    .await;
    assert_eq!(result["scenario"], "attack", "{result}");
    assert_eq!(result["kind"], "dribble", "{result}");
    assert_eq!(result["sources"], "127.0.1.1-127.0.1.2", "{result}");
    assert_eq!(result["open_max"], 4, "{result}");
    assert!(result["attempts"].as_u64() >= Some(8), "{result}");
    let cut = &result["outcomes"]["408 body-timeout"];
    assert!(cut["count"].as_u64() >= Some(4), "{result}");
    let after = cut["after_ms"]["p50"].as_f64().expect("p50");
    assert!((300.0..1000.0).contains(&after), "{result}");
    // The hub runs in this test process, whose descriptors the other tests
    // open and close meanwhile: only that they were measured can be said
    // (`open_max` above says the four connections were held).
    let fds = &result["hub"]["fds"];
    assert!(fds["before"].as_u64() > Some(0), "{result}");
    assert!(fds["during_max"].as_u64() > Some(0), "{result}");
    assert!(fds["after"].as_u64() > Some(0), "{result}");
    let rss = &result["hub"]["rss_bytes"];
    assert!(
        rss["during_max"].as_u64() >= rss["before"].as_u64(),
        "{result}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_is_refused_past_the_rate_and_what_is_stored_is_dense() {
    let server = Server::start_with(|config| {
        config.limits.publish_rate = 20;
        config.limits.publish_burst = 20;
    })
    .await;
    let result = bench(
        &server,
        &[
            "attack",
            "--kind",
            "publish-flood",
            "--connections",
            "2",
            "--duration",
            "1s",
            "--retry",
            "10ms",
            "--settle",
            "0s",
        ],
    )
    .await;
    let stored = &result["stored"];
    let count = stored["count"].as_u64().expect("stored count");
    assert!((20..=60).contains(&count), "{result}");
    assert_eq!(result["outcomes"]["201"]["count"], count, "{result}");
    assert_eq!(stored["first_seq"], 1, "{result}");
    assert_eq!(stored["last_seq"], count, "{result}");
    assert_eq!(stored["dense"], true, "{result}");
    assert!(
        result["outcomes"]["429 publish-rate"]["count"].as_u64() > Some(0),
        "{result}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_measures_rate_and_latency_of_concurrent_publishers_on_the_durable_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start_with(|config| {
        config.storage.data_dir = Some(dir.clone());
        config.limits.publish_rate = 1_000_000;
        config.limits.publish_burst = 1_000_000;
    })
    .await;
    let result = bench(
        &server,
        &[
            "publish",
            "--publishers",
            "4",
            "--topics",
            "2",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert_eq!(result["scenario"], "publish", "{result}");
    assert_eq!(result["failed"], 0, "{result}");
    let published = result["published"].as_u64().expect("published");
    assert!(published > 0, "{result}");
    assert!(result["events_per_second"].as_f64() > Some(0.0), "{result}");
    assert!(result["latency_ms"]["p99"].as_f64() > Some(0.0), "{result}");
    // Every answered publish was stored, densely numbered per topic.
    let mut stored = 0;
    for topic in ["bench-publish-0", "bench-publish-1"] {
        let id = server.publish_id(topic, "last").await;
        stored += seq_of(&id) - 1;
    }
    assert_eq!(stored, published, "{result}");
    server.stop().await;
}

/// `--batch N`: each request is a `POST /events` of N events to one topic,
/// the publishers going round the topics; every event counted as
/// published was stored, densely numbered per topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_in_batches_posts_that_many_events_per_request_round_the_topics() {
    let server = Server::start_with(|config| {
        config.limits.publish_rate = 1_000_000;
        config.limits.publish_burst = 1_000_000;
    })
    .await;
    let result = bench(
        &server,
        &[
            "publish",
            "--publishers",
            "2",
            "--topics",
            "3",
            "--batch",
            "10",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert_eq!(result["batch"], 10, "{result}");
    assert_eq!(result["failed"], 0, "{result}");
    let published = result["published"].as_u64().expect("published");
    assert!(published >= 30 && published % 10 == 0, "{result}");
    let mut stored = Vec::new();
    for topic in ["bench-publish-0", "bench-publish-1", "bench-publish-2"] {
        let id = server.publish_id(topic, "last").await;
        stored.push(seq_of(&id) - 1);
    }
    assert!(
        stored.iter().all(|&n| n > 0 && n % 10 == 0),
        "every topic got whole batches: {stored:?}"
    );
    assert_eq!(stored.iter().sum::<u64>(), published, "{result}");
    server.stop().await;
}

/// `crier bench bare-hub`, the floor crier is measured against: `fanout`
/// measures it as it measures crier (every delivery checked, its CPU read
/// from /proc by its pid), its events are crier's bytes (ids `SEQ.EPOCH`,
/// read here by the suite's SSE parser), and it stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bare_hub_is_measured_like_crier_and_writes_crier_events() {
    use tokio::io::AsyncBufReadExt;
    let mut hub = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["bench", "bare-hub", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the bare hub");
    let pid = hub.id().expect("its pid");
    let mut lines = tokio::io::BufReader::new(hub.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("the bare hub says where it listens in time")
        .expect("its stderr")
        .expect("a line");
    let addr = first
        .strip_prefix("bare hub listening on ")
        .unwrap_or_else(|| panic!("unexpected first line `{first}`"));
    let url = format!("http://{addr}");

    let result = bench_at(
        &url,
        pid,
        &[
            "fanout",
            "--subscribers",
            "50",
            "--rate",
            "50",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert_every_event_once(&result, 50, 50);
    assert_eq!(result["content_encoding"], "identity", "{result}");
    assert!(result["server"]["cpu_s"].as_f64() > Some(0.0), "{result}");

    // A stream read by the suite's SSE parser (subscribed once its head
    // came): crier's preamble, then each event with its id and its data as
    // published (lines split as crier splits them).
    let client = client();
    let mut stream = SseClient::connect(&client, &format!("{url}/topics/t"), None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    for data in ["one", "two\r\nlines"] {
        let published = client
            .post(format!("{url}/topics/t"))
            .body(data)
            .send()
            .await
            .expect("publish");
        assert_eq!(published.status(), 201);
    }
    let events = stream.take(2).await;
    let epoch = events[0]
        .id
        .split_once('.')
        .expect("SEQ.EPOCH")
        .1
        .to_owned();
    assert_eq!(
        events,
        [
            Ev::new(&format!("1.{epoch}"), "message", "one"),
            Ev::new(&format!("2.{epoch}"), "message", "two\nlines"),
        ]
    );
    // The bytes themselves: the preamble, then crier's frames.
    assert_eq!(
        String::from_utf8_lossy(&stream.raw.lock().unwrap()),
        format!(
            "retry: 3000\n: crier stream open\n\n\
             id: 1.{epoch}\ndata: one\n\n\
             id: 2.{epoch}\ndata: two\ndata: lines\n\n"
        )
    );
    let refused = client.get(format!("{url}/elsewhere")).send().await.unwrap();
    assert_eq!(refused.status(), 404);

    // SIGTERM: it stops, cleanly.
    // SAFETY: kill(2) on the pid of a child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(10), hub.wait())
        .await
        .expect("the bare hub stops in time")
        .expect("its status");
    assert!(status.success(), "{status}");
}

/// A fan-out run in which each of `subscribers` got each of `published`
/// events exactly once, in order.
fn assert_every_event_once(result: &Value, subscribers: u64, published: u64) {
    assert_eq!(result["connected"], subscribers, "{result}");
    assert_eq!(result["published"], published, "{result}");
    let expected = subscribers * published;
    assert_eq!(result["expected_deliveries"], expected, "{result}");
    assert_eq!(result["deliveries"], expected, "{result}");
    assert_eq!(result["lost"], 0, "{result}");
    assert_eq!(result["duplicated"], 0, "{result}");
    assert_eq!(result["out_of_order"], 0, "{result}");
}

/// A publishing scenario refused by the hub's rate limit says how to start
/// the hub for measuring, not only "429".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_by_the_rate_limit_says_to_lift_it() {
    let server = Server::start_with(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 1;
    })
    .await;
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["bench", "wire", "--events", "20", "--url"])
        .arg(format!("http://{}", server.addr))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the bench finishes in time")
        .expect("run crier bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "publish answered 429 Too Many Requests: the hub's publish rate limit; start the hub \
             with --publish-rate 0 (CRIER_PUBLISH_RATE=0) to measure it"
        ),
        "{stderr}"
    );
    server.stop().await;
}
