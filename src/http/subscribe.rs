//! `GET /topics/{topic}` and `GET /events?topic=…`: parse where the client
//! wants to start, check who asks, open a subscription, and hand it to its
//! transport: `text/event-stream` (the default; the `Accept` header is not
//! required: `curl -N` users forget it), a WebSocket (`Upgrade: websocket`,
//! `crate::http::websocket`) or a long-poll (`?poll=1`, `Accept:
//! application/json`, `crate::http::poll`). Every transport shares the
//! start positions, the authorization and the limits.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::Response;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::Frame;
use tokio_stream::Stream;

use super::access::credentials;
use super::client_slot::{BodyHoldsSlot, HeldSlot};
use super::request::{VARY_BY_ACCEPT, client_name, parse_topic, redeem_ticket};
use super::websocket::Handshake;
use super::{ApiError, AppState};
use crate::auth::OriginKind;
use crate::coding::negotiate;
use crate::event::{Cursor, Topic};
use crate::limits::ClientKey;
use crate::metrics::BytesWritten;
use crate::server::connection::{Activity, ConnectionHold, StreamActivity};
use crate::store::StoreError;
use crate::subscription::{IdStyle, Start, StreamSettings, Subscription};
use crate::transport::compressed::SharedUnits;
use crate::transport::plain::Plain;

pub async fn topic(
    State(state): State<AppState>,
    Extension(origin): Extension<OriginKind>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    upgrade: Result<Handshake, WebSocketUpgradeRejection>,
    (client, slot, activity, hold): PeerExtensions,
    (method, headers): (Method, HeaderMap),
) -> Result<Response, ApiError> {
    let peer = PeerParts {
        client,
        slot,
        activity,
        hold,
    };
    let topic = parse_topic(path, &state)?;
    let params = Params::parse(query.as_deref(), &state, false)?;
    let transport = Requested::of(&params, &method, &headers, upgrade)?;
    let (metrics, kind) = (state.metrics.clone(), transport.kind());
    open(
        state,
        vec![topic],
        IdStyle::Single,
        params,
        &headers,
        origin,
        transport,
        peer,
    )
    .await
    .inspect_err(|_| metrics.subscribe_refused(kind))
}

pub async fn topics(
    State(state): State<AppState>,
    Extension(origin): Extension<OriginKind>,
    RawQuery(query): RawQuery,
    upgrade: Result<Handshake, WebSocketUpgradeRejection>,
    (client, slot, activity, hold): PeerExtensions,
    (method, headers): (Method, HeaderMap),
) -> Result<Response, ApiError> {
    let peer = PeerParts {
        client,
        slot,
        activity,
        hold,
    };
    let params = Params::parse(query.as_deref(), &state, true)?;
    let mut topics = params.topics.clone();
    topics.sort();
    topics.dedup();
    if topics.is_empty() {
        return Err(ApiError::NoTopic);
    }
    let transport = Requested::of(&params, &method, &headers, upgrade)?;
    let (metrics, kind) = (state.metrics.clone(), transport.kind());
    open(
        state,
        topics,
        IdStyle::Multi,
        params,
        &headers,
        origin,
        transport,
        peer,
    )
    .await
    .inspect_err(|_| metrics.subscribe_refused(kind))
}

/// [`PeerParts`] as extracted.
type PeerExtensions = (
    Option<Extension<ClientKey>>,
    Option<Extension<HeldSlot>>,
    Option<Extension<Arc<Activity>>>,
    Option<Extension<ConnectionHold>>,
);

/// What the accept loop and the limits said about the request's client,
/// and, on HTTP/2, its connection's activity (a WebSocket there counts as
/// an open stream while it lives).
struct PeerParts {
    client: Option<Extension<ClientKey>>,
    slot: Option<Extension<HeldSlot>>,
    activity: Option<Extension<Arc<Activity>>>,
    /// An HTTP/1.1 upgrade's hold on the server's shutdown, kept by the
    /// socket.
    hold: Option<Extension<ConnectionHold>>,
}

/// The transport a subscribe request asks for (unlike `transport::Kind`,
/// its label, it holds the WebSocket handshake). A WebSocket handshake
/// (`Upgrade: websocket`) wins; then a long-poll (`poll=` other than
/// `0`/`false`, or an `Accept` naming `application/json` and not
/// `text/event-stream`); SSE otherwise.
enum Requested {
    Sse,
    Poll,
    WebSocket(Handshake),
}

impl Requested {
    /// Its `transport` label in the metrics.
    fn kind(&self) -> crate::transport::Kind {
        match self {
            Requested::Sse => crate::transport::Kind::Sse,
            Requested::Poll => crate::transport::Kind::LongPoll,
            Requested::WebSocket(_) => crate::transport::Kind::WebSocket,
        }
    }

    fn of(
        params: &Params,
        method: &Method,
        headers: &HeaderMap,
        upgrade: Result<Handshake, WebSocketUpgradeRejection>,
    ) -> Result<Requested, ApiError> {
        // A CONNECT is only ever a WebSocket handshake over HTTP/2.
        let asks_websocket = method == Method::CONNECT
            || headers.get_all(header::UPGRADE).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains("websocket"))
            });
        match upgrade {
            Ok(upgrade) => {
                check_key(method, headers)?;
                return Ok(Requested::WebSocket(upgrade));
            }
            Err(WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_)) if asks_websocket => {
                return Err(ApiError::WebSocketVersion);
            }
            Err(rejection) if asks_websocket => {
                return Err(ApiError::BadUpgrade(rejection.body_text()));
            }
            Err(_) => {}
        }
        if params.poll {
            return Ok(Requested::Poll);
        }
        let accept: Vec<&str> = headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let accept = accept.join(",").to_ascii_lowercase();
        if accept.contains("application/json") && !accept.contains("text/event-stream") {
            return Ok(Requested::Poll);
        }
        Ok(Requested::Sse)
    }
}

/// An HTTP/1.1 handshake's `Sec-WebSocket-Key` must be the base64 of 16
/// bytes (RFC 6455 §4.2.1); a client that sends anything else does not
/// speak the protocol. (Over HTTP/2 there is no key, RFC 8441 §5.)
fn check_key(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    use base64::Engine;
    if method == Method::CONNECT {
        return Ok(());
    }
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let decoded = keys
        .next()
        .map(|key| base64::engine::general_purpose::STANDARD.decode(key.as_bytes()));
    match (decoded, keys.next()) {
        (Some(Ok(key)), None) if key.len() == 16 => Ok(()),
        _ => Err(ApiError::BadUpgrade(
            "Sec-WebSocket-Key is not the base64 of 16 bytes".into(),
        )),
    }
}

/// The query parameters a subscription understands; others are ignored
/// (cache-busters and the like).
struct Params {
    topics: Vec<Topic>,
    last_event_id: Option<String>,
    last: Option<u64>,
    /// A single-use ticket from `POST /tickets`.
    ticket: Option<String>,
    /// `poll=…`: answer as a long-poll.
    poll: bool,
}

impl Params {
    fn parse(query: Option<&str>, state: &AppState, with_topics: bool) -> Result<Params, ApiError> {
        let mut params = Params {
            topics: Vec::new(),
            last_event_id: None,
            last: None,
            ticket: None,
            poll: false,
        };
        let limit = state.config.limits.max_topics_per_subscription;
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "topic" if with_topics => {
                    if params.topics.len() >= limit {
                        return Err(ApiError::TooManyTopics { limit });
                    }
                    let topic = Topic::parse(&value, state.config.limits.max_topic_len).map_err(
                        |reason| ApiError::InvalidTopic {
                            name: value.to_string(),
                            reason,
                        },
                    )?;
                    params.topics.push(topic);
                }
                "ticket" if !value.is_empty() => params.ticket = Some(value.into_owned()),
                "poll" => params.poll = !matches!(&*value, "" | "0" | "false"),
                "lastEventId" if !value.is_empty() => {
                    params.last_event_id = Some(value.into_owned())
                }
                "last" => {
                    let n = value.parse().map_err(|_| ApiError::InvalidParameter {
                        name: "last",
                        reason: format!("`{value}` is not a non-negative integer"),
                    })?;
                    params.last = Some(n);
                }
                _ => {}
            }
        }
        Ok(params)
    }
}

/// `Last-Event-ID` (sent by EventSource on reconnect) wins over the
/// `lastEventId` parameter (which the reconnecting URL still carries), which
/// wins over `last=N`.
fn start(params: &Params, headers: &HeaderMap, topics: usize) -> Result<Start, ApiError> {
    let header = match headers.get("last-event-id") {
        Some(value) => {
            let value = value.to_str().map_err(|_| ApiError::InvalidPosition {
                source_name: "Last-Event-ID header",
                reason: crate::event::InvalidCursor { expected: topics },
            })?;
            (!value.trim().is_empty()).then_some(value.trim())
        }
        None => None,
    };
    let (text, source_name) = match (header, &params.last_event_id) {
        (Some(h), _) => (h, "Last-Event-ID header"),
        (None, Some(p)) => (p.as_str(), "lastEventId parameter"),
        (None, None) => return Ok(params.last.map_or(Start::Now, Start::Last)),
    };
    Cursor::parse(text, topics)
        .map(Start::After)
        .map_err(|reason| ApiError::InvalidPosition {
            source_name,
            reason,
        })
}

#[allow(clippy::too_many_arguments)]
async fn open(
    state: AppState,
    topics: Vec<Topic>,
    style: IdStyle,
    params: Params,
    request_headers: &HeaderMap,
    origin: OriginKind,
    transport: Requested,
    peer: PeerParts,
) -> Result<Response, ApiError> {
    let start = start(&params, request_headers, topics.len())?;
    let given = match &start {
        Start::After(cursor) => Some(cursor.to_string()),
        Start::Now | Start::Last(_) => None,
    };
    let expires = authorize(&state, &topics, &params, request_headers, origin).await?;
    let mut subscription =
        Subscription::open(&state.hub, state.store.clone(), topics, style, start);
    // Answer once live delivery is confirmed and the start is fixed, so that
    // everything published after the client sees the headers reaches it. If
    // the store is slow or down, answer anyway: the stream keeps retrying and
    // sends heartbeats meanwhile. A store that refuses the work will refuse
    // it again: that is the answer.
    match tokio::time::timeout(PREPARE_WAIT, subscription.prepare()).await {
        Ok(Ok(())) => {}
        Ok(Err(error @ StoreError::Rejected(_))) => return Err(error.into()),
        Ok(Err(error)) => tracing::warn!(%error, "subscribing while the store is unavailable"),
        Err(_) => tracing::warn!("subscribing while the store is slow"),
    }
    let settings = StreamSettings {
        heartbeat: state.config.transports.heartbeat,
        retry: state.config.transports.retry,
        shutdown: state.shutdown.clone(),
        drain: state.drain.clone(),
        expires: expires.map(instant_of),
    };
    match transport {
        Requested::Sse => {}
        Requested::Poll => {
            // Boxed: the long-poll holds a whole event stream while it
            // waits, and inline that would size every subscribe request's
            // future (an SSE stream's too) for it. Measured: ~1.5 KB less
            // resident memory per idle SSE connection (BENCHMARKS, "Memory
            // per idle plain connection").
            let codec = negotiate(
                request_headers.get(header::ACCEPT_ENCODING),
                &state.config.transports.codecs(),
            );
            let answer = super::poll::answer(&state, subscription, settings, given, codec);
            return Ok(Box::pin(answer).await);
        }
        Requested::WebSocket(upgrade) => {
            let credentials = credentials(request_headers, origin, &state.config.auth_cookie);
            let publisher = state
                .auth
                .publisher(&credentials)
                .map_err(|error| ApiError::from(error).problem());
            let client = client_name(peer.client);
            let socket = super::websocket::Socket::new(
                state.clone(),
                publisher,
                client,
                peer.slot.map(|Extension(slot)| slot),
                peer.activity.map(|Extension(activity)| activity.open()),
                peer.hold.map(|Extension(hold)| hold),
            );
            return Ok(super::websocket::upgrade(
                upgrade,
                subscription,
                settings,
                socket,
            ));
        }
    }
    let codec = negotiate(
        request_headers.get(header::ACCEPT_ENCODING),
        &state.config.transports.codecs(),
    );
    let holds = Holds {
        written: state.metrics.written(crate::transport::Kind::Sse, codec),
        _slot: peer.slot.map(|Extension(slot)| slot),
        activity: peer.activity.map(|Extension(activity)| activity.open()),
    };
    // Compressed streams write the units the hub compressed once per event
    // (single-topic streams also its chained ones).
    let body = match codec {
        Some(shared) => {
            let wire = SharedUnits::new(shared, style == IdStyle::Single);
            event_body(subscription.into_stream(settings, wire), holds)
        }
        None => event_body(subscription.into_stream(settings, Plain::default()), holds),
    };
    let mut response = Response::new(body);
    response.extensions_mut().insert(BodyHoldsSlot);
    let headers = response.headers_mut();
    if let Some(codec) = codec {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(codec.token()),
        );
    }
    headers.insert(header::VARY, VARY_BY_ACCEPT);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    // A proxy that recompressed (or decoded) a compressed stream would
    // buffer it: `no-transform` asks it to pass the bytes through.
    let cache_control = match codec {
        Some(_) => "no-cache, no-transform",
        None => "no-cache",
    };
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// What an event stream's body holds besides the stream.
struct Holds {
    /// Bytes are counted as written, after compression: one relaxed add per
    /// write on a counter resolved once per stream.
    written: BytesWritten,
    /// The request's share of its client's cap, released when the stream
    /// ends (its body is dropped).
    _slot: Option<HeldSlot>,
    /// On HTTP/2: the stream's share of its connection's activity, told
    /// each time the connection asks for more (a starved stream is never
    /// asked).
    activity: Option<StreamActivity>,
}

pin_project_lite::pin_project! {
    /// An event stream's response body: the stream, with what it holds and
    /// the request's span, in one object the connection polls directly.
    /// Nothing wraps it on its way out (`HoldStream` sees
    /// [`BodyHoldsSlot`], and the trace does not wrap bodies), so an event
    /// crosses one boxed body to reach its stream, not one per layer.
    struct EventBody<S> {
        #[pin]
        stream: S,
        holds: Holds,
        // The request's span, the parent of the stream's last log line.
        // Not entered on every poll: entering costs the log filter a
        // lookup under a lock all streams share, per event per subscriber
        // (the stream's own log lines name the span themselves).
        span: tracing::Span,
        opened: std::time::Instant,
    }
}

/// `stream` as an event stream's response body.
fn event_body<S>(stream: S, holds: Holds) -> Body
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    Body::new(EventBody {
        stream,
        holds,
        span: tracing::Span::current(),
        opened: std::time::Instant::now(),
    })
}

impl<S> hyper::body::Body for EventBody<S>
where
    S: Stream<Item = std::io::Result<Bytes>>,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.project();
        if let Some(activity) = &this.holds.activity {
            activity.polled();
        }
        match std::task::ready!(this.stream.poll_next(cx)) {
            Some(Ok(bytes)) => {
                this.holds.written.add(bytes.len());
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error))),
            None => {
                let stream_duration_ms = this.opened.elapsed().as_millis() as u64;
                let span: &tracing::Span = this.span;
                tracing::debug!(parent: span, stream_duration_ms, "end of stream");
                Poll::Ready(None)
            }
        }
    }
}

/// Decides whether the request may read `topics`, by ticket or token, and
/// returns when its access ends (seconds since the Unix epoch).
async fn authorize(
    state: &AppState,
    topics: &[Topic],
    params: &Params,
    headers: &HeaderMap,
    origin: OriginKind,
) -> Result<Option<u64>, ApiError> {
    let auth = &state.auth;
    if auth.all_public(topics) {
        return Ok(None);
    }
    if let Some(presented) = &params.ticket {
        let record = redeem_ticket(state, presented).await?;
        return Ok(auth.by_ticket(record, topics)?);
    }
    let credentials = credentials(headers, origin, &state.config.auth_cookie);
    Ok(auth.subscriber(&credentials, topics)?)
}

/// The moment a Unix time (in seconds) comes, on the runtime's clock. A
/// token valid for more than a year is treated as valid for a year (the
/// stream then asks for new credentials), so no deadline overflows.
pub(crate) fn instant_of(unix_seconds: u64) -> tokio::time::Instant {
    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
    let left = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_secs(unix_seconds))
        .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
        .map_or(std::time::Duration::ZERO, |left| left.min(YEAR));
    tokio::time::Instant::now() + left
}

/// How long a subscribe request waits for the store before it answers
/// anyway.
pub(crate) const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
