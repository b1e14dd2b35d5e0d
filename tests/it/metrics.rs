//! `GET /metrics`: exact numbers after known actions, scraped over real HTTP
//! from hubs that each own their metrics, parsed strictly as Prometheus text.

use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::auth;
use common::redis::{Proxy, RedisServer};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Topic names used below: none may ever show up as a label value.
const TOPICS: [&str; 4] = [
    "secret-alpha",
    "secret-beta",
    "secret-slow",
    "secret-resume",
];

type Labels = Vec<(String, String)>;

/// One scrape: every series (name and sorted labels) and its value.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
}

impl Scrape {
    /// The sum of the series of `name` with these labels, whatever their
    /// others (as PromQL's `sum(name{labels})`): `crier_open_streams` with
    /// no label is every transport's. There must be at least one.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = series(name, labels);
        self.sum(name, labels)
            .unwrap_or_else(|| panic!("no series {key:?} in {:#?}", self.samples.keys()))
    }

    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, value)| *value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(n, _)| n == name)
    }
}

fn series(name: &str, labels: &[(&str, &str)]) -> (String, Vec<(String, String)>) {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

/// Parses the Prometheus text format (0.0.4) strictly: every family is
/// declared by a `# TYPE` line before its samples, its samples are together,
/// names, labels and escapes are well-formed, no series appears twice, and
/// histogram buckets are cumulative up to `+Inf` = `_count`.
fn parse(text: &str) -> Result<Scrape, String> {
    let mut samples = BTreeMap::new();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut closed: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest
                .split_once(' ')
                .ok_or_else(|| bad("HELP without text"))?;
            if !metric_name(name) {
                return Err(bad("bad metric name"));
            }
            let mut chars = help.chars();
            while let Some(c) = chars.next() {
                if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                    return Err(bad("bad escape in HELP"));
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| bad("TYPE without type"))?;
            if !metric_name(name) {
                return Err(bad("bad metric name"));
            }
            if !matches!(
                kind,
                "counter" | "gauge" | "histogram" | "summary" | "untyped"
            ) {
                return Err(bad("unknown type"));
            }
            if typed.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(bad("family typed twice"));
            }
            if let Some((family, _)) = current.take() {
                closed.push(family);
            }
            current = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with('#') {
            return Err(bad("a comment that is neither HELP nor TYPE"));
        }
        let (name, labels, value) = sample(line).ok_or_else(|| bad("malformed sample"))?;
        let (family, kind) = current.as_ref().ok_or_else(|| bad("sample before TYPE"))?;
        let suffix = name.strip_prefix(family.as_str());
        let fits = match kind.as_str() {
            "histogram" => matches!(suffix, Some("_bucket" | "_sum" | "_count")),
            "summary" => matches!(suffix, Some("" | "_sum" | "_count")),
            _ => suffix == Some(""),
        };
        if !fits || closed.contains(family) {
            return Err(bad("sample outside its family"));
        }
        if suffix == Some("_bucket") && !labels.iter().any(|(k, _)| k == "le") {
            return Err(bad("bucket without le"));
        }
        let mut sorted = labels.clone();
        sorted.sort();
        sorted.dedup_by(|a, b| a.0 == b.0);
        if sorted.len() != labels.len() {
            return Err(bad("a label given twice"));
        }
        if samples.insert((name.clone(), sorted), value).is_some() {
            return Err(bad("series given twice"));
        }
    }
    // Buckets: cumulative, ending with +Inf equal to _count.
    for (family, kind) in &typed {
        if kind != "histogram" {
            continue;
        }
        let bucket = format!("{family}_bucket");
        let mut by_labels: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        for ((name, labels), value) in &samples {
            if *name != bucket {
                continue;
            }
            let le = labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v);
            let le: f64 = match le.map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(v) => v.parse().map_err(|_| format!("bad le {v}"))?,
                None => unreachable!(),
            };
            let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            by_labels.entry(rest).or_default().push((le, *value));
        }
        for (labels, mut buckets) in by_labels {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{family}{labels:?}: buckets are not cumulative"));
            }
            let count = samples.get(&(format!("{family}_count"), labels.clone()));
            match buckets.last() {
                Some((le, n)) if le.is_infinite() && Some(n) == count => {}
                _ => return Err(format!("{family}{labels:?}: +Inf bucket is not _count")),
            }
        }
    }
    Ok(Scrape { samples })
}

fn metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `name{label="value",…} value`: the name, labels (unescaped) and value.
type Sample = (String, Vec<(String, String)>, f64);

fn sample(line: &str) -> Option<Sample> {
    let end = line.find(['{', ' '])?;
    let name = &line[..end];
    if !metric_name(name) {
        return None;
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            if !label_name(key) {
                return None;
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        _ => return None,
                    },
                    (_, '\n') => return None,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &after[close + 1..];
            match rest.strip_prefix(',') {
                Some(more) => rest = more,
                None if rest.starts_with('}') => {}
                None => return None,
            }
        }
    }
    let mut parts = rest.strip_prefix(' ')?.split(' ');
    let value = match parts.next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    if let Some(timestamp) = parts.next() {
        timestamp.parse::<i64>().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((name.to_owned(), labels, value))
}

/// Scrapes `url`, checks it parses and names no topic, and returns it.
async fn scrape_url(client: &reqwest::Client, url: &str, bearer: Option<&str>) -> Scrape {
    let mut request = client.get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .expect("scrape answers in time")
        .expect("scrape");
    assert_eq!(response.status(), 200, "scrape status");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.expect("scrape body");
    let scrape = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for (_, labels) in scrape.samples.keys() {
        for (_, value) in labels {
            assert!(
                !TOPICS.iter().any(|t| value.contains(t)) && !value.contains("127.0.0.1"),
                "a label value names a topic or an address: {value}"
            );
        }
    }
    scrape
}

/// A hub with its metrics on a listener of their own, and a client that
/// scrapes only there (so scraping opens no connection on the main one).
struct Hub {
    server: Server,
    scraper: reqwest::Client,
}

impl Hub {
    async fn start(configure: impl FnOnce(&mut Config)) -> Hub {
        let server = Server::start_with_metrics_listener(|c| {
            // No heartbeats during a test: byte counts stay exact.
            c.transports.heartbeat = Duration::from_secs(3600);
            configure(c);
        })
        .await;
        Hub {
            server,
            scraper: common::client(),
        }
    }

    fn metrics_url(&self) -> String {
        let addr: SocketAddr = self.server.metrics_addr.expect("a metrics listener");
        format!("http://{addr}/metrics")
    }

    async fn scrape(&self) -> Scrape {
        scrape_url(&self.scraper, &self.metrics_url(), None).await
    }

    /// Scrapes until the series has `value`, failing after the deadline.
    async fn wait(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let scrape = self.scrape().await;
            let now = scrape.sum(name, labels);
            if now == Some(value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}{labels:?} stayed at {now:?}, not {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const STREAM_ENDS: [&str; 5] = [
    "client_gone",
    "slow_consumer",
    "shutdown",
    "token_expired",
    "store_error",
];
const REFUSALS: [&str; 12] = [
    "auth",
    "forbidden",
    "origin",
    "rate",
    "cap",
    "bad_input",
    "too_large",
    "body_timeout",
    "not_found",
    "storage_full",
    "store_unavailable",
    "store_error",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_publishes_deliveries_and_bytes_are_counted_exactly() {
    let hub = Hub::start(|_| {}).await;
    let server = &hub.server;
    // A fresh hub: everything at zero.
    let zero = hub.scrape().await;
    assert_eq!(zero.get("crier_open_streams", &[]), 0.0);
    assert_eq!(zero.get("crier_deliveries_total", &[]), 0.0);
    assert!(
        !zero.has("crier_redis_connected"),
        "no Redis, no Redis metrics"
    );

    // Three single-topic subscribers and one of two topics, each on its own
    // HTTP/1.1 connection.
    let subscribers_client = common::client();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let url = server.url("/topics/secret-alpha");
        subs.push(SseClient::connect(&subscribers_client, &url, None).await);
    }
    let url = server.url("/events?topic=secret-alpha&topic=secret-beta");
    subs.push(SseClient::connect(&subscribers_client, &url, None).await);
    hub.wait("crier_open_streams", &[], 4.0).await;
    let open = hub.scrape().await;
    assert_eq!(open.get("crier_subscriptions", &[]), 5.0);
    assert_eq!(open.get("crier_watched_topics", &[]), 2.0);
    // Starting now reads each topic's bounds once per subscription topic.
    let read = [("operation", "read")];
    assert_eq!(open.get("crier_store_operation_seconds_count", &read), 5.0);

    // Four single publishes and one batch of two, from one connection.
    for n in 0..4 {
        server.publish("secret-alpha", &format!("a{n}")).await;
    }
    let batch = json!([
        { "topic": "secret-alpha", "data": "a4" },
        { "topic": "secret-beta", "data": "b0" },
    ]);
    let answer = server
        .client
        .post(server.url("/events"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 201);
    // A refused publish: a topic name outside the charset.
    let refused = server
        .client
        .post(server.url("/topics/no%20spaces"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_problem(refused, 400, "invalid-topic").await;
    for sub in &mut subs[..3] {
        assert_eq!(sub.take(5).await.len(), 5);
    }
    assert_eq!(subs[3].take(6).await.len(), 6);

    // Connections: the four streams'. (The publisher's was closed after
    // its refused request, whose body the hub did not read.)
    let h1 = [("protocol", "http1"), ("tls", "no")];
    hub.wait("crier_open_connections", &h1, 4.0).await;
    // Every event counted once per subscriber of its topic: five events of
    // secret-alpha to four subscribers, one of secret-beta to one.
    hub.wait("crier_deliveries_total", &[], 21.0).await;
    // One publish-to-write sample per event, however many subscribers.
    hub.wait("crier_publish_to_write_seconds_count", &[], 6.0)
        .await;
    // Bytes are counted as written: what the subscribers received.
    let received: usize = subs.iter().map(|s| s.raw.lock().unwrap().len()).sum();
    hub.wait(
        "crier_stream_bytes_total",
        &[("coding", "identity")],
        received as f64,
    )
    .await;
    let after = hub.scrape().await;
    let stored = [("result", "stored")];
    assert_eq!(after.get("crier_published_events_total", &stored), 6.0);
    for result in ["storage_full", "store_unavailable", "store_error"] {
        let labels = [("result", result)];
        assert_eq!(after.get("crier_published_events_total", &labels), 0.0);
    }
    assert_eq!(after.get("crier_publish_batches_total", &[]), 1.0);
    let append = [("operation", "append")];
    assert_eq!(
        after.get("crier_store_operation_seconds_count", &append),
        5.0
    );
    for reason in REFUSALS {
        let expected = if reason == "bad_input" { 1.0 } else { 0.0 };
        let labels = [("reason", reason)];
        assert_eq!(
            after.get("crier_refused_requests_total", &labels),
            expected,
            "{reason}"
        );
    }
    for coding in ["gzip", "br", "zstd"] {
        assert_eq!(
            after.get("crier_stream_bytes_total", &[("coding", coding)]),
            0.0
        );
    }
    assert_eq!(after.get("crier_replayed_events_total", &[]), 0.0);
    assert!(after.get("crier_process_resident_memory_bytes", &[]) > 0.0);
    assert!(after.get("crier_process_open_fds", &[]) > 0.0);
    assert!(after.has("crier_process_cpu_seconds_total"));

    // A subscriber leaves: its stream ends, and its subscription with it.
    subs.pop();
    hub.wait("crier_open_streams", &[], 3.0).await;
    let left = hub.scrape().await;
    assert_eq!(left.get("crier_subscriptions", &[]), 3.0);
    assert_eq!(left.get("crier_watched_topics", &[]), 1.0);
    for reason in STREAM_ENDS {
        let expected = if reason == "client_gone" { 1.0 } else { 0.0 };
        let labels = [("reason", reason)];
        assert_eq!(
            left.get("crier_stream_ends_total", &labels),
            expected,
            "{reason}"
        );
    }
    drop(subs);
    hub.wait("crier_subscriptions", &[], 0.0).await;
    hub.wait("crier_watched_topics", &[], 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_bytes_are_counted_by_content_coding_as_sent() {
    let hub = Hub::start(|_| {}).await;
    let server = &hub.server;
    let mut streams = Vec::new();
    for coding in ["gzip", "br", "zstd"] {
        let response = server
            .client
            .get(server.url("/topics/secret-alpha"))
            .header("accept-encoding", coding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-encoding"], coding);
        streams.push((coding, response));
    }
    server.publish("secret-alpha", "compressed").await;
    for (coding, response) in &mut streams {
        // Read what was sent (preamble, then the event), compressed.
        let mut received = 0;
        let labels = [("coding", *coding)];
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let scrape = hub.scrape().await;
            let counted = scrape.get("crier_stream_bytes_total", &labels);
            if counted > 0.0 && counted == received as f64 {
                break;
            }
            let chunk = tokio::time::timeout_at(deadline, response.chunk())
                .await
                .unwrap_or_else(|_| panic!("{coding}: counted {counted}, received {received}"))
                .unwrap()
                .expect("the stream stays open");
            received += chunk.len();
        }
    }
    let scrape = hub.scrape().await;
    assert_eq!(
        scrape.get("crier_stream_bytes_total", &[("coding", "identity")]),
        0.0
    );
}

/// The topics' chained compressors are counted by coding while they live,
/// against `--max-compression-chains` (2 here), and each event whose chained
/// unit a topic could not make for want of one is counted once (its stream
/// still decodes it, compressed alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_chains_are_counted_by_coding_and_refusals_past_the_cap() {
    let hub = Hub::start(|c| {
        c.transports.max_compression_chains = 2;
        // Quick heartbeats: a stream whose client left is noticed at once.
        c.transports.heartbeat = Duration::from_millis(50);
    })
    .await;
    let server = &hub.server;
    let chains = |coding| ("crier_compression_chains", [("coding", coding)]);
    let refusals = |coding| {
        (
            "crier_compression_chain_refusals_total",
            [("coding", coding)],
        )
    };
    let zero = hub.scrape().await;
    for coding in coding::SHARED {
        let (name, labels) = chains(coding);
        assert_eq!(zero.get(name, &labels), 0.0, "{coding}");
        let (name, labels) = refusals(coding);
        assert_eq!(zero.get(name, &labels), 0.0, "{coding}");
    }
    async fn stream(server: &Server, coding: &'static str, topic: &str) -> SseClient {
        coding::on(coding, server.subscribe(&format!("/topics/{topic}"))).await
    }
    async fn publish(server: &Server, sub: &mut SseClient, topic: &str, data: &str) {
        let id = server.publish_id(topic, data).await;
        assert_eq!(sub.next().await, Ev::new(&id, "message", data));
    }
    // A compressor is made when the first event of the topic goes out.
    let mut a = stream(server, "zstd", "secret-alpha").await;
    let (name, labels) = chains("zstd");
    hub.wait(name, &labels, 0.0).await;
    publish(server, &mut a, "secret-alpha", "a-1").await;
    hub.wait(name, &labels, 1.0).await;
    let mut b = stream(server, "zstd", "secret-beta").await;
    publish(server, &mut b, "secret-beta", "b-1").await;
    hub.wait(name, &labels, 2.0).await;
    // The cap is reached: a gzip stream's topic gets no compressor, and
    // each of its events is counted, sent compressed alone.
    let mut c = stream(server, "gzip", "secret-slow").await;
    publish(server, &mut c, "secret-slow", "c-1").await;
    publish(server, &mut c, "secret-slow", "c-2").await;
    let scrape = hub.scrape().await;
    let (gzip, gzip_labels) = chains("gzip");
    assert_eq!(scrape.get(gzip, &gzip_labels), 0.0);
    let (refused, refused_labels) = refusals("gzip");
    assert_eq!(scrape.get(refused, &refused_labels), 2.0);
    assert_eq!(scrape.get(name, &labels), 2.0);
    // The last zstd stream of a topic leaves: its compressor goes, and the
    // gzip topic takes the place at its next event.
    drop(a);
    hub.wait(name, &labels, 1.0).await;
    publish(server, &mut c, "secret-slow", "c-3").await;
    let scrape = hub.scrape().await;
    assert_eq!(scrape.get(gzip, &gzip_labels), 1.0);
    assert_eq!(scrape.get(refused, &refused_labels), 2.0);
    assert_eq!(scrape.get(name, &labels), 1.0);
    drop((b, c));
    hub.wait(name, &labels, 0.0).await;
    hub.wait(gzip, &gzip_labels, 0.0).await;
    let scrape = hub.scrape().await;
    for coding in coding::SHARED {
        let (name, labels) = refusals(coding);
        let expected = if coding == "gzip" { 2.0 } else { 0.0 };
        assert_eq!(scrape.get(name, &labels), expected, "{coding}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_cut_is_counted_as_such() {
    let hub = Hub::start(|c| {
        c.transports.subscriber_backlog = 4;
        c.storage.retention_events = 4;
    })
    .await;
    let server = &hub.server;
    // A subscriber with a tiny receive buffer that reads nothing yet.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(server.addr).await.unwrap();
    slow.write_all(b"GET /topics/secret-slow HTTP/1.1\r\nhost: crier\r\n\r\n")
        .await
        .unwrap();
    hub.wait("crier_open_streams", &[], 1.0).await;
    // Far more than the socket buffers and the backlog hold.
    let data = "x".repeat(60 * 1024);
    for _ in 0..200 {
        server.publish("secret-slow", &data).await;
    }
    // Now it reads: the stream finds it lagged, and ends.
    let reader = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(slow.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    hub.wait(
        "crier_stream_ends_total",
        &[("reason", "slow_consumer")],
        1.0,
    )
    .await;
    let scrape = hub.scrape().await;
    assert_eq!(scrape.get("crier_open_streams", &[]), 0.0);
    let gone = [("reason", "client_gone")];
    assert_eq!(scrape.get("crier_stream_ends_total", &gone), 0.0);
    reader.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_are_counted_by_outcome_with_the_events_they_replay() {
    let hub = Hub::start(|c| c.storage.retention_events = 2).await;
    let server = &hub.server;
    let mut ids = Vec::new();
    for n in 1..=5 {
        ids.push(server.publish_id("secret-resume", &format!("e{n}")).await);
    }
    let epoch = ids[0].split('.').nth(1).unwrap().to_owned();
    let other = if epoch == "1" { "2" } else { "1" };
    let path = "/topics/secret-resume";
    // Exact: after the newest event, nothing to replay.
    let exact = server.resume(path, &ids[4]).await;
    // Trimmed: event 2 is gone; reset, then 4 and 5.
    let mut trimmed = server.resume(path, &ids[0]).await;
    assert_eq!(trimmed.next().await.event, "reset");
    assert_eq!(trimmed.take(2).await[1].data, "e5");
    // Ahead of the head; reset, then 4 and 5.
    let mut ahead = server.resume(path, &format!("99.{epoch}")).await;
    assert_eq!(ahead.next().await.event, "reset");
    assert_eq!(ahead.take(2).await[1].data, "e5");
    // Another epoch: reset, then 4 and 5.
    let mut old = server.resume(path, &format!("3.{other}")).await;
    assert_eq!(old.next().await.event, "reset");
    assert_eq!(old.take(2).await[1].data, "e5");

    hub.wait("crier_replayed_events_total", &[], 6.0).await;
    let scrape = hub.scrape().await;
    for (outcome, n) in [
        ("exact", 1.0),
        ("reset_trimmed", 1.0),
        ("reset_ahead", 1.0),
        ("reset_epoch", 1.0),
    ] {
        let labels = [("outcome", outcome)];
        assert_eq!(scrape.get("crier_resumes_total", &labels), n, "{outcome}");
    }
    for reason in ["trimmed", "ahead", "epoch"] {
        let labels = [("reason", reason)];
        assert_eq!(scrape.get("crier_resets_total", &labels), 1.0, "{reason}");
    }
    drop(exact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_listener_serves_metrics_only_to_a_token_granting_them() {
    let server = Server::start_with(auth::with_secret).await;
    let url = server.url("/metrics");
    let client = common::client();
    let refused = client.get(&url).send().await.unwrap();
    assert_problem(refused, 401, "unauthenticated").await;
    let bad = client
        .get(&url)
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_problem(bad, 401, "invalid-token").await;
    // A token that may publish and read every topic, but not the metrics.
    let everything = auth::token(&["*"], &["*"]);
    let forbidden = client
        .get(&url)
        .bearer_auth(&everything)
        .send()
        .await
        .unwrap();
    assert_eq!(
        forbidden.headers()["www-authenticate"],
        r#"Bearer realm="crier", error="insufficient_scope""#
    );
    assert_problem(forbidden, 403, "forbidden-metrics").await;
    // A cookie does not stand in for the bearer token.
    let granted = auth::signed(&json!({
        "sub": "prometheus",
        "exp": auth::now() + 3600,
        "crier": { "metrics": true },
    }));
    let cookie = client
        .get(&url)
        .header("cookie", format!("{}={granted}", auth::COOKIE))
        .send()
        .await
        .unwrap();
    assert_problem(cookie, 401, "unauthenticated").await;

    let scrape = scrape_url(&client, &url, Some(&granted)).await;
    assert_eq!(
        scrape.get("crier_refused_requests_total", &[("reason", "auth")]),
        3.0
    );
    let forbidden = [("reason", "forbidden")];
    assert_eq!(scrape.get("crier_refused_requests_total", &forbidden), 1.0);
    // The metrics grant is only that: it publishes nothing.
    let publish = client
        .post(server.url("/topics/secret-alpha"))
        .bearer_auth(&granted)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_problem(publish, 403, "forbidden-topic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_metrics_listener_the_metrics_are_served_there_without_a_token_and_nowhere_else() {
    let hub = Hub::start(auth::with_secret).await;
    let granted = auth::signed(&json!({
        "exp": auth::now() + 3600,
        "crier": { "metrics": true },
    }));
    let main = hub
        .server
        .client
        .get(hub.server.url("/metrics"))
        .bearer_auth(&granted)
        .send()
        .await
        .unwrap();
    assert_problem(main, 404, "not-found").await;
    let scrape = hub.scrape().await;
    assert_eq!(
        scrape.get("crier_refused_requests_total", &[("reason", "not_found")]),
        1.0
    );
    // Nothing else is served on the metrics listener.
    let addr = hub.server.metrics_addr.unwrap();
    let other = hub
        .scraper
        .get(format!("http://{addr}/topics/secret-alpha"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_hub_serves_its_metrics_on_the_main_listener() {
    let server = Server::start().await;
    let client = common::client();
    let scrape = scrape_url(&client, &server.url("/metrics"), None).await;
    // The scrape's own connection is open while it is answered.
    let h1 = [("protocol", "http1"), ("tls", "no")];
    assert_eq!(scrape.get("crier_open_connections", &h1), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_token_expires_ends_counted_as_expired() {
    let hub = Hub::start(|c| {
        auth::with_secret(c);
        c.access.jwt.jwt_leeway = Duration::ZERO;
    })
    .await;
    let token = auth::signed(&auth::claims(&[], &["secret-alpha"], auth::now() + 2));
    let request = hub
        .server
        .client
        .get(hub.server.url("/topics/secret-alpha"))
        .bearer_auth(&token);
    let mut sub = SseClient::open(request).await;
    assert_eq!(sub.status, 200);
    assert_eq!(sub.until_end().await[0].event, "reauth");
    let expired = [("reason", "token_expired")];
    hub.wait("crier_stream_ends_total", &expired, 1.0).await;
    let scrape = hub.scrape().await;
    assert_eq!(
        scrape.get("crier_stream_ends_total", &[("reason", "client_gone")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_and_its_reconnect_are_counted() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr()).await;
    let url = proxy.url();
    let hub = Hub::start(|c| {
        c.redis.url = Some(url);
        c.redis.timeout = Duration::from_millis(500);
    })
    .await;
    let healthy = Server::start_with(|c| c.redis.url = Some(redis.url())).await;
    let server = &hub.server;
    hub.wait("crier_redis_connected", &[], 1.0).await;
    let mut sub = server.subscribe("/topics/secret-alpha").await;
    server.publish("secret-alpha", "before").await;
    assert_eq!(sub.next().await.data, "before");

    proxy.cut();
    hub.wait("crier_redis_connected", &[], 0.0).await;
    let refused = server
        .client
        .post(server.url("/topics/secret-alpha"))
        .body("lost")
        .send()
        .await
        .unwrap();
    assert_problem(refused, 503, "store-unavailable").await;
    healthy.publish("secret-alpha", "during").await;

    proxy.restore();
    hub.wait("crier_redis_connected", &[], 1.0).await;
    // Caught up by the node: the subscriber gets what it missed.
    assert_eq!(sub.next().await.data, "during");
    server.publish("secret-alpha", "after").await;
    assert_eq!(sub.next().await.data, "after");

    hub.wait("crier_deliveries_total", &[], 3.0).await;
    let scrape = hub.scrape().await;
    assert_eq!(scrape.get("crier_redis_reconnects_total", &[]), 1.0);
    let caught_up = [("result", "caught_up")];
    assert_eq!(scrape.get("crier_redis_catch_ups_total", &caught_up), 1.0);
    assert_eq!(
        scrape.get("crier_redis_catch_ups_total", &[("result", "resync")]),
        0.0
    );
    let unavailable = [("result", "store_unavailable")];
    assert_eq!(
        scrape.get("crier_published_events_total", &unavailable),
        1.0
    );
    let stored = [("result", "stored")];
    assert_eq!(scrape.get("crier_published_events_total", &stored), 2.0);
    let append = [("operation", "append"), ("kind", "unavailable")];
    assert_eq!(scrape.get("crier_store_errors_total", &append), 1.0);
    let reason = [("reason", "store_unavailable")];
    assert_eq!(scrape.get("crier_refused_requests_total", &reason), 1.0);
    // Live events only: the caught-up one is not a publish-to-write sample.
    assert_eq!(scrape.get("crier_publish_to_write_seconds_count", &[]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_metrics_on_the_address_its_environment_gives() {
    let crier =
        common::process::Process::start_with_env(&[], &[("CRIER_METRICS_LISTEN", "127.0.0.1:0")]);
    // Said before the main listener's line, which the harness waits for.
    let url = crier
        .log()
        .iter()
        .find_map(|line| {
            line.split("metrics on ")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .expect("the metrics address is logged");
    let client = common::client();
    let scrape = scrape_url(&client, &url, None).await;
    assert_eq!(scrape.get("crier_open_streams", &[]), 0.0);
    let main = client
        .get(format!("{}/metrics", crier.base))
        .send()
        .await
        .unwrap();
    assert_problem(main, 404, "not-found").await;
}

#[test]
fn the_parser_is_strict() {
    let good = "# HELP a_total A \\\\ help.\n# TYPE a_total counter\na_total{x=\"q\\\"\"} 1\n";
    assert!(parse(good).is_ok());
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na{x=\"1} 1\n",
        "# TYPE a counter\na{1x=\"1\"} 1\n",
        "# TYPE a counter\na 1\na 2\n",
        "# TYPE a counter\na one\n",
        "# TYPE a counter\n# TYPE b gauge\nb 1\na 1\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        "# TYPE a counter\na{x=\"\\q\"} 1\n",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_a_bounded_number_of_connections_and_closes_silent_ones() {
    let server = Server::start_with_metrics_listener(|c| {
        c.limits.header_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = server.metrics_addr.unwrap();
    // Silent connections take every slot the listener has.
    let mut silent = Vec::new();
    for _ in 0..crier::server::METRICS_MAX_CONNECTIONS {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Past them, a scraper is refused with a problem at once...
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    over.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, over.read_to_end(&mut answer))
        .await
        .expect("the refusal comes at once")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        answer.contains("urn:crier:problem:over-capacity"),
        "{answer}"
    );
    // ...and the silent ones are closed at the header timeout, which frees
    // the slots again.
    for mut connection in silent {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, connection.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a silent metrics connection was kept open");
    }
    // A slot is free once its connection's task has ended, just after the
    // close: scrape until served, within the deadline.
    let client = common::client();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let response = client.get(format!("http://{addr}/metrics")).send().await;
        if response.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot came free");
        tokio::task::yield_now().await;
    }
}

/// A subscribe refused once its transport is known (here a malformed
/// position) counts under that transport in
/// `crier_refused_subscribes_total`, and by reason as every refusal does;
/// one refused before (a malformed topic) counts by reason only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscribes_are_counted_by_transport() {
    let hub = Hub::start(|_| {}).await;
    let server = &hub.server;
    let client = common::client();
    let url = server.url("/topics/secret-alpha");
    let sse = client
        .get(&url)
        .header("accept", "text/event-stream")
        .header("last-event-id", "not-a-position")
        .send()
        .await
        .expect("SSE subscribe");
    assert_eq!(sse.status(), 400);
    let poll = client
        .get(format!("{url}?poll=1"))
        .header("last-event-id", "not-a-position")
        .send()
        .await
        .expect("long-poll");
    assert_eq!(poll.status(), 400);
    let ws_url = format!("{url}?lastEventId=not-a-position").replacen("http", "ws", 1);
    match tokio_tungstenite::connect_async(ws_url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => {
            assert_eq!(answer.status(), 400)
        }
        other => panic!("the handshake should be refused: {other:?}"),
    }
    let mut grpc = common::transport::grpc_client(server).await;
    let refused = grpc
        .subscribe(crier::grpc::proto::SubscribeRequest {
            topics: vec!["secret-alpha".into()],
            last_event_id: "not-a-position".into(),
            last: None,
        })
        .await
        .expect_err("a malformed position is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let bad_topic = client
        .get(server.url("/topics/bad%20topic"))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(bad_topic.status(), 400);

    for transport in ["sse", "longpoll", "websocket", "grpc"] {
        hub.wait(
            "crier_refused_subscribes_total",
            &[("transport", transport)],
            1.0,
        )
        .await;
    }
    let scrape = hub.scrape().await;
    assert_eq!(scrape.get("crier_refused_subscribes_total", &[]), 4.0);
    assert_eq!(
        scrape.get("crier_refused_requests_total", &[("reason", "bad_input")]),
        5.0
    );
    assert_eq!(scrape.get("crier_open_streams", &[]), 0.0);
}
