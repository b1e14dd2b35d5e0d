//! Properties of the HTTP edge, checked with generated input against a real
//! hub on each store: whatever a client sends as `Last-Event-ID`, as a batch
//! body or as a subscription's query string, the answer is a documented one
//! (a stream with exactly the events it owes, or a 4xx problem), never
//! silence, a 5xx or a panic.
//!
//! Starting a hub (and a `redis-server`) per case would take most of the
//! time, so each property starts one hub per store and its cases share it,
//! each on topics of its own. The pure parsers have their properties next
//! to them (`src/event.rs`, `src/compress/`).

use crate::common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::redis::RedisServer;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// How long any one expected event may take.
const PROMPTLY: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// One hub per property, shared by its cases
// ---------------------------------------------------------------------------

/// Panics on the hub's threads (the cases' own failures panic on the test
/// thread, where proptest catches them).
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

/// A hub on one store with its own runtime, for the cases of one property.
struct Hub {
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
    _redis: Option<RedisServer>,
}

impl Hub {
    fn start(on_redis: bool, configure: impl FnOnce(&mut Config)) -> Hub {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if std::thread::current()
                    .name()
                    .is_some_and(|name| name.starts_with("tokio-runtime-worker"))
                {
                    SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
                }
                default(info);
            }));
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let redis = on_redis.then(RedisServer::start);
        let url = redis.as_ref().map(RedisServer::url);
        let server = runtime.block_on(Server::start_with(|c| {
            c.redis.url = url;
            // Cases come fast, all from 127.0.0.1.
            c.limits.publish_rate = 0;
            c.limits.connection_rate = 0;
            configure(c);
        }));
        Hub {
            runtime,
            server: Some(server),
            _redis: redis,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("server")
    }

    /// Runs `cases` cases of `strategy` through `check`, then checks that
    /// the hub is still healthy and never panicked.
    fn check<S: Strategy>(
        &self,
        cases: u32,
        strategy: S,
        check: impl AsyncFn(&Server, S::Value) -> Result<(), TestCaseError>,
    ) {
        let mut runner = TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            // A failing case may wait out deadlines: keep shrinking short.
            max_shrink_iters: 64,
            max_shrink_time: 60_000,
            ..ProptestConfig::default()
        });
        let result = runner.run(&strategy, |case| {
            self.runtime.block_on(check(self.server(), case))
        });
        if let Err(error) = result {
            panic!("{error}");
        }
        self.runtime.block_on(async {
            let server = self.server();
            let health = server
                .client
                .get(server.url("/healthz"))
                .send()
                .await
                .expect("healthz");
            assert_eq!(health.status(), 200, "the hub is healthy afterwards");
            let id = server.publish_id("after-the-cases", "still here").await;
            let mut sub = server.resume("/topics/after-the-cases", "0").await;
            assert_eq!(sub.next().await, Ev::new(&id, "message", "still here"));
        });
        assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0, "the hub panicked");
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.stop());
        }
    }
}

/// A prefix no other case uses, for topic names.
fn fresh_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("p{}", NEXT.fetch_add(1, Ordering::SeqCst))
}

async fn next_promptly(sub: &mut SseClient, what: &str) -> Ev {
    tokio::time::timeout(PROMPTLY, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {PROMPTLY:?}: {what}"))
}

/// A request's query value, percent-encoded.
fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ".-_~:".contains(c)
}

/// docs/API.md, "Topics and event names".
fn is_topic(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(is_topic_char)
}

fn is_event_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
        && name != "reset"
        && name != "reauth"
}

/// Strings near the grammars under test, and anything at all.
fn garbage(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[0-9a-zA-Z.,/:_~ -]{{0,{max}}}")).unwrap(),
        proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
    ]
}

// ---------------------------------------------------------------------------
// Last-Event-ID
// ---------------------------------------------------------------------------

/// What a position's `SEQ` is, relative to the topic where that matters.
#[derive(Debug, Clone)]
enum Seq {
    /// The topic's head plus this (at least 0).
    FromHead(i64),
    Exact(u64),
}

#[derive(Debug, Clone)]
enum EpochPart {
    None,
    /// The topic's own epoch (an arbitrary one for a topic without history).
    Actual,
    Other(u64),
}

#[derive(Debug, Clone)]
enum LastEventId {
    Positions {
        prefix: Option<String>,
        positions: Vec<(Seq, EpochPart)>,
    },
    Garbage(String),
}

#[derive(Debug, Clone)]
struct ResumeCase {
    /// Events published to each topic before subscribing (0: no history).
    published: Vec<u64>,
    /// `/events?topic=…` even for one topic, else `/topics/{topic}`.
    multi: bool,
    last_event_id: LastEventId,
    /// By header if it can be one, else by `lastEventId`.
    by_header: bool,
}

fn resume_case() -> impl Strategy<Value = ResumeCase> {
    let seq = prop_oneof![
        5 => (-2i64..=2).prop_map(Seq::FromHead),
        1 => proptest::sample::select(vec![
            0,
            1,
            (1 << 53) - 2,
            (1 << 53) - 1,
            1 << 53,
            (1 << 53) + 1,
            (1 << 63) - 2,
            (1 << 63) - 1,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ])
        .prop_map(Seq::Exact),
        1 => any::<u64>().prop_map(Seq::Exact),
    ];
    let epoch = prop_oneof![
        3 => Just(EpochPart::None),
        3 => Just(EpochPart::Actual),
        1 => prop_oneof![any::<u64>(), 0u64..1000].prop_map(EpochPart::Other),
    ];
    let prefix = prop_oneof![
        3 => Just(None),
        3 => "[a-zA-Z0-9._~:-]{1,12}".prop_map(Some),
        1 => prop_oneof![Just(String::new()), Just("a b".to_owned())].prop_map(Some),
    ];
    (1usize..=3, any::<bool>(), any::<bool>()).prop_flat_map(move |(topics, multi, by_header)| {
        let count = prop_oneof![
            12 => Just(topics),
            1 => Just(topics + 1),
            1 => Just(topics - 1),
        ];
        let positions = count.prop_flat_map({
            let (seq, epoch) = (seq.clone(), epoch.clone());
            move |n| proptest::collection::vec((seq.clone(), epoch.clone()), n)
        });
        let last_event_id = prop_oneof![
            7 => (prefix.clone(), positions)
                .prop_map(|(prefix, positions)| LastEventId::Positions { prefix, positions }),
            1 => garbage(30).prop_map(LastEventId::Garbage),
        ];
        (proptest::collection::vec(0u64..=3, topics), last_event_id).prop_map(
            move |(published, last_event_id)| ResumeCase {
                published,
                multi: multi || topics > 1,
                last_event_id,
                by_header,
            },
        )
    })
}

fn base36(mut n: u64) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap()
}

/// A position as the hub writes it.
#[derive(Debug, Clone, PartialEq)]
struct Pos {
    seq: u64,
    epoch: Option<u64>,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.epoch {
            Some(epoch) => write!(f, "{}.{}", self.seq, base36(epoch)),
            None => write!(f, "{}", self.seq),
        }
    }
}

/// docs/API.md, "Event ids and resuming", written out again: an optional
/// `TOPIC/`, then `SEQ[.EPOCH]` per topic, `SEQ` 1 to 20 digits and
/// `EPOCH` 1 to 13 lowercase base-36 digits, each at most 2^64 - 1.
fn parse_cursor(text: &str, topics: usize) -> Option<Vec<Pos>> {
    let list = match text.find('/') {
        Some(at) => {
            let prefix = &text[..at];
            if prefix.is_empty() || !prefix.chars().all(is_topic_char) {
                return None;
            }
            &text[at + 1..]
        }
        None => text,
    };
    let number = |digits: &str, radix: u32, max_len: usize| -> Option<u64> {
        if digits.is_empty() || digits.len() > max_len {
            return None;
        }
        let mut n: u128 = 0;
        for c in digits.chars() {
            let d = c.to_digit(radix).filter(|_| !c.is_ascii_uppercase())?;
            n = n * u128::from(radix) + u128::from(d);
        }
        u64::try_from(n).ok()
    };
    let positions = list
        .split(',')
        .map(|p| {
            let (seq, epoch) = match p.find('.') {
                Some(at) => (&p[..at], Some(&p[at + 1..])),
                None => (p, None),
            };
            Some(Pos {
                seq: number(seq, 10, 20)?,
                epoch: match epoch {
                    Some(e) => Some(number(e, 36, 13)?),
                    None => None,
                },
            })
        })
        .collect::<Option<Vec<_>>>()?;
    (positions.len() == topics).then_some(positions)
}

/// What a topic holds: its epoch and head (`None`: no history).
#[derive(Debug, Clone)]
struct TopicState {
    name: String,
    history: Option<(u64, u64)>,
}

/// The events a subscriber sees, computed from the documented rules.
struct Expected {
    multi: bool,
    names: Vec<String>,
    positions: Vec<Pos>,
    events: Vec<Ev>,
}

impl Expected {
    fn id(&self, i: usize) -> String {
        if !self.multi {
            return self.positions[i].to_string();
        }
        let list: Vec<String> = self.positions.iter().map(Pos::to_string).collect();
        format!("{}/{}", self.names[i], list.join(","))
    }

    fn event(&mut self, i: usize, seq: u64, epoch: u64) {
        self.positions[i] = Pos {
            seq,
            epoch: Some(epoch),
        };
        let id = self.id(i);
        self.events
            .push(Ev::new(&id, "message", &format!("{}-{seq}", self.names[i])));
    }

    fn reset(&mut self, i: usize, to: Pos, reason: &str, requested: &Pos, oldest: Option<Pos>) {
        self.positions[i] = to;
        let data = json!({
            "topic": self.names[i],
            "reason": reason,
            "requested": requested.to_string(),
            "oldest": oldest.map(|p| p.to_string()),
        });
        let id = self.id(i);
        self.events.push(Ev::new(&id, "reset", &data.to_string()));
    }

    /// Brings topic `i` up to date with the store: a `reset` where the
    /// position cannot be honoured, then the retained events after it.
    fn catch_up(&mut self, i: usize, history: Option<(u64, u64)>) {
        let requested = self.positions[i].clone();
        let Some((epoch, head)) = history else {
            if requested.seq > 0 {
                let reason = if requested.epoch.is_some() {
                    "epoch"
                } else {
                    "ahead"
                };
                self.reset(
                    i,
                    Pos {
                        seq: 0,
                        epoch: None,
                    },
                    reason,
                    &requested,
                    None,
                );
            }
            return;
        };
        let reason = if requested.epoch.is_some_and(|e| e != epoch) {
            Some("epoch")
        } else if requested.seq > head {
            Some("ahead")
        } else {
            None
        };
        let from = match reason {
            Some(reason) => {
                let oldest = (head >= 1).then_some(Pos {
                    seq: 1,
                    epoch: Some(epoch),
                });
                let to = Pos {
                    seq: 0,
                    epoch: Some(epoch),
                };
                self.reset(i, to, reason, &requested, oldest);
                1
            }
            None => {
                self.positions[i].epoch = Some(epoch);
                requested.seq + 1
            }
        };
        for seq in from..=head {
            self.event(i, seq, epoch);
        }
    }
}

async fn any_last_event_id(server: &Server, case: ResumeCase) -> Result<(), TestCaseError> {
    let prefix = fresh_prefix();
    let mut topics = Vec::new();
    for (i, &n) in case.published.iter().enumerate() {
        let name = format!("{prefix}-t{i}");
        let mut history = None;
        for seq in 1..=n {
            let answer = server.publish(&name, &format!("{name}-{seq}")).await;
            prop_assert_eq!(&answer["seq"], seq);
            let id = answer["id"].as_str().expect("id");
            let epoch = u64::from_str_radix(id.split_once('.').expect("SEQ.EPOCH").1, 36)
                .expect("base-36 epoch");
            history = Some((epoch, seq));
        }
        topics.push(TopicState { name, history });
    }

    let text = match &case.last_event_id {
        LastEventId::Garbage(text) => text.clone(),
        LastEventId::Positions { prefix, positions } => {
            let list: Vec<String> = positions
                .iter()
                .enumerate()
                .map(|(i, (seq, epoch))| {
                    let history = topics.get(i).and_then(|t| t.history);
                    let head = history.map_or(0, |(_, head)| head);
                    let seq = match seq {
                        Seq::FromHead(d) => head.saturating_add_signed(*d),
                        Seq::Exact(n) => *n,
                    };
                    let epoch = match epoch {
                        EpochPart::None => None,
                        EpochPart::Actual => Some(history.map_or(12345, |(e, _)| e)),
                        EpochPart::Other(e) => Some(*e),
                    };
                    Pos { seq, epoch }.to_string()
                })
                .collect();
            match prefix {
                Some(prefix) => format!("{prefix}/{}", list.join(",")),
                None => list.join(","),
            }
        }
    };

    let path = if case.multi {
        let query: Vec<String> = topics.iter().map(|t| format!("topic={}", t.name)).collect();
        format!("/events?{}", query.join("&"))
    } else {
        format!("/topics/{}", topics[0].name)
    };
    let header = reqwest::header::HeaderValue::from_str(&text)
        .ok()
        .filter(|_| case.by_header);
    // The hub trims a header (so does HTTP); it reads a parameter as it is.
    // Either, empty, means "no position".
    let (request, given) = match header {
        Some(value) => {
            let request = server
                .client
                .get(server.url(&path))
                .header("last-event-id", value);
            let given = text.trim_matches([' ', '\t']).to_owned();
            (request, given)
        }
        None => {
            let separator = if path.contains('?') { '&' } else { '?' };
            let url = server.url(&format!("{path}{separator}lastEventId={}", encode(&text)));
            (server.client.get(url), text.clone())
        }
    };
    let start = if given.is_empty() {
        None
    } else {
        match parse_cursor(&given, topics.len()) {
            Some(positions) => Some(positions),
            None => {
                let response = request.send().await.expect("subscribe request");
                assert_problem(response, 400, "invalid-last-event-id").await;
                return Ok(());
            }
        }
    };

    let mut expected = Expected {
        multi: case.multi,
        names: topics.iter().map(|t| t.name.clone()).collect(),
        positions: Vec::new(),
        events: Vec::new(),
    };
    match start {
        Some(positions) => {
            expected.positions = positions;
            for (i, topic) in topics.iter().enumerate() {
                expected.catch_up(i, topic.history);
            }
        }
        // Only what is published from now on.
        None => {
            expected.positions = topics
                .iter()
                .map(|t| match t.history {
                    Some((epoch, head)) => Pos {
                        seq: head,
                        epoch: Some(epoch),
                    },
                    None => Pos {
                        seq: 0,
                        epoch: None,
                    },
                })
                .collect();
        }
    }
    let mut sub = SseClient::open(request).await;
    prop_assert_eq!(sub.status, 200);
    let mut received = Vec::new();
    for _ in 0..expected.events.len() {
        received.push(next_promptly(&mut sub, &format!("replay after {text:?}")).await);
    }
    prop_assert_eq!(&received, &expected.events, "replay after {:?}", text);

    // Then one live event per topic, exactly: nothing replayed twice or
    // left out comes before it. One topic at a time: a topic that must
    // first reset (its position names another history) goes through the
    // store, and another topic's live event published meanwhile may pass it.
    for (i, topic) in topics.iter().enumerate() {
        let seq = topic.history.map_or(1, |(_, head)| head + 1);
        let data = format!("{}-{seq}", topic.name);
        let answer = server.publish(&topic.name, &data).await;
        let id = answer["id"].as_str().expect("id");
        let epoch = u64::from_str_radix(id.split_once('.').expect("SEQ.EPOCH").1, 36).unwrap();
        let before = expected.events.len();
        let in_step = expected.positions[i].epoch == Some(epoch)
            || expected.positions[i]
                == (Pos {
                    seq: 0,
                    epoch: None,
                });
        if in_step {
            expected.event(i, seq, epoch);
        } else {
            // A topic created since: the position names another history.
            expected.catch_up(i, Some((epoch, seq)));
        }
        let mut live = Vec::new();
        for _ in before..expected.events.len() {
            live.push(next_promptly(&mut sub, &format!("live after {text:?}")).await);
        }
        prop_assert_eq!(&live, &expected.events[before..], "live after {:?}", text);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Batches: POST /events
// ---------------------------------------------------------------------------

/// Limits small enough for generated batches to cross them.
fn batch_limits(c: &mut Config) {
    c.limits.max_event_bytes = 64;
    c.limits.max_batch_events = 4;
    c.limits.max_batch_bytes = 1024;
}

fn json_value() -> impl Strategy<Value = Value> {
    let text = proptest::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        text.prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(("[a-z]{0,6}", inner), 0..4)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// One batch item, each part well-formed or not.
#[derive(Debug, Clone)]
struct Item {
    /// Index into the case's topics, or a bad topic (a name, or a non-string).
    topic: Result<usize, Value>,
    data: Option<Value>,
    /// Absent, or a name (which may be bad), or a non-string.
    event: Option<Value>,
    unknown_field: bool,
}

#[derive(Debug, Clone)]
enum Body {
    Items(Vec<Item>),
    Json(Value),
    Bytes(Vec<u8>),
}

fn batch_body() -> impl Strategy<Value = Body> {
    let topic = prop_oneof![
        6 => (0usize..3).prop_map(Ok),
        1 => prop_oneof![
            Just(json!("")),
            Just(json!("a b")),
            Just(json!("a/b")),
            Just(json!("x".repeat(129))),
            Just(json!(7)),
            Just(Value::Null),
            garbage(10)
                .prop_filter("not a topic name", |s| !is_topic(s))
                .prop_map(Value::String),
        ]
        .prop_map(Err),
    ];
    let data = prop_oneof![
        8 => json_value().prop_map(Some),
        1 => Just(None),
    ];
    let event = prop_oneof![
        4 => Just(None),
        2 => "[a-z:._-]{1,8}".prop_map(|n| Some(Value::String(n))),
        1 => prop_oneof![
            Just(json!("reset")),
            Just(json!("reauth")),
            Just(json!("a\nb")),
            Just(json!("")),
            Just(json!(1)),
            Just(Value::Null),
            garbage(10)
                .prop_filter("not an event name", |s| !is_event_name(s))
                .prop_map(Value::String),
        ]
        .prop_map(Some),
    ];
    let item = (topic, data, event, proptest::bool::weighted(0.05)).prop_map(
        |(topic, data, event, unknown_field)| Item {
            topic,
            data,
            event,
            unknown_field,
        },
    );
    prop_oneof![
        6 => proptest::collection::vec(item, 0..6).prop_map(Body::Items),
        1 => json_value().prop_map(Body::Json),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Body::Bytes),
    ]
}

/// The text an event's `data` is published as.
fn data_text(data: &Value) -> String {
    match data {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What EventSource hands over for a payload: CR and CRLF arrive as LF.
fn as_received(data: &str) -> String {
    data.replace("\r\n", "\n").replace('\r', "\n")
}

async fn any_batch(server: &Server, body: Body) -> Result<(), TestCaseError> {
    let prefix = fresh_prefix();
    let names: Vec<String> = (0..3).map(|i| format!("{prefix}-t{i}")).collect();
    // Whether the batch must be stored (`Some`), must be refused
    // (`Some(false)`), or may go either way (`None`).
    let (bytes, must_store) = match &body {
        Body::Items(items) => {
            let json: Vec<Value> = items
                .iter()
                .map(|item| {
                    let mut object = serde_json::Map::new();
                    object.insert(
                        "topic".into(),
                        match &item.topic {
                            Ok(i) => Value::String(names[*i].clone()),
                            Err(bad) => bad.clone(),
                        },
                    );
                    if let Some(data) = &item.data {
                        object.insert("data".into(), data.clone());
                    }
                    if let Some(event) = &item.event {
                        object.insert("event".into(), event.clone());
                    }
                    if item.unknown_field {
                        object.insert("priority".into(), json!(1));
                    }
                    Value::Object(object)
                })
                .collect();
            let bytes = serde_json::to_vec(&json).unwrap();
            let bad = |item: &Item| {
                item.topic.is_err()
                    || item.unknown_field
                    || item.data.as_ref().is_some_and(|d| data_text(d).len() > 64)
                    || item
                        .event
                        .as_ref()
                        .is_some_and(|e| !e.is_null() && !e.as_str().is_some_and(is_event_name))
            };
            let must_store = if items.len() > 4 || bytes.len() > 1024 || items.iter().any(bad) {
                Some(false)
            } else if items.iter().all(|i| i.data.is_some()) {
                Some(true)
            } else {
                // An item without `data`: refused or stored, but not half.
                None
            };
            (bytes, must_store)
        }
        Body::Json(value) => (serde_json::to_vec(value).unwrap(), None),
        Body::Bytes(bytes) => (bytes.clone(), None),
    };

    let response = server
        .client
        .post(server.url("/events"))
        .header("content-type", "application/json")
        .body(bytes.clone())
        .send()
        .await
        .expect("batch request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let answer: Value = response.json().await.expect("a JSON answer");
    prop_assert!(
        status == 201 || (400..500).contains(&status),
        "status {} for {:?}: {}",
        status,
        String::from_utf8_lossy(&bytes),
        answer
    );
    if let Some(must_store) = must_store {
        prop_assert_eq!(status == 201, must_store, "{}", answer);
    }

    // What each case topic must now hold, in order.
    let mut stored: Vec<Vec<(String, String)>> = vec![Vec::new(); 3];
    if status == 201 {
        let events = answer["events"].as_array().expect("events");
        // Arbitrary JSON or bytes cannot name the case's topics.
        let items = match &body {
            Body::Items(items) => items.as_slice(),
            _ => &[],
        };
        prop_assert!(
            items.len() == events.len() || !matches!(body, Body::Items(_)),
            "{} events for {} items",
            events.len(),
            items.len()
        );
        let mut epochs: Vec<Option<String>> = vec![None; 3];
        for (item, event) in items.iter().zip(events) {
            let t = *item.topic.as_ref().expect("stored items name a case topic");
            prop_assert_eq!(&event["topic"], &names[t]);
            let seq = stored[t].len() as u64 + 1;
            prop_assert_eq!(&event["seq"], seq, "dense ids: {}", answer);
            let id = event["id"].as_str().expect("id").to_owned();
            let (id_seq, epoch) = id.split_once('.').expect("SEQ.EPOCH");
            prop_assert_eq!(id_seq, seq.to_string());
            prop_assert!(epochs[t].get_or_insert_with(|| epoch.to_owned()) == epoch);
            let name = match &item.event {
                Some(Value::String(name)) => name.clone(),
                _ => "message".to_owned(),
            };
            let data = data_text(item.data.as_ref().expect("stored items have data"));
            stored[t].push((id, format!("{name}\n{}", as_received(&data))));
        }
    } else {
        prop_assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        prop_assert_eq!(&answer["status"], status);
        prop_assert!(
            answer["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("urn:crier:problem:")),
            "{}",
            answer
        );
    }

    // Each case topic holds exactly that: replay it from the start, then a
    // probe published now must come next with the next number.
    for (t, name) in names.iter().enumerate() {
        let mut sub = server.resume(&format!("/topics/{name}"), "0").await;
        let mut got = Vec::new();
        for _ in 0..stored[t].len() {
            let ev = next_promptly(&mut sub, "a stored event").await;
            got.push((ev.id.clone(), format!("{}\n{}", ev.event, ev.data)));
        }
        prop_assert_eq!(&got, &stored[t]);
        let probe = server.publish(name, "probe").await;
        prop_assert_eq!(
            &probe["seq"],
            stored[t].len() as u64 + 1,
            "nothing else stored"
        );
        let ev = next_promptly(&mut sub, "the probe").await;
        prop_assert_eq!(ev.data, "probe");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Query strings on subscribe
// ---------------------------------------------------------------------------

const MAX_TOPICS: usize = 3;

#[derive(Debug, Clone)]
struct QueryCase {
    multi: bool,
    /// Raw `key=value` pieces, already encoded (or deliberately not).
    pieces: Vec<String>,
}

fn query_case() -> impl Strategy<Value = QueryCase> {
    let key = prop_oneof![
        Just("topic".to_owned()),
        Just("last".to_owned()),
        Just("lastEventId".to_owned()),
        Just("ticket".to_owned()),
        Just("event".to_owned()),
        Just("Topic".to_owned()),
        garbage(8),
    ];
    let value = prop_oneof![
        (0usize..3).prop_map(|i| format!("{{topic{i}}}")),
        proptest::sample::select(vec![
            "0",
            "1",
            "3",
            "-1",
            "+2",
            "1.5",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999"
        ])
        .prop_map(str::to_owned),
        any::<u64>().prop_map(|n| n.to_string()),
        garbage(16),
    ];
    let piece = prop_oneof![
        8 => (key, value).prop_map(|(k, v)| {
            // Topic placeholders stay readable; everything else is encoded.
            let v = if v.starts_with("{topic") { v } else { encode(&v) };
            format!("{}={v}", encode(&k))
        }),
        1 => proptest::sample::select(vec![
            "",
            "=",
            "==",
            "%zz",
            "%",
            "%ff=%fe",
            "topic",
            "last=",
            "a=%00",
            "+=+",
            "topic={topic0}&topic={topic1}&topic={topic2}&topic={topic0}",
        ])
        .prop_map(str::to_owned),
    ];
    (any::<bool>(), proptest::collection::vec(piece, 0..7))
        .prop_map(|(multi, pieces)| QueryCase { multi, pieces })
}

/// The problems a query may get, by the documented rules (any of them, when
/// several apply: which one is checked first is not part of the contract).
fn query_problems(query: &str, multi: bool) -> Vec<&'static str> {
    let mut problems = Vec::new();
    let mut topics = std::collections::BTreeSet::new();
    let mut count = 0;
    let mut last_event_id = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "topic" if multi => {
                count += 1;
                if count > MAX_TOPICS {
                    problems.push("too-many-topics");
                }
                if !is_topic(&value) {
                    problems.push("invalid-topic");
                }
                topics.insert(value.into_owned());
            }
            "lastEventId" if !value.is_empty() => last_event_id = Some(value.into_owned()),
            "last" if value.parse::<u64>().is_err() => problems.push("invalid-parameter"),
            _ => {}
        }
    }
    if multi && topics.is_empty() {
        problems.push("no-topic");
    }
    let n = if multi { topics.len() } else { 1 };
    if let Some(id) = last_event_id
        && parse_cursor(&id, n).is_none()
    {
        problems.push("invalid-last-event-id");
    }
    problems
}

async fn any_query(server: &Server, case: QueryCase) -> Result<(), TestCaseError> {
    let prefix = fresh_prefix();
    let names: Vec<String> = (0..3).map(|i| format!("{prefix}-t{i}")).collect();
    // Some history, so `last=N` and positions have something to read.
    server.publish(&names[0], "one").await;
    let mut query = case.pieces.join("&");
    for (i, name) in names.iter().enumerate() {
        query = query.replace(&format!("{{topic{i}}}"), name);
    }
    let path = if case.multi {
        format!("/events?{query}")
    } else {
        format!("/topics/{}?{query}", names[0])
    };
    let response = tokio::time::timeout(
        PROMPTLY,
        server
            .client
            .get(server.url(&path))
            .header("accept", "text/event-stream")
            .send(),
    )
    .await
    .expect("an answer in time")
    .expect("subscribe request");
    let status = response.status().as_u16();
    let problems = query_problems(&query, case.multi);
    if problems.is_empty() {
        prop_assert_eq!(status, 200, "{}", path);
        prop_assert_eq!(
            response.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        let mut response = response;
        let first = tokio::time::timeout(PROMPTLY, response.chunk())
            .await
            .expect("the stream starts in time")
            .expect("stream")
            .expect("a first chunk");
        prop_assert!(first.starts_with(b"retry: "), "{:?}", first);
    } else {
        prop_assert_eq!(status, 400, "{}", path);
        prop_assert_eq!(
            response.headers().get("content-type").unwrap(),
            "application/problem+json"
        );
        let problem: Value = response.json().await.expect("a problem");
        let kind = problem["type"].as_str().unwrap_or_default();
        prop_assert!(
            problems
                .iter()
                .any(|p| kind == format!("urn:crier:problem:{p}")),
            "{} for {}, expected one of {:?}",
            kind,
            path,
            problems
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The properties, on each store
// ---------------------------------------------------------------------------

fn max_topics(c: &mut Config) {
    c.limits.max_topics_per_subscription = MAX_TOPICS;
}

macro_rules! on_each_store {
    ($($name:ident: $cases:expr, $configure:expr, $strategy:expr, $check:expr;)*) => {
        mod memory {
            use super::*;
            $(
                #[test]
                fn $name() {
                    Hub::start(false, $configure).check($cases, $strategy, $check);
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[test]
                fn $name() {
                    Hub::start(true, $configure).check($cases, $strategy, $check);
                }
            )*
        }
    };
}

on_each_store! {
    any_last_event_id_gets_a_400_or_a_reset_and_exactly_the_retained_events_then_live:
        128, |_: &mut Config| {}, resume_case(), any_last_event_id;
    any_batch_body_is_stored_whole_with_dense_ids_or_refused_with_a_4xx_storing_nothing:
        96, batch_limits, batch_body(), any_batch;
    any_query_string_gets_a_stream_or_a_400_problem_never_a_5xx:
        128, max_topics, query_case(), any_query;
}
