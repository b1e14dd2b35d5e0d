//! The hub's metrics: every name, label and help text, and the handles the
//! rest of the code counts with. Nothing else formats metrics text.
//!
//! Each hub state owns its own recorder (`metrics-exporter-prometheus`, used
//! for rendering only: no listener or push gateway of its own) instead of a
//! process-wide one, so several hubs in one process (the tests run many)
//! each show their own numbers. Handles are resolved once, when the state is
//! built, and kept: counting never hashes a label set. Labels come from the
//! small fixed sets below, never from a topic, an address or a token.
//!
//! The counters bumped per event per subscriber write (bytes written and
//! events sent, by transport; deliveries, bumped once per event per topic)
//! are plain atomics of our own, each on its own cache line, copied into the
//! recorder at scrape time: one relaxed add on the hot path. The stream
//! series carry a `transport` label ([`crate::transport::Kind`]), fixed when
//! the stream's wire is chosen.
//!
//! Process CPU, memory and descriptors are read from /proc at scrape time;
//! a task folds histogram samples into buckets every 5 s. Why this crate
//! rather than `prometheus`: handles are cheap `Arc`s of atomics behind the
//! `metrics` facade, and the exporter renders histograms with fixed
//! buckets; we serve the text ourselves through axum.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::coding::{Codec, SHARED_CODINGS};
use crate::event::LiveStamp;
use crate::transport::Kind;

/// The transports a stream travels by (the `transport` label).
const TRANSPORTS: usize = Kind::ALL.len();

/// The `Content-Type` of a scrape answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bounds of the latency histograms, in seconds: 100 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A node's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    connections: [[Gauge; 2]; 2],
    refused_connections: [Counter; ConnectionRefusal::ALL.len()],
    streams: [Gauge; TRANSPORTS],
    stream_ends: [[Counter; StreamEnd::ALL.len()]; TRANSPORTS],
    refused_subscribes: [Counter; TRANSPORTS],
    subscriptions: Gauge,
    watched_topics: Gauge,
    published: [Counter; PublishResult::ALL.len()],
    idempotency: [Counter; Idempotency::ALL.len()],
    batches: Counter,
    deliveries: HotCounter,
    deliveries_out: Counter,
    sent: [HotCounter; TRANSPORTS],
    sent_out: [Counter; TRANSPORTS],
    written: [[HotCounter; CODINGS.len()]; TRANSPORTS],
    written_out: [[Counter; CODINGS.len()]; TRANSPORTS],
    chains: [Gauge; SHARED_CODINGS],
    chain_refusals: [Counter; SHARED_CODINGS],
    resumes: [Counter; Resume::ALL.len()],
    resets: [Counter; 3],
    replayed: Counter,
    refused_requests: [Counter; Refusal::ALL.len()],
    store_seconds: [Histogram; StoreOp::TIMED.len()],
    store_errors: [[Counter; StoreErrorKind::ALL.len()]; StoreOp::ALL.len()],
    publish_to_write: Histogram,
    redis: OnceLock<RedisMetrics>,
}

/// A counter bumped on the hot path: a relaxed add on a cache line of its
/// own, copied to the recorder when scraped.
#[repr(align(64))]
#[derive(Default)]
struct HotCounter(AtomicU64);

/// The codings of the topics' chained compressors, in the order of
/// `Codec::shared_slot`.
const CHAIN_CODINGS: [&str; SHARED_CODINGS] = ["zstd", "gzip", "br"];

/// The content codings a stream is written with, in label order.
const CODINGS: [&str; 4] = ["identity", "gzip", "br", "zstd"];

fn coding_index(codec: Option<Codec>) -> usize {
    match codec {
        None => 0,
        Some(Codec::Gzip) => 1,
        Some(Codec::Brotli) => 2,
        Some(Codec::Zstd) => 3,
    }
}

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Why a connection was turned away before any request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// The hub holds all the connections it may.
    Capacity,
    /// The client has too many connections open.
    ClientConnections,
    /// The client opens connections too fast.
    ConnectionRate,
}

impl ConnectionRefusal {
    const ALL: [ConnectionRefusal; 3] = [
        ConnectionRefusal::Capacity,
        ConnectionRefusal::ClientConnections,
        ConnectionRefusal::ConnectionRate,
    ];

    fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::Capacity => "capacity",
            ConnectionRefusal::ClientConnections => "client_connections",
            ConnectionRefusal::ConnectionRate => "connection_rate",
        }
    }
}

/// Why an event stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The client closed it, or its connection broke or timed out.
    ClientGone,
    /// It fell further behind the live feed than the backlog holds.
    SlowConsumer,
    /// The hub is shutting down.
    Shutdown,
    /// The token (or ticket) that opened it expired: `reauth`.
    TokenExpired,
    /// The store refuses the stream's work for good.
    StoreError,
}

impl StreamEnd {
    const ALL: [StreamEnd; 5] = [
        StreamEnd::ClientGone,
        StreamEnd::SlowConsumer,
        StreamEnd::Shutdown,
        StreamEnd::TokenExpired,
        StreamEnd::StoreError,
    ];

    fn label(self) -> &'static str {
        match self {
            StreamEnd::ClientGone => "client_gone",
            StreamEnd::SlowConsumer => "slow_consumer",
            StreamEnd::Shutdown => "shutdown",
            StreamEnd::TokenExpired => "token_expired",
            StreamEnd::StoreError => "store_error",
        }
    }
}

/// What became of events a publisher sent that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishResult {
    Stored,
    StorageFull,
    StoreUnavailable,
    StoreError,
}

impl PublishResult {
    const ALL: [PublishResult; 4] = [
        PublishResult::Stored,
        PublishResult::StorageFull,
        PublishResult::StoreUnavailable,
        PublishResult::StoreError,
    ];

    fn label(self) -> &'static str {
        match self {
            PublishResult::Stored => "stored",
            PublishResult::StorageFull => "storage_full",
            PublishResult::StoreUnavailable => "store_unavailable",
            PublishResult::StoreError => "store_error",
        }
    }
}

/// What an idempotency key did to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// An event answered from its key's record, not stored again.
    Replayed,
    /// A request refused (422): a key of it was used for another event.
    Mismatch,
}

impl Idempotency {
    const ALL: [Idempotency; 2] = [Idempotency::Replayed, Idempotency::Mismatch];

    fn label(self) -> &'static str {
        match self {
            Idempotency::Replayed => "replayed",
            Idempotency::Mismatch => "mismatch",
        }
    }
}

/// How a resumed topic (a stream opened with a position) started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Exactly after the position asked for.
    Exact,
    /// The position is older than the oldest event retained: `reset`.
    Trimmed,
    /// The position is ahead of the newest event: `reset`.
    Ahead,
    /// The position belongs to an earlier epoch of the topic: `reset`.
    Epoch,
}

impl Resume {
    const ALL: [Resume; 4] = [Resume::Exact, Resume::Trimmed, Resume::Ahead, Resume::Epoch];

    fn label(self) -> &'static str {
        match self {
            Resume::Exact => "exact",
            Resume::Trimmed => "reset_trimmed",
            Resume::Ahead => "reset_ahead",
            Resume::Epoch => "reset_epoch",
        }
    }
}

/// Why a request was refused (the `type` of its problem, grouped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, a bad or expired token, or a bad ticket (401).
    Auth,
    /// A valid token that does not grant what was asked (403).
    Forbidden,
    /// An `Origin` not on the list (403).
    Origin,
    /// Over the publish rate, or a batch larger than the burst (429, 400).
    Rate,
    /// Over the client's concurrent requests (429).
    Cap,
    /// Malformed input: topic, event name, position, parameter, batch (400).
    BadInput,
    /// A body or event over its limit (413).
    TooLarge,
    /// A body that did not arrive in time (408).
    BodyTimeout,
    /// No such resource, or method (404, 405).
    NotFound,
    /// The store holds all it may (507).
    StorageFull,
    /// The store cannot be reached (503).
    StoreUnavailable,
    /// The store refused the work (500).
    StoreError,
    /// The node is draining (`/readyz`, 503).
    Draining,
}

impl Refusal {
    const ALL: [Refusal; 13] = [
        Refusal::Auth,
        Refusal::Forbidden,
        Refusal::Origin,
        Refusal::Rate,
        Refusal::Cap,
        Refusal::BadInput,
        Refusal::TooLarge,
        Refusal::BodyTimeout,
        Refusal::NotFound,
        Refusal::StorageFull,
        Refusal::StoreUnavailable,
        Refusal::StoreError,
        Refusal::Draining,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::Auth => "auth",
            Refusal::Forbidden => "forbidden",
            Refusal::Origin => "origin",
            Refusal::Rate => "rate",
            Refusal::Cap => "cap",
            Refusal::BadInput => "bad_input",
            Refusal::TooLarge => "too_large",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::NotFound => "not_found",
            Refusal::StorageFull => "storage_full",
            Refusal::StoreUnavailable => "store_unavailable",
            Refusal::StoreError => "store_error",
            Refusal::Draining => "draining",
        }
    }
}

/// A store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Append,
    Read,
    Watch,
    Ticket,
}

impl StoreOp {
    const ALL: [StoreOp; 4] = [
        StoreOp::Append,
        StoreOp::Read,
        StoreOp::Watch,
        StoreOp::Ticket,
    ];
    /// The operations whose latency is kept.
    const TIMED: [StoreOp; 2] = [StoreOp::Append, StoreOp::Read];

    fn label(self) -> &'static str {
        match self {
            StoreOp::Append => "append",
            StoreOp::Read => "read",
            StoreOp::Watch => "watch",
            StoreOp::Ticket => "ticket",
        }
    }
}

/// How a store operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    Unavailable,
    Rejected,
    Full,
}

impl StoreErrorKind {
    const ALL: [StoreErrorKind; 3] = [
        StoreErrorKind::Unavailable,
        StoreErrorKind::Rejected,
        StoreErrorKind::Full,
    ];

    fn label(self) -> &'static str {
        match self {
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Rejected => "rejected",
            StoreErrorKind::Full => "full",
        }
    }
}

const CANARY_SECONDS: &str = "crier_redis_canary_seconds";

/// Metrics of the Redis store, registered only when it is used (a hub on
/// the embedded store shows no Redis connection to alert on).
pub struct RedisMetrics {
    connected: Gauge,
    reconnects: Counter,
    catch_ups: [Counter; 2],
    failovers: Counter,
    renewals: [Counter; 2],
    /// Canary round trips per shard (a cluster's few shards, or `single`),
    /// registered as each shard is first heard from.
    canaries: std::sync::Mutex<Vec<(String, Histogram)>>,
}

/// Why a topic's epoch was renewed in Redis.
#[derive(Debug, Clone, Copy)]
pub enum Renewal {
    /// Its data belongs to another replication history: Redis restarted,
    /// or a replica was promoted.
    Replication,
    /// A node saw the topic further along than Redis now has it.
    WentBack,
}

impl RedisMetrics {
    /// The live feed from Redis is up (`true`) or down.
    pub fn set_connected(&self, up: bool) {
        self.connected.set(if up { 1.0 } else { 0.0 });
    }

    /// The live feed came back after it was lost.
    pub fn reconnected(&self) {
        self.reconnects.increment(1);
    }

    /// A watched topic was caught up after a reconnect (`delivered`), or
    /// its subscribers were told to check the store themselves.
    pub fn caught_up(&self, delivered: bool) {
        self.catch_ups[usize::from(!delivered)].increment(1);
    }

    /// The node switched to another primary (a Sentinel failover).
    pub fn failed_over(&self) {
        self.failovers.increment(1);
    }

    /// A topic's epoch was renewed, and why.
    pub fn renewed(&self, why: Renewal) {
        self.renewals[why as usize].increment(1);
    }
}

/// Registers handles against one recorder.
struct Registrar<'a>(&'a PrometheusRecorder);

impl Registrar<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, *v)).collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.describe_counter(name, help);
        self.labelled_counter(name, &[])
    }

    fn describe_counter(&self, name: &'static str, help: &'static str) {
        self.0
            .describe_counter(KeyName::from(name), None, SharedString::from(help));
    }

    fn labelled_counter(
        &self,
        name: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Counter {
        self.0
            .register_counter(&Self::key(name, labels), &metadata())
    }

    fn counters<const N: usize>(
        &self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: [&'static str; N],
    ) -> [Counter; N] {
        self.describe_counter(name, help);
        values.map(|v| self.labelled_counter(name, &[(label, v)]))
    }

    fn gauge(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Gauge {
        self.0
            .describe_gauge(KeyName::from(name), None, SharedString::from(help));
        self.0.register_gauge(&Self::key(name, labels), &metadata())
    }

    fn histogram(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&'static str, &'static str)],
    ) -> Histogram {
        self.0
            .describe_histogram(KeyName::from(name), None, SharedString::from(help));
        self.0
            .register_histogram(&Self::key(name, labels), &metadata())
    }

    /// A histogram whose one label's value is known only at run time.
    fn histogram_for(&self, name: &'static str, label: &'static str, value: String) -> Histogram {
        let key = Key::from_parts(name, vec![Label::new(label, value)]);
        self.0.register_histogram(&key, &metadata())
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, None)
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, all at zero, with a recorder of its own.
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new();
        let builder = [
            "crier_store_operation_seconds",
            "crier_publish_to_write_seconds",
        ]
        .into_iter()
        .fold(builder, |builder, name| {
            builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| unreachable!("the buckets are not empty"))
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let r = Registrar(&recorder);

        let connections = {
            let name = "crier_open_connections";
            let help = "Connections being served, by HTTP version and whether over TLS.";
            let g = |p, t| r.gauge(name, help, &[("protocol", p), ("tls", t)]);
            [
                [g("http1", "no"), g("http1", "yes")],
                [g("h2", "no"), g("h2", "yes")],
            ]
        };
        let refused_connections = r.counters(
            "crier_refused_connections_total",
            "Connections closed or answered 503/429 before any request, by reason.",
            "reason",
            ConnectionRefusal::ALL.map(ConnectionRefusal::label),
        );
        let streams = Kind::ALL.map(|kind| {
            r.gauge(
                "crier_open_streams",
                "Event streams open (a long-poll: while it waits), by transport.",
                &[("transport", kind.label())],
            )
        });
        r.describe_counter(
            "crier_stream_ends_total",
            "Event streams ended, by transport and reason.",
        );
        let stream_ends = Kind::ALL.map(|kind| {
            StreamEnd::ALL.map(|end| {
                r.labelled_counter(
                    "crier_stream_ends_total",
                    &[("transport", kind.label()), ("reason", end.label())],
                )
            })
        });
        let refused_subscribes = r.counters(
            "crier_refused_subscribes_total",
            "Subscribe requests refused once their transport was known (credentials, position, limits, store), by transport; each is also in crier_refused_requests_total by reason.",
            "transport",
            Kind::ALL.map(Kind::label),
        );
        let subscriptions = r.gauge(
            "crier_subscriptions",
            "Topic subscriptions open: a stream of three topics counts three.",
            &[],
        );
        let watched_topics = r.gauge(
            "crier_watched_topics",
            "Topics with at least one subscriber on this node.",
            &[],
        );
        let published = r.counters(
            "crier_published_events_total",
            "Events that reached the store, by result.",
            "result",
            PublishResult::ALL.map(PublishResult::label),
        );
        let idempotency = r.counters(
            "crier_idempotency_total",
            "Events answered from their Idempotency-Key's record instead of stored again (replayed), and publishes refused with 422 because a key was used for another event (mismatch).",
            "outcome",
            Idempotency::ALL.map(Idempotency::label),
        );
        let batches = r.counter(
            "crier_publish_batches_total",
            "Batches (POST /events) stored.",
        );
        let deliveries_out = r.counter(
            "crier_deliveries_total",
            "Live events handed to subscribers: each event counts once per subscriber of its topic on this node.",
        );
        let sent_out = r.counters(
            "crier_stream_events_total",
            "Events written to event streams, live or replayed, by transport: each event counts once per stream it is written to.",
            "transport",
            Kind::ALL.map(Kind::label),
        );
        r.describe_counter(
            "crier_stream_bytes_total",
            "Bytes written to event streams, after compression, by transport and content coding (gRPC: the messages' bytes before HTTP/2 framing).",
        );
        let written_out = Kind::ALL.map(|kind| {
            CODINGS.map(|coding| {
                r.labelled_counter(
                    "crier_stream_bytes_total",
                    &[("transport", kind.label()), ("coding", coding)],
                )
            })
        });
        let chains = {
            let name = "crier_compression_chains";
            let help = "Topics' chained compressors held, by coding (one per topic and coding with a compressed single-topic stream and an event since), against --max-compression-chains for all codings together.";
            CHAIN_CODINGS.map(|coding| r.gauge(name, help, &[("coding", coding)]))
        };
        let chain_refusals = r.counters(
            "crier_compression_chain_refusals_total",
            "Events of a topic whose streams of a coding wanted a chained compressor and got none, because --max-compression-chains were held: those streams wrote the event compressed alone. Counted once per event, topic and coding.",
            "coding",
            CHAIN_CODINGS,
        );
        let resumes = r.counters(
            "crier_resumes_total",
            "Topics of streams opened with a position (Last-Event-ID), by outcome.",
            "outcome",
            Resume::ALL.map(Resume::label),
        );
        let resets = r.counters(
            "crier_resets_total",
            "`reset` events sent (at a resume or later, when history was lost), by reason.",
            "reason",
            ["trimmed", "ahead", "epoch"],
        );
        let replayed = r.counter(
            "crier_replayed_events_total",
            "Events written to streams from the store's history rather than live.",
        );
        let refused_requests = r.counters(
            "crier_refused_requests_total",
            "Requests answered with a problem (4xx, 5xx), by reason.",
            "reason",
            Refusal::ALL.map(Refusal::label),
        );
        let store_seconds = StoreOp::TIMED.map(|op| {
            r.histogram(
                "crier_store_operation_seconds",
                "How long store operations take, failed ones included.",
                &[("operation", op.label())],
            )
        });
        r.describe_counter(
            "crier_store_errors_total",
            "Store operations that failed, by operation and kind.",
        );
        let store_errors = StoreOp::ALL.map(|op| {
            StoreErrorKind::ALL.map(|kind| {
                r.labelled_counter(
                    "crier_store_errors_total",
                    &[("operation", op.label()), ("kind", kind.label())],
                )
            })
        });
        let publish_to_write = r.histogram(
            "crier_publish_to_write_seconds",
            "From when the store numbered a live event (Redis: when this node received it) to its first write to a stream; one sample per event and topic.",
            &[],
        );
        Metrics {
            inner: Arc::new(Inner {
                connections,
                refused_connections,
                streams,
                stream_ends,
                refused_subscribes,
                subscriptions,
                watched_topics,
                published,
                idempotency,
                batches,
                deliveries: HotCounter::default(),
                deliveries_out,
                sent: Default::default(),
                sent_out,
                written: Default::default(),
                written_out,
                chains,
                chain_refusals,
                resumes,
                resets,
                replayed,
                refused_requests,
                store_seconds,
                store_errors,
                publish_to_write,
                redis: OnceLock::new(),
                handle,
                recorder,
            }),
        }
    }

    /// The Redis store's metrics, registered on first use.
    /// A canary came back through `shard` of Redis after `took`.
    pub fn redis_canary_back(&self, shard: &str, took: Duration) {
        let redis = self.redis();
        let mut canaries = redis.canaries.lock().unwrap_or_else(|e| e.into_inner());
        let at = match canaries.iter().position(|(s, _)| s == shard) {
            Some(at) => at,
            None => {
                let histogram = Registrar(&self.inner.recorder).histogram_for(
                    CANARY_SECONDS,
                    "shard",
                    shard.to_owned(),
                );
                canaries.push((shard.to_owned(), histogram));
                canaries.len() - 1
            }
        };
        canaries[at].1.record(took.as_secs_f64());
    }

    pub fn redis(&self) -> &RedisMetrics {
        self.inner.redis.get_or_init(|| {
            let r = Registrar(&self.inner.recorder);
            RedisMetrics {
                connected: r.gauge(
                    "crier_redis_connected",
                    "1 while the live feed (pub/sub connection) from Redis is up, else 0.",
                    &[],
                ),
                reconnects: r.counter(
                    "crier_redis_reconnects_total",
                    "Times the live feed from Redis came back after it was lost.",
                ),
                catch_ups: r.counters(
                    "crier_redis_catch_ups_total",
                    "Watched topics after a reconnect: caught up by this node, or handed to their subscribers to check (resync).",
                    "result",
                    ["caught_up", "resync"],
                ),
                failovers: r.counter(
                    "crier_redis_failovers_total",
                    "Times this node switched to another Redis primary (a Sentinel failover).",
                ),
                renewals: r.counters(
                    "crier_redis_epoch_renewals_total",
                    "Topics given a new epoch by this node's publishes or reads, because their data in Redis belongs to another replication history (a restart, a failover: replication) or went back below what this node saw (went_back).",
                    "cause",
                    ["replication", "went_back"],
                ),
                canaries: {
                    self.inner.recorder.describe_histogram(
                        KeyName::from(CANARY_SECONDS),
                        None,
                        SharedString::from(
                            "Round trip of this node's canaries through the live path of Redis, per shard: on a cluster the slot range of each shard it listens to, else single.",
                        ),
                    );
                    std::sync::Mutex::new(Vec::new())
                },
            }
        })
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn connection(&self, protocol: Protocol, tls: bool) -> GaugeGuard {
        let p = usize::from(protocol == Protocol::Http2);
        GaugeGuard::new(self.inner.connections[p][usize::from(tls)].clone())
    }

    pub fn connection_refused(&self, reason: ConnectionRefusal) {
        let i = ConnectionRefusal::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.inner.refused_connections[i].increment(1);
    }

    /// Counts an event stream over `transport` as open until it ends; the
    /// guard records why.
    pub fn stream(&self, transport: Kind) -> StreamGuard {
        self.inner.streams[transport.index()].increment(1.0);
        StreamGuard {
            metrics: self.clone(),
            transport,
            end: StreamEnd::ClientGone,
        }
    }

    /// A subscribe request over `transport` was refused (its reason is
    /// counted by [`Metrics::refused`]).
    pub fn subscribe_refused(&self, transport: Kind) {
        self.inner.refused_subscribes[transport.index()].increment(1);
    }

    /// The counter of events written to streams over `transport`, for a
    /// stream to keep.
    pub fn sent(&self, transport: Kind) -> EventsSent {
        EventsSent {
            metrics: self.clone(),
            i: transport.index(),
        }
    }

    /// A topic subscription opened (`+1`) or closed (`-1`); `topic` when the
    /// topic gained its first subscriber or lost its last.
    pub fn subscription(&self, delta: f64, topic: bool) {
        self.inner.subscriptions.increment(delta);
        if topic {
            self.inner.watched_topics.increment(delta);
        }
    }

    pub fn published(&self, result: PublishResult, events: usize) {
        let i = PublishResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or_default();
        self.inner.published[i].increment(events as u64);
    }

    pub fn idempotency(&self, outcome: Idempotency, n: usize) {
        let i = Idempotency::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        if n > 0 {
            self.inner.idempotency[i].increment(n as u64);
        }
    }

    pub fn batch_stored(&self) {
        self.inner.batches.increment(1);
    }

    /// An event was handed to `subscribers` live subscribers.
    #[inline]
    pub fn delivered(&self, subscribers: usize) {
        self.inner
            .deliveries
            .0
            .fetch_add(subscribers as u64, Ordering::Relaxed);
    }

    /// The counter of bytes written over `transport` with `codec`, for a
    /// stream to keep.
    pub fn written(&self, transport: Kind, codec: Option<Codec>) -> BytesWritten {
        BytesWritten {
            metrics: self.clone(),
            transport: transport.index(),
            coding: coding_index(codec),
        }
    }

    /// A chained compressor of the coding in `slot` (`Codec::shared_slot`)
    /// was made (`+1`) or dropped (`-1`).
    pub fn chain_held(&self, slot: usize, delta: f64) {
        if let Some(gauge) = self.inner.chains.get(slot) {
            gauge.increment(delta);
        }
    }

    /// An event's chained unit in the coding in `slot` was not made for
    /// want of a place under `--max-compression-chains`.
    pub fn chain_refused(&self, slot: usize) {
        if let Some(counter) = self.inner.chain_refusals.get(slot) {
            counter.increment(1);
        }
    }

    pub fn resumed(&self, outcome: Resume) {
        let i = Resume::ALL
            .iter()
            .position(|r| *r == outcome)
            .unwrap_or_default();
        self.inner.resumes[i].increment(1);
    }

    /// A `reset` was sent: 0 trimmed, 1 ahead, 2 epoch.
    pub fn reset(&self, reason: Resume) {
        let i = match reason {
            Resume::Trimmed => 0,
            Resume::Ahead => 1,
            Resume::Epoch => 2,
            Resume::Exact => return,
        };
        self.inner.resets[i].increment(1);
    }

    pub fn replayed(&self, events: usize) {
        if events > 0 {
            self.inner.replayed.increment(events as u64);
        }
    }

    pub fn refused(&self, reason: Refusal) {
        let i = Refusal::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or_default();
        self.inner.refused_requests[i].increment(1);
    }

    /// Records how long a store operation took (append and read only).
    pub fn store_took(&self, op: StoreOp, took: Duration) {
        if let Some(i) = StoreOp::TIMED.iter().position(|o| *o == op) {
            self.inner.store_seconds[i].record(took.as_secs_f64());
        }
    }

    pub fn store_failed(&self, op: StoreOp, kind: StoreErrorKind) {
        let o = StoreOp::ALL
            .iter()
            .position(|x| *x == op)
            .unwrap_or_default();
        let k = StoreErrorKind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or_default();
        self.inner.store_errors[o][k].increment(1);
    }

    /// A live event stamped at `stamp` (see [`LiveStamp`]) was first written.
    pub fn first_write(&self, stamp: u32) {
        let elapsed = LiveStamp::now().wrapping_sub(stamp);
        self.inner
            .publish_to_write
            .record(f64::from(elapsed) / 1_000_000.0);
    }

    /// Folds histogram samples into their buckets, so memory stays bounded
    /// between scrapes; run every few seconds.
    pub fn upkeep(&self) {
        self.inner.handle.run_upkeep();
    }

    /// The whole scrape answer, in the Prometheus text format.
    pub fn render(&self) -> String {
        let inner = &self.inner;
        inner
            .deliveries_out
            .absolute(inner.deliveries.0.load(Ordering::Relaxed));
        for (hot, out) in inner.sent.iter().zip(&inner.sent_out) {
            out.absolute(hot.0.load(Ordering::Relaxed));
        }
        for (hot, out) in inner
            .written
            .iter()
            .flatten()
            .zip(inner.written_out.iter().flatten())
        {
            out.absolute(hot.0.load(Ordering::Relaxed));
        }
        let mut text = inner.handle.render();
        process::render(&mut text);
        text
    }
}

/// Keeps a gauge one higher while it lives.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> GaugeGuard {
        gauge.increment(1.0);
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// An open event stream: counted open while it lives, and its end counted
/// by the reason set last (a stream dropped without one: the client left).
pub struct StreamGuard {
    metrics: Metrics,
    transport: Kind,
    end: StreamEnd,
}

impl StreamGuard {
    pub fn ends(&mut self, reason: StreamEnd) {
        self.end = reason;
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let inner = &self.metrics.inner;
        let t = self.transport.index();
        inner.streams[t].decrement(1.0);
        let i = StreamEnd::ALL
            .iter()
            .position(|r| *r == self.end)
            .unwrap_or_default();
        inner.stream_ends[t][i].increment(1);
    }
}

/// A stream's counter of bytes written over its transport with its coding.
pub struct BytesWritten {
    metrics: Metrics,
    transport: usize,
    coding: usize,
}

impl BytesWritten {
    #[inline]
    pub fn add(&self, bytes: usize) {
        self.metrics.inner.written[self.transport][self.coding]
            .0
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// A stream's counter of events written over its transport.
pub struct EventsSent {
    metrics: Metrics,
    i: usize,
}

impl EventsSent {
    #[inline]
    pub fn add(&self, events: usize) {
        self.metrics.inner.sent[self.i]
            .0
            .fetch_add(events as u64, Ordering::Relaxed);
    }
}

/// Process metrics, read from /proc at scrape time (Linux; elsewhere, left
/// out). They describe the whole process, which in tests may hold several
/// hubs.
mod process {
    use std::fmt::Write;

    pub fn render(text: &mut String) {
        if let Some(cpu) = cpu_seconds() {
            metric(
                text,
                "crier_process_cpu_seconds_total",
                "counter",
                "CPU time used by the process (user and system), in seconds.",
                cpu,
            );
        }
        if let Some(rss) = resident_bytes() {
            metric(
                text,
                "crier_process_resident_memory_bytes",
                "gauge",
                "Resident memory of the process, in bytes.",
                rss as f64,
            );
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            let open = entries.count().saturating_sub(1);
            metric(
                text,
                "crier_process_open_fds",
                "gauge",
                "Open file descriptors (connections, listeners, files).",
                open as f64,
            );
        }
        if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
            metric(
                text,
                "crier_process_max_fds",
                "gauge",
                "The process's open-file limit (soft).",
                soft as f64,
            );
        }
    }

    fn metric(text: &mut String, name: &str, kind: &str, help: &str, value: f64) {
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    }

    /// utime + stime of /proc/self/stat (fields 14 and 15), in seconds.
    fn cpu_seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces: count after its `)`.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split_whitespace().skip(11);
        let utime: u64 = fields.next()?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
    }

    /// Resident pages of /proc/self/statm, in bytes.
    fn resident_bytes() -> Option<u64> {
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(page).ok().map(|page| pages * page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_rendered_from_zero_with_its_help_and_type() {
        let metrics = Metrics::new();
        let text = metrics.render();
        for line in [
            "# TYPE crier_open_connections gauge",
            "crier_open_connections{protocol=\"h2\",tls=\"yes\"} 0",
            "crier_stream_ends_total{transport=\"grpc\",reason=\"slow_consumer\"} 0",
            "crier_stream_events_total{transport=\"longpoll\"} 0",
            "crier_refused_subscribes_total{transport=\"websocket\"} 0",
            "crier_deliveries_total 0",
            "crier_stream_bytes_total{transport=\"sse\",coding=\"zstd\"} 0",
            "crier_refused_requests_total{reason=\"storage_full\"} 0",
            "crier_store_errors_total{operation=\"read\",kind=\"unavailable\"} 0",
            "# TYPE crier_process_cpu_seconds_total counter",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("crier_redis"),
            "no Redis metrics without Redis"
        );
    }

    #[test]
    fn hot_counters_reach_the_scrape_and_guards_give_back_what_they_took() {
        let metrics = Metrics::new();
        metrics.delivered(3);
        metrics.delivered(2);
        metrics.written(Kind::Sse, Some(Codec::Gzip)).add(10);
        metrics.sent(Kind::Grpc).add(4);
        {
            let _c = metrics.connection(Protocol::Http2, true);
            let mut stream = metrics.stream(Kind::WebSocket);
            stream.ends(StreamEnd::SlowConsumer);
            let text = metrics.render();
            assert!(text.contains("crier_open_connections{protocol=\"h2\",tls=\"yes\"} 1"));
            assert!(text.contains("crier_open_streams{transport=\"websocket\"} 1"));
        }
        let text = metrics.render();
        assert!(text.contains("crier_deliveries_total 5"), "{text}");
        assert!(text.contains("crier_stream_bytes_total{transport=\"sse\",coding=\"gzip\"} 10"));
        assert!(text.contains("crier_stream_events_total{transport=\"grpc\"} 4"));
        assert!(text.contains("crier_open_connections{protocol=\"h2\",tls=\"yes\"} 0"));
        assert!(text.contains("crier_open_streams{transport=\"websocket\"} 0"));
        assert!(text.contains(
            "crier_stream_ends_total{transport=\"websocket\",reason=\"slow_consumer\"} 1"
        ));
    }
}
