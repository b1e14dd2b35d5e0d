//! Shared test harness: a real crier on an ephemeral loopback port, a real
//! HTTP client, and a real (third-party) SSE parser.
#![allow(dead_code)]

pub mod auth;
pub mod coding;
pub mod process;
pub mod redis;
pub mod tls;
#[macro_use]
pub mod transport;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crier::Config;

/// How long any single expectation may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Server {
    pub addr: SocketAddr,
    /// The `--metrics-listen` address, when the server has one.
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
    pub client: reqwest::Client,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(|_| {}).await
    }

    /// Starts a server on the store the test runs against (see
    /// [`on_every_store!`]), after `configure` adjusted its settings.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Server {
        Server::launch(configure, false).await
    }

    /// Like [`Server::start_with`], with metrics on a listener of their own
    /// (`--metrics-listen`) on another ephemeral port.
    pub async fn start_with_metrics_listener(configure: impl FnOnce(&mut Config)) -> Server {
        Server::launch(configure, true).await
    }

    async fn launch(configure: impl FnOnce(&mut Config), metrics_listener: bool) -> Server {
        let mut config = Config::default();
        if let Ok(Some(setup)) = STORE.try_with(|setup| setup.clone()) {
            setup.apply(&mut config);
        }
        if let Ok(dir) = DATA_DIR.try_with(|dir| dir.clone()) {
            config.storage.data_dir = Some(dir);
        }
        configure(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let metrics = match metrics_listener {
            true => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            false => None,
        };
        let metrics_addr = metrics
            .as_ref()
            .map(|l| l.local_addr().expect("local addr"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(crier::serve_with_metrics(
            listener,
            metrics,
            config,
            shutdown.clone(),
        ));
        Server {
            addr,
            metrics_addr,
            shutdown,
            task: Some(task),
            client: client(),
        }
    }

    /// Scrapes the main listener's `/metrics` (an open hub) until a line of
    /// it reads `line` exactly, failing after the deadline: how a test waits
    /// for what happens inside the hub (a stream opened, a socket closed).
    pub async fn wait_for_metric(&self, line: &str) {
        eventually(&format!("metric line {line:?}"), || async {
            let text = self.scrape().await;
            text.lines()
                .any(|l| l == line)
                .then_some(())
                .ok_or("absent")
        })
        .await
    }

    /// The main listener's `/metrics` text (an open hub).
    pub async fn scrape(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("scrape body")
    }

    /// The value of the series `series` (its name and labels, as written),
    /// or 0 when it is absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.scrape()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Publishes `data` to `topic` and returns the answer's JSON.
    pub async fn publish(&self, topic: &str, data: &str) -> Value {
        self.publish_to(&format!("/topics/{topic}"), data).await
    }

    /// Publishes `data` (one event, or a batch's JSON to `/events`) to
    /// `path`, expecting `201`, and returns the answer's JSON.
    pub async fn publish_to(&self, path: &str, data: &str) -> Value {
        publish_with(&self.client, &self.url(path), data).await
    }

    /// Publishes and returns the event id the answer gives.
    pub async fn publish_id(&self, topic: &str, data: &str) -> String {
        id_of(&self.publish(topic, data).await)
    }

    pub async fn subscribe(&self, path: &str) -> SseClient {
        SseClient::connect(&self.client, &self.url(path), None).await
    }

    pub async fn resume(&self, path: &str, last_event_id: &str) -> SseClient {
        SseClient::connect(&self.client, &self.url(path), Some(last_event_id)).await
    }

    /// Cancels the server and waits until it has returned.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("server stops in time")
                .expect("server task")
                .expect("server result");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// POSTs `data` to `url`, expecting `201`; the answer's JSON.
pub async fn publish_with(client: &reqwest::Client, url: &str, data: &str) -> Value {
    let response = client
        .post(url)
        .body(data.to_owned())
        .send()
        .await
        .expect("publish request");
    assert_eq!(response.status(), 201, "publishing to {url}");
    response.json().await.expect("publish answer is JSON")
}

/// The event id of a publish answer.
pub fn id_of(answer: &Value) -> String {
    answer["id"].as_str().expect("id is a string").to_owned()
}

pub fn client() -> reqwest::Client {
    // The hub and the clients share one TLS provider (an error only means
    // it is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

/// An event as a browser's EventSource would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ev {
    pub id: String,
    pub event: String,
    pub data: String,
}

impl Ev {
    pub fn new(id: &str, event: &str, data: &str) -> Ev {
        Ev {
            id: id.into(),
            event: event.into(),
            data: data.into(),
        }
    }

    /// The sequence number of a single-topic id (`SEQ.EPOCH`).
    pub fn seq(&self) -> u64 {
        seq_of(&self.id)
    }
}

/// Tries `attempt` until it succeeds, every 20 ms, failing the test with
/// `what` and the last reason once [`DEADLINE`] has passed: for conditions
/// the test can only ask about (a metric, a released slot, a store back).
pub async fn eventually<T, E, F, Fut>(what: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within {DEADLINE:?} ({why})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A default (`message`) event as a stream shows it.
pub fn msg(id: &str, data: &str) -> Ev {
    Ev::new(id, "message", data)
}

/// The epoch part of a `SEQ.EPOCH` id.
pub fn epoch_of(id: &str) -> String {
    id.split_once('.').expect("SEQ.EPOCH id").1.to_owned()
}

/// A single-topic position `SEQ.EPOCH`.
pub fn pos(seq: u64, epoch: &str) -> String {
    format!("{seq}.{epoch}")
}

/// A multi-topic id: `TOPIC/` then one position per topic, in sorted order.
pub fn multi(topic: &str, positions: &[&str]) -> String {
    format!("{topic}/{}", positions.join(","))
}

pub fn seq_of(id: &str) -> u64 {
    id.split('.').next().unwrap().parse().expect("SEQ.EPOCH id")
}

type Events = Pin<Box<dyn Stream<Item = Result<Ev, String>> + Send>>;

/// A subscriber: the response's status and headers, its parsed events, and
/// every raw byte received (to look at comments and heartbeats). Inside
/// [`coding::on`] it asks for that coding, checks that a stream (200) is
/// sent with it, and decodes each chunk on arrival ([`coding::OnArrival`]):
/// its events and `raw` are what an EventSource would see.
pub struct SseClient {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub raw: Arc<Mutex<Vec<u8>>>,
    events: Events,
}

impl SseClient {
    pub async fn connect(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let mut request = client.get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        SseClient::open(request).await
    }

    /// Subscribes with `request` (a GET with whatever headers the test
    /// needs: credentials, `Origin`, `Last-Event-ID`).
    pub async fn open(request: reqwest::RequestBuilder) -> SseClient {
        let mut request = request.header("accept", "text/event-stream");
        let coding = coding::current();
        if let Some(coding) = coding {
            request = request.header("accept-encoding", coding);
        }
        let response = tokio::time::timeout(DEADLINE, request.send())
            .await
            .expect("subscribe answers in time")
            .expect("subscribe request");
        let status = response.status();
        let headers = response.headers().clone();
        let mut decoder = match coding {
            Some(coding) if status == 200 => {
                let sent = headers.get("content-encoding").map(|v| v.to_str().unwrap());
                assert_eq!(sent, Some(coding), "the stream's Content-Encoding");
                Some(coding::OnArrival::new(coding))
            }
            _ => None,
        };
        let raw = Arc::new(Mutex::new(Vec::new()));
        let tee = raw.clone();
        let events = response
            .bytes_stream()
            .map(move |chunk| match &mut decoder {
                Some(decoder) => chunk.map(|wire| decoder.decode(&wire).into()),
                None => chunk,
            })
            .inspect(move |chunk| {
                if let Ok(bytes) = chunk {
                    tee.lock().unwrap().extend_from_slice(bytes);
                }
            })
            .eventsource()
            .map(|item| {
                item.map(|e| Ev {
                    id: e.id,
                    event: e.event,
                    data: e.data,
                })
                .map_err(|e| e.to_string())
            });
        SseClient {
            status,
            headers,
            raw,
            events: Box::pin(events),
        }
    }

    /// The next event; fails the test after the deadline or at end of stream.
    pub async fn next(&mut self) -> Ev {
        match tokio::time::timeout(DEADLINE, self.events.next()).await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => panic!("stream error: {e}"),
            Ok(None) => panic!("stream ended while an event was expected"),
            Err(_) => panic!("no event within {DEADLINE:?}"),
        }
    }

    /// The next event, or `None` when the server ended the stream cleanly;
    /// fails the test on a broken stream or after the deadline.
    pub async fn next_or_end(&mut self) -> Option<Ev> {
        match tokio::time::timeout(DEADLINE, self.events.next()).await {
            Ok(Some(Ok(event))) => Some(event),
            Ok(Some(Err(e))) => panic!("the stream broke instead of ending: {e}"),
            Ok(None) => None,
            Err(_) => panic!("no event or end within {DEADLINE:?}"),
        }
    }

    /// The next event, or `None` at a clean end, however long it takes:
    /// for feeds that outlive a store's outage (whose reader decides how
    /// long to wait).
    pub async fn next_or_end_patiently(&mut self) -> Option<Ev> {
        match self.events.next().await {
            Some(Ok(event)) => Some(event),
            Some(Err(e)) => panic!("the stream broke instead of ending: {e}"),
            None => None,
        }
    }

    /// The next `n` events.
    pub async fn take(&mut self, n: usize) -> Vec<Ev> {
        let mut events = Vec::with_capacity(n);
        for _ in 0..n {
            events.push(self.next().await);
        }
        events
    }

    /// Waits for the server to end the stream cleanly (a proper end of
    /// body, not a broken connection), returning any events that came first.
    pub async fn until_end(&mut self) -> Vec<Ev> {
        let mut events = Vec::new();
        loop {
            match tokio::time::timeout(DEADLINE, self.events.next()).await {
                Ok(Some(Ok(event))) => events.push(event),
                Ok(Some(Err(e))) => panic!("the stream broke instead of ending: {e}"),
                Ok(None) => return events,
                Err(_) => panic!("stream did not end within {DEADLINE:?}"),
            }
        }
    }

    /// Asserts that no event arrives within `quiet`.
    pub async fn expect_quiet(&mut self, quiet: Duration) {
        if let Ok(item) = tokio::time::timeout(quiet, self.events.next()).await {
            panic!("expected no event, got {item:?}");
        }
    }

    pub fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).into_owned()
    }
}

/// The events of a raw hyper response body, as a browser would parse them.
pub fn sse_events(body: hyper::body::Incoming) -> Pin<Box<dyn Stream<Item = Ev> + Send>> {
    use http_body_util::BodyStream;
    Box::pin(
        BodyStream::new(body)
            // A broken body keeps answering its error: end at the first.
            .take_while(|frame| std::future::ready(frame.is_ok()))
            .filter_map(|frame| async move { frame.ok().and_then(|f| f.into_data().ok()) })
            .map(Ok::<_, std::convert::Infallible>)
            .eventsource()
            .map(|e| {
                let e = e.expect("well-formed stream");
                Ev::new(&e.id, &e.event, &e.data)
            }),
    )
}

/// Polls `condition` until it holds, failing the test after the deadline.
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts a problem+json answer with the given status and problem type.
pub async fn assert_problem(response: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["type"], format!("urn:crier:problem:{kind}"), "{body}");
    assert_eq!(body["status"], status);
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

tokio::task_local! {
    /// The Redis the current test's servers use; unset or `None`: the
    /// embedded store.
    static STORE: Option<RedisSetup>;
}

/// How a test's servers reach Redis.
#[derive(Clone, Debug, Default)]
pub struct RedisSetup {
    /// `--redis`.
    pub url: Option<String>,
    /// `--redis-sentinel`, with `--redis-master`.
    pub sentinels: Vec<String>,
    /// `--redis-cluster`.
    pub cluster: Vec<String>,
    /// `--redis-prefix`: tests sharing one Redis each keep to their own.
    pub prefix: Option<String>,
    /// `--redis-wait-replicas`.
    pub wait_replicas: u32,
}

impl RedisSetup {
    pub fn apply(&self, config: &mut Config) {
        config.redis.url = self.url.clone();
        if !self.sentinels.is_empty() {
            config.redis.sentinel = self.sentinels.clone();
            config.redis.master = Some(redis::MASTER.to_owned());
        }
        config.redis.cluster = self.cluster.clone();
        if let Some(prefix) = &self.prefix {
            config.redis.prefix = prefix.clone();
        }
        config.redis.wait_replicas = self.wait_replicas;
    }
}

/// The current test's Redis setup, if it runs on Redis.
pub fn redis_setup() -> Option<RedisSetup> {
    STORE.try_with(|setup| setup.clone()).ok().flatten()
}

tokio::task_local! {
    /// The data directory the current test's servers use (inside
    /// [`on_durable`]): the durable embedded store.
    static DATA_DIR: std::path::PathBuf;
}

/// Whether the current test runs on the durable store (inside
/// [`on_durable`]).
pub fn on_durable_store() -> bool {
    DATA_DIR.try_with(|_| ()).is_ok()
}

/// Runs `test` with every `Server` it starts on the durable embedded store,
/// in a fresh data directory removed afterwards.
pub async fn on_durable<F: std::future::Future>(test: F) -> F::Output {
    let dir = tempfile::tempdir().expect("a temporary data directory");
    let output = DATA_DIR.scope(dir.path().join("data"), test).await;
    drop(dir);
    output
}

/// Whether the current test runs on Redis (inside [`on_redis`]).
pub fn on_redis_store() -> bool {
    STORE.try_with(|setup| setup.is_some()).unwrap_or(false)
}

/// Runs `test` with every `Server` it starts backed by its own fresh
/// `redis-server`.
pub async fn on_redis<F: std::future::Future>(test: F) -> F::Output {
    let redis = redis::RedisServer::start();
    let setup = RedisSetup {
        url: Some(redis.url()),
        ..RedisSetup::default()
    };
    let output = STORE.scope(Some(setup), test).await;
    drop(redis);
    output
}

/// Runs `test` with every `Server` it starts reaching Redis through the
/// binary's shared Sentinel group, under a key prefix of its own, with
/// publishes waiting for its replica (`--redis-wait-replicas 1`): the
/// shared suites run once on the path that sends events live only once a
/// replica has them.
pub async fn on_sentinel<F: std::future::Future>(test: F) -> F::Output {
    let (sentinels, _) = redis::shared_sentinel();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let setup = RedisSetup {
        sentinels: sentinels.clone(),
        prefix: Some(format!("crier-test-{n}:")),
        wait_replicas: 1,
        ..RedisSetup::default()
    };
    STORE.scope(Some(setup), test).await
}

/// Runs `test` with every `Server` it starts on the binary's shared Redis
/// Cluster, under a key prefix of its own.
pub async fn on_cluster<F: std::future::Future>(test: F) -> F::Output {
    let seeds = redis::shared_cluster();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let setup = RedisSetup {
        cluster: seeds.clone(),
        prefix: Some(format!("crier-test-{n}:")),
        ..RedisSetup::default()
    };
    STORE.scope(Some(setup), test).await
}

/// Declares each listed `async fn` as three tests: `memory::NAME` on the
/// embedded store, `durable::NAME` on the embedded store with a data
/// directory, and `redis::NAME` on a fresh `redis-server`, so every store
/// passes the same behavioural suite.
#[macro_export]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name().await
                }
            )*
        }
        mod durable {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::on_durable(super::$name()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::on_redis(super::$name()).await
                }
            )*
        }
        mod sentinel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::on_sentinel(super::$name()).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::on_cluster(super::$name()).await
                }
            )*
        }
    };
}

/// Runs `test` as it is: on the embedded store, without a data directory
/// (the counterpart of [`on_durable`] and [`on_redis`] in the macros).
pub async fn on_memory<F: std::future::Future>(test: F) -> F::Output {
    test.await
}

/// Declares each listed `async fn` again with its SSE subscribers on
/// compressed streams ([`coding::on`]: `Accept-Encoding` sent,
/// `Content-Encoding` checked, every chunk decoded on arrival by two
/// decoders): every shared coding on the embedded store
/// (`zstd::memory::NAME`, `gzip::memory::NAME`, `br::memory::NAME`), and one
/// coding on each other store (`gzip::durable::NAME`, `zstd::redis::NAME`).
/// Compression happens in the hub, after the store, so each coding's own
/// paths (chains, joins, units compressed alone) are covered on one store,
/// and what a store changes (when and in what batches its events reach the
/// hub) on one coding each, keeping the suite's time bounded.
/// `on_every_coding!(@memory …)`: every coding on the embedded store only.
#[macro_export]
macro_rules! on_every_coding {
    (@memory $($name:ident),* $(,)?) => {
        mod zstd {
            $crate::on_every_coding!(@store memory, on_memory, "zstd", $($name),*);
        }
        mod gzip {
            $crate::on_every_coding!(@store memory, on_memory, "gzip", $($name),*);
        }
        mod br {
            $crate::on_every_coding!(@store memory, on_memory, "br", $($name),*);
        }
    };
    ($($name:ident),* $(,)?) => {
        mod zstd {
            $crate::on_every_coding!(@store memory, on_memory, "zstd", $($name),*);
            $crate::on_every_coding!(@store redis, on_redis, "zstd", $($name),*);
        }
        mod gzip {
            $crate::on_every_coding!(@store memory, on_memory, "gzip", $($name),*);
            $crate::on_every_coding!(@store durable, on_durable, "gzip", $($name),*);
        }
        mod br {
            $crate::on_every_coding!(@store memory, on_memory, "br", $($name),*);
        }
    };
    (@store $store:ident, $on_store:ident, $coding:literal, $($name:ident),*) => {
        mod $store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::$on_store($crate::common::coding::on(
                        $coding,
                        super::super::$name(),
                    ))
                    .await
                }
            )*
        }
    };
}

/// [`on_every_store!`] and [`on_every_coding!`]: each listed `async fn` on
/// every store over plain SSE, and on compressed SSE streams.
#[macro_export]
macro_rules! on_every_store_and_coding {
    ($($name:ident),* $(,)?) => {
        $crate::on_every_store!($($name),*);
        $crate::on_every_coding!($($name),*);
    };
}
