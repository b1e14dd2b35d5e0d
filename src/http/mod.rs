//! The HTTP face of the hub: thin axum handlers that parse a request into
//! domain types, call the store or open a subscription, and map the result.
//!
//! Thin axum handlers. `mod.rs` builds the router (`app()`), compression of
//! JSON answers (the layer wraps only those handlers, not streams); around
//! every route it puts one stack of plain tower services (not `from_fn`
//! middleware, nor a `Router::layer` per layer: both box and clone per
//! request, and stream setup is the request a reconnect storm makes thousands
//! of times a second): `trace.rs`, each request's span (method and path only:
//! a query string may hold a ticket) and its answer's log line with the
//! refusal's problem type (`/readyz` logs its own changes of state instead,
//! through `ReadyzLog` in `http/mod.rs`), without wrapping bodies; then
//! `edge.rs`, the first thing every request passes (the `Origin` check of
//! `access.rs`, 403 before any work; on the way back, refusals counted by
//! reason and `Connection: close` on refused requests with a body), then
//! CORS, then `client_slot.rs`. `AppState` is one `Arc`, so cloning it per request
//! costs one reference count. `access.rs` holds the `Origin` check, CORS from
//! the same list, and reading a request's bearer token and cookie;
//! `client_slot.rs` names the request's client and holds its slot among the
//! client's concurrent requests in the response body, so an event stream
//! counts until it really ends (an event stream's body holds it itself, see
//! `subscribe.rs`); `publish.rs` checks the publisher's token and rate before
//! reading the body, reads it within `--body-timeout` copying each piece (a
//! piece may pin hyper's whole read buffer), validates it, checks grants for
//! every topic, and calls `Store::append`, or `Store::append_once` when an
//! event carries an `Idempotency-Key` (scoped to the token's subject, hashed;
//! a replay is answered `201` with `Idempotent-Replayed: true`); `tickets.rs`
//! trades a token for a ticket kept by the store; `metrics.rs` serves `GET
//! /metrics` (on the main listener behind a token granting `metrics` when
//! tokens are configured, or alone on the `--metrics-listen` listener,
//! `metrics_app()`, without a token) (refused requests are counted by the
//! reason `error.rs` attaches to their answer, in `edge.rs`); `subscribe.rs`
//! parses topics and the start position (`Last-Event-ID` > `lastEventId` >
//! `last=N` > now) and the transport (WebSocket handshake > `poll=` >
//! `Accept: application/json` > SSE), authorizes by ticket or token (public
//! topics need neither), waits (briefly) for the subscription to be prepared,
//! then hands it to its transport: for SSE it negotiates compression and
//! returns the stream with SSE headers, as an `EventBody`: the stream, the
//! byte count, the limits slot, the HTTP/2 activity guard and the request's
//! span (not entered per poll: the stream's log lines name it) in one object
//! that nothing wraps, so an event crosses one boxed body between the
//! connection and its stream; `poll.rs` runs the subscription until its first
//! entries (or `--poll-timeout`) and answers them as JSON, compressed whole
//! in the negotiated coding; `websocket.rs` answers the handshake and serves
//! the socket (frames out, pings with a pong deadline of one heartbeat,
//! `publish` frames in through `publish.rs`'s `item_event` and `store_one`,
//! the same checks and store path as an HTTP publish, acked or refused per
//! frame; a bad frame closes the socket), holding the request's limits slot
//! (`HeldSlot`) and, over HTTP/1.1, its connection's `ConnectionHold` until
//! it closes, and over HTTP/2 (an extended CONNECT, which the HTTP/2 builder
//! enables) its stream's `Activity` guard, noted polled after each write;
//! `error.rs` is the single place errors become problem+json. Handlers never
//! touch a lock or a socket directly.

mod access;
mod client_slot;
mod dispatch;
mod edge;
mod error;
mod metrics;
mod poll;
pub(crate) mod publish;
pub(crate) mod request;
pub(crate) mod subscribe;
mod tickets;
mod trace;
mod websocket;

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;

pub use error::ApiError;
pub use metrics::metrics_app;

use crate::auth::Auth;
use crate::coding::Codec;
use crate::config::{Config, LimitsConfig, TransportsConfig};
use crate::hub::Hub;
use crate::store::{Store, StoreError};

/// Everything a handler may touch: a handle, one reference count to clone.
/// Handlers and layers clone it for every request (axum's extractors and
/// services take it by value), so a clone of each part here would be a
/// reference count (or a lock, for the cancellation tokens) per part, many
/// times per request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] hands out.
pub struct Shared {
    pub hub: Hub,
    pub store: Arc<dyn Store>,
    /// The settings handlers read, and no others.
    pub config: HandlerConfig,
    /// Who may publish and read; checked before any store work.
    pub auth: Arc<Auth>,
    /// Caps and rates per client.
    pub limits: Arc<crate::limits::Limits>,
    /// Cancelled when the process shuts down; every open stream ends then.
    pub shutdown: CancellationToken,
    /// Begun on SIGTERM: readiness fails, streams close spread over time.
    pub drain: crate::drain::Drain,
    /// This hub's metrics (its own recorder, not a process-wide one).
    pub metrics: crate::metrics::Metrics,
    /// What `/readyz` last answered, so a change is logged once.
    pub readiness: ReadyzLog,
}

/// What the handlers read of the configuration: two areas whole, and four
/// settings of others. The listener's, the stores' and the drain's settings
/// go to those alone, so a handler cannot come to depend on them.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Sizes and times of requests: bodies, batches, topics.
    pub limits: LimitsConfig,
    /// Heartbeat, retry hint, long-poll wait, codecs, permessage-deflate.
    pub transports: TransportsConfig,
    /// The cookie a browser's token may come in (`--auth-cookie`).
    pub auth_cookie: String,
    /// How long an idempotency key's record is kept (`--idempotency-window`).
    pub idempotency_window: std::time::Duration,
    /// How long `/readyz` waits for the store (`--redis-timeout`).
    pub readiness_timeout: std::time::Duration,
    /// `/metrics` is served on its own listener (`--metrics-listen`), not
    /// on the main one.
    pub metrics_elsewhere: bool,
}

impl HandlerConfig {
    /// The handlers' part of `config`.
    pub fn of(config: &Config) -> HandlerConfig {
        HandlerConfig {
            limits: config.limits.clone(),
            transports: config.transports.clone(),
            auth_cookie: config.access.auth_cookie.clone(),
            idempotency_window: config.storage.idempotency_window,
            readiness_timeout: config.redis.timeout,
            metrics_elsewhere: config.observability.metrics_listen.is_some(),
        }
    }
}

/// The last answer of `/readyz`: `None` ready, else the problem type. A
/// load balancer probes every few seconds; the log says when the answer
/// changes, at WARN when it turns unready, not at ERROR on every probe.
#[derive(Debug, Default)]
pub struct ReadyzLog(std::sync::Mutex<Option<&'static str>>);

impl ReadyzLog {
    fn observe(&self, answer: Result<(), &ApiError>) {
        let now = answer.err().map(ApiError::problem_kind);
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *last == now {
            return;
        }
        *last = now;
        match answer {
            Ok(()) => tracing::info!("ready: /readyz answers 200 again"),
            Err(error) => tracing::warn!(
                problem = error.problem_kind(),
                %error,
                "not ready: /readyz answers 503 until this changes"
            ),
        }
    }
}

/// Marks a readiness probe's answer, which the request log leaves to
/// [`ReadyzLog`].
#[derive(Debug, Clone, Copy)]
struct Probe;

/// Builds the whole router. `main` serves it; tests serve the very same.
pub fn app(state: AppState) -> Router {
    app_with(state, None)
}

/// [`app`], with gRPC calls sent to `grpc` (`crate::grpc::routes`) once
/// traced, ahead of every other HTTP layer: Origin checks and CORS are for
/// browsers.
pub fn app_with(state: AppState, grpc: Option<Router>) -> Router {
    let cors = access::cors_layer(state.auth.origins());
    // JSON and HTML answers are compressed by tower-http; event streams
    // compress themselves, flushing per chunk. The layer wraps only the
    // handlers whose answers it compresses: around a stream its body
    // wrapper would cost every open connection several KiB for nothing.
    let codecs = state.config.transports.codecs();
    let compression = CompressionLayer::new()
        .zstd(codecs.contains(&Codec::Zstd))
        .br(codecs.contains(&Codec::Brotli))
        .gzip(codecs.contains(&Codec::Gzip))
        .no_deflate();
    let router = Router::new()
        .route(
            "/",
            get(index.layer(compression.clone())).fallback(not_allowed("GET, HEAD")),
        )
        .route("/healthz", get(healthz).fallback(not_allowed("GET, HEAD")))
        .route("/readyz", get(readyz).fallback(not_allowed("GET, HEAD")))
        .route(
            "/topics/{topic}",
            get(subscribe::topic)
                // A WebSocket over HTTP/2 opens with an extended CONNECT.
                .connect(subscribe::topic)
                .post(publish::one.layer(compression.clone()))
                .fallback(not_allowed("GET, POST")),
        )
        .route(
            "/events",
            get(subscribe::topics)
                .connect(subscribe::topics)
                .post(publish::batch.layer(compression.clone()))
                .fallback(not_allowed("GET, POST")),
        )
        .route(
            "/tickets",
            axum::routing::post(tickets::create.layer(compression.clone()))
                .fallback(not_allowed("POST")),
        )
        .route(
            "/crier.js",
            get(browser_helper).fallback(not_allowed("GET, HEAD")),
        )
        .route(
            "/metrics",
            get(metrics::scrape.layer(compression)).fallback(not_allowed("GET, HEAD")),
        )
        .fallback(not_found)
        .with_state(state.clone());
    // One layer, a stack of plain services. Each `Router::layer` wraps every
    // route in a boxed service of its own, and a call clones the boxed
    // stack beneath it, so layers added one by one cost clones and boxes
    // per request in the square of their number.
    router.layer(
        ServiceBuilder::new()
            .layer(trace::TraceLayer)
            // gRPC calls get their span and log line, and none of the
            // layers below (Origin, CORS, HTTP limits): they have their own.
            .layer(dispatch::DispatchLayer(grpc))
            // The origin check comes before CORS, so a foreign origin's
            // preflight is refused like any of its requests rather than
            // answered.
            .layer(edge::EdgeLayer(state.clone()))
            .layer(cors)
            .layer(client_slot::HoldStreamLayer(state)),
    )
}

fn not_allowed(allow: &'static str) -> MethodRouter<AppState> {
    axum::routing::any(move |method: Method| async move {
        ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow,
        }
    })
}

async fn not_found(uri: Uri) -> ApiError {
    let path = uri.path();
    match nearest_path(path) {
        Some(near) => ApiError::NotFound(format!("{path} (did you mean {near}?)")),
        None => ApiError::NotFound(path.to_owned()),
    }
}

/// The real path a mistyped one most likely meant (`/topic/news` →
/// `/topics/news`, `/event` → `/events`): its first segment within two
/// edits of a route's, ignoring case. `None` when nothing is that near.
fn nearest_path(path: &str) -> Option<String> {
    const ROUTES: [&str; 7] = [
        "events", "tickets", "healthz", "readyz", "metrics", "crier.js", "topics",
    ];
    let trimmed = path.trim_start_matches('/');
    let (first, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let first = first.to_ascii_lowercase();
    let route = ROUTES
        .iter()
        .map(|route| (edits(&first, route), *route))
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)?
        .1;
    let rest = rest.trim_matches('/');
    match route {
        "topics" if rest.is_empty() || rest.contains('/') => Some("/topics/{topic}".to_owned()),
        "topics" => Some(format!("/topics/{rest}")),
        "events" if !rest.is_empty() && !rest.contains('/') => {
            Some(format!("/events?topic={rest}"))
        }
        _ if rest.is_empty() && first != route => Some(format!("/{route}")),
        _ if rest.is_empty() => None,
        _ => Some(format!("/{route}")),
    }
}

/// Levenshtein distance between two short ASCII strings.
fn edits(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// The live demo page; compiled in so the binary is all a user needs.
async fn index(headers: HeaderMap) -> Response {
    static FILE: LazyLock<CompiledFile> = LazyLock::new(|| {
        CompiledFile::new(
            "text/html; charset=utf-8",
            include_str!("../../static/index.html"),
        )
    });
    FILE.answer(&headers)
}

/// The browser helper (an ES module) that subscribes with tickets and
/// rides out expiry and restarts.
async fn browser_helper(headers: HeaderMap) -> Response {
    static FILE: LazyLock<CompiledFile> = LazyLock::new(|| {
        CompiledFile::new(
            "text/javascript; charset=utf-8",
            include_str!("../../static/crier.js"),
        )
    });
    FILE.answer(&headers)
}

/// A file compiled into the binary. Browsers revalidate it on every use
/// (`no-cache`: a new crier may serve a new helper at the same URL) and
/// get `304` while it is unchanged. The tag is weak: the compression
/// layer may send the same file in several codings.
struct CompiledFile {
    content_type: &'static str,
    body: &'static str,
    etag: HeaderValue,
}

impl CompiledFile {
    fn new(content_type: &'static str, body: &'static str) -> CompiledFile {
        let digest = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
        let hex: String = digest.as_ref()[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        CompiledFile {
            content_type,
            body,
            etag: HeaderValue::from_str(&format!("W/\"{hex}\"")).expect("a hex tag"),
        }
    }

    fn answer(&self, request: &HeaderMap) -> Response {
        let ours = self.etag.as_bytes().trim_ascii_start();
        let ours = ours.strip_prefix(b"W/").unwrap_or(ours);
        let unchanged = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(|tag| {
                let tag = tag.trim_ascii();
                tag.strip_prefix(b"W/").unwrap_or(tag)
            })
            .any(|tag| tag == b"*" || tag == ours);
        let headers = [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::ETAG, self.etag.clone()),
        ];
        if unchanged {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        let content_type = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        )];
        (headers, content_type, self.body).into_response()
    }
}

/// Liveness: the process serves HTTP. Never cached: a cached answer
/// would say nothing about the process now.
async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        r#"{"status":"ok"}"#,
    )
}

/// Readiness: the node is not draining, and the store can be reached and
/// its live feed flows (see `Store::check`), so publishes will be stored and
/// subscribers served.
async fn readyz(State(state): State<AppState>) -> axum::response::Response {
    let answer = ready(&state).await;
    state.readiness.observe(answer.as_ref().map(|_| ()));
    let mut response = match answer {
        Ok(()) => healthz().await.into_response(),
        Err(error) => error.into_response(),
    };
    response.extensions_mut().insert(Probe);
    response
}

/// Why the node is not ready, if it is not (what `/readyz` and gRPC's
/// health service answer).
pub async fn ready(state: &AppState) -> Result<(), ApiError> {
    if state.drain.is_draining() {
        return Err(ApiError::Draining);
    }
    let timeout = state.config.readiness_timeout;
    match tokio::time::timeout(timeout, state.store.check()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(StoreError::Unavailable("the store did not answer in time".into()).into()),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{HandlerConfig, nearest_path};
    use crate::config::Cli;

    #[test]
    fn handlers_get_the_settings_they_read_from_the_flags_that_set_them() {
        let cli = Cli::parse_from([
            "crier",
            "--auth-cookie",
            "pass",
            "--idempotency-window",
            "7m",
            "--redis-timeout",
            "3s",
            "--metrics-listen",
            "127.0.0.1:9100",
            "--max-event-bytes",
            "1234",
            "--poll-timeout",
            "9s",
        ]);
        let config = HandlerConfig::of(&cli.serve);
        assert_eq!(config.auth_cookie, "pass");
        assert_eq!(config.idempotency_window.as_secs(), 420);
        assert_eq!(config.readiness_timeout.as_secs(), 3);
        assert!(config.metrics_elsewhere);
        assert_eq!(config.limits.max_event_bytes, 1234);
        assert_eq!(config.transports.poll_timeout.as_secs(), 9);
        let defaults = HandlerConfig::of(&Cli::parse_from(["crier"]).serve);
        assert!(!defaults.metrics_elsewhere);
        assert_ne!(defaults.auth_cookie, "pass");
    }

    #[test]
    fn a_mistyped_path_is_answered_with_the_real_one() {
        let near = |p: &str| nearest_path(p);
        assert_eq!(near("/topic/news").as_deref(), Some("/topics/news"));
        assert_eq!(near("/Topics/news/").as_deref(), Some("/topics/news"));
        assert_eq!(near("/topics").as_deref(), Some("/topics/{topic}"));
        assert_eq!(near("/event").as_deref(), Some("/events"));
        assert_eq!(near("/health").as_deref(), Some("/healthz"));
        assert_eq!(near("/crier.jss").as_deref(), Some("/crier.js"));
        assert_eq!(near("/events/news").as_deref(), Some("/events?topic=news"));
        assert_eq!(near("/healthz/x").as_deref(), Some("/healthz"));
        assert_eq!(near("/wp-admin.php"), None);
        assert_eq!(near("/"), None);
    }
}
