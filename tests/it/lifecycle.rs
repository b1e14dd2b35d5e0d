//! The process as an operator sees it: the real binary, started and stopped.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::Process;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_cleanly_and_exits_promptly() {
    // No drain (tests/operations.rs pins it): streams end at once.
    let mut crier = Process::start(&[
        "--shutdown-timeout",
        "5s",
        "--drain-delay",
        "0s",
        "--drain-window",
        "0s",
    ]);
    let mut sub = crier.subscribe("/topics/t").await;
    let id = crier.publish_id("t", "before shutdown").await;
    assert_eq!(sub.next().await, Ev::new(&id, "message", "before shutdown"));

    let stopping = Instant::now();
    crier.terminate();
    // The stream ends with a proper end of body, not a reset connection.
    assert_eq!(sub.until_end().await, vec![]);
    let status = tokio::task::spawn_blocking(move || crier.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "open streams must not hold the shutdown for its whole timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_documents_every_setting_with_its_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_crier"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "CRIER_LISTEN"),
        ("--metrics-listen", "CRIER_METRICS_LISTEN"),
        ("--retention-events", "CRIER_RETENTION_EVENTS"),
        ("--retention-age", "CRIER_RETENTION_AGE"),
        ("--max-event-bytes", "CRIER_MAX_EVENT_BYTES"),
        ("--max-batch-bytes", "CRIER_MAX_BATCH_BYTES"),
        ("--max-batch-events", "CRIER_MAX_BATCH_EVENTS"),
        ("--max-topic-len", "CRIER_MAX_TOPIC_LEN"),
        (
            "--max-topics-per-subscription",
            "CRIER_MAX_TOPICS_PER_SUBSCRIPTION",
        ),
        ("--subscriber-backlog", "CRIER_SUBSCRIBER_BACKLOG"),
        ("--heartbeat", "CRIER_HEARTBEAT"),
        ("--ws-deflate", "CRIER_WS_DEFLATE"),
        ("--poll-timeout", "CRIER_POLL_TIMEOUT"),
        ("--retry", "CRIER_RETRY"),
        ("--shutdown-timeout", "CRIER_SHUTDOWN_TIMEOUT"),
        ("--drain-delay", "CRIER_DRAIN_DELAY"),
        ("--drain-window", "CRIER_DRAIN_WINDOW"),
        ("--canary-interval", "CRIER_CANARY_INTERVAL"),
        ("--canary-timeout", "CRIER_CANARY_TIMEOUT"),
        ("--allowed-origins", "CRIER_ALLOWED_ORIGINS"),
        ("--cors-origins", "CRIER_ALLOWED_ORIGINS"),
        ("--jwt-secret", "CRIER_JWT_SECRET"),
        ("--jwt-secret-file", "CRIER_JWT_SECRET_FILE"),
        ("--jwt-public-key", "CRIER_JWT_PUBLIC_KEY"),
        ("--jwks-file", "CRIER_JWKS_FILE"),
        ("--jwt-algorithm", "CRIER_JWT_ALGORITHM"),
        ("--jwt-issuer", "CRIER_JWT_ISSUER"),
        ("--jwt-audience", "CRIER_JWT_AUDIENCE"),
        ("--jwt-leeway", "CRIER_JWT_LEEWAY"),
        ("--auth-cookie", "CRIER_AUTH_COOKIE"),
        ("--public-topics", "CRIER_PUBLIC_TOPICS"),
        ("--ticket-ttl", "CRIER_TICKET_TTL"),
        ("--max-connections", "CRIER_MAX_CONNECTIONS"),
        ("--max-connections-per-ip", "CRIER_MAX_CONNECTIONS_PER_IP"),
        ("--max-streams-per-ip", "CRIER_MAX_STREAMS_PER_IP"),
        ("--connection-rate", "CRIER_CONNECTION_RATE"),
        ("--connection-burst", "CRIER_CONNECTION_BURST"),
        ("--publish-rate", "CRIER_PUBLISH_RATE"),
        ("--publish-burst", "CRIER_PUBLISH_BURST"),
        ("--trusted-proxies", "CRIER_TRUSTED_PROXIES"),
        ("--client-ip-header", "CRIER_CLIENT_IP_HEADER"),
        ("--tls-handshake-timeout", "CRIER_TLS_HANDSHAKE_TIMEOUT"),
        ("--header-timeout", "CRIER_HEADER_TIMEOUT"),
        ("--body-timeout", "CRIER_BODY_TIMEOUT"),
        ("--idle-timeout", "CRIER_IDLE_TIMEOUT"),
        ("--max-header-bytes", "CRIER_MAX_HEADER_BYTES"),
        ("--write-timeout", "CRIER_WRITE_TIMEOUT"),
        ("--max-retained-bytes", "CRIER_MAX_RETAINED_BYTES"),
        ("--max-topics", "CRIER_MAX_TOPICS"),
        ("--idempotency-window", "CRIER_IDEMPOTENCY_WINDOW"),
        ("--idempotency-max-keys", "CRIER_IDEMPOTENCY_MAX_KEYS"),
        ("--listen-backlog", "CRIER_LISTEN_BACKLOG"),
        ("--log-format", "CRIER_LOG_FORMAT"),
        ("--tls-cert", "CRIER_TLS_CERT"),
        ("--tls-key", "CRIER_TLS_KEY"),
        ("--http2-max-streams", "CRIER_HTTP2_MAX_STREAMS"),
        ("--http2-keepalive", "CRIER_HTTP2_KEEPALIVE"),
        ("--compression", "CRIER_COMPRESSION"),
        ("--max-compression-chains", "CRIER_MAX_COMPRESSION_CHAINS"),
        ("--redis", "CRIER_REDIS_URL"),
        ("--redis-ca-cert", "CRIER_REDIS_CA_CERT"),
        ("--redis-prefix", "CRIER_REDIS_PREFIX"),
        ("--redis-timeout", "CRIER_REDIS_TIMEOUT"),
        ("--data-dir", "CRIER_DATA_DIR"),
        ("--fsync", "CRIER_FSYNC"),
        ("--fsync-interval", "CRIER_FSYNC_INTERVAL"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
        assert!(help.contains(env), "{env} missing from --help");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_are_read_from_the_environment() {
    let crier = Process::start_with_env(&[], &[("CRIER_MAX_EVENT_BYTES", "4")]);
    let base = &crier.base;
    let client = common::client();
    let small = client
        .post(format!("{base}/topics/t"))
        .body("1234")
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 201);
    let big = client
        .post(format!("{base}/topics/t"))
        .body("12345")
        .send()
        .await
        .unwrap();
    assert_problem(big, 413, "payload-too-large").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_queues_as_many_connections_as_configured() {
    // A reconnect storm needs room in the accept queue; the kernel reports
    // a listening socket's backlog as its Send-Q.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for backlog in [100u32, 1000] {
        let crier = Process::start(&["--listen-backlog", &backlog.to_string()]);
        let port = crier.base.rsplit(':').next().unwrap().to_owned();
        let output = Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) is installed");
        let line = String::from_utf8_lossy(&output.stdout).into_owned();
        let send_q: u32 = line
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no listening socket in {line:?}"))
            .parse()
            .unwrap();
        assert_eq!(send_q, backlog.min(somaxconn), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_request_fields() {
    let crier = Process::start_with_env(
        &["--log-format", "json"],
        &[("RUST_LOG", "debug,hyper=info,h2=info")],
    );
    let client = common::client();
    let served = client
        .get(format!("{}/healthz", crier.base))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let refused = client
        .get(format!("{}/nowhere?secret=query", crier.base))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let parsed = || -> Vec<serde_json::Value> {
        crier
            .log()
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    };
    common::wait_for("both request lines", || {
        parsed()
            .iter()
            .filter(|l| l["span"]["name"] == "request" && l["status"].is_number())
            .count()
            >= 2
    })
    .await;
    let lines = parsed();
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
    }
    let request = |status: u64| {
        lines
            .iter()
            .find(|l| l["status"] == status && l["span"]["name"] == "request")
            .unwrap_or_else(|| panic!("no line for {status}: {lines:#?}"))
            .clone()
    };
    let ok = request(200);
    assert_eq!(ok["level"], "DEBUG");
    assert_eq!(ok["span"]["method"], "GET");
    assert_eq!(ok["span"]["path"], "/healthz");
    assert!(ok["latency_us"].is_number());
    let no = request(404);
    assert_eq!(no["level"], "INFO");
    assert_eq!(no["span"]["path"], "/nowhere", "the path, never the query");
    assert!(!crier.log().iter().any(|l| l.contains("secret=query")));
}

/// An event stream's own log lines carry its request's span (the body does
/// not enter the span on every poll; the lines name it): here the line of
/// a stream ended by shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_s_log_lines_carry_its_request_span() {
    let mut crier = Process::start_with_env(
        &[
            "--log-format",
            "json",
            "--drain-delay",
            "0s",
            "--drain-window",
            "0s",
        ],
        &[("RUST_LOG", "debug,hyper=info,h2=info")],
    );
    let client = common::client();
    let mut sub = SseClient::connect(
        &client,
        &format!("{}/topics/logged?secret=query", crier.base),
        None,
    )
    .await;
    crier.terminate();
    assert_eq!(sub.until_end().await, vec![]);
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = crier.wait_exit(DEADLINE);
        (status, crier.full_log())
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let end = log
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|l| l["message"] == "end of stream")
        .unwrap_or_else(|| panic!("no end of stream line: {log:#?}"));
    assert_eq!(end["level"], "DEBUG");
    assert_eq!(end["span"]["name"], "request", "{end}");
    assert_eq!(end["span"]["method"], "GET");
    assert_eq!(
        end["span"]["path"], "/topics/logged",
        "the path, never the query"
    );
    assert!(!log.iter().any(|l| l.contains("secret=query")));
}

/// Settings a newcomer gets wrong at start-up are refused with what to do:
/// a taken address, a host name for `--listen`, a Redis URL that does not
/// parse. Each exits with a failure status, before serving anything.
#[test]
fn start_up_mistakes_are_refused_saying_what_to_do() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--listen", &taken],
            "another process (another crier?) holds this address; stop it, or give another --listen",
        ),
        (
            &["--listen", "example.com:8080"],
            "expected IP:PORT, such as 127.0.0.1:8080",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--redis",
                "http://127.0.0.1:6379",
            ],
            "(expected redis://[USER:PASSWORD@]HOST:PORT[/DB], or rediss:// for TLS)",
        ),
    ];
    for (args, says) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_crier"))
            .args(args)
            .env_remove("CRIER_LISTEN")
            .env_remove("CRIER_REDIS_URL")
            .output()
            .expect("run crier");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
